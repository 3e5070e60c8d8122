"""What programs of several tokens save the selection forward / dq, on the CPU: the share of K / V block reads
left when each program of BQ neighbouring tokens walks the union of their blocks once
(nsa.kernels.selected.query_tiles, ``SelectedTiles.rows``), and the matmul rows it computes instead.

The forward and dq of one-token programs read one K / V block per (token, kv head, selected block) and are
L2-bound (docs/PERF_NOTES.md). A program of BQ tokens reads each block of its union once, for all its BQ x GP
rows, masking the rows whose token did not select it. On a random selection with the top-n's rule
(``random_selection``: the three forced blocks and n - 3 distinct complete candidates drawn uniformly, as random
inputs select) this counts, over the same unions ``query_tiles`` lists:
- bytes: the union's blocks over the tokens' selected blocks (the K / V reads left);
- rows: the union's blocks x BQ over the tokens' selected blocks (each block's dot runs all BQ tokens' rows).

    python -m bench.model_query_unions --seq-lens 8192 65536 --tokens 4 8
"""

from __future__ import annotations

import argparse

import torch

from nsa.kernels.launch_args import next_power_of_2
from nsa.kernels.selected import query_tile_shape

SEL_BLOCK, NUM_SELECTED = 64, 16


def random_selection(seq_len: int, seed: int = 0) -> torch.Tensor:
    """int32 [T, 1, n] block indices of one kv head: forced {0, c - 1, c}, then n - 3 distinct uniform complete
    candidates 1 <= j <= c - 2 (c = t // l'), -1 where fewer exist."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.full((seq_len, NUM_SELECTED), -1, dtype=torch.int32)
    for t in range(seq_len):
        current = t // SEL_BLOCK
        forced = sorted({0, current, max(current - 1, 0)})
        candidates = max(0, current - 2)
        chosen = (1 + torch.randperm(candidates, generator=gen)[:NUM_SELECTED - 3]).tolist() if candidates else []
        picked = forced + chosen
        rows[t, :len(picked)] = torch.tensor(picked, dtype=torch.int32)
    return rows[:, None, :]


def union_shares(indices: torch.Tensor, tokens: int, group: int = 16) -> tuple[float, float]:
    """(bytes, rows) of programs of ``tokens`` tokens x the group's heads (``group`` padded to a power of two)
    on ``indices`` (int32 [T, H_kv, n] of one sequence), against one-token programs. The unions are the sets of
    distinct blocks each program's tokens selected (what ``query_tiles`` lists for the kernels), counted here
    through a block-membership table per program."""
    shape = query_tile_shape(group, tokens * next_power_of_2(group))
    if shape["BQ"] != tokens:
        raise ValueError(f"{tokens} tokens x {shape['GP']} heads is not a program of query_tile_shape")
    seq_len, num_kv_heads, num_selected = indices.shape
    programs = -(-seq_len // tokens)
    padded = indices.new_full((programs * tokens, num_kv_heads, num_selected), -1)
    padded[:seq_len] = indices
    slots = padded.view(programs, tokens, num_kv_heads, num_selected).transpose(1, 2).reshape(
        programs * num_kv_heads, tokens * num_selected)
    member = torch.zeros(slots.shape[0], int(indices.max()) + 2, dtype=torch.bool)
    member.scatter_(1, slots.long() + 1, True)  # column 0 collects the unused slots (-1)
    reads = int((indices >= 0).sum())
    union = int(member[:, 1:].sum())
    return union / reads, union * tokens / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 65536])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 8, 16], help="tokens per program (BQ)")
    parser.add_argument("--group", type=int, default=16, help="query heads per kv head (the public shape's 16)")
    args = parser.parse_args()
    if min(args.seq_lens) < 1 or min(args.tokens) < 2 or args.group < 1:
        parser.error("--seq-lens and --group must be positive, --tokens at least 2")
    print("| T | tokens per program | K / V reads left | matmul rows |\n|---|---|---|---|")
    for seq_len in args.seq_lens:
        indices = random_selection(seq_len)
        for tokens in args.tokens:
            reads, rows = union_shares(indices, tokens, args.group)
            print(f"| {seq_len} | {tokens} | {reads:.2f} | {rows:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
