"""Argument checks shared by the ops. Each check raises `NSAInputError` naming the argument.

Shape checks cost no host sync; only `check_block_indices` reads tensor values here (one sync), and
the internal paths that build indices themselves skip it. Outside this module two public ops read values
too: `topn_blocks` given positions (one sync; the library's chunk step calls `_topn`, which reads nothing) and
`apply_rope` given float positions, only on the CPU (no device sync; the layer's compressed-key rotation
passes such positions, so CPU runs pay one small reduction per call). The scalar checks (`check_positive_int`,
`check_nonnegative_int`, `check_real`, `parse_device`, `check_device`) take the error class to raise, so
configuration code (NSAConfig, the training config, ScopeConfig) shares them and raises its own config error.
"""

from __future__ import annotations

import math
import numbers

import torch

from nsa.errors import NSAInputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# float32 rounds |x| >= max + half an ulp to inf (the tie goes to the even neighbour, inf) and
# |x| <= half the smallest subnormal to 0 (the tie goes to 0). Plain floats, so torch.compile traces the checks.
_FLOAT32_TO_INF = float.fromhex("0x1.ffffffp+127")
_FLOAT32_TO_ZERO = 2.0**-150


def is_int(value: object) -> bool:
    """A Python int that is not a bool (True would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: int, *, error: type[Exception] = NSAInputError) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise error(f"{name} must be a positive int, got {value!r}")


def check_nonnegative_int(name: str, value: object, *, error: type[Exception] = NSAInputError) -> None:
    """An int >= 0 (a count or a length). A torch.SymInt passes too: sizes read from tensor shapes are
    SymInts while torch.compile traces with dynamic shapes."""
    if isinstance(value, bool) or not isinstance(value, int | torch.SymInt) or value < 0:
        raise error(f"{name} must be an int >= 0, got {value!r}")


def check_real(name: str, value: object, *, error: type[Exception] = NSAInputError, above: float | None = None,
               at_least: float | None = None, below: float | None = None, float32: bool = False) -> float:
    """`value` as a float when it is a finite real number (not a bool) and, for each bound given,
    > above, >= at_least and < below; otherwise raise `error` naming `name`. Every float setting goes
    through here: an inf or NaN setting would otherwise turn outputs (or a training run) into NaN
    without an error. float32: the setting enters float32 arithmetic (an attention scale, RoPE's
    theta), so it must also stay finite there, and nonzero where the bounds ask for > 0: 1e39 would be
    inf and 1e-300 would be 0 there, and either makes every output NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    for ok, rule in ((above is None or number > above, f"> {above}"),
                     (at_least is None or number >= at_least, f">= {at_least}"),
                     (below is None or number < below, f"< {below}")):
        if not ok:
            raise error(f"{name} must be {rule}, got {value!r}")
    if float32:
        positive = (above is not None and above >= 0.0) or (at_least is not None and at_least > 0.0)
        _check_float32_range(name, number, error=error, nonzero=positive)
    return number


def _check_float32_range(name: str, number: float, *, error: type[Exception], nonzero: bool) -> None:
    """`number` (finite) stays finite once rounded to float32, and nonzero when `nonzero`."""
    if abs(number) >= _FLOAT32_TO_INF:
        raise error(f"{name}={number!r} overflows to inf in float32, where it is computed: |{name}| must be "
                    "< 3.4e38")
    if nonzero and abs(number) <= _FLOAT32_TO_ZERO:
        raise error(f"{name}={number!r} underflows to 0 in float32, where it is computed: it must be > 0 there")


def parse_device(name: str, device: object, *, error: type[Exception] = NSAInputError) -> torch.device:
    """`device` (a torch.device, or a string such as "cuda:0") as a torch.device; `error` naming
    `name` when torch cannot parse it. Says nothing about whether this machine has the device."""
    try:
        return torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError) as err:
        raise error(f"{name}={device!r} is not a torch device ({err})") from err


