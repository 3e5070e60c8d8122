"""The selection dk/dv's schedule (nsa.kernels.selected.selection_lists) against lists built here by plain loops.

Each (kv head, global block) list must hold exactly the token rows that selected the block, ascending (the order
the reduction sums them in), cut into chunks of at most ``chunk`` entries; every chunk must fit the buffer the host
bound sized (a lost chunk would drop entries); the chunks must be numbered (the grid's order) by kv head, then
block, then position in the list.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa.kernels.selected import selection_lists
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
    return lengths, equal, sel_block, indices, draw(st.integers(1, 6))


@given(selections())
def test_chunks_hold_each_list_in_token_order(case: tuple) -> None:
    lengths, equal, sel_block, indices, chunk = case
    total, kv_heads = sum(lengths), indices.shape[1]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    packed = packed_batch(len(lengths), lengths[0], torch.device("cpu")) if equal else packed_varlen(cu, total)
    lists = selection_lists(indices, packed, sel_block, chunk, with_slots=True)

    # the lists by plain loops: global block = the blocks of the earlier sequences + the local block
    first_block = [0, *itertools.accumulate(-(-n // sel_block) for n in lengths)]
    expected: dict[tuple[int, int], list[int]] = {}
    for seq, length in enumerate(lengths):
        for t in range(int(cu[seq].item()), int(cu[seq].item()) + length):
            for h in range(kv_heads):
                for b in indices[t, h].tolist():
                    if b >= 0:
                        expected.setdefault((h, first_block[seq] + b), []).append(t)

    per_head = lists.blocks_per_head
    num_lists = kv_heads * per_head
    chunk_list, start, list_end = lists.chunk_list.tolist(), lists.chunk_start.tolist(), lists.list_end.tolist()
    live = [c for c, listed in enumerate(chunk_list) if listed < num_lists]
    assert live == list(range(len(live)))  # the live chunks first, then the unused slots of the host bound
    # what the dk/dv kernel reads of chunk c: its entries up to the chunk size or its list's end
    end = [min(start[c] + chunk, list_end[chunk_list[c]]) for c in live]
    entries, list_chunks = lists.entries.tolist(), lists.list_chunks.tolist()
    assert lists.slots is not None
    slots, flat, num_selected = lists.slots.tolist(), indices.flatten().tolist(), indices.shape[-1]
    for listed in range(num_lists):
        mine = range(list_chunks[listed], list_chunks[listed + 1])  # the range the reduction walks
        assert all(chunk_list[c] == listed and 0 < end[c] - start[c] <= chunk for c in mine)
        got = [t for c in mine for t in entries[start[c]:end[c]]]  # in chunk order: what the reduction sums
        assert got == expected.get((listed // per_head, listed % per_head), [])
        # each entry's slot (the row of its dq share where the dq is inside the dk/dv): its token, this list's kv
        # head, this list's block
        head, block = divmod(listed, per_head)
        for c in mine:
            for e in range(start[c], end[c]):
                token, rest = divmod(slots[e], kv_heads * num_selected)
                seq = sum(1 for bound in cu[1:].tolist() if bound <= token)
                assert (token, rest // num_selected) == (entries[e], head)
                assert flat[slots[e]] == block - first_block[seq]
    assert list_chunks[-1] == len(live)
    assert [chunk_list[c] for c in live] == sorted(chunk_list[c] for c in live)  # kv head, then block


def test_every_block_chosen_fits_the_buffer() -> None:
    """Every token selects every block it sees, in chunks of one entry: the most chunks a selection can need, all
    of which must fit the buffer the host bound sized."""
    for lengths in ([100], [37, 64, 5], [64, 64]):
        sel_block, total = 8, sum(lengths)
        rows = [[[b for b in range(t // sel_block + 1)] + [-1] * (13 - t // sel_block - 1)]
                for length in lengths for t in range(length)]
        indices = torch.tensor(rows, dtype=torch.int32)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        lists = selection_lists(indices, packed_varlen(cu, total), sel_block, 1)
        live = int((lists.chunk_list < lists.blocks_per_head).sum())  # one kv head
        assert live == int((indices >= 0).sum()) and lists.chunk_list.numel() >= live
