#!/usr/bin/env bash
# What one device session runs: GPU tests, then the benchmarks; results land in $OUT (and bench/results).
# Test failures do not stop the benchmarks (their numbers are still worth having); the script exits
# non-zero at the end if any test failed. PARTS picks what runs (default: all of "tests nsa scope").
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
PARTS=${PARTS:-tests nsa scope}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
tests_status=0
if [[ " $PARTS " == *" tests "* ]]; then
    # -x and a timeout: a hung compile must not eat the whole device call (it once did).
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/ \
        >"$OUT/gpu_tests.log" 2>&1 || tests_status=$?
    tail -n 30 "$OUT/gpu_tests.log"
fi
if [[ " $PARTS " == *" nsa "* ]]; then
    timeout 150 python3 -m bench.bench_decode --device cuda --skip-reads --profile 2>&1 | tee "$OUT/bench_decode.log"
    cp bench/results/decode_cuda.* "$OUT/"
fi
if [[ " $PARTS " == *" scope "* ]]; then
    # Target row (score_mod bias, 32k-128k), then what the bias and the pointers each cost at 128k.
    # First compiles of flex fwd+bwd with the spectral score_mod take minutes: give this part its own call.
    timeout 540 python3 -m bench.bench_scope --device cuda --results-dir "$OUT" 2>&1 | tee "$OUT/bench_scope.log"
    timeout 300 python3 -m bench.bench_scope --device cuda --seq-lens 131072 --bias-impls qk_aug none \
        --module-seq-lens --max-seconds 120 --results-dir "$OUT" 2>&1 | tee -a "$OUT/bench_scope.log"
fi
exit "$tests_status"
