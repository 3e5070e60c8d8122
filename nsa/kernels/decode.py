"""Fused single-token NSA decode on Triton: flash-decoding over the three branches.

One decode step of a batch reads, per (sequence, KV head), the visible compressed blocks, the n
selected blocks and the w-token window ring, once for all G query heads of the group (GQA: the G
rows form the M side of every tl.dot, so a group's keys are loaded once, not G times).

Launches (all grids from host-known bounds, so a step is CUDA-graph capturable):
1. cmp_partials: grid (B*Hkv, num_splits). Each split scans a range of compressed blocks, writes
   the raw scaled logits (selection needs the normalised probabilities, which need the global
   log-sum-exp) and a flash-decoding partial (row max m, row sum l, unnormalised acc).
2. cmp_group_probs: grid (B*Hkv, num_splits). Merges the m/l partials into each head's lse and
   writes p_grp[n] = sum_g exp(logit[g, n] - lse[g]) (Eq. 8 + Eq. 10) for every visible block.
3. select_topn: grid (B*Hkv,). Eq. 9 and top-n with the rule of nsa.selection_scorer.topn_blocks
   (forced blocks, complete candidates, ties to the lower index) through one tl.topk of packed keys.
4. sel_win_partials: grid (B*Hkv, n + window tiles). One program per selected block (tokens <= t)
   and per tile of the window ring (slots holding positions t-w+1..t).
5. combine: grid (B*Hkv, G). Merges one head's partials of each branch and applies its gates.
The merges (2 and 5) load CHUNK partial slots per step and 5 spreads a group's heads over programs: at
batch 1 a step has up to ~128 splits per (sequence, KV head), and one program per pair loading one slot
at a time made the merge most of the step (73 of 134 us on the H200 at 128k).

Layouts (strides passed; only the last dimension of each tensor must be contiguous): q [B, HQ, Dk]; gates [B, HQ, 3];
positions [B] (absolute position t of the new token, already written to the cache); k/v buffers
[B, rows, Hkv, D] as in NSAKVCache; block_indices [B, Hkv, n] int64 (-1 = unused). Paged KV (NSAKVCache's
paged layout): k_sel/v_sel are pools [pages + 1, PAGE, Hkv, D] and the selected block j of sequence b is read
at page page_table[b, j*l' // PAGE], rows (j*l') % PAGE onwards (PAGE a multiple of l': one lookup per block;
the table is read on the device, so a step's arguments do not depend on which pages are mapped).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nsa.functional import NSASizes

BLOCK_W = 64  # window ring slots per tile
MAX_INDEX = tl.constexpr(0x7FFFFFFF)
NO_KEY = tl.constexpr(-(1 << 62))  # a non-candidate's top-n key: below every candidate's
UNUSED = tl.constexpr(1 << 30)  # an empty selection slot while sorting: after every block index, stored as -1


class DecodeTiles(NamedTuple):
    """Launch settings of a decode step. cmp_block: compressed blocks per tile; programs_per_sm: the
    compressed-branch splits aim at about this many programs per SM, never more splits than tiles (rounded
    up to a power of two, so a growing cache recompiles only when its length doubles); cmp_warps /
    cmp_stages: the compressed-partials launch; merge_chunk: partial slots per load in the merges. Defaults from
    the H200 sweep (bench_decode --tiles, bench/results/decode_tiles_cuda.jsonl, public shape, CUDA graphs):
    128-block tiles ran batch 1 in 25.3 / 37.4 us at 64k / 128k against 27.3 / 42.6 with 64, and batch 32 within
    3% of the best candidate. Fusing launches 2 and 3 (one program per (sequence, KV head) summing the group
    probabilities from the logits and selecting) ran 1.3-5x slower in the sweep of 2026-12-02: one program per
    pair cannot spread the logits' read over the GPU."""

    cmp_block: int = 128
    programs_per_sm: int = 8
    cmp_warps: int = 4
    cmp_stages: int = 3
    merge_chunk: int = 16


