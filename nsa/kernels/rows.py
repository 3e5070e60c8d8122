"""Triton kernels of the non-finite rule's row passes (nsa.nonfinite): one read of a tensor to flag its non-finite
vectors, one read and one write to fill whole vectors with NaN (poisoning output rows) or zero (their gradient), and
the whole NSA layer's rows to poison (``nsa_nonfinite_rows_triton``) in three launches.

A tensor [..., D] is taken as N = numel / D rows of D contiguous elements (callers pass contiguous tensors; the
guard's keys and values may be strided views). In
PyTorch the same passes take several kernels each: ``(x * 0).sum(-1).isnan()`` writes and reads a product the
size of x, and ``torch.where(rows[..., None], nan, x)`` broadcasts the flags along the last dim, which
PyTorch's vectorised elementwise path does not take (1.5 ms for each direction over a 1 GiB output on the H200,
where one read and one write take about 0.5 ms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa.kernels.interpreter import allow_loaded_loop_bounds
from nsa.kernels.launch_args import cdiv, next_power_of_2

allow_loaded_loop_bounds()
ELEMENTS_PER_STEP = 4096  # rows x columns of one program's step: 16-32 elements per thread on 4 warps
# Tokens x query heads per program of the guard's row pass. H200, public shape (bench/results/logs/
# probe_guard_launches_h200.jsonl): 64 x 16 ran the whole guard in 0.105 ms at 8k and 0.625 at 64k; 128 tokens
# 0.131 / 0.887, 4 heads 0.100 / 0.698; the seven launches before 0.156 / 0.619.
GUARD_TOKENS = 64
GUARD_HEADS = 16


@triton.jit
def _row_flags(x_ptr, rows, row_ok, row_len, BLOCK_D: tl.constexpr):
    """int32 [BLOCK_R]: 1 where the row (of row_len contiguous elements, rows one after the other) holds a NaN or
    +-inf."""
    return _flags_at(x_ptr, rows.to(tl.int64) * row_len, row_ok, row_len, BLOCK_D)


@triton.jit
def _flags_at(x_ptr, starts, row_ok, row_len, BLOCK_D: tl.constexpr):
    """_row_flags of the rows of row_len contiguous elements starting at x_ptr + starts (int64 element offsets)."""
    base = x_ptr + starts[:, None]
    bad = tl.zeros(starts.shape, tl.int32)
    for start in range(0, row_len, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(base + cols[None, :], mask=row_ok[:, None] & (cols < row_len)[None, :], other=0.0)
        # x * 0 is exactly 0 for every finite x and NaN for NaN and +-inf (float32 holds every 16-bit value)
        bad = bad | tl.max(((x.to(tl.float32) * 0.0) != 0.0).to(tl.int32), axis=1)
    return bad


@triton.jit
def _nonfinite_rows_kernel(x_ptr, flags_ptr, num_rows, row_len, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    tl.store(flags_ptr + rows, _row_flags(x_ptr, rows, row_ok, row_len, BLOCK_D).to(tl.int8), mask=row_ok)


@triton.jit
def _fill_rows_kernel(x_ptr, flags_ptr, out_ptr, num_rows, row_len, FILL_NAN: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    fill = tl.load(flags_ptr + rows, mask=row_ok, other=0) != 0
    offsets = rows.to(tl.int64)[:, None] * row_len
    value = float("nan") if FILL_NAN else 0.0
    for start in range(0, row_len, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < row_len)[None, :]
        x = tl.load(x_ptr + offsets + cols[None, :], mask=mask & ~fill[:, None], other=value)
        tl.store(out_ptr + offsets + cols[None, :], x, mask=mask)


@triton.jit
def _pair_segment(k_ptr, v_ptr, counts_ptr, block, num_rows, length, heads, k_len, v_len, seg_len, seg0, stride_kb,
                  stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flags of one block of (key, value) vector pairs of k [B, N, H, Dk], v [B, N, H, Dv] (1: either is
    non-finite), stored transposed as counts[b * H + h, seg0 + n] (int32) for the prefix sums along n. k and v
    may be strided views (the layer's selection and window sets are slices of one projection's output); their
    vectors are contiguous."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    head = rows % heads
    batch_pos = rows // heads
    position = batch_pos % length
    batch = batch_pos // length
    b, n, h = batch.to(tl.int64), position.to(tl.int64), head.to(tl.int64)
    bad = (_flags_at(k_ptr, b * stride_kb + n * stride_kn + h * stride_kh, row_ok, k_len, BLOCK_D)
           | _flags_at(v_ptr, b * stride_vb + n * stride_vn + h * stride_vh, row_ok, v_len, BLOCK_D))
    line = batch * heads + head
    tl.store(counts_ptr + line.to(tl.int64) * seg_len + seg0 + position, bad, mask=row_ok)


@triton.jit
def _pair_flags_kernel(k_cmp_ptr, v_cmp_ptr, k_sel_ptr, v_sel_ptr, k_win_ptr, v_win_ptr, counts_ptr, heads, seg_len,
                       rows_cmp, rows_sel, rows_win, len_cmp, len_sel, len_win, dk_cmp, dv_cmp, dk_sel, dv_sel, dk_win,
                       dv_win, seg_sel, seg_win, programs_cmp, programs_sel, stride_kcb, stride_kcn, stride_kch,
                       stride_vcb, stride_vcn, stride_vch, stride_ksb, stride_ksn, stride_ksh, stride_vsb, stride_vsn,
                       stride_vsh, stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn, stride_vwh,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Every branch's pair flags in one launch: the first programs_cmp programs take the compressed pairs, the next
    programs_sel the selection's, the rest the window's (none where it reads the selection's tensors). Strides:
    each tensor's (batch, position, head) element strides."""
    pid = tl.program_id(0)
    if pid < programs_cmp:
        _pair_segment(k_cmp_ptr, v_cmp_ptr, counts_ptr, pid, rows_cmp, len_cmp, heads, dk_cmp, dv_cmp, seg_len, 0,
                      stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch, BLOCK_R, BLOCK_D)
    elif pid < programs_cmp + programs_sel:
        _pair_segment(k_sel_ptr, v_sel_ptr, counts_ptr, pid - programs_cmp, rows_sel, len_sel, heads, dk_sel, dv_sel,
                      seg_len, seg_sel, stride_ksb, stride_ksn, stride_ksh, stride_vsb, stride_vsn, stride_vsh,
                      BLOCK_R, BLOCK_D)
    else:
        _pair_segment(k_win_ptr, v_win_ptr, counts_ptr, pid - programs_cmp - programs_sel, rows_win, len_win, heads,
                      dk_win, dv_win, seg_len, seg_win, stride_kwb, stride_kwn, stride_kwh, stride_vwb, stride_vwn,
                      stride_vwh, BLOCK_R, BLOCK_D)


