"""Triton kernel of NSA's block selection (Eq. 8-12) from the compression branch's scores.

One program takes BQ consecutive queries of one sequence and one kv head, i.e. BQ x G query rows (the G
heads of the group, padded to a power of two GP). It recomputes the compressed scores tile by tile, turns
them into probabilities with the compression branch's log-sum-exp (Eq. 8), sums them over the group's heads
(Eq. 10; Eq. 9 and 10 are linear, so the sum comes first), maps each tile of NS * r compressed blocks onto
its NS selection blocks by token overlap (Eq. 9, r = l'/d; what a block's last compressed blocks spill into
the next selection block is carried to the next tile) and inserts the tile's candidates into per-column lists
(column c of every tile: blocks c, c + NS, c + 2 NS, ...), an element-wise step with no reduction across
threads. The n - 3 best of those lists are the top candidates; where a list was shallower than n - 3 and
dropped a block that would have ranked, the program ranks its rows again with an exact running merge. Nothing
of size [T, T/d] ever exists: the output is the [tokens, H_kv, n] index tensor.

The rule is nsa.selection_scorer.topn_blocks's: forced blocks {0, t // l' - 1, t // l'}, then the best
complete candidates 1 <= j <= t // l' - 2 by score, ties to the lower index. Scores and indices are packed
into one int64 key (float bits of the non-negative score above 0x7FFFFFFF - j), so sorting keys ranks by
score and breaks bitwise ties by the lower index exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa.kernels.attention_steps import LOG2E, load_split_at, load_split_rows, scaled_scores
from nsa.kernels.interpreter import allow_loaded_loop_bounds
from nsa.kernels.launch_args import dot_precision, next_power_of_2, split_dims
from nsa.kernels.tiles import (
    Packed,
    eq9_overlap,
    kv_descriptors,
    output_buffer,
    packed_tiles,
    tile_origin,
    visible_key_count,
)
from nsa.prefill import TOPN_KEY_BLOCKS, topn_tile_shape

allow_loaded_loop_bounds()
MAX_INDEX = tl.constexpr(0x7FFFFFFF)
UNUSED = tl.constexpr(1 << 30)  # sorts after every block index, written out as -1
NO_KEY = tl.constexpr(-(1 << 62))  # a non-candidate's key: below every real key and every empty slot
KEEP = tl.constexpr((1 << 63) - 64)  # slots past n - 3 hold KEEP + i: above every key (< 0x7F800000 << 32)


class TopnTiles(NamedTuple):
    """rows: query rows per program (BQ queries x GP heads; the GPU's choice by group and head dim:
    ``topn_tiles_for``);
    num_warps / num_stages: launch settings; key_blocks:
    selection blocks per compressed-key tile (topn_tile_shape fits them to MAX_KEY_TILE and KP). H200, 64k
    (bench/results/prefill_tiles_cuda.md): with the former insertion loop 32 blocks per tile ran the public shape's
    top-n in 12.9 ms against 13.7 for 16 (2026-12-03), but G = 4 in 6.9 against 5.4 and the GPT's G = 2 in 2.65
    against 1.96; with the column lists 16 blocks run the public shape in 9.04 against 9.32 ms (2026-12-04), so
    every group takes 16 (groups of 16 or more took 32 until then). column_depth: the
    per-column list depth (``depth_for``); 16 holds the paper's n - 3 = 13 whole, so the exact merge is never
    needed. Column lists against the former per-tile insertion loop (``_merge_top``, now the fallback), 64k, indices
    equal (2026-12-03, seventeenth session): public 9.39 against 12.92 ms, G = 12 9.18 against 13.92, G = 4 3.41
    against 5.45, the GPT's G = 2 1.19 against 1.96; depths 8 and 4 ran within 0.3 ms of 16 except G = 4 and G = 2
    at depth 4 (4.35, 1.66). tma: the compressed-key tiles through tensor descriptors (nsa.kernels.tiles.
    kv_descriptors; pointer loads where the device or the tensor cannot)."""

    rows: int = 64
    num_warps: int = 4
    num_stages: int = 2
    key_blocks: int = TOPN_KEY_BLOCKS
    column_depth: int = 16
    tma: bool = False

    def depth_for(self, num_selected: int) -> int:
        """The per-column list depth the kernel keeps: column_depth, or fewer where n - 3 candidates need fewer."""
        return max(1, min(num_selected - 3, self.column_depth))


def topn_tiles_for(group: int, head_dim: int) -> TopnTiles:
    """The GPU's top-n tiles for groups of ``group`` query heads and a layer whose widest head dim (of d_k and d_v,
    as every tile choice takes it: ``nsa.prefill._tiles``) is ``head_dim``: programs of 128 rows where the group
    padded to a power of two has 16 heads or more (8 tokens at G = 16: each compressed-key tile is read by twice the
    rows), 64 rows below (16 tokens at G = 4); the key tiles through TMA for 64 < head_dim <= 128 (every shape
    timed had d_k widest).
    H200, 64k, independent queries (bench/results/prefill_tiles_cuda.md), ms:
    - rows (2026-12-04, twenty-first session), 64 / 128 rows on 4 warps: public 9.11 / 7.62, the paper's d_k = 192
      11.40 / 9.88, G = 12 9.11 / 8.82, G = 4 3.39 / 3.69, the GPT's G = 2 1.20 / 1.87; 128 rows on 8 warps and 256
      rows on 8 ran 9.46 and 10.60 at the public shape, 32 rows 16.07. Groups above 16 (2 or 4 tokens per program)
      were not timed.
    - key loads (2026-12-04, twenty-fifth session, indices equal), pointers / TMA: public 7.60 / 7.43, G = 12 8.80 /
      7.55, G = 4 3.37 / 3.26, but the GPT's d_k = 64 1.17 / 1.29 and the paper's d_k = 192 9.85 / 10.06; 3 stages
      with TMA: public 7.89, G = 4 3.21, paper 13.22."""
    return TopnTiles(rows=128 if next_power_of_2(group) >= 16 else 64, tma=64 < head_dim <= 128)


@triton.jit
def _shift(x, offset, NS: tl.constexpr):
    """y[:, c] = x[:, c - offset] (0 where c - offset is outside [0, NS)), for x [BQ, NS]."""
    src = tl.arange(0, NS) - offset
    inside = (src >= 0) & (src < NS)
    moved = tl.gather(x, tl.broadcast_to(tl.where(inside, src, 0)[None, :], x.shape), axis=1)
    return tl.where(inside[None, :], moved, 0.0)


@triton.jit
def _tile_keys(q1, q2, lse, carry, k_ptr, k_desc1, k_desc2, key0, start, hi, hk, stride_kt, stride_kh, qk_scale, t_row,
               row_ok, current, query_ok, BQ: tl.constexpr, GP: tl.constexpr, CMP_BLOCK: tl.constexpr,
               CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr, RATIO: tl.constexpr, SPILL: tl.constexpr,
               NS: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, PRECISION: tl.constexpr,
               TMA: tl.constexpr):
    """The candidate keys [BQ, NS] of the selection blocks start / RATIO .. + NS (NO_KEY where a block is not a
    candidate), from the compressed keys start .. start + NS * RATIO (k_ptr at the sequence's first key, row key0
    of the descriptors where TMA, whose keys past hi no row sees), and the carry of Eq. 9's spill into the next
    tile."""
    key_tile = tl.arange(0, NS * RATIO)
    cols = start + key_tile
    k1, k2 = load_split_rows(k_ptr + start * stride_kt + hk * stride_kh, k_desc1, k_desc2, key0 + start, hk, key_tile,
                             cols < hi, stride_kt, NS * RATIO, TMA, DQK, D1, D2)
    s = scaled_scores(q1, q2, k1, k2, qk_scale, D2, PRECISION)
    seen = (cols[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= t_row[:, None]) & row_ok[:, None]
    p = tl.where(seen, tl.math.exp2(s - lse[:, None]), 0.0)  # Eq. 8
    group = tl.reshape(tl.sum(tl.reshape(p, [BQ, GP, NS * RATIO]), axis=1), [BQ, NS, RATIO])  # Eq. 10
    within = tl.arange(0, RATIO)
    score = tl.sum(group * eq9_overlap(within, 0, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK)[None, None, :], axis=2) + carry
    carry = tl.zeros([BQ, NS], tl.float32)
    for e in tl.static_range(1, SPILL + 1):  # Eq. 9: the part of each block that lands e blocks later
        spill = tl.sum(group * eq9_overlap(within, e, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK)[None, None, :], axis=2)
        score += _shift(spill, e, NS)
        carry += _shift(spill, e - NS, NS)
    block = start // RATIO + tl.arange(0, NS)
    candidate = (block[None, :] >= 1) & (block[None, :] <= current[:, None] - 2) & query_ok[:, None]
    keys = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (-block[None, :] + MAX_INDEX)
    return tl.where(candidate, keys, NO_KEY), carry


@triton.jit
def _column_insert(columns, lost, keys, DEPTH: tl.constexpr):
    """Insert keys [BQ, NS] into the columns' descending lists (a tuple of DEPTH [BQ, NS] tensors, entry i of
    every column's list) and fold what falls off the end into lost, the largest key each column dropped."""
    kept: tl.tuple = ()
    for i in tl.static_range(DEPTH):
        kept = kept + (tl.maximum(columns[i], keys),)
        keys = tl.minimum(columns[i], keys)
    return kept, tl.maximum(lost, keys)


