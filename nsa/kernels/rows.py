"""Triton kernels of the non-finite rule's row passes (nsa.nonfinite): one read of a tensor to flag its non-finite
vectors, one read and one write to fill whole vectors with NaN (poisoning output rows) or zero (their gradient).

A tensor [..., D] is taken as N = numel / D rows of D contiguous elements (callers pass contiguous tensors). In
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

allow_loaded_loop_bounds()
ELEMENTS_PER_STEP = 4096  # rows x columns of one program's step: 16-32 elements per thread on 4 warps


@triton.jit
def _nonfinite_rows_kernel(x_ptr, flags_ptr, num_rows, row_len, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    base = x_ptr + rows.to(tl.int64)[:, None] * row_len
    bad = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, row_len, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(base + cols[None, :], mask=row_ok[:, None] & (cols < row_len)[None, :], other=0.0)
        # x * 0 is exactly 0 for every finite x and NaN for NaN and +-inf (float32 holds every 16-bit value)
        bad = bad | tl.max(((x.to(tl.float32) * 0.0) != 0.0).to(tl.int32), axis=1)
    tl.store(flags_ptr + rows, bad.to(tl.int8), mask=row_ok)


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


def _blocks(row_len: int) -> dict[str, int]:
    block_d = min(triton.next_power_of_2(row_len), ELEMENTS_PER_STEP)
    return {"BLOCK_D": block_d, "BLOCK_R": max(1, ELEMENTS_PER_STEP // block_d)}


def _launch(x: Tensor) -> tuple[tuple[int], dict[str, int]]:
    """(grid, the runtime row count and length with the block constexprs) for x taken as rows of its last dim."""
    row_len = x.shape[-1]
    num_rows = x.numel() // row_len
    blocks = _blocks(row_len)
    return (triton.cdiv(num_rows, blocks["BLOCK_R"]),), {"num_rows": num_rows, "row_len": row_len, **blocks}


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