def check_device(name: str, device: object, *, error: type[Exception] = NSAInputError) -> torch.device:
    """parse_device, then require that this build and machine have the device: its backend module
    (torch.cuda, torch.xpu, torch.mps, ...) reports it available, and the index is below its count.
    An index left out becomes the backend's current device ("cuda" -> cuda:0), the device that
    tensors created there report, so comparisons with their .device hold."""
    parsed = parse_device(name, device, error=error)
    if parsed.type in ("cpu", "meta"):
        return parsed
    backend = getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise error(f"{name}={device!r}: this torch build or machine has no {parsed.type} device")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if parsed.index is not None and count is not None and parsed.index >= count:
        raise error(f"{name}={device!r}: this machine has {count} {parsed.type} device(s)")
    if parsed.index is None and hasattr(backend, "current_device"):
        return torch.device(parsed.type, backend.current_device())
    return parsed


def describe(value: object) -> str:
    """A rejected argument in a message: a tensor's shape and dtype, else its type."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


def check_divides(divisor_name: str, divisor: int, name: str, value: int) -> None:
    if value % divisor != 0:
        raise NSAInputError(f"{divisor_name}={divisor} must divide {name}={value}")


def check_scale(scale: float | None) -> None:
    """The attention scale: None (1/sqrt(head dim)) or a number > 0, finite and nonzero in float32."""
    if scale is not None:
        check_real("scale", scale, above=0.0, float32=True)


def check_float_tensor(name: str, x: torch.Tensor, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise NSAInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise NSAInputError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise NSAInputError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")


def check_layer_input(x: object, hidden_size: int, weight: torch.Tensor, *,
                      error: type[Exception] = NSAInputError) -> None:
    """`error` unless x is a floating [B, T, hidden_size] tensor on the device and in the dtype of the layer's
    parameters (`weight`); under autocast any floating dtype, since the projections cast x themselves (mixed
    dtypes are the point of autocast)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != hidden_size:
        raise error(f"x must be [B, T, hidden_size={hidden_size}], got {describe(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise error(f"x must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.device != weight.device:
        raise error(f"x is on {x.device} but the layer's parameters are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise error(f"x has dtype {x.dtype} but the layer's parameters have dtype {weight.dtype}; "
                    "cast x or the layer (or run under torch.autocast)")


def check_positions_layout(positions: torch.Tensor, batch: int, seq_len: int, device: torch.device,
                           of: str) -> None:
    """NSAInputError unless positions (one per token of `of`) is [T] or [B|1, T] with T = seq_len, on device."""
    if positions.dim() not in (1, 2) or positions.shape[-1] != seq_len or (
            positions.dim() == 2 and positions.shape[0] not in (1, batch)):
        raise NSAInputError(f"positions must be [T] or [B, T] (B in (1, {batch})) with {of}'s T={seq_len}, "
                            f"got {tuple(positions.shape)}")
    if positions.device != device:
        raise NSAInputError(f"positions is on {positions.device} but {of} is on {device}")


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
    if head_dim == 0 or v.shape[3] == 0:
        raise NSAInputError(
            f"head dims must be >= 1: q and {k_name} have D_k={head_dim}, {v_name} has D_v={v.shape[3]}"
        )
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


def check_lse(lse: object, q: torch.Tensor) -> None:
    """compressed_attention's log-sum-exp as select_blocks takes it: a floating [B, T, HQ] tensor on q's device."""
    if (not isinstance(lse, torch.Tensor) or not lse.is_floating_point() or tuple(lse.shape) != tuple(q.shape[:3])
            or lse.device != q.device):
        where = f" on {lse.device}" if isinstance(lse, torch.Tensor) else ""
        raise NSAInputError(f"lse must be a floating tensor [B, T, HQ] = {tuple(q.shape[:3])} on {q.device} "
                            f"(compressed_attention's), got {describe(lse)}{where}")


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
    if block_indices.shape[3] == 0:
        raise NSAInputError("block_indices must have at least one slot per row (S >= 1), got S=0")
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
