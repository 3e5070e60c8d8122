"""Argument checks shared by the ops. Each check raises `NSAInputError` naming the argument.

Shape checks cost no host sync; only `check_block_indices` reads tensor values (one sync), and
the internal paths that build indices themselves skip it.
"""

from __future__ import annotations

import torch

from nsa.errors import NSAInputError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NSAInputError(f"{name} must be a positive int, got {value!r}")


def check_divides(divisor_name: str, divisor: int, name: str, value: int) -> None:
    if value % divisor != 0:
        raise NSAInputError(f"{divisor_name}={divisor} must divide {name}={value}")


def check_scale(scale: float | None) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise NSAInputError(f"scale must be a positive number or None, got {scale!r}")


def check_float_tensor(name: str, x: torch.Tensor, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise NSAInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise NSAInputError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise NSAInputError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")


def check_same_dtype_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.dtype != reference.dtype:
            raise NSAInputError(f"{name} has dtype {x.dtype} but {reference_name} has {reference.dtype}")
        if x.device != reference.device:
            raise NSAInputError(f"{name} is on {x.device} but {reference_name} is on {reference.device}")


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_name: str = "k", v_name: str = "v"
) -> tuple[int, int, int]:
    """Check q [B,T,HQ,Dk], k [B,N,Hkv,Dk], v [B,N,Hkv,Dv]; return (T, HQ, Hkv)."""
    check_float_tensor("q", q, 4)
    check_float_tensor(k_name, k, 4)
    check_float_tensor(v_name, v, 4)
    check_same_dtype_device("q", q, **{k_name: k, v_name: v})
    batch, seq_len, num_heads, head_dim = q.shape
    if seq_len == 0:
        raise NSAInputError("q must hold at least one token (T >= 1), got T=0")
    if k.shape[0] != batch or v.shape[0] != batch:
        raise NSAInputError(
            f"batch sizes differ: q has {batch}, {k_name} has {k.shape[0]}, {v_name} has {v.shape[0]}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise NSAInputError(
            f"{k_name} {tuple(k.shape)} and {v_name} {tuple(v.shape)} must agree on [B, N, H_kv]"
        )
    if k.shape[3] != head_dim:
        raise NSAInputError(f"{k_name} head dim {k.shape[3]} must equal q head dim {head_dim}")
    num_kv_heads = k.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise NSAInputError(
            f"query heads HQ={num_heads} must be a multiple of {k_name} heads H_kv={num_kv_heads}"
        )
    return seq_len, num_heads, num_kv_heads


def check_same_length(name: str, x: torch.Tensor, seq_len: int) -> None:
    if x.shape[1] != seq_len:
        raise NSAInputError(f"{name} has {x.shape[1]} tokens but q has T={seq_len}; they must match")


def check_gates(gates: torch.Tensor, q: torch.Tensor) -> None:
    check_float_tensor("gates", gates, 4)
    check_same_dtype_device("q", q, gates=gates)
    expected = (*q.shape[:3], 3)
    if tuple(gates.shape) != expected:
        raise NSAInputError(f"gates must have shape [B, T, HQ, 3] = {expected}, got {tuple(gates.shape)}")


def check_block_indices(
    block_indices: torch.Tensor, q: torch.Tensor, num_kv_heads: int, block_size: int, *, validate_values: bool
) -> None:
    """Shape and dtype always; with validate_values also range, causality and uniqueness (one sync)."""
    if not isinstance(block_indices, torch.Tensor) or block_indices.dtype not in (torch.int32, torch.int64):
        raise NSAInputError("block_indices must be an int32 or int64 tensor")
    batch, seq_len = q.shape[:2]
    if block_indices.dim() != 4 or tuple(block_indices.shape[:3]) != (batch, seq_len, num_kv_heads):
        raise NSAInputError(
            f"block_indices must have shape [B, T, H_kv, S] = [{batch}, {seq_len}, {num_kv_heads}, S], "
            f"got {tuple(block_indices.shape)}"
        )
    if block_indices.device != q.device:
        raise NSAInputError(f"block_indices is on {block_indices.device} but q is on {q.device}")
    if not validate_values or block_indices.numel() == 0:
        return
    num_blocks = -(-seq_len // block_size)
    if bool((block_indices < -1).any()) or bool((block_indices >= num_blocks).any()):
        raise NSAInputError(
            f"block_indices must lie in [-1, {num_blocks - 1}] (ceil(T / block_size) blocks, -1 = unused)"
        )
    positions = torch.arange(seq_len, device=q.device).view(1, seq_len, 1, 1)
    if bool((block_indices * block_size > positions).any()):
        raise NSAInputError("block_indices points to the future: block start j * block_size > query position t")
    ordered = block_indices.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(repeated.any()):
        raise NSAInputError("block_indices repeats a block within one (b, t, h_kv) row; blocks must be unique")
