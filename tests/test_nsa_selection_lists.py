"""The selection dk/dv's schedule (nsa.kernels.selected.selection_lists) against lists built here by plain loops.

Each (kv head, global block) list must hold exactly the token rows that selected the block, ascending, cut into
chunks of at most ``chunk`` entries that never cross a window boundary; every chunk must fit the buffer the host
bound sized (a lost chunk would drop entries); the chunks must be numbered (the grid's order) by window, then kv
head, then block. The ordered dk/dv (SelectedTiles.dkv_ordered) waits on each chunk's rank within its list: a rank
too high never ends its wait, two chunks of one rank race.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

from nsa.kernels.selected import _list_rank, segment_bound, selection_lists, window_rows
from nsa.kernels.tiles import packed_batch, packed_varlen


@st.composite
def selections(draw: st.DrawFn) -> tuple:
    lengths = draw(st.lists(st.integers(1, 90), min_size=1, max_size=3))
    equal = len(set(lengths)) == 1 and draw(st.booleans())
    sel_block, kv_heads, num_selected = draw(st.sampled_from([4, 8])), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    rng = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rows = []
    for length in lengths:
        for t in range(length):
            per_head = []
            for _ in range(kv_heads):  # distinct blocks the token may see, then -1 (unused slots)
                order = torch.randperm(t // sel_block + 1, generator=rng)[:num_selected].tolist()
                per_head.append(order + [-1] * (num_selected - len(order)))
            rows.append(per_head)
    indices = torch.tensor(rows, dtype=torch.int32)
    return lengths, equal, sel_block, indices, draw(st.integers(1, 6)), draw(st.integers(1, 4))


@given(selections())
def test_chunks_hold_each_list_in_token_order_within_one_window(case: tuple) -> None:
    lengths, equal, sel_block, indices, chunk, windows = case
    total, kv_heads = sum(lengths), indices.shape[1]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    packed = packed_batch(len(lengths), lengths[0], torch.device("cpu")) if equal else packed_varlen(cu, total)
    lists = selection_lists(indices, packed, sel_block, chunk, windows)

    # the lists by plain loops: global block = the blocks of the earlier sequences + the local block
    first_block = [0, *itertools.accumulate(-(-n // sel_block) for n in lengths)]
    expected: dict[tuple[int, int], list[int]] = {}
    for seq, length in enumerate(lengths):
        for t in range(cu[seq].item(), cu[seq].item() + length):
            for h in range(kv_heads):
                for b in indices[t, h].tolist():
                    if b >= 0:
                        expected.setdefault((h, first_block[seq] + b), []).append(t)

    width = window_rows(total, windows, sel_block)
    per_head = lists.blocks_per_head
    num_lists = kv_heads * per_head
    segments, start, segment_end = lists.chunk_segment.tolist(), lists.chunk_start.tolist(), lists.segment_end.tolist()
    live = [c for c, segment in enumerate(segments) if segment < windows * num_lists]
    assert live == list(range(len(live)))  # the live chunks first, then the unused slots of the host bound
    # what the dk/dv kernel reads of chunk c: its list, and its entries up to the chunk size or its segment's end
    chunk_list = [segments[c] % num_lists for c in live]
    end = [min(start[c] + chunk, segment_end[segments[c]]) for c in live]
    entries, segment_chunks = lists.entries.tolist(), lists.segment_chunks.tolist()
    for listed in range(num_lists):
        mine = [c for c in live if chunk_list[c] == listed]
        got = [t for c in mine for t in entries[start[c]:end[c]]]  # in chunk order: what the reduction sums
        assert got == expected.get((listed // per_head, listed % per_head), [])
        for window in range(windows):  # each segment's chunks: a contiguous range the reduction walks
            segment = window * num_lists + listed
            chunks = range(segment_chunks[segment], segment_chunks[segment + 1])
            assert all(chunk_list[c] == listed and entries[start[c]] // width == window for c in chunks)
        for c in mine:
            assert 0 < end[c] - start[c] <= chunk
            assert len({t // width for t in entries[start[c]:end[c]]}) == 1
    assert segment_chunks[-1] == len(live)

    def order(c: int) -> tuple[int, int, int]:  # the grid runs the chunks in id order
        listed = chunk_list[c]
        return entries[start[c]] // width, listed // per_head, listed % per_head

    ran = [order(c) for c in live]
    assert ran == sorted(ran)


def test_segment_bound_counts_the_windows_each_block_can_reach() -> None:
    """Global block g of a packing of S sequences starts no earlier than row (g - S) blocks: summed by brute force."""
    for blocks, seqs, windows, window_blocks in itertools.product(range(40), range(1, 4), range(1, 6), range(1, 7)):
        reach = sum(windows - min(windows - 1, max(0, g - seqs) // window_blocks) for g in range(blocks))
        assert segment_bound(blocks, seqs, windows, window_blocks) == reach


def test_every_block_chosen_fills_each_reachable_window_and_fits_the_buffer() -> None:
    """Every token selects every block it sees and one chunk could hold a whole list: each (list, window) segment a
    block can reach is non-empty, one chunk each, and all of them must fit the buffer the host bound sized."""
    for lengths, windows in (([100], 4), ([37, 64, 5], 3), ([64, 64], 2)):
        sel_block, total = 8, sum(lengths)
        rows = [[[b for b in range(t // sel_block + 1)] + [-1] * (13 - t // sel_block - 1)]
                for length in lengths for t in range(length)]
        indices = torch.tensor(rows, dtype=torch.int32)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        lists = selection_lists(indices, packed_varlen(cu, total), sel_block, indices.numel(), windows)
        live = int((lists.chunk_segment < windows * lists.blocks_per_head).sum())  # one kv head
        width = window_rows(total, windows, sel_block)
        reachable = 0
        for seq, length in enumerate(lengths):
            start = cu[seq].item()
            for b in range(-(-length // sel_block)):
                reachable += (start + length - 1) // width - (start + b * sel_block) // width + 1
        assert live == reachable and lists.chunk_segment.numel() >= live


@triton.jit
def _ranks_kernel(segment_chunks_ptr, chunk_segment_ptr, out_ptr, num_lists, windows, WP: tl.constexpr):
    chunk = tl.program_id(0)
    segment = tl.load(chunk_segment_ptr + chunk)
    rank, total = _list_rank(segment_chunks_ptr, segment % num_lists, segment // num_lists, chunk, num_lists, windows,
                             WP)
    tl.store(out_ptr + 2 * chunk, rank)
    tl.store(out_ptr + 2 * chunk + 1, total)


@given(selections())
def test_each_chunk_knows_its_rank_in_its_list_and_the_list_count(case: tuple) -> None:
    """What the ordered dk/dv's chunk computes (``_list_rank``, in the interpreter) against counts by plain loops over
    the chunks in grid order: how many chunks of its list come before it, and how many its list has."""
    lengths, _, sel_block, indices, chunk, windows = case
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    lists = selection_lists(indices, packed_varlen(cu, sum(lengths)), sel_block, chunk, windows)
    num_lists = indices.shape[1] * lists.blocks_per_head
    chunk_list = [s % num_lists for s in lists.chunk_segment.tolist() if s < windows * num_lists]
    got = torch.empty(len(chunk_list), 2, dtype=torch.int32)
    _ranks_kernel[(len(chunk_list),)](lists.segment_chunks, lists.chunk_segment, got, num_lists, windows,
                                      WP=triton.next_power_of_2(windows))
    expected = [[chunk_list[:c].count(listed), chunk_list.count(listed)] for c, listed in enumerate(chunk_list)]
    assert got.tolist() == expected
