"""A cache model of the selection dk/dv's q / dO gathers, on the CPU: what share of them the L2 could serve under
each schedule of nsa.kernels.selected.selection_lists (``SelectedTiles.dkv_windows``).

The dk/dv runs one program per chunk of a (kv head, block) list; each step gathers the q and dO rows of two tokens
for the group's heads. The model takes the schedule the code builds (``selection_lists`` on a random selection with
the top-n's rule: the three forced blocks and n - 3 distinct complete candidates drawn uniformly, as random inputs
select), runs ``--slots`` programs at a time in launch order, each taking two tokens per round, and counts the
gathers that find their token's rows in an LRU cache of ``--l2-mib`` (one kv head's rows: the grid runs kv head
after kv head). It ignores the K / V blocks and the partials that share the L2, and the programs' different
speeds: a model to rank schedules before timing them on the device (docs/PERF_NOTES.md, thirty-first session).

    python -m bench.model_dkdv_gathers --seq-len 65536 --windows 1 8 16
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch

from nsa.kernels.selected import SelectedTiles, selection_lists
from nsa.kernels.tiles import packed_batch

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


def program_tokens(indices: torch.Tensor, windows: int, chunk: int) -> list[list[int]]:
    """The token list of each dk/dv program, in launch order (the live chunks of ``selection_lists``)."""
    lists = selection_lists(indices, packed_batch(1, indices.shape[0], torch.device("cpu")), SEL_BLOCK, chunk, windows)
    entries, start, segment_end = lists.entries.tolist(), lists.chunk_start.tolist(), lists.segment_end.tolist()
    live = [segment for segment in lists.chunk_segment.tolist() if segment < windows * lists.blocks_per_head]
    return [entries[start[c]:min(start[c] + chunk, segment_end[segment])] for c, segment in enumerate(live)]


def hit_rate(programs: list[list[int]], slots: int, capacity: int) -> float:
    """Share of the gathers that hit an LRU cache of ``capacity`` token rows, ``slots`` programs in flight."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    waiting = [list(tokens) for tokens in reversed(programs)]  # copies: the loop consumes them
    running: list[list[int]] = []  # each program's tokens not gathered yet
    while waiting or running:
        while waiting and len(running) < slots:
            running.append(waiting.pop())
        for tokens in running:
            for token in tokens[:2]:
                total += 1
                if token in cache:
                    hits += 1
                    cache.move_to_end(token)
                else:
                    cache[token] = None
                    if len(cache) > capacity:
                        cache.popitem(last=False)
            del tokens[:2]
        running = [tokens for tokens in running if tokens]
    return hits / max(1, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--slots", type=int, default=396, help="programs in flight (132 SMs x 3 on the H200)")
    parser.add_argument("--l2-mib", type=float, default=50.0)
    parser.add_argument("--group", type=int, default=16, help="query heads per kv head (the public shape's 16)")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    if args.seq_len < 1 or args.slots < 1 or not 0 < args.l2_mib < float("inf") or min(args.windows) < 1:
        parser.error("--seq-len, --slots and --windows must be positive, --l2-mib a positive number")
    row_bytes = args.group * args.head_dim * 2 * 2  # q and dO, bf16
    capacity = int(args.l2_mib * 2**20 // row_bytes)
    indices, tiles = random_selection(args.seq_len), SelectedTiles()
    chunk = tiles.dkv_chunk(args.seq_len)
    print("| T | windows | programs | L2 hit rate (model) |\n|---|---|---|---|")
    for windows in args.windows:
        programs = program_tokens(indices, windows, chunk)
        print(f"| {args.seq_len} | {windows} | {len(programs)} | {hit_rate(programs, args.slots, capacity):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
