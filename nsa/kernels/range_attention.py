"""Triton kernels of range attention: NSA's compression and sliding-window branches.

Query t (a position inside its sequence) sees the keys i whose last raw token has arrived and, with a
window, is less than WINDOW tokens old:

    e(i) = i * STRIDE + SPAN - 1 <= t      and      t - e(i) < WINDOW      (WINDOW == 0: no window)

Compression branch: key i is compressed block i (STRIDE = d, SPAN = l, no window). Window branch: key i is
token i (STRIDE = SPAN = 1, WINDOW = w). The visible keys of a query are one contiguous range, so a tile of
queries scans one contiguous range of key tiles and masks only the tiles crossing its edges.

Three kernels, all on packed sequences (nsa.kernels.tiles): the forward (out, base-2 log-sum-exp; an
optional per-(token, head) gate scales the output, and the result can be added to ``out``; the un-gated branch
output is stored as well), dq, and dk/dv. The dq kernel takes delta = dO . o (dO un-gated) from that stored output
and accumulates dq = g * scale * sum_j p_j (dp_j - delta) k_j: three matmuls per key tile, where the one-pass form
without a stored output (sum_j p_j dp_j k_j and sum_j p_j k_j kept apart) took four. delta is also the gate's
gradient and the dk/dv kernel's row term. The dk/dv kernel walks the G query heads of its kv head itself (no
atomics, no G-fold copies); a long query range (the first compressed keys are seen by every later query) is split
over programs that write fp32 partials, summed in a fixed order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa.kernels.attention_steps import (
    LOG2E,
    add_store_split_at,
    dq_step,
    gathered_dkdv_step,
    load_split,
    load_split_at,
    load_split_rows,
    row_delta,
    scaled_scores,
    softmax_result,
    softmax_step,
    zeros_split,
)
from nsa.kernels.interpreter import allow_loaded_loop_bounds
from nsa.kernels.launch_args import dot_precision, next_power_of_2, split_dims
from nsa.kernels.tiles import (
    Packed,
    TileTable,
    add_store_at,
    kv_descriptors,
    load_at,
    load_tile,
    output_buffer,
    packed_tiles,
    store_at,
    store_tile,
    tile_origin,
    tile_table,
    visible_key_count,
)

allow_loaded_loop_bounds()


class RangeTiles(NamedTuple):
    """Tile sizes and launch settings: forward fwd_m queries x fwd_n keys, dq dq_m x dq_n, dk/dv dkv_n keys x
    dkv_m queries; the dk/dv query range is split over at most ``max_splits`` programs per key tile. num_warps:
    the forward's launch; dq_num_warps: the dq's; dkv_num_warps: the dk/dv's; num_stages / dq_num_stages /
    dkv_num_stages: the forward's, the dq's and the dk/dv's pipeline depths. dkv_head_rows: each dk/dv step takes
    dkv_m // GP tokens x the group's GP heads (padded to a power of two, at most dkv_m) instead of dkv_m tokens of
    one head, one pass over the queries instead of one per head. On the H200 at the public shape, 64k (bench/results/
    prefill_tiles_cuda.md, 2026-12-02), 4 tokens x 16 heads per step ran the compression dk/dv in 21.1 ms and the
    window's in 8.3 against 31.4 and 9.6 for 32 tokens of one head. dq tiles of 128 queries x 64 keys ran the
    compression / window dq in 14.9 / 6.6 ms against 17.3 / 7.4 for 128 x 32 (2026-12-03, sixteenth session).
    tma: the forward and dq load their K / V tiles through tensor descriptors (nsa.kernels.tiles.kv_descriptors;
    pointer loads where the device or the tensors cannot). head_rows: the forward's and dq's programs take
    fwd_m // G (dq_m // G) tokens x the group's G query heads, which share their keys, instead of fwd_m tokens of
    one head (``query_rows``): a window's tile then spans G times fewer tokens, so fewer of its keys fall outside
    every row's window. Per branch: ``tiles_for``."""

    fwd_m: int = 128
    fwd_n: int = 64
    dq_m: int = 128
    dq_n: int = 64
    dkv_m: int = 64
    dkv_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    dq_num_stages: int = 2
    max_splits: int = 32
    dkv_num_warps: int = 8
    dkv_head_rows: bool = True
    tma: bool = False
    dkv_num_stages: int = 2
    head_rows: bool = False
    dq_num_warps: int = 8


