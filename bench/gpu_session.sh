#!/usr/bin/env bash
# What one device session runs: GPU tests, then the benchmarks; results land in $OUT (and bench/results).
# Test failures do not stop the benchmarks (their numbers are still worth having); the script exits
# non-zero at the end if any test failed. PARTS picks what runs (default "tests prefill nsa scope"; "tiles",
# "gpt" and "ab" on request).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
PARTS=${PARTS:-tests prefill nsa scope}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
tests_status=0
if [[ " $PARTS " == *" tests "* ]]; then
    # Compiles dominate (serially the suite ran past 9 minutes on the H200): 8 xdist workers share the GPU, each
    # compiling with one inductor thread (inductor's own compile pools under 8 workers stalled past 470 s). The
    # one slow-compiling case is marked slow (tests/test_scope_gpu.py). A timeout: a hung compile must not eat
    # the whole device call.
    workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n 8 --dist load)
    # -v: each test's outcome is logged as it ends, so a suite cut short by the timeout still names its failures.
    TORCHINDUCTOR_COMPILE_THREADS=1 timeout "${TEST_TIMEOUT:-470}" python3 -m pytest -v -m "gpu and not slow" \
        -p no:cacheprovider "${workers[@]}" --timeout 400 --durations=30 tests/ >"$OUT/gpu_tests.log" 2>&1 \
        || tests_status=$?
    grep -E "(FAILED|ERROR) " "$OUT/gpu_tests.log" | tail -n 20 || echo "no test failed before the log ends"
    tail -n 5 "$OUT/gpu_tests.log"
fi
if [[ " $PARTS " == *" prefill "* ]]; then
    # NSA prefill/training (issue 11): the public shape at every length first (the targets), then the other shapes
    # at 64k, the module (with its operator table beside the dense module's) and the GPT. fla's rows need its wheel:
    # carry .whl and install it (CLAUDE.md).
    timeout "${PREFILL_TIMEOUT:-400}" python3 -m bench.bench_prefill --device cuda --parts check kernels layer module gpt \
        --seq-lens 131072 65536 32768 16384 8192 4096 262144 524288 --other-shape-lens 65536 --results-dir "$OUT" \
        --module-profile --max-seconds 300 2>&1 | tee "$OUT/bench_prefill.log" || echo "bench_prefill exited with $?"
    # ANCHORS.md's batch that fills the GPU: 8 sequences per call at the short lengths (64k tokens at 8k)
    timeout "${PREFILL_BATCH_TIMEOUT:-150}" python3 -m bench.bench_prefill --device cuda --parts check layer \
        --shapes public --seq-lens 8192 4096 --batch 8 --results-dir "$OUT" 2>&1 | tee -a "$OUT/bench_prefill.log" \
        || echo "bench_prefill --batch 8 exited with $?"
fi
if [[ " $PARTS " == *" tiles "* ]]; then
    # Tile candidates of the range, top-n and selection kernels at 64k (bench_prefill.tile_variants, the defaults first),
    # each checked against the default tiles' result before it is timed, on independent queries and on queries that
    # share 90% of their variance within 64-token spans (neighbours select overlapping blocks): the next defaults of
    # nsa/kernels (only on request: PARTS=tiles; TILE_SHAPES, TILE_LOCALITIES pick the shapes, "gpt" being the 4-layer
    # GPT's G = 2 attention, "g4_paper" G = 4 at d_k = 192; TILE_FIELDS the kernels, e.g. "cmp_tiles win_tiles";
    # TILE_MATCH only the candidates whose repr holds one of its '|'-separated texts, e.g. "dkv_n=64" or
    # ", rows=64,|, rows=128,", beside the defaults; TILE_SKIP none whose repr holds one of its texts;
    # KERNEL_LEN the tokens, 65536 unless given; TILE_TIMEOUT
    # seconds: each candidate in a child process, one that hangs or faults gets an error row and the sweep goes on).
    matches=()
    [[ -z "${TILE_MATCH:-}" ]] || { IFS='|' read -r -a texts <<< "$TILE_MATCH"; matches=(--tile-match "${texts[@]}"); }
    [[ -z "${TILE_SKIP:-}" ]] || { IFS='|' read -r -a texts <<< "$TILE_SKIP"; matches+=(--tile-skip "${texts[@]}"); }
    # shellcheck disable=SC2086  # lists of shapes, localities and fields
    timeout "${TILES_TIMEOUT:-400}" python3 -m bench.bench_prefill --device cuda --parts tiles \
        --tile-shapes ${TILE_SHAPES:-public g4 gpt} --tile-localities ${TILE_LOCALITIES:-0 0.9} \
        --tile-fields ${TILE_FIELDS:-cmp_tiles win_tiles topn_tiles sel_tiles} "${matches[@]}" \
        ${TILE_TIMEOUT:+--tile-timeout "$TILE_TIMEOUT"} ${KERNEL_LEN:+--kernel-len "$KERNEL_LEN"} \
        --results-dir "$OUT" --name prefill_tiles_cuda 2>&1 | tee "$OUT/bench_prefill_tiles.log" || echo "bench_prefill tiles exited with $?"
