"""NSA decode economics: tokens read per step (formula and measured) and per-token latency vs dense.

    python -m bench.bench_decode                 # CPU: reads table 1k..1M, latency at batch 1 and 32
    python bench/bench_decode.py                 # the same, run as a file from a plain checkout
    python -m bench.bench_decode --device cuda   # GPU: public shape (HQ=64, H_kv=4, D=128, bf16)
    python -m bench.bench_decode --skip-latency  # the design card's token-read check alone (a few seconds)

Reads are measured from a real decode step (the counters of NSAKVCache, taken from the masks the
attention used) after the cache is put in the state of S-1 random tokens (NSAKVCache.fill_random_),
and set beside the formula num_cmp(S) + sel(S) + min(w, S) of NSA.md; the exit status is 1 when a measured
branch count differs from the formula at any length (the table is still written, the mismatches go to stderr).
Latency: the attention of one
decode step (nsa.decode_attention: compressed scores, selection, the three branches and the gates,
over a cache holding S tokens) against dense SDPA over a KV cache of the same S (is_causal=False for
the single row), with the torch reference backend and, on CUDA, the Triton kernels. On CUDA every
step is also captured in a CUDA graph and replayed, the way ANCHORS.md timed dense decode, and the
whole layer step (projections, cache writes, emission, attention) is replayed for reference.
Results: bench/results/decode_<device>.jsonl and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/bench_decode.py): make the checkout's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from bench.env_info import (
    RESULTS_DIR,
    Distinct,
    cpu_median_ms,
    device_name,
    environment,
    markdown_table,
    positive_int,
    profile_step,
    results_folder,
)
from nsa import NSAAttention, NSAConfig, NSAKVCache, num_compressed_blocks, num_selection_blocks
from nsa.decode_attention import decode_attention

PAPER_BLOCKS: dict[str, Any] = dict(cmp_block_size=32, cmp_stride=16, sel_block_size=64, num_selected=16,
                                    window_size=512)
READ_LENGTHS = [1024 * 2**i for i in range(11)]  # 1k .. 1M
PAGE_SIZE = 256  # tokens per page of the paged rows (4 selection blocks)


def formula_reads(seq_len: int, config: NSAConfig) -> tuple[int, int, int]:
    """NSA.md: num_cmp(S), tokens of the n selected blocks (current block partial), min(w, S)."""
    l_sel, n = config.sel_block_size, config.num_selected
    num_blocks = -(-seq_len // l_sel)
    sel = seq_len if num_blocks <= n else (n - 1) * l_sel + seq_len - (num_blocks - 1) * l_sel
    cmp = num_compressed_blocks(seq_len, config.cmp_block_size, config.cmp_stride)
    return cmp, sel, min(config.window_size, seq_len)


@torch.no_grad()
def measured_reads(seq_len: int) -> tuple[int, int, int]:
    config = NSAConfig(hidden_size=16, num_heads=1, num_kv_heads=1, head_dim=8, head_dim_v=8,
                       compression="mean", **PAPER_BLOCKS)
    layer = NSAAttention(config)
    cache = layer.new_cache(1, seq_len)
    cache.fill_random_(seq_len - 1)
    layer(torch.randn(1, 1, config.hidden_size), cache=cache)
    assert cache.last_reads is not None
    cmp, sel, win = cache.last_reads[0, 0, 0].tolist()
    return cmp, sel, win


def reads_table(lengths: list[int]) -> list[dict[str, Any]]:
    """One row per length S: the reads measured per branch, their sum, the formula's sum and its branches."""
    config = NSAConfig(**PAPER_BLOCKS)
    rows = []
    for seq_len in lengths:
        cmp, sel, win = formula_reads(seq_len, config)
        m_cmp, m_sel, m_win = measured_reads(seq_len)
        rows.append({"S": seq_len, "cmp": m_cmp, "sel": m_sel, "win": m_win, "measured": m_cmp + m_sel + m_win,
                     "formula": cmp + sel + win, "formula_branches": [cmp, sel, win], "dense": seq_len,
                     "dense/nsa": round(seq_len / (m_cmp + m_sel + m_win), 2)})
        print(f"reads S={seq_len}: measured {rows[-1]['measured']} formula {rows[-1]['formula']}", flush=True)
    return rows