@triton.jit
def _load_group_queries(q_ptr, stride_qb, stride_qh, b, h, G: tl.constexpr, DK: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_DK)
    ptrs = q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    return tl.load(ptrs, mask=(offs_g < G)[:, None] & (offs_d < DK)[None, :], other=0.0)


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, rows, valid, stride_kr, stride_vr, scale, m, l, acc,
                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Online-softmax update of (m, l, acc) [BLOCK_G], [BLOCK_G], [BLOCK_G, BLOCK_DV] with the keys at
    `rows` (k_ptr/v_ptr already point at this sequence and head). Returns (m, l, acc, scores)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + rows[:, None] * stride_kr + offs_dk[None, :],
                mask=valid[:, None] & (offs_dk < DK)[None, :], other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row must not give NaN
    alpha = tl.exp(m - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    v = tl.load(v_ptr + rows[:, None] * stride_vr + offs_dv[None, :],
                mask=valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l * alpha + tl.sum(p, axis=1), acc, scores


@triton.jit
def _store_partial(m_ptr, l_ptr, acc_ptr, count_ptr, bh, slot, num_slots, m, l, acc, count,
                   BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = bh * num_slots + slot
    tl.store(count_ptr + base, count)
    tl.store(m_ptr + base * BLOCK_G + offs_g, m)
    tl.store(l_ptr + base * BLOCK_G + offs_g, l)
    tl.store(acc_ptr + (base * BLOCK_G + offs_g)[:, None] * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _num_visible_cmp(t, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Compressed blocks visible to the query at position t: i*d + l - 1 <= t."""
    return tl.where(t >= CMP_BLOCK - 1, (t - CMP_BLOCK + 1) // CMP_STRIDE + 1, 0)


@triton.jit
def _cmp_partials_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, count_ptr,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    scale, logits_cols, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    num_visible = _num_visible_cmp(tl.load(pos_ptr + b), CMP_BLOCK, CMP_STRIDE)
    q = _load_group_queries(q_ptr, stride_qb, stride_qh, b, h, G, DK, BLOCK_G, BLOCK_DK)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    first = split * TILES_PER_SPLIT * BLOCK_N
    offs_g = tl.arange(0, BLOCK_G)
    count = tl.zeros([], tl.int32)
    # No branch on the visible count inside the loop (a conditional body is not software-pipelined):
    # tiles past it are fully masked, which loads no memory and leaves (m, l, acc) unchanged.
    for i in range(0, TILES_PER_SPLIT):
        rows = first + i * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = rows < num_visible
        count += tl.sum(valid.to(tl.int32))
        m, l, acc, scores = _attend_tile(q, k_ptr + b * stride_kb + h * stride_kh,
                                         v_ptr + b * stride_vb + h * stride_vh, rows, valid,
                                         stride_kn, stride_vn, scale, m, l, acc, DK, DV, BLOCK_DK, BLOCK_DV)
        tl.store(logits_ptr + (bh * BLOCK_G + offs_g)[:, None] * logits_cols + rows[None, :], scores,
                 mask=(offs_g < G)[:, None] & valid[None, :])
    _store_partial(m_ptr, l_ptr, acc_ptr, count_ptr, bh, split, num_slots, m, l, acc, count, BLOCK_G, BLOCK_DV)


@triton.jit
def _slot_rows(bh, first_slot, s0, count, num_slots, CHUNK: tl.constexpr):
    """Partial slots s0 .. s0 + CHUNK of a branch's [first_slot, first_slot + count): rows and validity."""
    offs = s0 + tl.arange(0, CHUNK)
    return bh * num_slots + first_slot + offs, offs < count


@triton.jit
def _partials_max(m_ptr, bh, first_slot, count: tl.constexpr, num_slots, BLOCK_G: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Row max per head over partial slots [first_slot, first_slot + count), 0 where all are empty
    (a finite shift, so exp(m - max) of an empty slot is 0, never NaN)."""
    offs_g = tl.arange(0, BLOCK_G)
    m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s0 in range(0, count, CHUNK):
        rows, ok = _slot_rows(bh, first_slot, s0, count, num_slots, CHUNK)
        m = tl.load(m_ptr + rows[:, None] * BLOCK_G + offs_g[None, :], mask=ok[:, None], other=float("-inf"))
        m_all = tl.maximum(m_all, tl.max(m, axis=0))
    return tl.where(m_all == float("-inf"), 0.0, m_all)


@triton.jit
def _merged_lse(m_ptr, l_ptr, bh, first_slot, count: tl.constexpr, num_slots, BLOCK_G: tl.constexpr,
                CHUNK: tl.constexpr):
    """Log-sum-exp per head over partial slots [first_slot, first_slot + count); -inf if all empty."""
    offs_g = tl.arange(0, BLOCK_G)
    m_safe = _partials_max(m_ptr, bh, first_slot, count, num_slots, BLOCK_G, CHUNK)
    total = tl.zeros([BLOCK_G], tl.float32)
    for s0 in range(0, count, CHUNK):
        rows, ok = _slot_rows(bh, first_slot, s0, count, num_slots, CHUNK)
        at = rows[:, None] * BLOCK_G + offs_g[None, :]
        m = tl.load(m_ptr + at, mask=ok[:, None], other=float("-inf"))
        total += tl.sum(tl.load(l_ptr + at, mask=ok[:, None], other=0.0) * tl.exp(m - m_safe[None, :]), axis=0)
    return tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def _cmp_group_probs_kernel(
    pos_ptr, logits_ptr, m_ptr, l_ptr, probs_ptr, logits_cols, probs_cols, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
    CHUNK: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    num_visible = _num_visible_cmp(tl.load(pos_ptr + bh // HKV), CMP_BLOCK, CMP_STRIDE)
    lse = _merged_lse(m_ptr, l_ptr, bh, 0, NUM_SPLITS, num_slots, BLOCK_G, CHUNK)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # no visible block: every logit below is masked anyway
    offs_g = tl.arange(0, BLOCK_G)
    for i in range(0, TILES_PER_SPLIT):
        cols = (split * TILES_PER_SPLIT + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = cols < num_visible
        logits = tl.load(logits_ptr + (bh * BLOCK_G + offs_g)[:, None] * logits_cols + cols[None, :],
                         mask=(offs_g < G)[:, None] & valid[None, :], other=float("-inf"))
        probs = tl.sum(tl.exp(logits - lse[:, None]), axis=0)
        tl.store(probs_ptr + bh * probs_cols + cols, probs, mask=cols < probs_cols)


@triton.jit
def _eq9_term(k, blocks, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr):
    """Eq. 9 as the strided correlation of nsa.block_index.overlap_kernel, term k: compressed block
    j * (l'/d) + u (u = k - (l/d - 1)) overlaps selection block j by min(u*d + l, l') - max(u*d, 0) tokens.
    -> (that compressed block's index for each of ``blocks``, its weight overlap / l)."""
    start = (k - (CMP_BLOCK // CMP_STRIDE - 1)) * CMP_STRIDE
    overlap = tl.minimum(start + CMP_BLOCK, SEL_BLOCK) - tl.maximum(start, 0)
    src = blocks * (SEL_BLOCK // CMP_STRIDE) + k - (CMP_BLOCK // CMP_STRIDE - 1)
    return src, tl.maximum(overlap, 0).to(tl.float32) / CMP_BLOCK


@triton.jit
def _candidate_top(score, blocks, in_range, t, SEL_BLOCK: tl.constexpr, BLOCK_OUT: tl.constexpr):
    """The BLOCK_OUT best candidates among ``blocks`` (complete, not forced), as descending int64 keys: the
    score's float bits (non-negative, so they order as integers) above the negated index, so one tl.topk ranks
    by score and breaks bitwise ties by the lower index; NO_KEY fills the rest."""
    current = t // SEL_BLOCK
    forced = (blocks == 0) | (blocks == current) | (blocks == current - 1)
    candidate = in_range & ~forced & ((blocks + 1) * SEL_BLOCK <= t + 1)
    keys = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (MAX_INDEX - blocks)
    return tl.topk(tl.where(candidate, keys, NO_KEY), BLOCK_OUT)


@triton.jit
def _store_selection(idx_ptr, bh, top, t, SEL_BLOCK: tl.constexpr, NUM_SELECTED: tl.constexpr,
                     BLOCK_OUT: tl.constexpr):
    """The rule of nsa.selection_scorer.topn_blocks from the candidates' top keys: the forced blocks {0,
    t // l' - 1, t // l'} and the best n - |forced| candidates, written ascending and padded with -1."""
    current = t // SEL_BLOCK
    remaining = NUM_SELECTED - 1 - (current >= 1).to(tl.int32) - (current >= 2).to(tl.int32)
    rank = tl.arange(0, BLOCK_OUT)
    picked = tl.where((rank < remaining) & (top > NO_KEY), MAX_INDEX - (top & 0xFFFFFFFF), UNUSED)
    forced = tl.where(rank == 0, 0, UNUSED)
    forced = tl.where((rank == 1) & (current >= 2), current - 1, forced)
    forced = tl.where((rank == 2) & (current >= 1), current, forced).to(tl.int64)
    ordered = -tl.topk(-tl.reshape(tl.join(picked, forced), [2 * BLOCK_OUT]), BLOCK_OUT)  # the smallest, ascending
    tl.store(idx_ptr + bh * NUM_SELECTED + rank, tl.where(ordered == UNUSED, -1, ordered), mask=rank < NUM_SELECTED)


@triton.jit
def _select_topn_kernel(
    probs_ptr, pos_ptr, idx_ptr, probs_cols, num_sel_blocks,
    HKV: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    NUM_SELECTED: tl.constexpr, BLOCK_NSEL: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    """Eq. 9 and top-n for one (sequence, KV head) from the group probabilities of cmp_group_probs."""
    bh = tl.program_id(0)
    t = tl.load(pos_ptr + bh // HKV)
    blocks = tl.arange(0, BLOCK_NSEL)
    in_range = blocks < num_sel_blocks
    score = tl.zeros([BLOCK_NSEL], tl.float32)
    for k in tl.static_range(CMP_BLOCK // CMP_STRIDE - 1 + SEL_BLOCK // CMP_STRIDE):
        src, weight = _eq9_term(k, blocks, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK)
        probs = tl.load(probs_ptr + bh * probs_cols + src, mask=in_range & (src >= 0) & (src < probs_cols), other=0.0)
        score += weight * probs
    top = _candidate_top(score, blocks, in_range, t, SEL_BLOCK, BLOCK_OUT)
    _store_selection(idx_ptr, bh, top, t, SEL_BLOCK, NUM_SELECTED, BLOCK_OUT)


@triton.jit
def _sel_win_partials_kernel(
    q_ptr, k_sel_ptr, v_sel_ptr, k_win_ptr, v_win_ptr, pos_ptr, idx_ptr, page_table_ptr, m_ptr, l_ptr, acc_ptr,
    count_ptr, stride_qb, stride_qh, stride_ksb, stride_ksn, stride_ksh, stride_vsb, stride_vsn, stride_vsh,
    stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn, stride_vwh, stride_ib, stride_ih, stride_pt,
    scale, first_slot, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, NUM_SELECTED: tl.constexpr,
    SEL_BLOCK: tl.constexpr, WINDOW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_W: tl.constexpr, PAGE: tl.constexpr,
):
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    t = tl.load(pos_ptr + b)
    q = _load_group_queries(q_ptr, stride_qb, stride_qh, b, h, G, DK, BLOCK_G, BLOCK_DK)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    count = tl.zeros([], tl.int32)
    if tile < NUM_SELECTED:
        block = tl.load(idx_ptr + b * stride_ib + h * stride_ih + tile)
        first = tl.maximum(block, 0) * SEL_BLOCK  # an unused slot (-1) reads nothing
        offs = tl.arange(0, BLOCK_SEL)
        valid = (block >= 0) & (offs < SEL_BLOCK) & (first + offs <= t)
        count = tl.sum(valid.to(tl.int32))
        if PAGE > 0:  # paged pool [pages + 1, PAGE, Hkv, D]: the block lies in one page (PAGE % SEL_BLOCK == 0)
            page = tl.load(page_table_ptr + b * stride_pt + first // PAGE).to(tl.int64)
            k_seq = k_sel_ptr + page * stride_ksb
            v_seq = v_sel_ptr + page * stride_vsb
            rows = first % PAGE + offs
        else:
            k_seq = k_sel_ptr + b * stride_ksb
            v_seq = v_sel_ptr + b * stride_vsb
            rows = first + offs
        m, l, acc, _ = _attend_tile(q, k_seq + h * stride_ksh, v_seq + h * stride_vsh, rows, valid,
                                    stride_ksn, stride_vsn, scale, m, l, acc, DK, DV, BLOCK_DK, BLOCK_DV)
    else:
        # Ring slot s holds the latest position p <= t with p % w == s: p = t - ((t - s) mod w).
        slots = (tile - NUM_SELECTED) * BLOCK_W + tl.arange(0, BLOCK_W)
        lag = ((t - slots) % WINDOW + WINDOW) % WINDOW
        valid = (slots < WINDOW) & (t - lag >= 0)
        count = tl.sum(valid.to(tl.int32))
        m, l, acc, _ = _attend_tile(q, k_win_ptr + b * stride_kwb + h * stride_kwh,
                                    v_win_ptr + b * stride_vwb + h * stride_vwh, slots, valid,
                                    stride_kwn, stride_vwn, scale, m, l, acc, DK, DV, BLOCK_DK, BLOCK_DV)
    _store_partial(m_ptr, l_ptr, acc_ptr, count_ptr, bh, first_slot + tile, num_slots, m, l, acc, count,
                   BLOCK_G, BLOCK_DV)


@triton.jit
def _merged_head_output(m_ptr, l_ptr, acc_ptr, bh, g, first_slot, count: tl.constexpr, num_slots,
                        BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr):
    """Head g's normalised attention output [BLOCK_DV] from partial slots; 0 if it read nothing."""
    offs_dv = tl.arange(0, BLOCK_DV)
    m_all = tl.full([CHUNK], float("-inf"), tl.float32)
    for s0 in range(0, count, CHUNK):
        rows, ok = _slot_rows(bh, first_slot, s0, count, num_slots, CHUNK)
        m_all = tl.maximum(m_all, tl.load(m_ptr + rows * BLOCK_G + g, mask=ok, other=float("-inf")))
    m_max = tl.max(m_all, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # a finite shift: an empty slot weighs exp(-inf) = 0
    total = tl.zeros([CHUNK], tl.float32)
    out = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, count, CHUNK):
        rows, ok = _slot_rows(bh, first_slot, s0, count, num_slots, CHUNK)
        at = rows * BLOCK_G + g
        weight = tl.exp(tl.load(m_ptr + at, mask=ok, other=float("-inf")) - m_safe)
        total += tl.load(l_ptr + at, mask=ok, other=0.0) * weight
        acc = tl.load(acc_ptr + at[:, None] * BLOCK_DV + offs_dv[None, :], mask=ok[:, None], other=0.0)
        out += tl.sum(acc * weight[:, None], axis=0)
    denominator = tl.sum(total, axis=0)
    return out / tl.where(denominator > 0, denominator, 1.0)


@triton.jit
def _combine_kernel(
    gates_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, reads_ptr, stride_gb, stride_gh, stride_ob, stride_oh,
    num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_SELECTED: tl.constexpr,
    NUM_WIN_TILES: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program per (sequence, KV head, query head of the group): G programs share the merge's reads."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    o_cmp = _merged_head_output(m_ptr, l_ptr, acc_ptr, bh, g, 0, NUM_SPLITS, num_slots, BLOCK_G, BLOCK_DV, CHUNK)
    o_sel = _merged_head_output(m_ptr, l_ptr, acc_ptr, bh, g, NUM_SPLITS, NUM_SELECTED, num_slots, BLOCK_G,
                                BLOCK_DV, CHUNK)
    o_win = _merged_head_output(m_ptr, l_ptr, acc_ptr, bh, g, NUM_SPLITS + NUM_SELECTED, NUM_WIN_TILES, num_slots,
                                BLOCK_G, BLOCK_DV, CHUNK)
    offs_dv = tl.arange(0, BLOCK_DV)
    gate_ptr = gates_ptr + b * stride_gb + (h * G + g) * stride_gh
    out = (tl.load(gate_ptr).to(tl.float32) * o_cmp + tl.load(gate_ptr + 1).to(tl.float32) * o_sel
           + tl.load(gate_ptr + 2).to(tl.float32) * o_win)
    tl.store(out_ptr + b * stride_ob + (h * G + g) * stride_oh + offs_dv, out.to(out_ptr.dtype.element_ty),
             mask=offs_dv < DV)
    if g == 0:
        # Keys read per branch: the sums of what each program's masks let through.
        slots = tl.arange(0, BLOCK_SLOTS)
        counts = tl.load(count_ptr + bh * num_slots + slots, mask=slots < num_slots, other=0).to(tl.int64)
        tl.store(reads_ptr + bh * 3, tl.sum(tl.where(slots < NUM_SPLITS, counts, 0), axis=0))
        tl.store(reads_ptr + bh * 3 + 1,
                 tl.sum(tl.where((slots >= NUM_SPLITS) & (slots < NUM_SPLITS + NUM_SELECTED), counts, 0), axis=0))
        tl.store(reads_ptr + bh * 3 + 2, tl.sum(tl.where(slots >= NUM_SPLITS + NUM_SELECTED, counts, 0), axis=0))


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _lse_chunk(num_splits: int) -> int:
    """m/l slots per load when merging log-sum-exps: all splits at once up to 64 ([64, G] floats)."""
    return min(64, triton.next_power_of_2(num_splits))


def default_tiles(device: torch.device) -> DecodeTiles:
    """The GPU's settings; in the interpreter (tests, one "SM") 16-block tiles and many programs, so tiny caches
    still split and merge."""
    return DecodeTiles() if device.type == "cuda" else DecodeTiles(cmp_block=16, programs_per_sm=64, merge_chunk=2)


def num_cmp_splits(num_tiles: int, pairs: int, tiles: DecodeTiles, device: torch.device) -> int:
    """Splits of the compressed branch per (sequence, KV head): about tiles.programs_per_sm programs per SM
    over the batch, at most one per tile (tiles rounded up to a power of two: recompiles only at doublings)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(triton.cdiv(tiles.programs_per_sm * sms, pairs), triton.next_power_of_2(num_tiles)))


def decode_attention_triton(
    q: torch.Tensor, gates: torch.Tensor, positions: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    num_cmp_bound: int, k_sel: torch.Tensor, v_sel: torch.Tensor, num_sel_blocks: int, k_win: torch.Tensor,
    v_win: torch.Tensor, sizes: NSASizes, scale: float, page_table: torch.Tensor | None = None,
    tiles: DecodeTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One NSA decode step (layouts in the module docstring). Returns (o [B, HQ, Dv] in q's dtype,
    block_indices [B, Hkv, n] int64, reads [B, Hkv, 3] int64: the keys the kernels' masks let through per
    branch (cmp, sel, win), counted inside the kernels). num_cmp_bound / num_sel_blocks are host bounds (the largest
    sequence's counts, or the capacity's for a static-shape step); each sequence reads only what
    its own position makes visible. page_table [B, pages] int32 (paged layout: k_sel/v_sel are pools
    [pages + 1, P, Hkv, D] of P-token pages, P a multiple of l'); None: per-sequence buffers. tiles: launch settings
    (default_tiles(q.device) when None)."""
    tiles = default_tiles(q.device) if tiles is None else tiles
    batch, num_heads, dk = q.shape
    num_kv_heads, dv = k_cmp.shape[2], v_cmp.shape[-1]
    group = num_heads // num_kv_heads
    block_g, block_dk, block_dv = _block(group), _block(dk), _block(dv)
    pairs = batch * num_kv_heads
    # The split count and tiles per split (a power of two) are compile-time constants (unrolled merges,
    # pipelined loops). Splits or tiles past a sequence's visible blocks read nothing.
    num_tiles = max(1, triton.cdiv(num_cmp_bound, tiles.cmp_block))
    num_splits = num_cmp_splits(num_tiles, pairs, tiles, q.device)
    tiles_per_split = triton.next_power_of_2(triton.cdiv(num_tiles, num_splits))
    logits_cols = num_splits * tiles_per_split * tiles.cmp_block
    num_win_tiles = triton.cdiv(sizes.window_size, BLOCK_W)
    num_slots = num_splits + sizes.num_selected + num_win_tiles
    logits = q.new_empty(pairs, block_g, logits_cols, dtype=torch.float32)
    m_part = q.new_empty(pairs, num_slots, block_g, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = q.new_empty(pairs, num_slots, block_g, block_dv, dtype=torch.float32)
    counts = torch.empty(pairs, num_slots, device=q.device, dtype=torch.int32)
    heads = dict(HKV=num_kv_heads, G=group)
    blocks = dict(BLOCK_G=block_g, BLOCK_DK=block_dk, BLOCK_DV=block_dv)

    _cmp_partials_kernel[(pairs, num_splits)](
        q, k_cmp, v_cmp, positions, logits, m_part, l_part, acc_part, counts,
        q.stride(0), q.stride(1), *k_cmp.stride()[:3], *v_cmp.stride()[:3],
        scale, logits_cols, num_slots,
        DK=dk, DV=dv, CMP_BLOCK=sizes.block_size, CMP_STRIDE=sizes.block_stride, BLOCK_N=tiles.cmp_block,
        TILES_PER_SPLIT=tiles_per_split, **heads, **blocks, num_warps=tiles.cmp_warps, num_stages=tiles.cmp_stages,
    )
    p_grp = q.new_empty(batch, num_kv_heads, num_cmp_bound, dtype=torch.float32)
    _cmp_group_probs_kernel[(pairs, num_splits)](
        positions, logits, m_part, l_part, p_grp, logits_cols, num_cmp_bound, num_slots,
        CMP_BLOCK=sizes.block_size, CMP_STRIDE=sizes.block_stride, BLOCK_G=block_g, BLOCK_N=tiles.cmp_block,
        NUM_SPLITS=num_splits, TILES_PER_SPLIT=tiles_per_split, CHUNK=_lse_chunk(num_splits), **heads,
    )
    block_indices = q.new_empty(batch, num_kv_heads, sizes.num_selected, dtype=torch.long)
    block_out = triton.next_power_of_2(sizes.num_selected)
    _select_topn_kernel[(pairs,)](
        p_grp, positions, block_indices, num_cmp_bound, num_sel_blocks, HKV=num_kv_heads,
        CMP_BLOCK=sizes.block_size, CMP_STRIDE=sizes.block_stride, SEL_BLOCK=sizes.sel_block_size,
        NUM_SELECTED=sizes.num_selected, BLOCK_OUT=block_out,
        BLOCK_NSEL=triton.next_power_of_2(max(num_sel_blocks, block_out, 16)), num_warps=8,
    )
    _sel_win_partials_kernel[(pairs, sizes.num_selected + num_win_tiles)](
        q, k_sel, v_sel, k_win, v_win, positions, block_indices,
        positions if page_table is None else page_table,  # a placeholder pointer without pages (never read)
        m_part, l_part, acc_part, counts,
        q.stride(0), q.stride(1), *k_sel.stride()[:3], *v_sel.stride()[:3], *k_win.stride()[:3],
        *v_win.stride()[:3], block_indices.stride(0), block_indices.stride(1),
        0 if page_table is None else page_table.stride(0), scale, num_splits, num_slots,
        DK=dk, DV=dv, NUM_SELECTED=sizes.num_selected, SEL_BLOCK=sizes.sel_block_size,
        WINDOW=sizes.window_size, BLOCK_SEL=_block(sizes.sel_block_size), BLOCK_W=BLOCK_W,
        PAGE=0 if page_table is None else k_sel.shape[1], **heads, **blocks,
    )
    out = torch.empty(batch, num_heads, dv, device=q.device, dtype=q.dtype)
    reads = q.new_empty(batch, num_kv_heads, 3, dtype=torch.long)
    _combine_kernel[(pairs, group)](
        gates, out, m_part, l_part, acc_part, counts, reads, gates.stride(0), gates.stride(1), out.stride(0),
        out.stride(1), num_slots, NUM_SPLITS=num_splits, BLOCK_SLOTS=triton.next_power_of_2(num_slots), G=group,
        HKV=num_kv_heads, DV=dv, NUM_SELECTED=sizes.num_selected,
        NUM_WIN_TILES=num_win_tiles, BLOCK_G=block_g, BLOCK_DV=block_dv, CHUNK=tiles.merge_chunk, num_warps=4,
    )
    return out, block_indices, reads