fi
if [[ " $PARTS " == *" gpt "* ]]; then
    # The 4-layer GPT's training tokens/s, NSA and dense, eager (one step's operator table per model, then the
    # median of three fresh processes: the eager NSA step at 16k is host-bound and varies between processes, so the
    # median's rows come last and are the ones the report reads) and both under torch.compile (only on request:
    # PARTS=gpt).
    timeout "${GPT_PROFILE_TIMEOUT:-120}" python3 -m bench.bench_prefill --device cuda --parts gpt --gpt-lens 16384 \
        --gpt-profile --results-dir "$OUT" 2>&1 | tee "$OUT/bench_gpt.log" || echo "bench_prefill gpt --gpt-profile exited with $?"
    timeout "${GPT_TIMEOUT:-300}" python3 -m bench.bench_prefill --device cuda --parts gpt --gpt-lens 16384 65536 \
        --gpt-processes 3 --results-dir "$OUT" 2>&1 | tee -a "$OUT/bench_gpt.log" \
        || echo "bench_prefill gpt --gpt-processes 3 exited with $?"
    timeout "${GPT_COMPILE_TIMEOUT:-300}" python3 -m bench.bench_prefill --device cuda --parts gpt --gpt-lens 16384 \
        65536 --gpt-compile --results-dir "$OUT" 2>&1 | tee -a "$OUT/bench_gpt.log" \
        || echo "bench_prefill gpt --gpt-compile exited with $?"
fi
if [[ " $PARTS " == *" ab "* ]]; then
    # A same-call A/B against an older tree (only on request: PARTS=ab). The device gets no history: extract the tree
    # beside this one before the call (git archive <commit> | tar -x -C ab_base, an untracked folder travels) and name
    # it in AB_BASE_LABEL. Each round runs, for each tree in turn, one process with the parity check, the kernels,
    # the layer and the module at 64k (public shape) and the eager GPT at 16k (AB_PARTS: a subset of those bench_prefill
    # parts, e.g. "gpt" for the host-bound step alone), so that the host's and the GPU's drift falls on both trees
    # alike; rows go to $OUT/prefill_ab.jsonl labelled with their tree (BENCH_COMMIT for this one).
    [[ -d ab_base ]] || { echo "PARTS=ab needs the older tree in ab_base/"; exit 2; }
    root=$(pwd)
    out=$(cd "$OUT" && pwd)
    for round in $(seq "${AB_ROUNDS:-2}"); do
        for tree in . ab_base; do
            label=${BENCH_COMMIT:-new}
            [[ $tree == . ]] || label=${AB_BASE_LABEL:-base}
            echo "== round $round: $label"
            # shellcheck disable=SC2086  # AB_PARTS is a list of parts
            (cd "$root/$tree" && BENCH_COMMIT=$label timeout "${AB_TIMEOUT:-200}" python3 -m bench.bench_prefill \
                --device cuda --parts ${AB_PARTS:-check kernels layer module gpt} --shapes public --seq-lens 65536 \
                --impls nsa dense --gpt-lens 16384 --results-dir "$out" --name prefill_ab) 2>&1 \
                | tee -a "$out/bench_ab.log" || echo "bench_prefill ($label) exited with $?"
        done
    done
fi
if [[ " $PARTS " == *" nsa "* ]]; then
    timeout 240 python3 -m bench.bench_decode --device cuda --skip-reads --profile --paged 2>&1 | tee "$OUT/bench_decode.log"
    cp bench/results/decode_cuda.* "$OUT/"
fi
if [[ " $PARTS " == *" scope "* ]]; then
    # One process per backend and length group (compiles take minutes; a 128k run alone takes ~270 s, so
    # a 600 s device call fits about two: pick with SCOPE_BACKENDS / SCOPE_SEQ_LEN_GROUPS). The Triton
    # kernels (auto's choice for qk_aug) first, then Flex; score_mod only on request (its flex compile takes
    # minutes). SCOPE_BATCH: sequences per call (ANCHORS.md's batch that fills the GPU; the 128k target reads
    # batch 1). BENCH_COMMIT: the device's .git can lag the working tree it runs.
    IFS=';' read -r -a groups <<< "${SCOPE_SEQ_LEN_GROUPS:-131072;65536 32768}"
    for backend in ${SCOPE_BACKENDS:-triton flex}; do
        for group in "${groups[@]}"; do
            name="scope_cuda_${backend}_${group// /_}"
            module_lens=()
            [[ "$group" == *131072* ]] || module_lens=(--module-seq-lens)  # the module only at 128k
            # shellcheck disable=SC2086  # the group is a list of lengths
            timeout "${SCOPE_TIMEOUT:-290}" python3 -m bench.bench_scope --device cuda --backends "$backend" \
                --seq-lens $group "${module_lens[@]}" ${SCOPE_BATCH:+--batch "$SCOPE_BATCH"} --max-seconds 240 \
                --results-dir "$OUT" --name "$name" 2>&1 | tee -a "$OUT/bench_scope.log" \
                || echo "bench_scope $backend $group exited with $?"
        done
    done
    timeout 100 python3 -m bench.bench_block_sparse --out "$OUT/block_sparse_cuda.jsonl" 2>&1 \
        | tee "$OUT/bench_block_sparse.log" || echo "bench_block_sparse exited with $?"
fi
exit "$tests_status"