@triton.jit
def _topn_kernel(
    q_ptr, k_ptr, lse_ptr, idx_ptr, cu_q_ptr, cu_k_ptr, tile_seq_ptr, tile_first_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_it, stride_ih, num_heads, num_seqs, qk_scale, k_desc1, k_desc2,
    GROUP: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    SEL_BLOCK: tl.constexpr, RATIO: tl.constexpr, SPILL: tl.constexpr, NS: tl.constexpr, KP: tl.constexpr,
    NUM_SELECTED: tl.constexpr, OUT_WIDTH: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    PRECISION: tl.constexpr, DEPTH: tl.constexpr, TMA: tl.constexpr,
):
    hk = tl.program_id(1)
    tok0, seq_len, key0, num_keys, first = tile_origin(tile_seq_ptr, tile_first_ptr, cu_q_ptr, cu_k_ptr, num_seqs, BQ)
    rows = tl.arange(0, BQ * GP)
    t_row = first + rows // GP
    g_row = rows % GP
    row_ok = (t_row < seq_len) & (g_row < GROUP)
    head = hk * GROUP + g_row
    q_tile = q_ptr + (tok0 + first) * stride_qt
    q_offsets = (rows // GP) * stride_qt + head * stride_qh
    q1, q2 = load_split_at(q_tile, q_offsets, row_ok, DQK, D1, D2)
    lse = tl.load(lse_ptr + (tok0 + t_row) * num_heads + head, mask=row_ok, other=float("inf"))
    t_query = first + tl.arange(0, BQ)
    query_ok = t_query < seq_len
    current = t_query // SEL_BLOCK
    last = tl.minimum(first + BQ, seq_len) - 1
    hi = visible_key_count(last, num_keys, CMP_STRIDE, CMP_BLOCK)
    # The tiles run on to the last candidate block. Where l > l' + d a block can be complete before the compressed
    # blocks over its end are visible: past the visible keys it scores 0 (or what Eq. 9 carries into it) and must
    # still rank (with fewer candidates than n - 3 all are selected). Elsewhere key_end == hi.
    key_end = tl.maximum(hi, (last // SEL_BLOCK - 1) * RATIO)
    k_seq = k_ptr + key0 * stride_kt
    # Each of the NS block columns of a tile keeps a descending list of the DEPTH largest keys it has seen (no
    # reduction across threads per tile); the n - 3 best of a row are the best of its columns' lists unless some
    # column dropped a key that would rank among them (lost), which only DEPTH < n - 3 allows.
    columns: tl.tuple = ()
    for _ in tl.static_range(DEPTH):
        columns = columns + (tl.full([BQ, NS], NO_KEY, tl.int64),)
    lost = tl.full([BQ, NS], NO_KEY, tl.int64)
    carry = tl.zeros([BQ, NS], tl.float32)
    for start in range(0, key_end, NS * RATIO):
        keys, carry = _tile_keys(q1, q2, lse, carry, k_seq, k_desc1, k_desc2, key0, start, hi, hk, stride_kt,
                                 stride_kh, qk_scale, t_row, row_ok, current, query_ok, BQ, GP, CMP_BLOCK, CMP_STRIDE,
                                 SEL_BLOCK, RATIO, SPILL, NS, DQK, D1, D2, PRECISION, TMA)
        columns, lost = _column_insert(columns, lost, keys, DEPTH)
    # The best n - 3 of the lists: each column's head is its largest, so n - 3 rounds of (take the largest head,
    # advance that column).
    slot = tl.arange(0, KP)[None, :]
    best = tl.full([BQ, KP], NO_KEY, tl.int64)
    top = tl.full([BQ], NO_KEY, tl.int64)
    for r in tl.static_range(NUM_SELECTED - 3):
        top = tl.max(columns[0], axis=1)
        best = tl.where(slot == r, top[:, None], best)
        taken = columns[0] == top[:, None]
        advanced: tl.tuple = ()
        for i in tl.static_range(DEPTH - 1):
            advanced = advanced + (tl.where(taken, columns[i + 1], columns[i]),)
        columns = advanced + (tl.where(taken, NO_KEY, columns[DEPTH - 1]),)
    if DEPTH < NUM_SELECTED - 3:  # noqa: SIM102 (a constexpr test: the merge below is compiled only then)
        if tl.max((tl.max(lost, axis=1) > top).to(tl.int32), axis=0) > 0:  # a dropped key ranks: redo exactly
            slot_id = slot.to(tl.int64) + tl.zeros([BQ, KP], tl.int64)
            best = tl.where(slot_id < NUM_SELECTED - 3, -1 - slot_id, slot_id + KEEP)
            carry = tl.zeros([BQ, NS], tl.float32)
            for start in range(0, key_end, NS * RATIO):
                keys, carry = _tile_keys(q1, q2, lse, carry, k_seq, k_desc1, k_desc2, key0, start, hi, hk,
                                         stride_kt, stride_kh, qk_scale, t_row, row_ok, current, query_ok, BQ, GP,
                                         CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, RATIO, SPILL, NS, DQK, D1, D2, PRECISION,
                                         TMA)
                best = _merge_top(best, keys)
    # Forced blocks, then the chosen candidates; written ascending, then -1.
    chosen = tl.where((best >= 0) & (best < KEEP), -(best & 0xFFFFFFFF) + MAX_INDEX, UNUSED)
    current = current.to(tl.int64)[:, None]
    column = tl.arange(0, 4)[None, :]
    forced = tl.where(column == 0, 0, UNUSED).to(tl.int64) + tl.zeros([BQ, 4], tl.int64)
    forced = tl.where((column == 1) & (current >= 2), current - 1, forced)
    forced = tl.where((column == 2) & (current >= 1), current, forced)
    out_slot = tl.arange(0, OUT_WIDTH)[None, :]
    ordered = tl.full([BQ, OUT_WIDTH], -1, tl.int64)
    for r in tl.static_range(NUM_SELECTED):  # ascending: the smallest remaining block, n times
        low = tl.minimum(tl.min(chosen, axis=1), tl.min(forced, axis=1))[:, None]
        ordered = tl.where(out_slot == r, tl.where(low == UNUSED, -1, low), ordered)
        chosen = tl.where(chosen == low, UNUSED, chosen)
        forced = tl.where(forced == low, UNUSED, forced)
    out_ptrs = idx_ptr + (tok0 + t_query)[:, None] * stride_it + hk * stride_ih + out_slot
    tl.store(out_ptrs, ordered.to(idx_ptr.dtype.element_ty), mask=query_ok[:, None] & (out_slot < NUM_SELECTED))


@triton.jit
def _merge_top(best, keys):
    """Insert into the top set best [BQ, KP] the keys [BQ, NS] that beat its smallest entry, the largest first,
    until no row has one left (all keys distinct): exact at any n, but each turn reduces across threads, and a
    tile takes as many turns as its row with the most entering keys (the column lists' fallback)."""
    top = tl.max(keys, axis=1)
    low = tl.min(best, axis=1)
    while tl.max((top > low).to(tl.int32), axis=0) > 0:
        enters = top > low
        best = tl.where((best == low[:, None]) & enters[:, None], top[:, None], best)
        keys = tl.where(keys == top[:, None], NO_KEY, keys)
        top = tl.max(keys, axis=1)
        low = tl.min(best, axis=1)
    return best


def select_topn(q: Tensor, k_cmp: Tensor, lse: Tensor, packed: Packed, cu_cmp: Tensor, *, block_size: int,
                block_stride: int, sel_block_size: int, num_selected: int, scale: float,
                tiles: TopnTiles) -> Tensor:
    """Block indices int32 [N, H_kv, num_selected] (ascending, then -1) for query rows q [N, HQ, Dk] against the
    packed compressed keys k_cmp [N_cmp, H_kv, Dk]; lse [N, HQ] is the compression branch's base-2 log-sum-exp
    (+inf where nothing is visible)."""
    num_heads, num_kv_heads = q.shape[1], k_cmp.shape[1]
    group = num_heads // num_kv_heads
    shape = topn_tile_shape(num_selected, group, sel_block_size, block_stride, tiles.rows, tiles.key_blocks)
    out = output_buffer(q.shape[0], num_kv_heads, num_selected, like=q, dtype=torch.int32)
    table = packed_tiles(packed, shape["BQ"])
    k_cmp = k_cmp if k_cmp.shape[0] else k_cmp.new_zeros(1, *k_cmp.shape[1:])
    spill = (sel_block_size - block_stride + block_size - 1) // sel_block_size
    dims = {key: value for key, value in split_dims(q.shape[-1], 16).items() if key in ("DQK", "D1", "D2")}
    _topn_kernel[(table.grid, num_kv_heads)](
        q, k_cmp, lse, out, packed.cu, cu_cmp, table.seq, table.first,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), out.stride(0), out.stride(1),
        num_heads, packed.num_seqs, scale * LOG2E,
        **kv_descriptors(k_cmp, None, shape["NS"] * shape["RATIO"], dims, tiles.tma),
        GROUP=group, CMP_BLOCK=block_size, CMP_STRIDE=block_stride, SEL_BLOCK=sel_block_size, SPILL=spill,
        NUM_SELECTED=num_selected, OUT_WIDTH=next_power_of_2(num_selected), PRECISION=dot_precision(q.dtype),
        DEPTH=tiles.depth_for(num_selected),
        **shape, **dims, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