def read_mismatches(rows: list[dict[str, Any]]) -> list[str]:
    """The lengths whose measured reads differ from the formula in any branch (cmp, sel, win), one line each."""
    return [f"S={row['S']}: measured (cmp, sel, win) = {[row['cmp'], row['sel'], row['win']]}, "
            f"formula {row['formula_branches']}"
            for row in rows if [row["cmp"], row["sel"], row["win"]] != row["formula_branches"]]


def timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of fn: triton.testing.do_bench on CUDA, a perf_counter loop on CPU."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    return cpu_median_ms


def cuda_graph_ms(step: Callable[[], Any], replays: int = 100) -> float:
    """Capture one call of `step` in a CUDA graph and return the mean ms of `replays` replays.

    A fixed replay count (not do_bench's adaptive one) because every replay appends a token to a
    cache of fixed capacity. Warm-up runs on a side stream as graph capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def attention_step(layer: NSAAttention, cache: NSAKVCache, q: torch.Tensor, gates: torch.Tensor,
                   backend: str) -> Callable[[], Any]:
    """The attention part of a decode step (what dense SDPA over a KV cache is compared with): the new
    token's q [B, HQ, Dk] and gates [B, HQ, 3] against a cache already holding its K/V, sequence b at position
    lengths[b] - 1 (contiguous or paged)."""
    positions = cache.device_lengths - 1
    return lambda: decode_attention(q, gates, positions, k_cmp=cache.k_cmp, v_cmp=cache.v_cmp, k_sel=cache.k_sel,
                                    v_sel=cache.v_sel, k_win=cache.k_win, v_win=cache.v_win, sizes=layer.sizes,
                                    scale=layer.config.attention_scale, backend=backend, page_table=cache.page_table,
                                    **step_bounds(layer.config, cache))


def step_bounds(config: NSAConfig, cache: NSAKVCache) -> dict[str, int]:
    """The host bounds of a decode step over the cache: compressed and selection blocks of its longest sequence."""
    length = max(cache.lengths)
    return dict(num_cmp_bound=num_compressed_blocks(length, config.cmp_block_size, config.cmp_stride),
                num_sel_blocks=num_selection_blocks(length, config.sel_block_size))


def parity(torch_step: Callable[[], Any], triton_step: Callable[[], Any]) -> dict[str, float]:
    """Triton vs the torch reference on the benchmark's own inputs, checked before timing."""
    ref, fast = torch_step(), triton_step()
    return {"max_abs_diff": round((ref.output.float() - fast.output.float()).abs().max().item(), 5),
            "blocks_equal": round((ref.block_indices == fast.block_indices).float().mean().item(), 4),
            "reads_equal": bool((ref.reads == fast.reads).all().item())}


def decode_inputs(seq_len: int, batch: int, shape: dict[str, int], device: str, dtype: torch.dtype,
                  lengths: list[int] | None = None) -> tuple[NSAAttention, NSAKVCache, torch.Tensor, torch.Tensor]:
    """A layer of the benchmark shape, its cache of capacity S holding S random tokens per sequence (or
    lengths[b]), and the new token's q and gates."""
    heads, kv_heads, dim = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    config = NSAConfig(hidden_size=heads * dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
                       head_dim_v=dim, **PAPER_BLOCKS)
    layer = NSAAttention(config).to(device=device, dtype=dtype)
    cache = layer.new_cache(batch, seq_len)
    cache.fill_random_(seq_len if lengths is None else lengths)
    q_step = torch.randn(batch, heads, dim, device=device, dtype=dtype)
    gates = torch.rand(batch, heads, 3, device=device, dtype=dtype)
    return layer, cache, q_step, gates


