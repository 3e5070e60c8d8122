#!/usr/bin/env bash
# What one device session runs: GPU tests, then the benchmarks; results land in $OUT (and bench/results).
# Test failures do not stop the benchmarks (their numbers are still worth having); the script exits
# non-zero at the end if any test failed.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
TESTS=${TESTS:-tests/}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
tests_status=0
python3 -m pytest -q -m gpu -p no:cacheprovider $TESTS >"$OUT/gpu_tests.log" 2>&1 || tests_status=$?
tail -n 30 "$OUT/gpu_tests.log"
python3 -m bench.bench_decode --device cuda --skip-reads --profile 2>&1 | tee "$OUT/bench_decode.log"
cp bench/results/*cuda* "$OUT/"
exit "$tests_status"