class RangeRule(NamedTuple):
    """Which keys a query sees (module docstring): key i ends at i * stride + span - 1; window 0 = none."""

    stride: int
    span: int
    window: int


@triton.jit
def _key_end(i, STRIDE: tl.constexpr, SPAN: tl.constexpr):
    return i * STRIDE + SPAN - 1


@triton.jit
def _visible(t, i, STRIDE: tl.constexpr, SPAN: tl.constexpr, WINDOW: tl.constexpr):
    end = _key_end(i, STRIDE, SPAN)
    ok = end <= t
    if WINDOW > 0:
        ok = ok & (t - end < WINDOW)
    return ok


@triton.jit
def _key_bounds(first, last, num_keys, STRIDE: tl.constexpr, SPAN: tl.constexpr, WINDOW: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key range [lo, hi) the queries first .. last (last < first: none) can see; lo rounded down to BLOCK_N."""
    hi = visible_key_count(last, num_keys, STRIDE, SPAN)
    lo = 0
    if WINDOW > 0:
        oldest = first - (SPAN - 1) - WINDOW  # key i is in the window of `first` iff i * STRIDE > oldest
        lo = tl.where(oldest >= 0, oldest // STRIDE + 1, 0)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_rows(q_ptr, tile_seq_ptr, tile_first_ptr, cu_q_ptr, cu_k_ptr, num_seqs, stride_qt, stride_qh,
                BLOCK_M: tl.constexpr, GROUP: tl.constexpr, HEAD_ROWS: tl.constexpr, DQK: tl.constexpr,
                D1: tl.constexpr, D2: tl.constexpr):
    """This program's query rows: with HEAD_ROWS, BLOCK_M // GROUP tokens x the GROUP query heads of kv head h (a
    token's heads are neighbours in memory, and the tokens share their keys), else BLOCK_M tokens of query head h;
    h is the grid's second axis. -> (kv head, the tile's first token row (int64), the sequence's key offset and
    count, the tile's first and last token, each row's token offset from the first row, its query head, its
    validity, q1, q2)."""
    h = tl.program_id(1)
    tokens: tl.constexpr = BLOCK_M // GROUP if HEAD_ROWS else BLOCK_M
    tok0, seq_len, key0, num_keys, first = tile_origin(tile_seq_ptr, tile_first_ptr, cu_q_ptr, cu_k_ptr, num_seqs,
                                                       tokens)
    row0 = tok0 + first
    r = tl.arange(0, BLOCK_M)
    if HEAD_ROWS:
        hk = h
        tok = r // GROUP
        head = h * GROUP + r % GROUP
        ok = (r < tokens * GROUP) & (first + tok < seq_len)
    else:
        hk = h // GROUP
        tok = r
        head = h
        ok = first + tok < seq_len
    q1, q2 = load_split_at(q_ptr + row0 * stride_qt, tok * stride_qt + head * stride_qh, ok, DQK, D1, D2)
    last = tl.minimum(first + tokens, seq_len) - 1
    return hk, row0, key0, num_keys, first, last, tok, head, ok, q1, q2


@triton.jit
def _key_tile_scores(q1, q2, k_base, k_desc1, k_desc2, key0, hk, start, hi, t, first, last, stride_kt, qk_scale,
                     STRIDE: tl.constexpr, SPAN: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
                     DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, PRECISION: tl.constexpr,
                     ROW_T: tl.constexpr, TMA: tl.constexpr):
    """Masked base-2 scores of the query rows (at positions t, tokens first .. last) against the key tile at
    ``start``: (s, the key rows, their validity, k1, k2). Only tiles crossing the causal edge of the first query,
    the window edge of the last or the end of the visible range are masked (so a TMA load's rows past ``hi`` score
    -inf)."""
    cols = (start + tl.arange(0, BLOCK_N)).to(ROW_T)
    col_ok = cols < hi
    k1, k2 = load_split_rows(k_base, k_desc1, k_desc2, key0 + start, hk, cols, col_ok, stride_kt, BLOCK_N, TMA, DQK,
                             D1, D2)
    s = scaled_scores(q1, q2, k1, k2, qk_scale, D2, PRECISION)
    edge = (_key_end(start + BLOCK_N - 1, STRIDE, SPAN) > first) | (start + BLOCK_N > hi)
    if WINDOW > 0:
        edge = edge | (last - _key_end(start, STRIDE, SPAN) >= WINDOW)
    if edge:
        s = tl.where(_visible(t[:, None], cols[None, :], STRIDE, SPAN, WINDOW), s, float("-inf"))
    return s, cols, col_ok, k1, k2


@triton.jit
def _range_fwd_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, out_ptr, lse_ptr, branch_ptr, cu_q_ptr, cu_k_ptr, tile_seq_ptr, tile_first_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh, stride_ot, stride_oh,
    stride_bt, stride_bh, num_heads, num_seqs, qk_scale, k_desc1, k_desc2, v_desc,
    GROUP: tl.constexpr, STRIDE: tl.constexpr, SPAN: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr,
    ACCUMULATE: tl.constexpr, ROW_T: tl.constexpr, TMA: tl.constexpr, HEAD_ROWS: tl.constexpr,
):
    """Program (token tile, head h): BLOCK_M rows of query head h, or with HEAD_ROWS of the query heads of kv head h
    (``_query_rows``)."""
    hk, row0, key0, num_keys, first, last, tok, head, row_ok, q1, q2 = _query_rows(
        q_ptr, tile_seq_ptr, tile_first_ptr, cu_q_ptr, cu_k_ptr, num_seqs, stride_qt, stride_qh, BLOCK_M, GROUP,
        HEAD_ROWS, DQK, D1, D2)
    lo, hi = _key_bounds(first, last, num_keys, STRIDE, SPAN, WINDOW, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_base = k_ptr + key0 * stride_kt + hk * stride_kh
    v_base = v_ptr + key0 * stride_vt + hk * stride_vh
    for start in range(lo, hi, BLOCK_N):
        s, cols, col_ok, _, _ = _key_tile_scores(q1, q2, k_base, k_desc1, k_desc2, key0, hk, start, hi, first + tok,
                                                 first, last, stride_kt, qk_scale, STRIDE, SPAN, WINDOW, BLOCK_N, DQK,
                                                 D1, D2, PRECISION, ROW_T, TMA)
        v, _ = load_split_rows(v_base, v_desc, v_desc, key0 + start, hk, cols, col_ok, stride_vt, BLOCK_N, TMA, DV,
                               BLOCK_DV, 0)
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PRECISION)
    out, lse = softmax_result(m_i, l_i, acc)
    tl.store(lse_ptr + (row0 + tok) * num_heads + head, lse, mask=row_ok)
    store_at(branch_ptr + row0 * stride_bt, tok * stride_bt + head * stride_bh, row_ok,
             out.to(branch_ptr.dtype.element_ty), 0, BLOCK_DV, DV)
    if HAS_GATE:
        gate = tl.load(gate_ptr + row0 * stride_gt + tok * stride_gt + head * stride_gh, mask=row_ok, other=0.0)
        out = out * gate.to(tl.float32)[:, None]
    add_store_at(out_ptr + row0 * stride_ot, tok * stride_ot + head * stride_oh, row_ok, out, ACCUMULATE, 0, BLOCK_DV,
                 DV)


@triton.jit
def _range_dq_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, do_ptr, branch_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr, tile_seq_ptr,
    tile_first_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
    stride_dot, stride_doh, stride_bt, stride_bh, stride_dqt, stride_dqh, num_heads, num_seqs, qk_scale, scale,
    k_desc1, k_desc2, v_desc, GROUP: tl.constexpr, STRIDE: tl.constexpr, SPAN: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr,
    ACCUMULATE: tl.constexpr, ROW_T: tl.constexpr, TMA: tl.constexpr, HEAD_ROWS: tl.constexpr,
):
    """dq = g * scale * sum_j p_j (dp_j - delta) k_j with delta = dO . o from the forward's branch output, which
    it also writes (the gate's gradient and the dk/dv kernel's row term). Rows as in the forward."""
    hk, row0, key0, num_keys, first, last, tok, head, row_ok, q1, q2 = _query_rows(
        q_ptr, tile_seq_ptr, tile_first_ptr, cu_q_ptr, cu_k_ptr, num_seqs, stride_qt, stride_qh, BLOCK_M, GROUP,
        HEAD_ROWS, DQK, D1, D2)
    dq1, dq2 = zeros_split(BLOCK_M, D1, D2)
    do = load_at(do_ptr + row0 * stride_dot, tok * stride_dot + head * stride_doh, row_ok, 0, BLOCK_DV, DV)
    stats = (row0 + tok) * num_heads + head
    lse = tl.load(lse_ptr + stats, mask=row_ok, other=float("inf"))
    delta = row_delta(do, load_at(branch_ptr + row0 * stride_bt, tok * stride_bt + head * stride_bh, row_ok, 0,
                                  BLOCK_DV, DV))
    tl.store(delta_ptr + stats, delta, mask=row_ok)
    lo, hi = _key_bounds(first, last, num_keys, STRIDE, SPAN, WINDOW, BLOCK_N)
    k_base = k_ptr + key0 * stride_kt + hk * stride_kh
    v_base = v_ptr + key0 * stride_vt + hk * stride_vh
    for start in range(lo, hi, BLOCK_N):
        s, cols, col_ok, k1, k2 = _key_tile_scores(q1, q2, k_base, k_desc1, k_desc2, key0, hk, start, hi, first + tok,
                                                   first, last, stride_kt, qk_scale, STRIDE, SPAN, WINDOW, BLOCK_N,
                                                   DQK, D1, D2, PRECISION, ROW_T, TMA)
        v, _ = load_split_rows(v_base, v_desc, v_desc, key0 + start, hk, cols, col_ok, stride_vt, BLOCK_N, TMA, DV,
                               BLOCK_DV, 0)
        dq1, dq2 = dq_step(tl.math.exp2(s - lse[:, None]), do, v, k1, k2, delta, dq1, dq2, D2, PRECISION)
    factor = tl.zeros([BLOCK_M], tl.float32) + scale
    if HAS_GATE:
        factor *= tl.load(gate_ptr + row0 * stride_gt + tok * stride_gt + head * stride_gh, mask=row_ok,
                          other=0.0).to(tl.float32)
    add_store_split_at(dq_ptr + row0 * stride_dqt, tok * stride_dqt + head * stride_dqh, row_ok,
                       dq1 * factor[:, None], dq2 * factor[:, None], ACCUMULATE, DQK, D1, D2)


@triton.jit
def _dkdv_tile(q_ptr, do_ptr, gate_ptr, lse_ptr, delta_ptr, tok0, toks, heads, row_ok, m0, q_hi, first, last_key, cols,
               k1, k2, v, dk1, dk2, dv, stride_qt, stride_qh, stride_dot, stride_doh, stride_gt, stride_gh, num_heads,
               qk_scale, STEP: tl.constexpr, STRIDE: tl.constexpr, SPAN: tl.constexpr, WINDOW: tl.constexpr,
               DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
               PRECISION: tl.constexpr, HAS_GATE: tl.constexpr):
    """One dk/dv step: the query rows (token toks, head heads; STEP tokens from m0) against this program's keys."""
    q1, q2 = load_split_at(q_ptr + tok0 * stride_qt, toks * stride_qt + heads * stride_qh, row_ok, DQK, D1, D2)
    s_t = scaled_scores(k1, k2, q1, q2, qk_scale, D2, PRECISION)
    edge = (_key_end(last_key, STRIDE, SPAN) > m0) | (m0 + STEP > q_hi)
    if WINDOW > 0:
        edge = edge | (m0 + STEP - 1 - _key_end(first, STRIDE, SPAN) >= WINDOW)
    if edge:
        s_t = tl.where(_visible(toks[None, :], cols[:, None], STRIDE, SPAN, WINDOW) & row_ok[None, :], s_t,
                       float("-inf"))
    return gathered_dkdv_step(s_t, q1, q2, v, do_ptr + tok0 * stride_dot, lse_ptr, delta_ptr, gate_ptr,
                              toks * stride_dot + heads * stride_doh, (tok0 + toks) * num_heads + heads,
                              (tok0 + toks) * stride_gt + heads * stride_gh, row_ok, dk1, dk2, dv, D2, DV, BLOCK_DV,
                              PRECISION, HAS_GATE)


