"""Rotary position embedding applied per head over the head dimension (rotate-half convention)."""

from __future__ import annotations

from typing import Any

import torch

from nsa.dispatch import elementwise_kernel_applies
from nsa.errors import NSAInputError
from nsa.sized_tensors import sized_tensors
from nsa.validation import check_float_tensor, check_positions_layout, check_positive_int, check_real, describe


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None, theta: float = 10000.0, *, stride: int = 1,
               offset: float = 0.0) -> torch.Tensor:
    """Rotate x [B, T, H, D] at `positions` ([T] or [B, T], int or float; absolute token positions).

    Pairs (i, i + D/2) rotate by angle position * theta^(-2i/D). Each head is rotated on its own D
    dims, never over the flattened H*D vector. The rotation is computed in float32 (float64 for
    float64 inputs) so positions near 1M keep their precision, then cast back to x's dtype. Eager on CUDA
    the rotation is one Triton pass forward and one backward (nsa.kernels.rope), bitwise the same result.
    positions None: token t sits at t * stride + offset (0 .. T - 1 by default), and the angles' cos / sin
    follow from the sizes alone, so they are built once per size and kept (nsa.sized_tensors): the same values
    as from those positions given as a tensor, without four launches per call.
    NSAInputError naming the argument: x a floating [B, T, H, D] tensor with D even; theta > 0 and offset
    finite, also in float32; positions an integer (not bool) or floating tensor [T] or [B|1, T] on x's device.
    Float positions must be finite: checked on CPU tensors in eager mode only, since reading a device tensor's
    values is a host sync (and would break the decode step's CUDA-graph capture); elsewhere a non-finite
    position gives NaN in its rows.
    """
    check_float_tensor("x", x, 4)
    head_dim = x.shape[-1]
    if head_dim % 2 != 0:
        raise NSAInputError(f"RoPE needs an even head dim, got D={head_dim} (x's last dim)")
    check_real("theta", theta, above=0.0, float32=True)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if positions is None:
        check_positive_int("stride", stride)
        check_real("offset", offset, float32=True)
        seq_len, device = x.shape[1], x.device
        cos, sin = sized_tensors(("rope tables", seq_len, stride, offset, head_dim, theta, compute_dtype), device,
                                 lambda: _tables(_sequence_positions(seq_len, stride, offset, device), head_dim,
                                                 theta, compute_dtype))
    else:
        if isinstance(stride, bool) or stride != 1 or offset != 0.0:
            raise NSAInputError(f"stride={stride!r} and offset={offset!r} place the tokens only when positions is "
                                "None; given positions, fold them in (positions * stride + offset)")
        _check_positions(positions, x)
        cos, sin = _tables(positions, head_dim, theta, compute_dtype)
    if elementwise_kernel_applies(x, contiguous=False) and not (positions is not None and positions.requires_grad):
        return _RopeKernel.apply(x, cos, sin)
    half = head_dim // 2
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B|1, T, 1, D/2]: broadcast over the heads
    x1, x2 = x[..., :half].to(compute_dtype), x[..., half:].to(compute_dtype)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


def _check_positions(positions: torch.Tensor, x: torch.Tensor) -> None:
    """positions: an integer or floating tensor [T] or [B|1, T] on x's device; float ones finite (CPU, eager)."""
    if not isinstance(positions, torch.Tensor) or positions.dtype == torch.bool or positions.is_complex():
        raise NSAInputError(f"positions must be an integer or floating tensor (token positions), got "
                            f"{describe(positions)}")
    check_positions_layout(positions, x.shape[0], x.shape[1], x.device, of="x")
    # CPU values read without a device sync; under torch.compile the read would break the graph.
    if (positions.is_floating_point() and positions.device.type == "cpu" and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(positions).all())):
        raise NSAInputError("positions must be finite: a NaN or inf position rotates its token into NaN")


def _sequence_positions(seq_len: int, stride: int, offset: float, device: torch.device) -> torch.Tensor:
    """t * stride + offset for t < seq_len, as a caller would write them (int64 unless the offset is not 0)."""
    positions = torch.arange(seq_len, device=device)
    if stride != 1:
        positions = positions * stride
    return positions + offset if offset else positions


def _tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B|1, T, D/2] of the angles position * theta^(-2i/D), in ``dtype``."""
    half = head_dim // 2

    def frequencies() -> torch.Tensor:
        return theta ** (-torch.arange(half, device=positions.device, dtype=dtype) * 2.0 / head_dim)

    inv_freq = sized_tensors(("rope frequencies", head_dim, theta, dtype), positions.device, frequencies)
    angles = positions.to(dtype)[..., None] * inv_freq  # [T, D/2] or [B, T, D/2]
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    return angles.cos(), angles.sin()


class _RopeKernel(torch.autograd.Function):
    """apply_rope in one pass (nsa.kernels.rope, eager CUDA); its backward rotates the gradient back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        from nsa.kernels.rope import rope_triton

        ctx.save_for_backward(cos, sin)
        return rope_triton(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        from nsa.kernels.rope import rope_triton

        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return rope_triton(grad, cos, sin, inverse=True), None, None
