"""Rotary position embedding applied per head over the head dimension (rotate-half convention)."""

from __future__ import annotations

import torch

from nsa.errors import NSAInputError


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate x [B, T, H, D] at `positions` ([T] or [B, T], int or float; absolute token positions).

    Pairs (i, i + D/2) rotate by angle position * theta^(-2i/D). Each head is rotated on its own D
    dims, never over the flattened H*D vector. The rotation is computed in float32 (float64 for
    float64 inputs) so positions near 1M keep their precision, then cast back to x's dtype.
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
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=compute_dtype) * 2.0 / head_dim)
    angles = positions.to(compute_dtype)[..., None] * inv_freq  # [T, D/2] or [B, T, D/2]
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)  # [B|1, T, 1, D/2]
    x1, x2 = x[..., :half].to(compute_dtype), x[..., half:].to(compute_dtype)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)