@triton.jit
def _range_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_k_ptr, cu_q_ptr, tile_seq_ptr,
    tile_first_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dk_split, stride_dv_split,
    num_heads, num_seqs, split_len, qk_scale, scale,
    GROUP: tl.constexpr, STRIDE: tl.constexpr, SPAN: tl.constexpr, WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, HAS_GATE: tl.constexpr, ROW_T: tl.constexpr,
    GP: tl.constexpr,
):
    """dv = sum over the GROUP query heads and the queries of this program's split of (g p)^T dO, and
    dk = scale * sum (g p (dp - delta))^T q, for BLOCK_N keys of one kv head. GP = 0: each step takes BLOCK_M
    tokens of one head, head after head; GP = the group padded to a power of two: each step takes BLOCK_M // GP
    tokens x the GP heads (a token's heads are neighbours in memory), one pass over the queries."""
    hk, split = tl.program_id(1), tl.program_id(2)
    key0, num_keys, tok0, seq_len, first = tile_origin(tile_seq_ptr, tile_first_ptr, cu_k_ptr, cu_q_ptr, num_seqs,
                                                       BLOCK_N)
    key_tile = tl.arange(0, BLOCK_N)
    cols = first + key_tile
    col_ok = cols < num_keys
    k_row0 = key0 + first
    k1, k2 = load_split(k_ptr + k_row0 * stride_kt + hk * stride_kh, key_tile, col_ok, stride_kt, DQK, D1, D2)
    v = load_tile(v_ptr + k_row0 * stride_vt + hk * stride_vh, key_tile, col_ok, stride_vt, 0, BLOCK_DV, DV)
    dk1, dk2 = zeros_split(BLOCK_N, D1, D2)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Queries that see a key of this tile: from the first key's end to the last key's window end.
    last_key = tl.minimum(first + BLOCK_N, num_keys) - 1
    q_lo = tl.maximum(_key_end(first, STRIDE, SPAN), split * split_len)
    q_hi = tl.minimum(seq_len, (split + 1) * split_len)
    if WINDOW > 0:
        q_hi = tl.minimum(q_hi, _key_end(last_key, STRIDE, SPAN) + WINDOW)
    q_hi = tl.where(num_keys > first, q_hi, 0)
    if GP > 0:
        r = tl.arange(0, BLOCK_M)
        g = r % GP
        for m0 in range(q_lo // (BLOCK_M // GP) * (BLOCK_M // GP), q_hi, BLOCK_M // GP):
            toks = (m0 + r // GP).to(ROW_T)
            dk1, dk2, dv, _ = _dkdv_tile(q_ptr, do_ptr, gate_ptr, lse_ptr, delta_ptr, tok0, toks, hk * GROUP + g,
                                      (toks < q_hi) & (g < GROUP), m0, q_hi, first, last_key, cols, k1, k2, v, dk1,
                                      dk2, dv, stride_qt, stride_qh, stride_dot, stride_doh, stride_gt, stride_gh,
                                      num_heads, qk_scale, BLOCK_M // GP, STRIDE, SPAN, WINDOW, DQK, D1, D2, DV,
                                      BLOCK_DV, PRECISION, HAS_GATE)
    else:
        for g in range(0, GROUP):
            for m0 in range(q_lo // BLOCK_M * BLOCK_M, q_hi, BLOCK_M):
                toks = (m0 + tl.arange(0, BLOCK_M)).to(ROW_T)
                dk1, dk2, dv, _ = _dkdv_tile(q_ptr, do_ptr, gate_ptr, lse_ptr, delta_ptr, tok0, toks, hk * GROUP + g,
                                          toks < q_hi, m0, q_hi, first, last_key, cols, k1, k2, v, dk1, dk2, dv,
                                          stride_qt, stride_qh, stride_dot, stride_doh, stride_gt, stride_gh,
                                          num_heads, qk_scale, BLOCK_M, STRIDE, SPAN, WINDOW, DQK, D1, D2, DV,
                                          BLOCK_DV, PRECISION, HAS_GATE)
    split64 = split.to(tl.int64)
    dk_base = dk_ptr + split64 * stride_dk_split + k_row0 * stride_dkt + hk * stride_dkh
    store_tile(dk_base, key_tile, col_ok, stride_dkt, (dk1 * scale).to(dk_ptr.dtype.element_ty), 0, D1, DQK)
    if D2 > 0:
        store_tile(dk_base, key_tile, col_ok, stride_dkt, (dk2 * scale).to(dk_ptr.dtype.element_ty), D1, D2, DQK)
    dv_base = dv_ptr + split64 * stride_dv_split + k_row0 * stride_dvt + hk * stride_dvh
    store_tile(dv_base, key_tile, col_ok, stride_dvt, dv.to(dv_ptr.dtype.element_ty), 0, BLOCK_DV, DV)


# ----------------------------------------------------------------------------------------------
# launchers. Tensors are token rows [N, H, D] with a contiguous last dim (nsa.kernels.tiles.rows_view);
# gate is None or [N, HQ] (any strides); lse and delta are float32 [N, HQ] contiguous, base 2.


def _common(q: Tensor, k: Tensor, v: Tensor, rule: RangeRule, max_len: int, *others: Tensor) -> dict:
    """The constexprs every range kernel takes. ROW_T: int64 row offsets when a sequence's rows times a row
    stride can pass 2^31 (the kernels index rows inside a sequence; int32 addresses are cheaper)."""
    wide = max_len * max(t.stride(0) for t in (q, k, v, *others)) >= 2**31
    return {"GROUP": q.shape[1] // k.shape[1], "STRIDE": rule.stride, "SPAN": rule.span, "WINDOW": rule.window,
            "PRECISION": dot_precision(q.dtype), "ROW_T": tl.int64 if wide else tl.int32,
            **split_dims(q.shape[-1], v.shape[-1])}


def _gate_args(gate: Tensor | None, q: Tensor) -> tuple[Tensor, int, int]:
    return (q, 0, 0) if gate is None else (gate, gate.stride(0), gate.stride(1))


def _nonempty(x: Tensor) -> Tensor:
    """A zero-row key tensor gets one zero row, so its pointer is valid (no program reads it)."""
    return x if x.shape[0] else x.new_zeros(1, *x.shape[1:])


def range_forward(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, out: Tensor, lse: Tensor, branch_out: Tensor,
                  packed: Packed, cu_keys: Tensor, rule: RangeRule, scale: float, accumulate: bool,
                  tiles: RangeTiles) -> None:
    """out[rows] (+)= gate * attention over the visible key range; lse[rows] = base-2 log-sum-exp (+inf where
    nothing is visible); branch_out[rows] = the attention itself, un-gated (out's shape; for range_dq). cu_keys:
    cumulative key counts [S + 1] of the packed key tensor k / v."""
    rows = query_rows(q.shape[1] // k.shape[1], tiles.fwd_m, tiles)
    table = packed_tiles(packed, rows.tokens)
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    k, v = _nonempty(k), _nonempty(v)
    consts = _common(q, k, v, rule, packed.max_len, out, branch_out)
    _range_fwd_kernel[(table.grid, k.shape[1] if rows.head_rows else q.shape[1])](
        q, k, v, gate_t, out, lse, branch_out, packed.cu, cu_keys, table.seq, table.first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_gt, stride_gh,
        out.stride(0), out.stride(1), branch_out.stride(0), branch_out.stride(1), q.shape[1], packed.num_seqs,
        scale * LOG2E, **kv_descriptors(k, v, tiles.fwd_n, consts, tiles.tma),
        BLOCK_M=tiles.fwd_m, BLOCK_N=tiles.fwd_n, HAS_GATE=gate is not None, ACCUMULATE=accumulate, **consts,
        HEAD_ROWS=rows.head_rows, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def range_dq(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, dout: Tensor, branch_out: Tensor, lse: Tensor,
             delta: Tensor, dq: Tensor, packed: Packed, cu_keys: Tensor, rule: RangeRule, scale: float,
             accumulate: bool, tiles: RangeTiles) -> None:
    """dq[rows] (+)= this branch's query gradient; delta[rows] = dO . o (float32), o = range_forward's branch_out."""
    rows = query_rows(q.shape[1] // k.shape[1], tiles.dq_m, tiles)
    table = packed_tiles(packed, rows.tokens)
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    k, v = _nonempty(k), _nonempty(v)
    consts = _common(q, k, v, rule, packed.max_len, dout, branch_out, dq)
    _range_dq_kernel[(table.grid, k.shape[1] if rows.head_rows else q.shape[1])](
        q, k, v, gate_t, dout, branch_out, lse, delta, dq, packed.cu, cu_keys, table.seq, table.first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_gt, stride_gh,
        dout.stride(0), dout.stride(1), branch_out.stride(0), branch_out.stride(1), dq.stride(0), dq.stride(1),
        q.shape[1], packed.num_seqs, scale * LOG2E, scale, **kv_descriptors(k, v, tiles.dq_n, consts, tiles.tma),
        BLOCK_M=tiles.dq_m, BLOCK_N=tiles.dq_n, HAS_GATE=gate is not None, ACCUMULATE=accumulate, **consts,
        HEAD_ROWS=rows.head_rows, num_warps=tiles.dq_num_warps, num_stages=tiles.dq_num_stages,
    )


def range_dkdv(q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, dout: Tensor, lse: Tensor, delta: Tensor,
               packed: Packed, cu_keys: Tensor, rule: RangeRule, scale: float, tiles: RangeTiles
               ) -> tuple[Tensor, Tensor]:
    """-> dk, dv (k's and v's shapes and dtypes). Without a window, the query range of a key tile is split over up
    to tiles.max_splits programs; their float32 partials are summed in split order (deterministic)."""
    dk, dv = output_buffer(*k.shape, like=k), output_buffer(*v.shape, like=v)  # each key row: one key tile
    if k.shape[0] == 0:
        return dk, dv
    num_keys = k.shape[0]
    # an unpacked batch has as many keys in every sequence
    table: TileTable = tile_table(cu_keys, packed.num_seqs, num_keys, tiles.dkv_n,
                                  num_keys // packed.num_seqs if packed.equal else None)
    # A window bounds a key tile's queries (dkv_n * stride + window): splitting them only adds empty programs.
    per_split = -(-packed.max_len // (1 if rule.window else tiles.max_splits))
    split_len = -(-per_split // tiles.dkv_m) * tiles.dkv_m
    num_splits = -(-packed.max_len // split_len)
    if num_splits > 1:
        dk_out = output_buffer(num_splits, *k.shape, like=k, dtype=torch.float32)
        dv_out = output_buffer(num_splits, *v.shape, like=v, dtype=torch.float32)
    else:
        dk_out, dv_out = dk[None], dv[None]
    gate_t, stride_gt, stride_gh = _gate_args(gate, q)
    _range_dkdv_kernel[(table.grid, k.shape[1], num_splits)](
        q, k, v, gate_t, dout, lse, delta, dk_out, dv_out, cu_keys, packed.cu, table.seq, table.first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_gt, stride_gh,
        dout.stride(0), dout.stride(1), dk_out.stride(1), dk_out.stride(2), dv_out.stride(1), dv_out.stride(2),
        dk_out.stride(0), dv_out.stride(0), q.shape[1], packed.num_seqs, split_len, scale * LOG2E, scale,
        BLOCK_M=tiles.dkv_m, BLOCK_N=tiles.dkv_n, HAS_GATE=gate is not None,
        **_common(q, k, v, rule, packed.max_len, dout), GP=dkv_head_rows(q.shape[1] // k.shape[1], tiles),
        num_warps=tiles.dkv_num_warps, num_stages=tiles.dkv_num_stages,
    )
    if num_splits > 1:
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))
    return dk, dv


def dkv_head_rows(group: int, tiles: RangeTiles) -> int:
    """The dk/dv kernel's GP: the group padded to a power of two when tiles.dkv_head_rows and it fits a step's
    dkv_m rows, else 0 (one head per step)."""
    padded = next_power_of_2(group)
    return padded if tiles.dkv_head_rows and padded <= tiles.dkv_m else 0


class QueryRows(NamedTuple):
    """How the forward and dq lay out a program's rows: ``tokens`` per program, and whether the rows are those tokens
    x the group's query heads (``head_rows``; the grid's second axis is then the kv heads) or tokens of one head."""

    tokens: int
    head_rows: bool


def query_rows(group: int, block_m: int, tiles: RangeTiles) -> QueryRows:
    """block_m // group tokens x the group's heads where tiles.head_rows and the group fits block_m rows, else
    block_m tokens of one head."""
    if tiles.head_rows and group <= block_m:
        return QueryRows(block_m // group, True)
    return QueryRows(block_m, False)


def tiles_for(head_dim: int, branch: str, group: int) -> RangeTiles:
    """Tiles of ``branch`` ("cmp": the compression, "win": the window) for the widest head dim, picked by the H200
    tile sweep (bench_prefill --parts tiles, 2026-12-01, the public and paper shapes at 64k): long, narrow dq (128
    queries x 32 keys; 64 keys up to head dim 128 since 2026-12-03) and dk/dv tiles (128 keys x 16-32 queries) ran
    1.4-2.8x faster than square ones although ptxas (bench/compile_kernels.py) reports 24-48 bytes of spills for
    them; narrower forward tiles at head dim 256.
    dk/dv over tokens x heads (dkv_head_rows) at 192 (2026-12-02): 2 tokens x 16 heads per step ran the compression
    / window dk/dv in 34.4 / 11.4 ms against 52.7 / 15.2 for 16 tokens of one head. 256: untuned, spill-free, one
    head per step. Up to head dim 128 the compression loads K / V through TMA with 3 backward stages (2026-12-04,
    public shape: forward / dq / dk/dv 10.58 / 12.75 / 20.56 ms against 10.98 / 13.11 / 21.01); the window gains
    nothing from TMA (4.99 against 4.94 ms forward) and loses with 3 backward stages (dk/dv 12.7 against 8.2). At
    head dim 64 (the GPT's G = 2) TMA slowed the compression: forward / dq 0.67 / 0.67 against 0.42 / 0.45 ms.
    On 128-key programs of 8 warps the compression dk/dv ran 3 stages deep best only at G = 16 (``group``: query
    heads per kv head), 20.85 ms against 21.39 with 2 (H200, 64k, 2026-12-04); 2 stages ran G = 12 in 20.83 against
    25.27 and G = 4 in 5.92 against 8.26 (ptxas spills 80 / 184 bytes with 3 stages, 32 with 2). G = 16 now takes
    one-warpgroup programs (below).
    The window's forward and dq take tokens x the group's heads (head_rows) up to head dim 192 (2026-12-04, 64k):
    forward / dq 4.28 / 4.71 ms against 4.92 / 6.00 (public), 3.48 / 3.92 against 3.71 / 4.34 (G = 12), 1.15 /
    1.26 against 1.25 / 1.44 (G = 4), 4.80 / 7.07 against 10.23 / 8.94 (paper, d_k 192, where the forward's
    programs also doubled to 128 rows: 9.93 on 64); at head dim 64 (the GPT, G = 2) with 32-key dq tiles 0.195 /
    0.221 against 0.191 / 0.300. The compression gains nothing from them (public 10.62 / 12.25 against 10.75 /
    12.14, G = 12 8.46 / 9.84 against 8.10 / 9.17), but its forward at head dim 192 ran in 12.53 ms on 128-row
    programs against 30.72 on 64 (the paper's shape, the same day). Up to head dim 128 the window's forward and dq
    run one warpgroup per program (64 rows on 4 warps, two programs per SM; 2026-12-04, 64k): forward / dq 3.89 /
    4.60 ms against 4.28 / 4.74 on 128 rows of 8 warps (public), 3.32 / 3.66 against 3.50 / 3.93 (G = 12); the
    compression's forward on them 10.68 against 10.83 (public) and its dq 14.83 against 12.27: it keeps 8 warps. On
    those tiles the window loads K / V through TMA (2026-12-04, 64k): forward / dq 3.64 / 4.34 ms against 3.87 /
    4.50 (public), 0.98 / 1.15 against 1.06 / 1.19 (G = 4), where 128-row programs of 8 warps had gained nothing
    from it. The dk/dv on one warpgroup too (64 keys, 4 warps, two programs per SM; 2026-12-04, 64k, ms against the
    tiles before): the compression at G = 16 19.83 against 20.71 on 2 stages (29.78 on 3), but G = 12 21.16 against
    20.84 and G = 4 6.54 against 5.82; the window with 2 tokens x the padded group per step (32 rows) at G = 4 1.85
    against 2.17 and G = 12 8.32 against 8.61, but G = 16 9.09 against 8.59. The compression's forward at G = 16
    takes 128-key tiles (2026-12-05, 64k, public): 10.31 ms against 10.64 on 64 keys; 128 rows on one warpgroup
    ran it in 13.09. So do the other groups up to head dim 128 (2026-12-05, 64k): G = 12 7.62 against 8.01 ms,
    G = 4 2.59 against 2.67 (G = 1, 2 and 8 untimed); the top-n's selection there moved on 4e-6 of the (token, kv
    head) rows, near ties whose compression lse the other summation order rounded apart."""
    if branch not in ("cmp", "win"):
        raise ValueError(f"branch must be 'cmp' or 'win', got {branch!r}")
    if head_dim <= 64:
        return RangeTiles(head_rows=True, dq_n=32) if branch == "win" else RangeTiles()
    if head_dim <= 128:
        if branch == "win":
            tiles = RangeTiles(fwd_m=64, dq_m=64, num_warps=4, dq_num_warps=4, head_rows=True, tma=True)
            return tiles._replace(dkv_m=32, dkv_n=64, dkv_num_warps=4) if group <= 12 else tiles
        if group == 16:
            return RangeTiles(fwd_n=128, tma=True, dq_num_stages=3, dkv_n=64, dkv_num_warps=4)
        return RangeTiles(fwd_n=128, tma=True, dq_num_stages=3)
    if head_dim <= 192:
        return RangeTiles(dq_n=32, dkv_m=32, head_rows=branch == "win")
    return RangeTiles(fwd_m=32, dq_m=32, dq_n=64, dkv_m=32, dkv_n=32, dkv_head_rows=False)
