"""Fused single-token NSA decode on Triton: flash-decoding over the three branches.

One decode step of a batch reads, per (sequence, KV head), the visible compressed blocks, the n
selected blocks and the w-token window ring, once for all G query heads of the group (GQA: the G
rows form the M side of every tl.dot, so a group's keys are loaded once, not G times).

Launches (all grids from host-known bounds, so a step is CUDA-graph capturable):
1. cmp_partials: grid (B*Hkv, num_splits). Each split scans a range of compressed blocks and writes a
   flash-decoding partial (row max m, row sum l, unnormalised acc) and, per head and tile, Eq. 9 applied to the
   tile's probabilities relative to the running row max (selection needs the normalised probabilities, which
   need the global log-sum-exp): ceil((l/d - 1) / (l'/d)) + 1 planes of terms per selection block, half the
   logits' bytes at the paper's blocks, and the row max (ref) per tile.
2. split_top_blocks: grid (B*Hkv, num_splits). Merges the m/l partials into each head's lse, scores the split's
   selection blocks (sum over heads g and planes s of exp(ref[g] - lse[g]) * term[s, g, j - s]: Eq. 8 + 10) and
   writes its best n candidates as packed (score, index) keys.
3. select_topn: grid (B*Hkv,). Top-n with the rule of nsa.selection_scorer.topn_blocks (forced blocks, complete
   candidates, ties to the lower index) through one tl.topk over the splits' keys: every block of the overall top
   is in its split's top, and the keys order blocks exactly (score bits, then the lower index).
4. sel_win_partials: grid (B*Hkv, n / sel_blocks + window tiles). One program per sel_blocks selected blocks
   (tokens <= t; their rows side by side in one tile) and per tile of the window ring (slots holding positions
   t-w+1..t).
5. combine: grid (B*Hkv, G). Merges one head's partials of each branch and applies its gates.
The merges (2 and 5) load CHUNK partial slots per step and 5 spreads a group's heads over programs: at
batch 1 a step has up to ~128 splits per (sequence, KV head), and one program per pair loading one slot
at a time made the merge most of the step (73 of 134 us on the H200 at 128k). 2 and 5 run one warp per
program: their reductions are small, and with four warps each crossed warps through shared memory (the H200's
L1 / shared-memory pipe, not DRAM, bounded them: 89% against 22% in Nsight Compute).

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
from nsa.kernels.launch_args import cdiv, next_power_of_2
from nsa.kernels.tiles import eq9_overlap

BLOCK_W = 64  # window ring slots per tile
LSE_SLOTS_PER_LOAD = 64  # the lse merges load at most [64, G] m / l floats per step
MAX_INDEX = tl.constexpr(0x7FFFFFFF)
NO_KEY = tl.constexpr(-(1 << 62))  # a non-candidate's top-n key: below every candidate's
UNUSED = tl.constexpr(1 << 30)  # an empty selection slot while sorting: after every block index, stored as -1


class DecodeTiles(NamedTuple):
    """Launch settings of a decode step (H200 measurements: bench/results/decode_cuda.md, public shape, CUDA graphs).

    cmp_block: compressed-block lanes per tile (whole selection blocks of l'/d lanes, padded to a power of two);
    single_tile_block: the lanes instead where that many leave every split one tile (small batches: fewer splits
    to merge). With several tiles per split, 64 lanes let two programs' pipeline buffers share an SM: batch 32 ran
    11% / 8% faster at 64k / 128k than with 128, batch 1 11-21% slower (2026-12-03). programs_per_sm: the
    compressed-branch splits aim at about this many programs per SM, never more splits than tiles (rounded up to a
    power of two, so a growing cache recompiles only when its length doubles). cmp_warps / cmp_stages: the
    compressed-partials launch. merge_chunk: partial slots per load in the merges. sel_blocks: selected blocks per
    program of the selected / window partials, a power of two (their rows in one tile; window tiles of sel_blocks x
    64 ring slots): 2 ran 0.1568 / 0.2487 ms at batch 32, 64k / 128k, against 0.1602 / 0.2522 for 1 and 0.1618 /
    0.2543 for 4. scores_warps / combine_warps: warps of launches 2 and 5; one ran 0.1368 / 0.2211 ms at batch 32
    against 0.1377 / 0.2346 for four (2026-12-03, fourteenth session). Fusing launches 2 and 3 into one program per
    (sequence, KV head) ran 1.3-5x slower on 2026-12-02: one program per pair cannot spread the read over the GPU;
    the splits' own top-n candidates (launch 2) leave launch 3 a few keys per split."""

    cmp_block: int = 64
    single_tile_block: int = 128
    programs_per_sm: int = 8
    cmp_warps: int = 4
    cmp_stages: int = 3
    merge_chunk: int = 16
    sel_blocks: int = 2
    scores_warps: int = 1
    combine_warps: int = 1


@triton.jit
def _load_group_queries(q_ptr, stride_qb, stride_qh, b, h, G: tl.constexpr, DK: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_DK)
    ptrs = q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(ptrs, mask=(offs_g < G)[:, None] & (offs_d < DK)[None, :], other=0.0)
    # A non-finite query attends as zeros, as in the torch step: its head's output is flagged NaN by the combine,
    # and the group's other heads select from Eq. 9 sums that hold no NaN.
    return tl.where(q * 0.0 == 0.0, q, 0.0)


@triton.jit
def _nan_if_infinite(x):
    """x with +-inf entries turned NaN, others bit for bit (x * 0 is +-0 at finite x, NaN at NaN and +-inf). A NaN
    key makes every score of its rows NaN; an inf one would give +inf scores (NaN as well) or -inf ones, which
    drop the key where the contract (nsa.nonfinite) says NaN."""
    return x + x * 0.0


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, k_rows, v_rows, valid, scale, m, l, acc,
                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Online-softmax update of (m, l, acc) [BLOCK_G], [BLOCK_G], [BLOCK_G, BLOCK_DV] with the keys whose rows
    start k_rows / v_rows elements after k_ptr / v_ptr (already at this sequence and head). Returns (m, l, acc,
    p): p [BLOCK_G, rows] the tile's probabilities relative to m (0 where m is -inf or the key is masked)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _nan_if_infinite(tl.load(k_ptr + k_rows[:, None] + offs_dk[None, :],
                                 mask=valid[:, None] & (offs_dk < DK)[None, :], other=0.0))
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row must not give NaN
    alpha = tl.exp(m - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    v = tl.load(v_ptr + v_rows[:, None] + offs_dv[None, :], mask=valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l * alpha + tl.sum(p, axis=1), acc, p


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
def _tile_eq9_terms(p, s: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
                    SEL_BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """What each of a tile's BLOCK_Q selection blocks' own compressed blocks give selection block j + s by Eq. 9,
    per head: p [BLOCK_G, BLOCK_Q * BLOCK_R], lane (j, r) holding compressed block (tile's first selection block
    + j) * R + r, R = l'/d (r >= R: padding, p = 0), which starts r * d into block j and so overlaps block j + s
    as eq9_overlap(r, s) weighs (s runs to ceil((l/d - 1) / R)). -> [BLOCK_G, BLOCK_Q]."""
    R: tl.constexpr = SEL_BLOCK // CMP_STRIDE
    r = tl.arange(0, BLOCK_R)
    weight = tl.where(r < R, eq9_overlap(r, s, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK), 0.0)
    return tl.sum(tl.reshape(p, [BLOCK_G, BLOCK_Q, BLOCK_R]) * weight[None, None, :], axis=2)


@triton.jit
def _cmp_partials_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, terms_ptr, ref_ptr, m_ptr, l_ptr, acc_ptr, count_ptr,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    scale, num_pairs, num_tiles, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CMP_BLOCK: tl.constexpr,
    CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, SPILL: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr,
):
    """One split: a flash-decoding partial (m, l, acc) over its tiles and, per tile and head, the Eq. 9 terms of
    its compressed blocks (planes s = 0 .. SPILL: what they give the selection block s after their own) relative
    to the running row max (stored beside them as ref): (SPILL + 1) / (l'/d) of the logits' bytes (half at the
    paper's blocks); the log-sum-exp is applied once it is known."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    R: tl.constexpr = SEL_BLOCK // CMP_STRIDE
    num_visible = _num_visible_cmp(tl.load(pos_ptr + b), CMP_BLOCK, CMP_STRIDE)
    q = _load_group_queries(q_ptr, stride_qb, stride_qh, b, h, G, DK, BLOCK_G, BLOCK_DK)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    offs_g = tl.arange(0, BLOCK_G)
    lane = tl.arange(0, BLOCK_Q * BLOCK_R)
    offs_q = tl.arange(0, BLOCK_Q)
    head_rows = (bh * BLOCK_G + offs_g)[:, None]
    real_heads = (offs_g < G)[:, None]
    count = tl.zeros([], tl.int32)
    # No branch on the visible count inside the loop (a conditional body is not software-pipelined):
    # tiles past it are fully masked, which loads no memory and leaves (m, l, acc) unchanged.
    for i in range(0, TILES_PER_SPLIT):
        tile = split * TILES_PER_SPLIT + i
        rows = (tile * BLOCK_Q + lane // BLOCK_R) * R + lane % BLOCK_R
        valid = (lane % BLOCK_R < R) & (rows < num_visible)
        count += tl.sum(valid.to(tl.int32))
        m, l, acc, p = _attend_tile(q, k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
                                    rows * stride_kn, rows * stride_vn, valid, scale, m, l, acc,
                                    DK, DV, BLOCK_DK, BLOCK_DV)
        for s in tl.static_range(SPILL + 1):
            terms = _tile_eq9_terms(p, s, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, BLOCK_G, BLOCK_Q, BLOCK_R)
            tl.store(terms_ptr + (s * num_pairs * BLOCK_G + head_rows) * (num_tiles * BLOCK_Q) + tile * BLOCK_Q
                     + offs_q[None, :], terms, mask=real_heads)
        tl.store(ref_ptr + (bh * BLOCK_G + offs_g) * num_tiles + tile, tl.where(m == float("-inf"), 0.0, m),
                 mask=offs_g < G)
    _store_partial(m_ptr, l_ptr, acc_ptr, count_ptr, bh, split, num_slots, m, l, acc, count, BLOCK_G, BLOCK_DV)


@triton.jit
def _slot_rows(bh, first_slot, s0, count, num_slots, CHUNK: tl.constexpr):
    """Partial slots s0 .. s0 + CHUNK of a branch's [first_slot, first_slot + count): rows and validity."""
    offs = s0 + tl.arange(0, CHUNK)
    return bh * num_slots + first_slot + offs, offs < count


@triton.jit
def _merged_lse(m_ptr, l_ptr, bh, first_slot, count: tl.constexpr, num_slots, BLOCK_G: tl.constexpr,
                CHUNK: tl.constexpr):
    """Log-sum-exp per head over partial slots [first_slot, first_slot + count); -inf if all empty. One online
    pass, unrolled: every chunk's loads are independent of the arithmetic, so they issue together."""
    offs_g = tl.arange(0, BLOCK_G)
    m_run = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    for s0 in tl.static_range(0, count, CHUNK):
        rows, ok = _slot_rows(bh, first_slot, s0, count, num_slots, CHUNK)
        at = rows[:, None] * BLOCK_G + offs_g[None, :]
        m = tl.load(m_ptr + at, mask=ok[:, None], other=float("-inf"))
        l = tl.load(l_ptr + at, mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a finite shift: empty slots weigh exp(-inf) = 0
        total = total * tl.exp(m_run - m_safe) + tl.sum(l * tl.exp(m - m_safe[None, :]), axis=0)
        m_run = m_new
    return tl.where(total > 0, m_run + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def _split_top_blocks_kernel(
    terms_ptr, ref_ptr, m_ptr, l_ptr, pos_ptr, scores_ptr, keys_ptr, num_pairs, num_tiles, num_slots, num_sel_blocks,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, SPILL: tl.constexpr,
    NUM_SPLITS: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, CHUNK: tl.constexpr, SEL_BLOCK: tl.constexpr,
    LOCAL_TOP: tl.constexpr,
):
    """The best LOCAL_TOP candidates among one split's selection blocks, as packed keys (_candidate_top). Scores by
    Eq. 8 + 10 on the per-head Eq. 9 terms of cmp_partials: block j's is the sum over the group's heads and s = 0 ..
    SPILL of plane s at block j - s times exp(ref - lse), ref being the row max of the tile j - s lies in (this
    tile for lanes q >= s, the one before otherwise: SPILL <= BLOCK_Q), so the scales are per (head, tile), not per
    element. The tiles' scores go through scores_ptr (scratch) to meet in one vector for the top-k."""
    tl.static_assert(SPILL <= BLOCK_Q)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    lse = _merged_lse(m_ptr, l_ptr, bh, 0, NUM_SPLITS, num_slots, BLOCK_G, CHUNK)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # no visible block: every term below is 0 anyway
    offs_g = tl.arange(0, BLOCK_G)
    offs_q = tl.arange(0, BLOCK_Q)
    heads = bh * BLOCK_G + offs_g
    real = offs_g < G
    first = split * TILES_PER_SPLIT
    # A padded head's ref loads as -inf (scale 0); the tile before the first has no terms (src < 0 below).
    scale_before = tl.exp(tl.load(ref_ptr + heads * num_tiles + first - 1, mask=real & (first >= 1),
                                  other=float("-inf")) - lse)
    for i in tl.static_range(TILES_PER_SPLIT):  # unrolled: no load waits on the previous tile's arithmetic
        tile = first + i
        scale = tl.exp(tl.load(ref_ptr + heads * num_tiles + tile, mask=real, other=float("-inf")) - lse)
        blocks = tile * BLOCK_Q + offs_q
        weighted = tl.zeros([BLOCK_G, BLOCK_Q], tl.float32)
        for s in tl.static_range(SPILL + 1):
            src = blocks - s
            terms = tl.load(terms_ptr + (s * num_pairs * BLOCK_G + heads)[:, None] * (num_tiles * BLOCK_Q)
                            + src[None, :], mask=real[:, None] & (src >= 0)[None, :], other=0.0)
            weighted += terms * tl.where((offs_q >= s)[None, :], scale[:, None], scale_before[:, None])
        tl.store(scores_ptr + bh * num_tiles * BLOCK_Q + blocks, tl.sum(weighted, axis=0))
        scale_before = scale
    tl.debug_barrier()  # the scores this program's threads wrote, read back by others
    blocks = first * BLOCK_Q + tl.arange(0, TILES_PER_SPLIT * BLOCK_Q)
    score = tl.load(scores_ptr + bh * num_tiles * BLOCK_Q + blocks)
    top = _candidate_top(score, blocks, blocks < num_sel_blocks, tl.load(pos_ptr + bh // HKV), SEL_BLOCK, LOCAL_TOP)
    tl.store(keys_ptr + (bh * NUM_SPLITS + split) * LOCAL_TOP + tl.arange(0, LOCAL_TOP), top)


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
    keys_ptr, pos_ptr, idx_ptr,
    HKV: tl.constexpr, SEL_BLOCK: tl.constexpr, NUM_SELECTED: tl.constexpr, NUM_KEYS: tl.constexpr,
    BLOCK_KEYS: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    """Top-n for one (sequence, KV head) from the splits' best candidates (split_top_blocks): the best of every
    split's best holds the best overall, and the packed keys order them exactly (score, then the lower index)."""
    bh = tl.program_id(0)
    t = tl.load(pos_ptr + bh // HKV)
    offs = tl.arange(0, BLOCK_KEYS)
    keys = tl.load(keys_ptr + bh * NUM_KEYS + offs, mask=offs < NUM_KEYS, other=NO_KEY)
    _store_selection(idx_ptr, bh, tl.topk(keys, BLOCK_OUT), t, SEL_BLOCK, NUM_SELECTED, BLOCK_OUT)


@triton.jit
def _sel_win_partials_kernel(
    q_ptr, k_sel_ptr, v_sel_ptr, k_win_ptr, v_win_ptr, pos_ptr, idx_ptr, page_table_ptr, m_ptr, l_ptr, acc_ptr,
    count_ptr, stride_qb, stride_qh, stride_ksb, stride_ksn, stride_ksh, stride_vsb, stride_vsn, stride_vsh,
    stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn, stride_vwh, stride_ib, stride_ih, stride_pt,
    scale, first_slot, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, NUM_SELECTED: tl.constexpr,
    SEL_BLOCK: tl.constexpr, WINDOW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_W: tl.constexpr, PAGE: tl.constexpr,
    PER_PROGRAM: tl.constexpr, NUM_SEL_PROGRAMS: tl.constexpr,
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
    if tile < NUM_SEL_PROGRAMS:
        # Selected blocks tile * PER_PROGRAM .. + PER_PROGRAM - 1 (past n: -1), their rows side by side in one tile.
        offs = tl.arange(0, PER_PROGRAM * BLOCK_SEL)
        slot = tile * PER_PROGRAM + offs // BLOCK_SEL
        within = offs % BLOCK_SEL
        block = tl.load(idx_ptr + b * stride_ib + h * stride_ih + slot, mask=slot < NUM_SELECTED, other=-1)
        first = tl.maximum(block, 0) * SEL_BLOCK  # an unused slot (-1) reads nothing
        valid = (block >= 0) & (within < SEL_BLOCK) & (first + within <= t)
        count = tl.sum(valid.to(tl.int32))
        if PAGE > 0:  # paged pool [pages + 1, PAGE, Hkv, D]: a block lies in one page (PAGE % SEL_BLOCK == 0)
            page = tl.load(page_table_ptr + b * stride_pt + first // PAGE).to(tl.int64)
            rows = first % PAGE + within
            k_rows, v_rows = page * stride_ksb + rows * stride_ksn, page * stride_vsb + rows * stride_vsn
        else:
            rows = (first + within).to(tl.int64)
            k_rows, v_rows = b * stride_ksb + rows * stride_ksn, b * stride_vsb + rows * stride_vsn
        m, l, acc, _ = _attend_tile(q, k_sel_ptr + h * stride_ksh, v_sel_ptr + h * stride_vsh, k_rows, v_rows, valid,
                                    scale, m, l, acc, DK, DV, BLOCK_DK, BLOCK_DV)
    else:
        # Ring slot s holds the latest position p <= t with p % w == s: p = t - ((t - s) mod w).
        slots = (tile - NUM_SEL_PROGRAMS) * PER_PROGRAM * BLOCK_W + tl.arange(0, PER_PROGRAM * BLOCK_W)
        lag = ((t - slots) % WINDOW + WINDOW) % WINDOW
        valid = (slots < WINDOW) & (t - lag >= 0)
        count = tl.sum(valid.to(tl.int32))
        m, l, acc, _ = _attend_tile(q, k_win_ptr + b * stride_kwb + h * stride_kwh,
                                    v_win_ptr + b * stride_vwb + h * stride_vwh, slots * stride_kwn,
                                    slots * stride_vwn, valid, scale, m, l, acc, DK, DV, BLOCK_DK, BLOCK_DV)
    _store_partial(m_ptr, l_ptr, acc_ptr, count_ptr, bh, first_slot + tile, num_slots, m, l, acc, count,
                   BLOCK_G, BLOCK_DV)


@triton.jit
def _merged_head_output(m_ptr, l_ptr, acc_ptr, bh, g, first_slot, count: tl.constexpr, num_slots,
                        BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr):
    """Head g's normalised attention output [BLOCK_DV] from partial slots; 0 if it read nothing. One online pass,
    unrolled, like _merged_lse: a step's merge is a few chunks, and their loads should not wait on each other."""
    offs_dv = tl.arange(0, BLOCK_DV)
    m_run = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    out = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in tl.static_range(0, count, CHUNK):
        rows, ok = _slot_rows(bh, first_slot, s0, count, num_slots, CHUNK)
        at = rows * BLOCK_G + g
        m = tl.load(m_ptr + at, mask=ok, other=float("-inf"))
        l = tl.load(l_ptr + at, mask=ok, other=0.0)
        acc = tl.load(acc_ptr + at[:, None] * BLOCK_DV + offs_dv[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a finite shift: an empty slot weighs exp(-inf) = 0
        rescale = tl.exp(m_run - m_safe)
        weight = tl.exp(m - m_safe)
        total = total * rescale + tl.sum(l * weight, axis=0)
        out = out * rescale + tl.sum(acc * weight[:, None], axis=0)
        m_run = m_new
    return out / tl.where(total > 0, total, 1.0)


@triton.jit
def _combine_kernel(
    q_ptr, gates_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, reads_ptr, stride_qb, stride_qh, stride_gb, stride_gh,
    stride_ob, stride_oh, num_slots,
    HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, NUM_SPLITS: tl.constexpr,
    NUM_SEL_SLOTS: tl.constexpr, NUM_WIN_TILES: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_SLOTS: tl.constexpr, CMP_CHUNK: tl.constexpr, SEL_CHUNK: tl.constexpr,
    WIN_CHUNK: tl.constexpr,
):
    """One program per (sequence, KV head, query head of the group): G programs share the merge's reads. A head
    whose query holds a NaN / inf, or whose output holds one in any column (a value's NaN / inf reaches only its own
    column of the p @ v sums), is NaN in every column: the rows rule of nsa.nonfinite."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    o_cmp = _merged_head_output(m_ptr, l_ptr, acc_ptr, bh, g, 0, NUM_SPLITS, num_slots, BLOCK_G, BLOCK_DV,
                                CMP_CHUNK)
    o_sel = _merged_head_output(m_ptr, l_ptr, acc_ptr, bh, g, NUM_SPLITS, NUM_SEL_SLOTS, num_slots, BLOCK_G,
                                BLOCK_DV, SEL_CHUNK)
    o_win = _merged_head_output(m_ptr, l_ptr, acc_ptr, bh, g, NUM_SPLITS + NUM_SEL_SLOTS, NUM_WIN_TILES, num_slots,
                                BLOCK_G, BLOCK_DV, WIN_CHUNK)
    offs_dv = tl.arange(0, BLOCK_DV)
    gate_ptr = gates_ptr + b * stride_gb + (h * G + g) * stride_gh
    out = (tl.load(gate_ptr).to(tl.float32) * o_cmp + tl.load(gate_ptr + 1).to(tl.float32) * o_sel
           + tl.load(gate_ptr + 2).to(tl.float32) * o_win)
    offs_dk = tl.arange(0, BLOCK_DK)
    q = tl.load(q_ptr + b * stride_qb + (h * G + g) * stride_qh + offs_dk, mask=offs_dk < DK, other=0.0)
    out += tl.sum(q.to(tl.float32) * 0.0, axis=0) + tl.sum(tl.where(offs_dv < DV, out * 0.0, 0.0), axis=0)
    tl.store(out_ptr + b * stride_ob + (h * G + g) * stride_oh + offs_dv, out.to(out_ptr.dtype.element_ty),
             mask=offs_dv < DV)
    if g == 0:
        # Keys read per branch: the sums of what each program's masks let through.
        slots = tl.arange(0, BLOCK_SLOTS)
        counts = tl.load(count_ptr + bh * num_slots + slots, mask=slots < num_slots, other=0).to(tl.int64)
        tl.store(reads_ptr + bh * 3, tl.sum(tl.where(slots < NUM_SPLITS, counts, 0), axis=0))
        tl.store(reads_ptr + bh * 3 + 1,
                 tl.sum(tl.where((slots >= NUM_SPLITS) & (slots < NUM_SPLITS + NUM_SEL_SLOTS), counts, 0), axis=0))
        tl.store(reads_ptr + bh * 3 + 2, tl.sum(tl.where(slots >= NUM_SPLITS + NUM_SEL_SLOTS, counts, 0), axis=0))


def _block(n: int) -> int:
    return max(16, next_power_of_2(n))


def _slots_per_load(num_slots: int, limit: int) -> int:
    """Partial slots a merge loads per step: all of them (a power of two) up to ``limit``."""
    return min(limit, next_power_of_2(num_slots))


def default_tiles(device: torch.device) -> DecodeTiles:
    """The GPU's settings; in the interpreter (tests, one "SM") 16-lane tiles and many programs, so tiny caches
    still split and merge."""
    return (DecodeTiles() if device.type == "cuda"
            else DecodeTiles(cmp_block=16, single_tile_block=16, programs_per_sm=64, merge_chunk=2))


class CmpTileShape(NamedTuple):
    """How a compressed-branch tile maps onto selection blocks: block_q selection blocks per tile, each the
    per_block = l'/d compressed blocks it starts (lanes padded to block_r, a power of two); spill: how many
    following selection blocks a compressed block's Eq. 9 weights reach (ceil((l/d - 1) / (l'/d)))."""

    block_q: int
    per_block: int
    block_r: int
    spill: int


def cmp_tile_shape(sizes: NSASizes, lanes: int) -> CmpTileShape:
    per_block = sizes.sel_block_size // sizes.block_stride
    block_r = next_power_of_2(per_block)
    spill = cdiv(sizes.block_size // sizes.block_stride - 1, per_block)
    # at least spill selection blocks per tile: a block's Eq. 9 terms then come from its own tile or the one before
    return CmpTileShape(max(lanes // block_r, next_power_of_2(spill), 1), per_block, block_r, spill)


def cmp_tiling(sizes: NSASizes, num_cmp_bound: int, num_sel_blocks: int, pairs: int, tiles: DecodeTiles,
               device: torch.device) -> tuple[CmpTileShape, int, int]:
    """(tile shape, splits, tiles per split) of the compressed branch. The tiles cover every selection block below
    num_sel_blocks too (with l >= l' + d a complete block's own compressed blocks can all lie past the visible ones:
    its score comes from those before it). Single-tile splits take tiles.single_tile_block lanes."""
    def count(shape: CmpTileShape) -> int:
        return max(1, cdiv(num_cmp_bound, shape.block_q * shape.per_block),
                   cdiv(num_sel_blocks, shape.block_q))

    shape = cmp_tile_shape(sizes, tiles.single_tile_block)
    num_tiles = count(shape)
    num_splits = num_cmp_splits(num_tiles, pairs, tiles, device)
    if num_splits < num_tiles:
        shape = cmp_tile_shape(sizes, tiles.cmp_block)
        num_tiles = count(shape)
        num_splits = num_cmp_splits(num_tiles, pairs, tiles, device)
    return shape, num_splits, next_power_of_2(cdiv(num_tiles, num_splits))


def num_cmp_splits(num_tiles: int, pairs: int, tiles: DecodeTiles, device: torch.device) -> int:
    """Splits of the compressed branch per (sequence, KV head): about tiles.programs_per_sm programs per SM
    over the batch, at most one per tile (tiles rounded up to a power of two: recompiles only at doublings)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(cdiv(tiles.programs_per_sm * sms, pairs), next_power_of_2(num_tiles)))


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
    if tiles.sel_blocks < 1 or tiles.sel_blocks & (tiles.sel_blocks - 1):
        raise ValueError(f"tiles.sel_blocks={tiles.sel_blocks} must be a power of two (one tile of its blocks' rows)")
    batch, num_heads, dk = q.shape
    num_kv_heads, dv = k_cmp.shape[2], v_cmp.shape[-1]
    group = num_heads // num_kv_heads
    block_g, block_dk, block_dv = _block(group), _block(dk), _block(dv)
    pairs = batch * num_kv_heads
    # The split count and tiles per split (a power of two) are compile-time constants (unrolled merges,
    # pipelined loops). Splits or tiles past a sequence's visible blocks read nothing.
    shape, num_splits, tiles_per_split = cmp_tiling(sizes, num_cmp_bound, num_sel_blocks, pairs, tiles, q.device)
    total_tiles = num_splits * tiles_per_split
    num_sel_programs = cdiv(sizes.num_selected, tiles.sel_blocks)
    num_win_tiles = cdiv(sizes.window_size, BLOCK_W * tiles.sel_blocks)
    num_slots = num_splits + num_sel_programs + num_win_tiles
    head_terms = q.new_empty(shape.spill + 1, pairs, block_g, total_tiles * shape.block_q, dtype=torch.float32)
    head_refs = q.new_empty(pairs, block_g, total_tiles, dtype=torch.float32)
    m_part = q.new_empty(pairs, num_slots, block_g, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = q.new_empty(pairs, num_slots, block_g, block_dv, dtype=torch.float32)
    counts = torch.empty(pairs, num_slots, device=q.device, dtype=torch.int32)
    heads = dict(HKV=num_kv_heads, G=group)
    blocks = dict(BLOCK_G=block_g, BLOCK_DK=block_dk, BLOCK_DV=block_dv)
    eq9 = dict(BLOCK_Q=shape.block_q, SPILL=shape.spill)

    _cmp_partials_kernel[(pairs, num_splits)](
        q, k_cmp, v_cmp, positions, head_terms, head_refs, m_part, l_part, acc_part, counts,
        q.stride(0), q.stride(1), *k_cmp.stride()[:3], *v_cmp.stride()[:3],
        scale, pairs, total_tiles, num_slots,
        DK=dk, DV=dv, CMP_BLOCK=sizes.block_size, CMP_STRIDE=sizes.block_stride, SEL_BLOCK=sizes.sel_block_size,
        BLOCK_R=shape.block_r, TILES_PER_SPLIT=tiles_per_split, **eq9, **heads, **blocks,
        num_warps=tiles.cmp_warps, num_stages=tiles.cmp_stages,
    )
    block_out = next_power_of_2(sizes.num_selected)
    local_top = min(block_out, tiles_per_split * shape.block_q)
    split_keys = q.new_empty(pairs, num_splits * local_top, dtype=torch.long)
    group_scores = q.new_empty(pairs, total_tiles * shape.block_q, dtype=torch.float32)
    _split_top_blocks_kernel[(pairs, num_splits)](
        head_terms, head_refs, m_part, l_part, positions, group_scores, split_keys, pairs, total_tiles, num_slots,
        num_sel_blocks, HKV=num_kv_heads, G=group, BLOCK_G=block_g, NUM_SPLITS=num_splits,
        TILES_PER_SPLIT=tiles_per_split, CHUNK=_slots_per_load(num_splits, LSE_SLOTS_PER_LOAD),
        SEL_BLOCK=sizes.sel_block_size, LOCAL_TOP=local_top, **eq9, num_warps=tiles.scores_warps,
    )
    block_indices = q.new_empty(batch, num_kv_heads, sizes.num_selected, dtype=torch.long)
    _select_topn_kernel[(pairs,)](
        split_keys, positions, block_indices, HKV=num_kv_heads, SEL_BLOCK=sizes.sel_block_size,
        NUM_SELECTED=sizes.num_selected, NUM_KEYS=split_keys.shape[1],
        BLOCK_KEYS=max(block_out, next_power_of_2(split_keys.shape[1])), BLOCK_OUT=block_out, num_warps=4,
    )
    _sel_win_partials_kernel[(pairs, num_sel_programs + num_win_tiles)](
        q, k_sel, v_sel, k_win, v_win, positions, block_indices,
        positions if page_table is None else page_table,  # a placeholder pointer without pages (never read)
        m_part, l_part, acc_part, counts,
        q.stride(0), q.stride(1), *k_sel.stride()[:3], *v_sel.stride()[:3], *k_win.stride()[:3],
        *v_win.stride()[:3], block_indices.stride(0), block_indices.stride(1),
        0 if page_table is None else page_table.stride(0), scale, num_splits, num_slots,
        DK=dk, DV=dv, NUM_SELECTED=sizes.num_selected, SEL_BLOCK=sizes.sel_block_size,
        WINDOW=sizes.window_size, BLOCK_SEL=_block(sizes.sel_block_size), BLOCK_W=BLOCK_W,
        PER_PROGRAM=tiles.sel_blocks, NUM_SEL_PROGRAMS=num_sel_programs,
        PAGE=0 if page_table is None else k_sel.shape[1], **heads, **blocks,
    )
    out = torch.empty(batch, num_heads, dv, device=q.device, dtype=q.dtype)
    reads = q.new_empty(batch, num_kv_heads, 3, dtype=torch.long)
    _combine_kernel[(pairs, group)](
        q, gates, out, m_part, l_part, acc_part, counts, reads, q.stride(0), q.stride(1), gates.stride(0),
        gates.stride(1), out.stride(0), out.stride(1), num_slots, NUM_SPLITS=num_splits,
        BLOCK_SLOTS=next_power_of_2(num_slots), DK=dk, DV=dv, NUM_SEL_SLOTS=num_sel_programs,
        NUM_WIN_TILES=num_win_tiles, **heads, **blocks,
        CMP_CHUNK=_slots_per_load(num_splits, tiles.merge_chunk),
        SEL_CHUNK=_slots_per_load(num_sel_programs, tiles.merge_chunk),
        WIN_CHUNK=_slots_per_load(num_win_tiles, tiles.merge_chunk), num_warps=tiles.combine_warps,
    )
    return out, block_indices, reads
