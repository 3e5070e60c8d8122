#!/usr/bin/env bash
# Runs of the GPU retrieval comparison (issue 12 item 7) on the H200 device, one (attention, task) or several
# side by side (JOBS, below; per-attention overrides as '<kind>:key=value', e.g. nsa:train.max_steps=1000):
#   BENCH_COMMIT=<sha of the tree sent> ATTENTION=nsa TASK=needle bash scripts/retrieval_cuda.sh
# (BENCH_COMMIT labels the rows: the device's copy of the tree may hold an older git HEAD than its files.)
# after installing the wheels of scripts/cuda_wheels.sh (see README "Training and evaluation"). At most
# train.max_minutes (7.5) of training, then the evaluation; appends its rows to bench/results/retrieval_cuda.jsonl,
# keeps the report's plots in bench/results/retrieval_cuda_plots/, rewrites bench/results/retrieval_cuda.md and
# copies both files, this call's plots and the log to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ATTENTION:?set ATTENTION to dense, window, nsa or scope}"
TASK="${TASK:-needle}"
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
# JOBS > 1 trains that many of the comma-separated attentions side by side on the one GPU, splitting the host's 16
# cores between them. They share the GPU by time slices (each runs slower than alone and still stops at
# train.max_minutes): plan their steps for the sum of their step times.
jobs="${JOBS:-1}"
started="$(mktemp)"
timeout 580 python3 -m scripts.compare experiment=cuda_16k --attention-variant 16k --attentions "$ATTENTION" \
    --tasks "$TASK" --jobs "$jobs" --threads $((16 / jobs)) --ddp-attentions "" --out-dir runs/cuda16k \
    --results bench/results/retrieval_cuda "$@" 2>&1 | tee "$out/retrieval_${ATTENTION//,/-}_${TASK//,/-}.log"
cp bench/results/retrieval_cuda.jsonl bench/results/retrieval_cuda.md "$out"/
mkdir -p "$out/retrieval_cuda_plots"  # this call's plots only: the device returns a limited number of files
find bench/results/retrieval_cuda_plots -name '*.png' -newer "$started" -exec cp {} "$out/retrieval_cuda_plots/" \;
