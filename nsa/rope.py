"""Rotary position embedding applied per head over the head dimension (rotate-half convention)."""

from __future__ import annotations

from typing import Any

import torch

from nsa.dispatch import elementwise_kernel_applies
from nsa.errors import NSAInputError
from nsa.sized_tensors import sized_tensors


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate x [B, T, H, D] at `positions` ([T] or [B, T], int or float; absolute token positions).

    Pairs (i, i + D/2) rotate by angle position * theta^(-2i/D). Each head is rotated on its own D
    dims, never over the flattened H*D vector. The rotation is computed in float32 (float64 for
    float64 inputs) so positions near 1M keep their precision, then cast back to x's dtype. Eager on CUDA
    the rotation is one Triton pass forward and one backward (nsa.kernels.rope), bitwise the same result.
    """
    if x.dim() != 4:
        raise NSAInputError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    head_dim = x.shape[-1]
    if head_dim % 2 != 0:
        raise NSAInputError(f"RoPE needs an even head dim, got D={head_dim}")
    if positions.dim() not in (1, 2) or positions.shape[-1] != x.shape[1]:
        raise NSAInputError(f"positions must be [T] or [B, T] with T={x.shape[1]}, got {tuple(positions.shape)}")
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = head_dim // 2

    def frequencies() -> torch.Tensor:
        return theta ** (-torch.arange(half, device=x.device, dtype=compute_dtype) * 2.0 / head_dim)

    inv_freq = sized_tensors(("rope frequencies", head_dim, theta, compute_dtype), x.device, frequencies)
    angles = positions.to(compute_dtype)[..., None] * inv_freq  # [T, D/2] or [B, T, D/2]
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    cos, sin = angles.cos(), angles.sin()  # [B|1, T, D/2]
    if elementwise_kernel_applies(x, contiguous=False) and not positions.requires_grad:
        return _RopeKernel.apply(x, cos, sin)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B|1, T, 1, D/2]: broadcast over the heads
    x1, x2 = x[..., :half].to(compute_dtype), x[..., half:].to(compute_dtype)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


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
