"""Triton kernels of block-sparse causal attention over per-(batch, head, query block) key-block lists.

Layouts and the math are those of :func:`scope.block_sparse_attention.block_sparse_attention`; this
module only launches. The q.k dot product is split into two tensor-core dots, a power-of-two main part
(D1 columns) and the rest (D2 columns, masked): a head dim of 128 plus SCOPE's 2K bias features
(qk_aug) costs 160 columns instead of the 256 a single power-of-two tile would take.

Three kernels: forward (writes out and the base-2 log-sum-exp), dq (also writes delta = rowsum(dO * out)),
and dk/dv; the backward walks the transposed lists (which query blocks list a key block) so that no kernel
needs atomics (a one-kernel backward with atomic dq was slower on the H100: bench/results/scope_cuda.md).
The causal mask is applied only to tiles that cross the diagonal. Loops run to a
bound loaded from the lists (under the CPU interpreter: see nsa.kernels.interpreter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa.kernels.attention_steps import LOG2E, dkdv_step, dq_step, row_delta, softmax_result, zeros_split
from nsa.kernels.interpreter import allow_loaded_loop_bounds
from nsa.kernels.launch_args import dot_precision, split_dims

allow_loaded_loop_bounds()


class Tiles(NamedTuple):
    """Tile sizes (capped at the mask block) and launch settings. fwd: BLOCK_M queries x BLOCK_N keys;
    dq: DQ_M x DQ_N; dk/dv: DKV_N keys x DKV_M queries. Defaults: the fastest forward and backward of
    bench/bench_block_sparse.py's sweep on an H100 at 128k, q.k width 160 and 128
    (bench/results/scope_cuda.md, block_sparse_cuda.jsonl)."""

    block_m: int = 128
    block_n: int = 64
    dq_m: int = 128
    dq_n: int = 64
    dkv_m: int = 64
    dkv_n: int = 128
    num_warps: int = 8
    num_stages: int = 3  # forward
    bwd_num_stages: int = 2


@triton.jit
def _load_rows(ptr, rows, stride_t, COL0: tl.constexpr, WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    """[len(rows), WIDTH] tile of columns COL0 .. COL0 + WIDTH (zeros past NCOLS)."""
    cols = COL0 + tl.arange(0, WIDTH)
    return tl.load(ptr + rows[:, None] * stride_t + cols[None, :], mask=cols[None, :] < NCOLS, other=0.0)


@triton.jit
def _store_rows(ptr, rows, stride_t, value, COL0: tl.constexpr, WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    tl.store(ptr + rows[:, None] * stride_t + cols[None, :], value, mask=cols[None, :] < NCOLS)


@triton.jit
def _query_tile(q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, num_heads,
                num_qblocks, GROUP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M queries of head h: (rows, the first row, q / k / v bases of (b, h) and its kv
    head, the row of its block's list, b, h)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    first_row = pid_m * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    return (rows, first_row, q_ptr + b * stride_qb + h * stride_qh, k_ptr + b * stride_kb + (h // GROUP) * stride_kh,
            v_ptr + b * stride_vb + (h // GROUP) * stride_vh, bh * num_qblocks + first_row // BLOCK, b, h)


@triton.jit
def _listed_tile(idx_ptr, list_row, width, it, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """Token positions of step ``it`` of a walk over a block list in tiles of TILE (BLOCK // TILE per block),
    and the first of them."""
    listed = tl.load(idx_ptr + list_row * width + it // (BLOCK // TILE))
    first = listed * BLOCK + (it % (BLOCK // TILE)) * TILE
    return first + tl.arange(0, TILE), first


@triton.jit
def _causal_scaled(s, q_pos, k_pos, first_q, first_k, K_TILE: tl.constexpr, scale_log2):
    """Scores s times scale_log2, -inf where a key comes after its query (q_pos / k_pos: positions shaped
    to broadcast against s). Only a tile whose K_TILE keys from first_k reach past its first query first_q
    can hold such a pair: the others skip the mask."""
    s = s * scale_log2
    if first_k + K_TILE > first_q + 1:
        s = tl.where(k_pos <= q_pos, s, float("-inf"))
    return s


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, kv_num_ptr, kv_idx_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, num_heads, seq_len, num_qblocks, max_kv, scale_log2,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, first_row, q_base, k_base, v_base, list_row, b, h = _query_tile(
        q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, num_heads,
        num_qblocks, GROUP, BLOCK, BLOCK_M)
    bh = tl.program_id(1)
    q1 = _load_rows(q_base, rows, stride_qt, 0, D1, DQK)
    if D2 > 0:
        q2 = _load_rows(q_base, rows, stride_qt, D1, D2, DQK)
    num_kv = tl.load(kv_num_ptr + list_row)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for it in range(0, num_kv * (BLOCK // BLOCK_N)):
        cols, first_col = _listed_tile(kv_idx_ptr, list_row, max_kv, it, BLOCK, BLOCK_N)
        s = tl.dot(q1, tl.trans(_load_rows(k_base, cols, stride_kt, 0, D1, DQK)), input_precision=PRECISION)
        if D2 > 0:
            s += tl.dot(q2, tl.trans(_load_rows(k_base, cols, stride_kt, D1, D2, DQK)), input_precision=PRECISION)
        s = _causal_scaled(s, rows[:, None], cols[None, :], first_row, first_col, BLOCK_N, scale_log2)
        # not nsa's softmax_step: it takes v loaded before the row max, which changed this loop's PTX (not timed)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        v = _load_rows(v_base, cols, stride_vt, 0, BLOCK_DV, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out, lse = softmax_result(m_i, l_i, acc)
    _store_rows(out_ptr + b * stride_ob + h * stride_oh, rows, stride_ot, out.to(out_ptr.dtype.element_ty),
                0, BLOCK_DV, DV)
    tl.store(lse_ptr + bh * seq_len + rows, lse)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kv_num_ptr, kv_idx_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot, num_heads, seq_len, num_qblocks, max_kv,
    scale_log2, scale,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq = scale * sum_j dS_ij k_j with dS = P (dP - delta), dP = dO v^T (dq has q's strides); writes
    delta = rowsum(dO * out) (= sum_j P_ij dP_ij), which the dk/dv kernel, launched after it, reads."""
    rows, first_row, q_base, k_base, v_base, list_row, b, h = _query_tile(
        q_ptr, k_ptr, v_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, num_heads,
        num_qblocks, GROUP, BLOCK, BLOCK_M)
    bh = tl.program_id(1)
    q1 = _load_rows(q_base, rows, stride_qt, 0, D1, DQK)
    q2 = q1
    if D2 > 0:
        q2 = _load_rows(q_base, rows, stride_qt, D1, D2, DQK)
    dq1, dq2 = zeros_split(BLOCK_M, D1, D2)
    do = _load_rows(do_ptr + b * stride_dob + h * stride_doh, rows, stride_dot, 0, BLOCK_DV, DV)
    delta = row_delta(do, _load_rows(out_ptr + b * stride_ob + h * stride_oh, rows, stride_ot, 0, BLOCK_DV, DV))
    tl.store(delta_ptr + bh * seq_len + rows, delta)
    lse = tl.load(lse_ptr + bh * seq_len + rows)
    num_kv = tl.load(kv_num_ptr + list_row)
    for it in range(0, num_kv * (BLOCK // BLOCK_N)):
        cols, first_col = _listed_tile(kv_idx_ptr, list_row, max_kv, it, BLOCK, BLOCK_N)
        k1 = _load_rows(k_base, cols, stride_kt, 0, D1, DQK)
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        k2 = k1
        if D2 > 0:
            k2 = _load_rows(k_base, cols, stride_kt, D1, D2, DQK)
            s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        s = _causal_scaled(s, rows[:, None], cols[None, :], first_row, first_col, BLOCK_N, scale_log2)
        dq1, dq2 = dq_step(tl.math.exp2(s - lse[:, None]), do, _load_rows(v_base, cols, stride_vt, 0, BLOCK_DV, DV),
                           k1, k2, delta, dq1, dq2, D2, PRECISION)
    dq_base = dq_ptr + b * stride_qb + h * stride_qh
    _store_rows(dq_base, rows, stride_qt, (dq1 * scale).to(dq_ptr.dtype.element_ty), 0, D1, DQK)
    if D2 > 0:
        _store_rows(dq_base, rows, stride_qt, (dq2 * scale).to(dq_ptr.dtype.element_ty), D1, D2, DQK)


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, q_num_ptr, q_idx_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, num_heads, num_kv_heads, seq_len, num_kblocks, max_q, scale_log2, scale,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """For BLOCK_N keys of one kv head: dv = sum P^T dO and dk = scale * sum dS^T q over the GROUP query
    heads reading it, each over its own transposed list (dk / dv have k's / v's strides)."""
    pid_n, bhk = tl.program_id(0), tl.program_id(1)
    b, hk = bhk // num_kv_heads, bhk % num_kv_heads
    first_col = pid_n * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    k1 = _load_rows(k_base, cols, stride_kt, 0, D1, DQK)
    k2 = k1
    if D2 > 0:
        k2 = _load_rows(k_base, cols, stride_kt, D1, D2, DQK)
    dk1, dk2 = zeros_split(BLOCK_N, D1, D2)
    v = _load_rows(v_base, cols, stride_vt, 0, BLOCK_DV, DV)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * num_heads + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        list_row = bh * num_kblocks + first_col // BLOCK
        num_q = tl.load(q_num_ptr + list_row)
        for it in range(0, num_q * (BLOCK // BLOCK_M)):
            rows, first_row = _listed_tile(q_idx_ptr, list_row, max_q, it, BLOCK, BLOCK_M)
            q1 = _load_rows(q_base, rows, stride_qt, 0, D1, DQK)
            s_t = tl.dot(k1, tl.trans(q1), input_precision=PRECISION)
            q2 = q1
            if D2 > 0:
                q2 = _load_rows(q_base, rows, stride_qt, D1, D2, DQK)
                s_t += tl.dot(k2, tl.trans(q2), input_precision=PRECISION)
            lse = tl.load(lse_ptr + bh * seq_len + rows)
            delta = tl.load(delta_ptr + bh * seq_len + rows)
            s_t = _causal_scaled(s_t, rows[None, :], cols[:, None], first_row, first_col, BLOCK_N, scale_log2)
            p_t = tl.math.exp2(s_t - lse[None, :])
            dk1, dk2, dv, _ = dkdv_step(v, q1, q2, _load_rows(do_base, rows, stride_dot, 0, BLOCK_DV, DV), p_t, delta,
                                     dk1, dk2, dv, D2, PRECISION)
    dk_base = dk_ptr + b * stride_kb + hk * stride_kh
    _store_rows(dk_base, cols, stride_kt, (dk1 * scale).to(dk_ptr.dtype.element_ty), 0, D1, DQK)
    if D2 > 0:
        _store_rows(dk_base, cols, stride_kt, (dk2 * scale).to(dk_ptr.dtype.element_ty), D1, D2, DQK)
    _store_rows(dv_ptr + b * stride_vb + hk * stride_vh, cols, stride_vt, dv.to(dv_ptr.dtype.element_ty),
                0, BLOCK_DV, DV)


# ----------------------------------------------------------------------------------------------
# launchers


def _strides(*tensors: Tensor) -> list[int]:
    """(batch, head, token) strides of each [B, H, T, D] tensor (the last dim is contiguous)."""
    return [s for t in tensors for s in t.stride()[:3]]


def forward(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, block: int, scale: float,
            tiles: Tiles) -> tuple[Tensor, Tensor]:
    """-> out [B, H, T, Dv] (q's dtype), lse [B, H, T] float32 in base 2 (+inf where nothing is visible)."""
    bsz, heads, seq_len, dqk = q.shape
    kv_num_blocks, kv_indices = kv_num_blocks.contiguous(), kv_indices.contiguous()  # indexed as dense rows
    out = torch.empty(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(bsz, heads, seq_len, device=q.device, dtype=torch.float32)
    block_m, block_n = min(tiles.block_m, block), min(tiles.block_n, block)
    _fwd_kernel[(seq_len // block_m, bsz * heads)](
        q, k, v, out, lse, kv_num_blocks, kv_indices, *_strides(q, k, v, out), heads, seq_len,
        seq_len // block, kv_indices.shape[-1], scale * LOG2E,
        GROUP=heads // k.shape[1], BLOCK=block, BLOCK_M=block_m, BLOCK_N=block_n, **split_dims(dqk, v.shape[-1]),
        PRECISION=dot_precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out, lse


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_num_blocks: Tensor,
             kv_indices: Tensor, q_num_blocks: Tensor, q_indices: Tensor, block: int, scale: float, tiles: Tiles
             ) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (the inputs' shapes, strides and dtypes); dout [B, H, T, Dv] with a contiguous last dim."""
    bsz, heads, seq_len, dqk = q.shape
    kv_heads = k.shape[1]
    kv_num_blocks, kv_indices, q_num_blocks, q_indices = (
        t.contiguous() for t in (kv_num_blocks, kv_indices, q_num_blocks, q_indices))  # indexed as dense rows
    delta = torch.empty(bsz, heads, seq_len, device=q.device, dtype=torch.float32)  # the dq kernel writes it
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dims = split_dims(dqk, v.shape[-1])
    common = {"GROUP": heads // kv_heads, "BLOCK": block, "PRECISION": dot_precision(q.dtype), **dims}
    dq_m, dq_n = min(tiles.dq_m, block), min(tiles.dq_n, block)
    _dq_kernel[(seq_len // dq_m, bsz * heads)](
        q, k, v, out, dout, lse, delta, dq, kv_num_blocks, kv_indices, *_strides(q, k, v, out, dout), heads, seq_len,
        seq_len // block, kv_indices.shape[-1], scale * LOG2E, scale,
        BLOCK_M=dq_m, BLOCK_N=dq_n, **common, num_warps=tiles.num_warps, num_stages=tiles.bwd_num_stages,
    )
    dkv_m, dkv_n = min(tiles.dkv_m, block), min(tiles.dkv_n, block)
    _dkdv_kernel[(seq_len // dkv_n, bsz * kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, q_num_blocks, q_indices, *_strides(q, k, v, dout), heads, kv_heads,
        seq_len, seq_len // block, q_indices.shape[-1], scale * LOG2E, scale,
        BLOCK_M=dkv_m, BLOCK_N=dkv_n, **common, num_warps=tiles.num_warps, num_stages=tiles.bwd_num_stages,
    )
    return dq, dk, dv
