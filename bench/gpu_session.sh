#!/usr/bin/env bash
# What one device session runs: GPU tests, then the benchmarks; results land in $OUT (and bench/results).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 -m bench.bench_decode --device cuda --skip-reads --profile 2>&1 | tee "$OUT/bench_decode.log"
python3 -m bench.bench_reference --device cuda --seq-lens 8192 65536 2>&1 | tee "$OUT/bench_reference.log"
python3 -m bench.bench_reference --device cuda --seq-lens 8192 --backward 2>&1 | tee -a "$OUT/bench_reference.log"
cp bench/results/*cuda* "$OUT/"
