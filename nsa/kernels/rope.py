"""Triton kernel of rotary position embedding (nsa.rope.apply_rope): one read of x and one write of the result.

In PyTorch the same rotation takes ten kernels (two float32 copies of the halves, four products, a difference, a
sum, the concatenation and the cast back), each a pass over a float32 tensor the size of x: on the H200 they were
~6 ms of the NSA module's 65 ms forward at 64k tokens, and as much again in the backward.

x [B, T, H, D] (strides arbitrary but the last dim's, which is contiguous) is taken as B * T * H rows of D; row
(b, t, h) rotates its pairs (i, i + D/2) by the angles whose cosines and sines are cos[b', t, i], sin[b', t, i]
(float32 [B', T, D/2], B' = 1 or B: one table for every sequence or one per sequence). The arithmetic is the
PyTorch form's, rounding for rounding (float32 products and sums, no fused multiply-add), so eager calls on the
kernel and torch.compile'd ones on the PyTorch form agree bitwise; the backward is the rotation by the opposite
angles (sin negated), which is what autograd computes through the PyTorch form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa.kernels.launch_args import cdiv, next_power_of_2

ELEMENTS_PER_STEP = 4096  # rows x half-dims of one program: 32 float32 pairs per thread on 4 warps


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_rows, seq_len, heads, half, stride_xb, stride_xt, stride_xh,
                 table_batch_stride, INVERSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    head = rows % heads
    token = (rows // heads) % seq_len
    batch = rows // (heads * seq_len)
    cols = tl.arange(0, BLOCK_H)
    ok = row_ok[:, None] & (cols < half)[None, :]
    x_row = x_ptr + (batch * stride_xb + token * stride_xt + head * stride_xh)[:, None] + cols[None, :]
    x1 = tl.load(x_row, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half, mask=ok, other=0.0).to(tl.float32)
    table = ((batch * table_batch_stride + token) * half)[:, None] + cols[None, :]
    cos = tl.load(cos_ptr + table, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + table, mask=ok, other=0.0)
    if INVERSE:
        sin = -sin
    out_row = out_ptr + (rows * (2 * half))[:, None] + cols[None, :]
    tl.store(out_row, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_row + half, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=ok)


def rope_triton(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """x [B, T, H, D] (contiguous last dim) rotated by the angles of cos / sin (float32 [B', T, D/2] contiguous,
    B' = 1 or B), by their negatives where ``inverse`` (the backward); a new contiguous tensor of x's dtype."""
    batch, seq_len, heads, head_dim = x.shape
    half = head_dim // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_h = next_power_of_2(half)
    block_r = max(1, ELEMENTS_PER_STEP // block_h)
    num_rows = batch * seq_len * heads
    _rope_kernel[(cdiv(num_rows, block_r),)](
        x, cos, sin, out, num_rows, seq_len, heads, half, x.stride(0), x.stride(1), x.stride(2),
        0 if cos.shape[0] == 1 else seq_len, INVERSE=inverse, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4,
        enable_fp_fusion=False)  # no fused multiply-adds: the PyTorch form's roundings, bit for bit
    return out
