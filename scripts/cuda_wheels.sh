#!/usr/bin/env bash
# Wheels the H200 image lacks (its Python 3.12 has torch, triton, einops, matplotlib, tqdm, PyYAML, but not
# hydra-core, omegaconf, antlr4 4.9, pydantic or fla-core, the public anchor of bench_prefill), downloaded here into
# .whl/ (git-ignored locally) for `carry: [".whl"]` on the device. One version of each: pip refuses two.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
    typing-inspection==0.4.2 typing-extensions==4.16.0 fla-core==0.6.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # an sdist only: built here (pure Python)
ls .whl
