"""The block-sparse Triton kernels alone (scope.kernels.block_sparse), per tile configuration, vs dense SDPA.

    python -m bench.bench_block_sparse                       # H100: T=128k, H=16, q.k dim 128 and 160, bf16
    python -m bench.bench_block_sparse --seq-len 65536 --tiles 128,64,128,64,64,128,8,3,2 64,64,64,64,64,64,4,3,3

Lists like SCOPE's benchmark mask: per (head, query block) the diagonal block, 3 local blocks before it
and 32 distinct random earlier blocks (fewer near the start). q.k dim 160 = 128 + qk_aug's 32 features,
split by the kernels into dots of 128 and 32. Each ``--tiles`` entry is block_m,block_n,dq_m,dq_n,dkv_m,
dkv_n,num_warps,num_stages[,bwd_num_stages] (scope.kernels.block_sparse.Tiles; the backward's stages
default to the forward's when omitted); the first is checked against the torch
twin at T=2048 before any timing. Dense SDPA's bwd_ms is its forward+backward minus its forward. Prints
a table; with --out, appends JSON lines there.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from bench.env_info import Distinct, device_name, environment, markdown_table, output_file, positive_int
from scope.block_sparse_attention import block_sparse_attention_reference, transpose_block_lists

if TYPE_CHECKING:  # the kernels import triton: only the timing and the checks load them
    from scope.kernels.block_sparse import Tiles


def scope_like_lists(heads: int, num_blocks: int, local: int, budget: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_num_blocks [1, H, QB], kv_indices [1, H, QB, local + budget] (ascending, -1 padded), on CUDA."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = torch.arange(num_blocks, device="cuda")
    lag = rows[:, None] - rows[None, :]  # qb - kb
    score = torch.rand(heads, num_blocks, num_blocks, device="cuda", generator=gen)
    score = torch.where(lag < 0, -1.0, torch.where(lag < local, 2.0, score))  # no future, local band first
    top = score.topk(min(local + budget, num_blocks), dim=-1)
    keep = top.values >= 0
    idx = torch.where(keep, top.indices, num_blocks).sort(-1).values
    return keep.sum(-1, dtype=torch.int32)[None], torch.where(idx < num_blocks, idx, -1).to(torch.int32)[None]


def time_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: tuple[torch.Tensor, torch.Tensor],
               tiles: Tiles) -> dict[str, float]:
    """Median ms of the forward and of the backward kernels (given the forward's out / lse)."""
    from triton.testing import do_bench

    from scope.kernels import block_sparse

    scale = q.shape[-1] ** -0.5
    q_lists = transpose_block_lists(*lists, q.shape[2] // 128)
    out, lse = block_sparse.forward(q, k, v, *lists, 128, scale, tiles)
    dout = torch.randn_like(out)
    fwd = do_bench(lambda: block_sparse.forward(q, k, v, *lists, 128, scale, tiles), return_mode="median")
    bwd = do_bench(lambda: block_sparse.backward(dout, q, k, v, out, lse, *lists, *q_lists, 128, scale, tiles),
                   return_mode="median")
    return {"fwd_ms": round(fwd, 3), "bwd_ms": round(bwd, 3)}


def check_tiles(heads: int, dqk: int, tiles: Tiles) -> None:
    """The kernels' forward vs the torch twin at T=2048 (bf16; a wrong list or tile shows as O(1) error)."""
    from scope.kernels import block_sparse

    q, k, v = inputs(heads, 2048, dqk)
    lists = scope_like_lists(heads, 16, 4, 32, seed=0)
    out, _ = block_sparse.forward(q, k, v, *lists, 128, dqk**-0.5, tiles)
    ref = block_sparse_attention_reference(q, k, v, *lists, block=128)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    print(f"check T=2048 dqk={dqk}: rel err {err:.2e} vs the torch twin", flush=True)
    assert err < 2e-2, err


def inputs(heads: int, seq_len: int, dqk: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(1, heads, seq_len, d, device="cuda", dtype=torch.bfloat16) for d in (dqk, dqk, 128))


def dense_row(heads: int, seq_len: int) -> dict[str, Any]:
    from triton.testing import do_bench

    q, k, v = (t.requires_grad_(True) for t in inputs(heads, seq_len, 128))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    fwd = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
    fb = do_bench(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v),
                                              dout), return_mode="median")
    return {"T": seq_len, "dqk": 128, "tiles": "dense SDPA", "fwd_ms": round(fwd, 3), "bwd_ms": round(fb - fwd, 3)}


def parse_tiles(text: str) -> Tiles:
    """argparse type of a --tiles entry: 8 or 9 whole numbers >= 1 (Tiles would fill a shorter list from its
    defaults, silently timing another configuration than the one named)."""
    from scope.kernels import block_sparse

    try:
        values = [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: each of its comma-separated entries {error}") from None
    if len(values) not in (8, 9):
        raise argparse.ArgumentTypeError(f"{text!r} has {len(values)} entries: give block_m,block_n,dq_m,dq_n,dkv_m,"
                                         "dkv_n,num_warps,num_stages[,bwd_num_stages]")
    if len(values) == 8:  # no separate backward stages
        values.append(values[-1])
    return block_sparse.Tiles(*values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=positive_int, default=131072, help="a multiple of the mask block, 128")
    parser.add_argument("--heads", type=positive_int, default=16)
    parser.add_argument("--qk-dims", type=positive_int, nargs="+", action=Distinct, default=[128, 160])
    parser.add_argument("--tiles", type=parse_tiles, nargs="+", action=Distinct,
                        help="default: the kernels' default Tiles")
    parser.add_argument("--out", type=output_file, help="JSON-lines file to append to")
    args = parser.parse_args(argv)
    if args.seq_len % 128:
        parser.error(f"--seq-len must be a multiple of the mask block 128, got {args.seq_len}")
    try:
        device_name("cuda")
    except argparse.ArgumentTypeError as error:
        parser.error(f"bench_block_sparse times CUDA kernels: {error}")
    from scope.kernels import block_sparse

    tile_sets = args.tiles or [block_sparse.Tiles()]
    env = environment("cuda")
    for dqk in args.qk_dims:
        check_tiles(args.heads, dqk, tile_sets[0])
    lists = scope_like_lists(args.heads, args.seq_len // 128, 4, 32, seed=0)
    rows: list[dict[str, Any]] = [dense_row(args.heads, args.seq_len)]
    for dqk in args.qk_dims:
        q, k, v = inputs(args.heads, args.seq_len, dqk)
        for tiles in tile_sets:
            rows.append({"T": args.seq_len, "dqk": dqk, "tiles": ",".join(map(str, tiles)),
                         **time_tiles(q, k, v, lists, tiles)})
            print(rows[-1], flush=True)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    print(markdown_table(rows, ["T", "dqk", "tiles", "fwd_ms", "bwd_ms"]))
    if args.out:
        with open(args.out, "a") as handle:
            handle.writelines(json.dumps({**row, **env}) + "\n" for row in rows)


if __name__ == "__main__":
    main()
