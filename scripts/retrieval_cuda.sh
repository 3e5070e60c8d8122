#!/usr/bin/env bash
# One (attention, task) of the GPU retrieval comparison (issue 12 item 7), run on the H200 device:
#   BENCH_COMMIT=<sha of the tree sent> ATTENTION=nsa TASK=needle bash scripts/retrieval_cuda.sh
# (BENCH_COMMIT labels the rows: the device's copy of the tree may hold an older git HEAD than its files.)
# after installing the wheels of scripts/cuda_wheels.sh (see README "Training and evaluation"). At most
# train.max_minutes (7.5) of training, then the evaluation; appends its rows to bench/results/retrieval_cuda.jsonl,
# keeps the report's plots in bench/results/retrieval_cuda_plots/, rewrites bench/results/retrieval_cuda.md and
# copies all three and the log to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ATTENTION:?set ATTENTION to dense, window, nsa or scope}"
TASK="${TASK:-needle}"
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
timeout 580 python3 -m scripts.compare experiment=cuda_16k --attention-variant 16k --attentions "$ATTENTION" \
    --tasks "$TASK" --jobs 1 --threads 8 --out-dir runs/cuda16k --results bench/results/retrieval_cuda "$@" \
    2>&1 | tee "$out/retrieval_${ATTENTION}_${TASK}.log"
cp -r bench/results/retrieval_cuda.jsonl bench/results/retrieval_cuda.md bench/results/retrieval_cuda_plots "$out"/