@torch.no_grad()
def tile_rows(seq_len: int, batch: int, shape: dict[str, int], device: str, dtype: torch.dtype) -> list[dict]:
    """The Triton decode step under each candidate of tile_candidates(), CUDA-graph replayed, after checking
    it against the torch reference on the same inputs (the next nsa.kernels.decode.DecodeTiles default)."""
    from nsa.kernels.decode import decode_attention_triton

    layer, cache, q_step, gates = decode_inputs(seq_len, batch, shape, device, dtype)
    reference = attention_step(layer, cache, q_step, gates, "torch")()
    bounds = step_bounds(layer.config, cache)
    args = (q_step, gates, cache.device_lengths - 1, cache.k_cmp, cache.v_cmp, bounds["num_cmp_bound"], cache.k_sel,
            cache.v_sel, bounds["num_sel_blocks"], cache.k_win, cache.v_win, layer.sizes, layer.config.attention_scale)
    rows = []
    for tiles in tile_candidates():
        out, indices, _ = decode_attention_triton(*args, tiles=tiles)
        row: dict[str, Any] = {"S": seq_len, "batch": batch, "tiles": repr(tiles),
                               "max_abs_diff": round((out.float() - reference.output.float()).abs().max().item(), 5),
                               "blocks_equal": bool(torch.equal(indices, reference.block_indices))}
        if row["blocks_equal"] and row["max_abs_diff"] < 0.02:
            row["graph_ms"] = round(cuda_graph_ms(functools.partial(decode_attention_triton, *args, tiles=tiles)), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def mixed_lengths(seq_len: int, batch: int) -> list[int]:
    """S/B, 2S/B, .., S: a batch of sequences of different lengths up to S."""
    return [max(1, seq_len * (b + 1) // batch) for b in range(batch)]


def selection_gib(cache: NSAKVCache) -> float:
    """Memory of the selection branch's raw-token buffers (per-sequence rows or the page pool)."""
    return round(sum(t.numel() * t.element_size() for t in (cache.k_sel, cache.v_sel)) / 2**30, 3)


@torch.no_grad()
def paged_row(seq_len: int, batch: int, shape: dict[str, int], device: str, dtype: torch.dtype) -> dict[str, Any]:
    """A batch of sequences of mixed_lengths: one decode step's attention on per-sequence buffers of capacity S and
    on a paged cache (PAGE_SIZE-token pages, the pool sized to the pages the lengths reach), each checked against
    the torch reference on its own cache before timing (CUDA: the Triton step, CUDA-graph replayed; CPU: the
    torch step, eager), with the selection buffers' memory."""
    cuda = device.startswith("cuda")
    lengths = mixed_lengths(seq_len, batch)
    layer, contiguous, q_step, gates = decode_inputs(seq_len, batch, shape, device, dtype, lengths)
    paged = layer.new_cache(batch, seq_len, page_size=PAGE_SIZE, num_pages=sum(-(-n // PAGE_SIZE) for n in lengths))
    paged.fill_random_(lengths)
    measure = cuda_graph_ms if cuda else timer(device)
    row: dict[str, Any] = {"S": seq_len, "batch": batch, "page_size": PAGE_SIZE, "lengths": f"{lengths[0]}..{seq_len}"}
    for name, cache in (("contiguous", contiguous), ("paged", paged)):
        step = attention_step(layer, cache, q_step, gates, "triton" if cuda else "torch")
        if cuda:
            checks = parity(attention_step(layer, cache, q_step, gates, "torch"), step)
            row.update({f"{name}_{key}": value for key, value in checks.items()})
        row[f"{name}_ms"] = round(measure(step), 4)
        row[f"{name}_sel_gib"] = selection_gib(cache)
    row["paged/contiguous"] = round(row["paged_ms"] / row["contiguous_ms"], 2)
    return row


def tile_candidates() -> list[Any]:
    """The current defaults first, then candidates one field off them."""
    from nsa.kernels.decode import DecodeTiles

    base = DecodeTiles()
    return [base, *(base._replace(programs_per_sm=n) for n in (2, 4, 16)),
            *(base._replace(cmp_block=n) for n in (32, 128)), base._replace(single_tile_block=64),
            *(base._replace(sel_blocks=n) for n in (1, 4)),
            base._replace(cmp_warps=8), *(base._replace(merge_chunk=n) for n in (8, 32)),
            *(base._replace(scores_warps=n) for n in (2, 4)), *(base._replace(combine_warps=n) for n in (2, 4))]


@torch.no_grad()
def latency_row(seq_len: int, batch: int, shape: dict[str, int], device: str, dtype: torch.dtype,
                profile: bool = False) -> dict[str, Any]:
    heads, kv_heads, dim = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    layer, cache, q_step, gates = decode_inputs(seq_len, batch, shape, device, dtype)
    config = layer.config
    cuda = device.startswith("cuda")
    q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_len, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)

    def dense_step() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)

    measure = timer(device)
    row: dict[str, Any] = {"S": seq_len, "batch": batch, "dense_ms": round(measure(dense_step), 4)}
    backends = ["torch", "triton"] if cuda else ["torch"]
    steps = {backend: attention_step(layer, cache, q_step, gates, backend) for backend in backends}
    if cuda:
        row.update(parity(steps["torch"], steps["triton"]))
    for backend, step in steps.items():
        row[f"{backend}_ms"] = round(measure(step), 4)
        row[f"dense/{backend}"] = round(row["dense_ms"] / row[f"{backend}_ms"], 2)
    if cuda:
        row["dense_graph_ms"] = round(cuda_graph_ms(dense_step), 4)
        for backend, step in steps.items():
            row[f"{backend}_graph_ms"] = round(cuda_graph_ms(step), 4)
            row[f"dense/{backend}_graph"] = round(row["dense_graph_ms"] / row[f"{backend}_graph_ms"], 2)
        if profile:
            print(profile_step(steps["triton"], device), flush=True)
        # The whole layer step (projections, cache writes, emission, attention) for reference.
        static_cache = layer.new_cache(batch, seq_len + 256, static_shapes=True)
        static_cache.fill_random_(seq_len - 1)
        x = torch.randn(batch, 1, config.hidden_size, device=device, dtype=dtype)
        row["layer_graph_ms"] = round(cuda_graph_ms(lambda: layer(x, cache=static_cache)), 4)
    return {**row, "dtype": str(dtype).removeprefix("torch."), **shape}


def contradicting_flags(args: argparse.Namespace) -> str | None:
    """Why these flags ask for nothing, or for work that --skip-latency / --tiles leave out (a run that would
    write empty tables, or ignore a flag); None when they agree."""
    if args.skip_latency and (args.skip_reads or args.tiles):
        return "--skip-latency with --skip-reads or --tiles measures nothing: drop one"
    ignored = [flag for flag, given in (("--seq-lens", args.seq_lens is not None), ("--paged", args.paged),
                                        ("--profile", args.profile)) if given]
    if args.skip_latency and ignored:
        return f"--skip-latency times no steps, so {', '.join(ignored)} would do nothing: drop one"
    if args.tiles and (args.paged or args.profile):
        return "--tiles replaces the tables: --paged and --profile would do nothing"
    if args.skip_reads and args.read_lengths is not None:
        return "--skip-reads leaves out the reads table, so --read-lengths would do nothing: drop one"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_name, default="cpu")
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", action=Distinct,
                        help="latency lengths (default: CPU 8k 32k, GPU 8k 64k 128k)")
    parser.add_argument("--batches", type=positive_int, nargs="+", action=Distinct, default=[1, 32])
    parser.add_argument("--skip-reads", action="store_true")
    parser.add_argument("--skip-latency", action="store_true", help="the token-read check alone")
    parser.add_argument("--read-lengths", type=positive_int, nargs="+", action=Distinct,
                        help="lengths S of the reads table (default 1k .. 1M)")
    parser.add_argument("--results-dir", type=results_folder, default=RESULTS_DIR,
                        help="where results go (default bench/results)")
    parser.add_argument("--profile", action="store_true",
                        help="print a profiler table of the Triton step at the largest batch and S")
    parser.add_argument("--paged", action="store_true",
                        help="also a batch of sequences of different lengths (S/B .. S) on a paged cache beside "
                             "per-sequence buffers, at every S and the largest batch")
    parser.add_argument("--tiles", action="store_true",
                        help="CUDA only, instead of the tables: the Triton step under each DecodeTiles candidate at "
                             "every S and batch (results decode_tiles_cuda.jsonl)")
    args = parser.parse_args(argv)
    contradiction = contradicting_flags(args)
    if contradiction:
        parser.error(contradiction)
    cuda = args.device.startswith("cuda")
    shape = (dict(num_heads=64, num_kv_heads=4, head_dim=128) if cuda
             else dict(num_heads=8, num_kv_heads=2, head_dim=64))
    dtype = torch.bfloat16 if cuda else torch.float32
    seq_lens = [] if args.skip_latency else args.seq_lens or ([8192, 65536, 131072] if cuda else [8192, 32768])
    env = environment(args.device)
    if args.tiles:
        if not cuda:
            parser.error("--tiles needs --device cuda (the candidates are timed as CUDA graphs)")
        args.results_dir.mkdir(parents=True, exist_ok=True)
        with open(args.results_dir / "decode_tiles_cuda.jsonl", "a") as handle:
            for seq_len in seq_lens:
                for batch in args.batches:
                    handle.writelines(json.dumps({"table": "tiles", **row, **env}) + "\n"
                                      for row in tile_rows(seq_len, batch, shape, args.device, dtype))
        return 0
    reads = [] if args.skip_reads else reads_table(args.read_lengths or READ_LENGTHS)
    latency = []
    for seq_len in seq_lens:
        for batch in args.batches:
            profile = args.profile and batch == max(args.batches) and seq_len == seq_lens[-1]
            latency.append(latency_row(seq_len, batch, shape, args.device, dtype, profile))
            print(json.dumps(latency[-1]), flush=True)
    paged = [paged_row(seq_len, max(args.batches), shape, args.device, dtype) for seq_len in seq_lens
             if args.paged]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"decode_{'cuda' if cuda else 'cpu'}"
    with open(stem.with_suffix(".jsonl"), "a") as handle:
        handle.writelines(json.dumps({"table": "reads", **row, **env}) + "\n" for row in reads)
        handle.writelines(json.dumps({"table": "latency", **row, **env}) + "\n" for row in latency)
        handle.writelines(json.dumps({"table": "paged", **row, **env}) + "\n" for row in paged)
    text = [f"# NSA decode, {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})", ""]
    if reads:
        text += ["## Tokens read per decode step (paper defaults l=32 d=16 l'=64 n=16 w=512)", "",
                 markdown_table(reads, ["S", "cmp", "sel", "win", "measured", "formula", "dense", "dense/nsa"]), ""]
    columns = ["S", "batch", "dense_ms", "torch_ms", "dense/torch"]
    if cuda:
        columns += ["triton_ms", "dense/triton", "dense_graph_ms", "torch_graph_ms", "dense/torch_graph",
                    "triton_graph_ms", "dense/triton_graph", "layer_graph_ms", "max_abs_diff", "blocks_equal",
                    "reads_equal"]
    text += ["## Per-token attention latency (ms): NSA decode step vs dense SDPA over a KV cache of S tokens", "",
             f"dtype {latency[0]['dtype']}, {shape}; *_graph = CUDA-graph replay; layer_graph = the whole NSA layer "
             "step (projections, cache writes, emission, attention) replayed; max_abs_diff / blocks_equal / "
             "reads_equal: Triton vs the torch reference on the same inputs, checked before timing.", "",
             markdown_table(latency, columns), ""] if latency else []
    if paged:
        checks = ["contiguous_max_abs_diff", "contiguous_blocks_equal", "paged_max_abs_diff", "paged_blocks_equal"]
        how = ("Triton step, CUDA-graph replay, each checked against the torch reference on its own cache before "
               "timing" if cuda else "torch step (the reference), eager")
        text += ["## Paged KV: a batch of sequences of lengths S/B .. S (ms per step; selection buffers in GiB)", "",
                 f"{how}; contiguous = per-sequence buffers of capacity S, paged = {PAGE_SIZE}-token pages, the pool "
                 "sized to the pages the lengths reach.", "",
                 markdown_table(paged, ["S", "batch", "lengths", "contiguous_ms", "paged_ms", "paged/contiguous",
                                        "contiguous_sel_gib", "paged_sel_gib", *(checks if cuda else [])]), ""]
    stem.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text))
    mismatches = read_mismatches(reads)
    for line in mismatches:
        print(f"token-read check FAILED: {line}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