@triton.jit
def _prefix(line_ptr, seg, x, seg_rows, ok):
    """Non-finite pairs among the segment's positions 0 .. x - 1 (x clamped to the segment), plus everything before
    the segment (cancelling in a difference): the inclusive prefix sum at seg + x - 1, 0 before the line's start."""
    at = seg + tl.minimum(tl.maximum(x, 0), seg_rows) - 1
    return tl.load(line_ptr + at, mask=ok & (at >= 0), other=0)


@triton.jit
def _guard_rows_kernel(counts_ptr, seg_len, seg_sel, seg_win, rows_cmp, rows_sel, rows_win, indices_ptr,
                       stride_ib, stride_it, stride_ih, stride_ij, q_ptr, gates_ptr, out_ptr, token_start_ptr,
                       block_start_ptr, position_ptr, seq_len, kv_heads, group, num_selected, block_size,
                       block_stride, sel_block_size, window_size, q_len, gate_len, PACKED: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DG: tl.constexpr,
                       HEADS: tl.constexpr):
    """Rows [B, T, HQ] (int8) of one tile of BLOCK_T tokens and HEADS of one kv head's G query heads (program 2:
    which HEADS): a visible compressed block, a window token or a token of a selected block holds a non-finite pair
    (counted from the prefix sums), or the query vector q [B, T, HQ, q_len] or the gate vector gates [B, T, HQ,
    gate_len] is non-finite (read here, one head at a time, rather than flagged by launches of their own)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    batch = tl.program_id(1) // kv_heads
    head = tl.program_id(1) % kv_heads
    ok = t < seq_len
    if PACKED:  # positions restart in each sequence (nsa.nonfinite.sequence_packing)
        token_start = tl.load(token_start_ptr + t, mask=ok, other=0)
        block_start = tl.load(block_start_ptr + t, mask=ok, other=0)
        position = tl.load(position_ptr + t, mask=ok, other=0)
    else:
        token_start = tl.zeros([BLOCK_T], tl.int64)
        block_start = tl.zeros([BLOCK_T], tl.int64)
        position = t.to(tl.int64)
    line = counts_ptr + (batch * kv_heads + head).to(tl.int64) * seg_len
    seen = position + 1
    num_cmp = tl.where(seen >= block_size, (seen - block_size) // block_stride + 1, 0)
    bad = (_prefix(line, 0, block_start + num_cmp, rows_cmp, ok)  # the compressed segment comes first
           - _prefix(line, 0, block_start, rows_cmp, ok)) > 0
    oldest = tl.maximum(token_start, t - window_size + 1)
    bad |= (_prefix(line, seg_win, t + 1, rows_win, ok) - _prefix(line, seg_win, oldest, rows_win, ok)) > 0
    j = tl.arange(0, BLOCK_N)
    picked = ok[:, None] & (j < num_selected)[None, :]
    index_rows = indices_ptr + batch.to(tl.int64) * stride_ib + t.to(tl.int64)[:, None] * stride_it + head * stride_ih
    chosen = tl.load(index_rows + j[None, :] * stride_ij, mask=picked, other=-1).to(tl.int64)
    first = token_start[:, None] + tl.maximum(chosen, 0) * sel_block_size
    end = tl.minimum(first + sel_block_size, t[:, None] + 1)
    read = (_prefix(line, seg_sel, end, rows_sel, picked) - _prefix(line, seg_sel, first, rows_sel, picked)) > 0
    bad |= tl.max((read & (chosen >= 0)).to(tl.int32), axis=1) > 0
    for g in range(tl.program_id(2) * HEADS, tl.minimum(tl.program_id(2) * HEADS + HEADS, group)):
        # row: of out, and the index of q's and the gates' vectors
        row = (batch * seq_len + t).to(tl.int64) * (kv_heads * group) + head * group + g
        own = _row_flags(q_ptr, row, ok, q_len, BLOCK_DQ) | _row_flags(gates_ptr, row, ok, gate_len, BLOCK_DG)
        tl.store(out_ptr + row, ((own != 0) | bad).to(tl.int8), mask=ok)


def nsa_nonfinite_rows_triton(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor,
                              v_win: Tensor, gates: Tensor, block_indices: Tensor, *, block_size: int,
                              block_stride: int, sel_block_size: int, window_size: int,
                              cu_seqlens: Tensor | None = None) -> Tensor:
    """bool [B, T, HQ]: nsa.nonfinite.nsa_nonfinite_rows (the same arguments and rule) on contiguous q and gates
    and keys / values of contiguous vectors (any batch, position and head strides), in three launches: every
    branch's (key, value) pair flags into one int32 buffer, one prefix sum along the positions, and one pass over
    the rows that counts the non-finite pairs each (query, kv head) can see (the compressed prefix, the window and
    the n selected blocks) and reads the query and gate vectors. The window branch shares the selection's flags
    when it reads the same tensors."""
    from nsa.nonfinite import sequence_packing

    packing = None if cu_seqlens is None else sequence_packing(q.shape[1], cu_seqlens, q.device, block_size,
                                                               block_stride)
    batch, seq_len, heads = q.shape[:3]
    kv_heads = k_sel.shape[2]
    shared = k_win is k_sel and v_win is v_sel
    seg_sel = k_cmp.shape[1]
    seg_win = seg_sel if shared else seg_sel + k_sel.shape[1]
    seg_len = seg_win + k_win.shape[1]
    counts = torch.empty(batch * kv_heads, seg_len, dtype=torch.int32, device=q.device)
    pairs = [(k_cmp, v_cmp), (k_sel, v_sel), (k_win, v_win)]
    num_rows = [k.numel() // k.shape[-1] for k, _ in pairs]
    blocks = _blocks(max(x.shape[-1] for pair in pairs for x in pair))
    programs = [cdiv(n, blocks["BLOCK_R"]) for n in num_rows]
    _pair_flags_kernel[(programs[0] + programs[1] + (0 if shared else programs[2]),)](
        *(x for pair in pairs for x in pair), counts, kv_heads, seg_len, *num_rows, *(k.shape[1] for k, _ in pairs),
        *(x.shape[-1] for pair in pairs for x in pair), seg_sel, seg_win, programs[0], programs[1],
        *(stride for pair in pairs for x in pair for stride in x.stride()[:3]), **blocks, num_warps=4)
    counts.cumsum_(dim=-1)
    out = torch.empty(batch, seq_len, heads, dtype=torch.int8, device=q.device)
    token_start, block_start, position = packing if packing is not None else (out, out, out)  # unread
    group = heads // kv_heads
    _guard_rows_kernel[(cdiv(seq_len, GUARD_TOKENS), batch * kv_heads, cdiv(group, GUARD_HEADS))](
        counts, seg_len, seg_sel, seg_win, k_cmp.shape[1], k_sel.shape[1], k_win.shape[1],
        block_indices, *block_indices.stride(), q, gates, out, token_start, block_start, position, seq_len, kv_heads,
        group, block_indices.shape[-1], block_size, block_stride, sel_block_size, window_size,
        q.shape[-1], gates.shape[-1], PACKED=packing is not None, BLOCK_T=GUARD_TOKENS,
        BLOCK_N=next_power_of_2(block_indices.shape[-1]), **_row_tile(q.shape[-1], "BLOCK_DQ", GUARD_TOKENS),
        **_row_tile(gates.shape[-1], "BLOCK_DG", GUARD_TOKENS), HEADS=GUARD_HEADS, num_warps=4)
    return out.view(torch.bool)


def _row_tile(row_len: int, name: str, rows: int) -> dict[str, int]:
    """{name: the columns per step} of a pass over ``rows`` rows at a time of row_len elements."""
    return {name: min(next_power_of_2(row_len), max(1, ELEMENTS_PER_STEP // rows))}


def _blocks(row_len: int) -> dict[str, int]:
    block_d = min(next_power_of_2(row_len), ELEMENTS_PER_STEP)
    return {"BLOCK_D": block_d, "BLOCK_R": max(1, ELEMENTS_PER_STEP // block_d)}


def _launch(x: Tensor) -> tuple[tuple[int], dict[str, int]]:
    """(grid, the runtime row count and length with the block constexprs) for x taken as rows of its last dim."""
    row_len = x.shape[-1]
    num_rows = x.numel() // row_len
    blocks = _blocks(row_len)
    return (cdiv(num_rows, blocks["BLOCK_R"]),), {"num_rows": num_rows, "row_len": row_len, **blocks}


def nonfinite_rows_triton(x: Tensor) -> Tensor:
    """bool x.shape[:-1]: the vectors (last dim) of contiguous x [..., D] (D >= 1) holding any NaN or +-inf."""
    flags = torch.empty(x.shape[:-1], dtype=torch.int8, device=x.device)
    grid, args = _launch(x)
    _nonfinite_rows_kernel[grid](x, flags, **args, num_warps=4)
    return flags.view(torch.bool)


def fill_rows_triton(x: Tensor, rows: Tensor, fill_nan: bool) -> Tensor:
    """A copy of contiguous x [..., D] with the vectors where ``rows`` (bool x.shape[:-1], contiguous) is True
    replaced by NaN (fill_nan) or zeros."""
    out = torch.empty_like(x)
    grid, args = _launch(x)
    _fill_rows_kernel[grid](x, rows.view(torch.int8), out, **args, FILL_NAN=fill_nan, num_warps=4)
    return out
