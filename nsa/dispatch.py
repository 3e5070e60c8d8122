"""The one place that chooses an implementation backend, and says why.

Backends: "torch" (the reference path: plain PyTorch, any device, differentiable) and "triton"
(fused NVIDIA kernels: NSA's single-token decode step, inference only, and SCOPE's block-sparse
attention, forward and backward; on CPU tensors they run only when asked for explicitly under
TRITON_INTERPRET=1, the way the CPU parity tests run them). NSAConfig.backend / ScopeConfig.backend
ask for one: "auto" takes triton when it can run the call and torch otherwise, logging the reason
once per distinct reason; "triton" raises when it cannot run (never a silent change of path);
"torch" always uses the reference.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import NamedTuple

import torch

# Public here (nsa.attention_core is internal): the dtype the reference paths, and SCOPE's, accumulate in.
from nsa.attention_core import accumulation_dtype as accumulation_dtype
from nsa.errors import NSAInputError

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256

logger = logging.getLogger("nsa.dispatch")  # SCOPE's choices are logged here too
_logged: set[tuple[str, str, str]] = set()


class BackendChoice(NamedTuple):
    name: str  # "triton" or the PyTorch path's name ("torch"; "flex" for SCOPE's attention)
    reason: str


# Looked up once at import: the dispatch runs on every decode step, and inside torch.compile'd code,
# where dynamo would trace (and break the graph on) importlib's find_spec.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (the CPU parity tests use it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_obstacles(tensors: tuple[torch.Tensor, ...], allow_interpreter: bool, inference_only: bool) -> list[str]:
    """Why a Triton op cannot run on these inputs (empty when it can). CPU tensors are allowed under
    the interpreter only when asked for (tests); "auto" never picks the interpreter."""
    first = tensors[0]
    obstacles = []
    if not TRITON_AVAILABLE:
        obstacles.append("triton is not installed")
    if first.device.type != "cuda" and not (allow_interpreter and interpreter_enabled()):
        obstacles.append(f"tensors are on {first.device.type}, not CUDA")
    if first.dtype not in TRITON_DTYPES:
        obstacles.append(f"dtype {first.dtype} is not one of float16/bfloat16/float32")
    if inference_only and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        obstacles.append("gradients are required and the Triton op is inference-only")
    if max(t.shape[-1] for t in tensors) > MAX_TRITON_HEAD_DIM:
        obstacles.append(f"head dim > {MAX_TRITON_HEAD_DIM}")
    return obstacles


def elementwise_kernel_applies(x: torch.Tensor, *, contiguous: bool = True) -> bool:
    """Whether a memory-bound pass over x (nsa.kernels.rows, nsa.kernels.rope) takes its single Triton kernel rather
    than its PyTorch form: eager (under torch.compile inductor fuses the PyTorch form into the ops around it),
    non-empty CUDA tensors of 16/32-bit floats, contiguous (``contiguous=False``: the last dim alone), triton
    installed, and $NSA_BACKEND not "torch". Both forms compute the same values; nothing is logged."""
    return (x.is_cuda and elementwise_kernel_fits(x, contiguous=contiguous) and TRITON_AVAILABLE
            and os.environ.get(BACKEND_ENV, "") != "torch" and not torch.compiler.is_compiling())


def elementwise_kernel_fits(x: torch.Tensor, *, contiguous: bool = True) -> bool:
    """The tensor's part of ``elementwise_kernel_applies``, whatever its device (the CPU tools that follow eager
    CUDA's path, bench/host_ops.py and the interpreter's tests, take it): non-empty, a 16/32-bit float, contiguous
    (``contiguous=False``: the last dim alone)."""
    layout_ok = x.is_contiguous() if contiguous else x.dim() > 0 and x.stride(-1) == 1
    return x.dtype in TRITON_DTYPES and layout_ok and x.numel() > 0


def choose_backend(op: str, requested: str, tensors: tuple[torch.Tensor, ...], *, inference_only: bool,
                   error: type[Exception], extra_obstacles: tuple[str, ...] = (), fallback: str = "torch"
                   ) -> BackendChoice:
    """Backend of `op` ("package op", for the log) over `tensors` (queries first, then everything read):
    "triton" or ``fallback`` (the PyTorch path's name: "torch", or "flex" for SCOPE's attention).
    ``extra_obstacles``: the op's own reasons the Triton path cannot take this call."""
    choices = ("auto", fallback, "triton")
    if requested not in choices:
        raise error(f"backend={requested!r} must be one of {choices}")
    if requested == fallback:
        return _logged_choice(op, BackendChoice(fallback, f"backend={fallback!r} requested"))
    obstacles = [*triton_obstacles(tensors, requested == "triton", inference_only), *extra_obstacles]
    if requested == "triton" and obstacles:
        raise error(f"backend='triton' cannot run {op}: {'; '.join(obstacles)}")
    if obstacles:
        return _logged_choice(op, BackendChoice(fallback, "; ".join(obstacles)))
    return _logged_choice(op, BackendChoice("triton", f"backend={requested!r}, inputs supported"))


BACKEND_ENV = "NSA_BACKEND"


def requested_nsa_backend(requested: str) -> str:
    """The backend an NSA op is asked for: $NSA_BACKEND (auto | torch | triton) when set, overriding the config
    and the call (the design card's switch), else ``requested``."""
    override = os.environ.get(BACKEND_ENV, "")
    if not override:
        return requested
    if override not in BACKENDS:
        raise NSAInputError(f"environment variable {BACKEND_ENV}={override!r} must be one of {BACKENDS}")
    return override


def choose_decode_backend(requested: str, *tensors: torch.Tensor) -> BackendChoice:
    """Backend for one NSA decode step over `tensors` (the Triton step is inference-only)."""
    return choose_backend("nsa decode", requested_nsa_backend(requested), tensors, inference_only=True,
                          error=NSAInputError)


def choose_prefill_backend(requested: str, q: torch.Tensor, tensors: tuple[torch.Tensor, ...],
                           sizes: tuple[int, int, int, int, int]) -> BackendChoice:
    """Backend for nsa_attention (prefill and training, differentiable): the fused kernels of nsa.prefill or
    the PyTorch path. ``tensors``: everything else the op reads; ``sizes``: (l, d, l', n, w)."""
    from nsa.prefill import prefill_obstacles  # no triton import: the size rules of the kernels

    group = q.shape[2] // max(1, tensors[0].shape[2])
    return choose_backend("nsa prefill", requested_nsa_backend(requested), (q, *tensors), inference_only=False,
                          error=NSAInputError, extra_obstacles=tuple(prefill_obstacles(group, *sizes)))


def _logged_choice(op: str, choice: BackendChoice) -> BackendChoice:
    key = (op, choice.name, choice.reason)
    if key not in _logged and not torch.compiler.is_compiling():  # logged from eager calls, not while traced
        _logged.add(key)
        logger.info("%s backend: %s (%s)", op, choice.name, choice.reason)
    return choice


# ----------------------------------------------------------------------------------------------
# SCOPE's prefill attention (scope.functional.scope_attention): three paths

SCOPE_ATTENTION_BACKENDS = ("auto", "flex", "triton", "torch")
# Scores (B * H * T^2) the dense "torch" path may hold: it is SCOPE's CPU training path, for short sequences.
SCOPE_DENSE_SCORE_LIMIT = 1 << 26


def choose_scope_attention_backend(requested: str, q: torch.Tensor, *, qk_width: int, block: int, score_mod: bool,
                                   documents: bool, needs_grad: bool, error: type[Exception]) -> BackendChoice:
    """SCOPE's attention over rotated queries q [B, H, T, D]: "triton" (scope.block_sparse_attention's kernels),
    "flex" (FlexAttention) or "torch" (dense masked softmax, scope.functional.naive_scope_attention's math).

    "auto" takes the kernels where the q.k width (``qk_width``: D, or qk_aug's D + 2K features aligned) is not
    a power of two, which Flex rounds up (H100, bf16, 128k, fwd+bwd: 54 ms vs Flex's 127 ms; at D=128 without
    the bias the kernels measured 38.2 ms against Flex's 39.5 ms, in runs of different commits: too close to
    switch), any float dtype (on the H100 float32 gradients through the kernels equal Flex's to 1%); Flex
    elsewhere, the path ``score_mod`` and ``documents`` need; and the dense path where Flex cannot run:
    gradients on the CPU (FlexAttention has no CPU backward), up to SCOPE_DENSE_SCORE_LIMIT scores.
    "flex", "triton" and "torch" force a path and raise ``error`` naming the reason when it cannot run.
    """
    if requested not in SCOPE_ATTENTION_BACKENDS:
        raise error(f"backend={requested!r} must be one of {SCOPE_ATTENTION_BACKENDS}")
    op = "scope attention"
    batch, heads, seq_len = q.shape[:3]
    dense_scores = batch * heads * seq_len**2
    cpu_grad = needs_grad and q.device.type == "cpu"
    obstacles: dict[str, list[str]] = {
        "triton": triton_obstacles((q,), requested == "triton", inference_only=False),
        "flex": ["FlexAttention has no backward on the CPU (the dense 'torch' path has one)"] if cpu_grad else [],
        "torch": [f"the dense path would hold B*H*T^2 = {dense_scores} scores (limit {SCOPE_DENSE_SCORE_LIMIT})"]
        if dense_scores > SCOPE_DENSE_SCORE_LIMIT else [],
    }
    if score_mod:
        obstacles["triton"].append("bias_impl='score_mod' runs in FlexAttention")
    if documents:
        obstacles["triton"].append("document masks run in FlexAttention")
    if block < 16 or block & (block - 1):
        obstacles["triton"].append(f"block={block} is not a power of two >= 16 (the Triton kernels' tile rule)")
    if requested != "auto":
        if obstacles[requested]:
            raise error(f"backend={requested!r} cannot run {op}: {'; '.join(obstacles[requested])}")
        return _logged_choice(op, BackendChoice(requested, f"backend={requested!r} requested"))
    if qk_width & (qk_width - 1) == 0:
        obstacles["triton"].append(f"q.k width {qk_width} is a power of two, which FlexAttention runs unpadded")
    tried: list[str] = []
    for name in ("triton", "flex", "torch"):
        if not obstacles[name]:
            reason = "; ".join(tried) if tried else f"q.k width {qk_width} is not a power of two (Flex would pad it)"
            return _logged_choice(op, BackendChoice(name, reason))
        tried.append(f"not {name}: {'; '.join(obstacles[name])}")
    raise error(f"no backend can run {op} ({'; '.join(tried)}): train on CUDA, shorten the sequence, or run "
                "without gradients (torch.no_grad())")


# ----------------------------------------------------------------------------------------------
# NSA's opt-in FlashAttention-2 path for the PyTorch path's window and compression branches (nsa.fa2)

FA2_ENV = "NSA_USE_FA2"


def choose_fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether nsa_attention's PyTorch path runs its window and compression branches through flash-attn (nsa.fa2):
    when $NSA_USE_FA2 is "1" and flash-attn can run queries q over keys k / values v (nsa.fa2.fa2_obstacles).
    Asked for but impossible, the default path runs and the reason is logged once; unset or "0", nothing is logged."""
    requested = os.environ.get(FA2_ENV, "")
    if requested not in ("", "0", "1"):
        raise NSAInputError(f"environment variable {FA2_ENV}={requested!r} must be '1' (use flash-attn) or '0' / unset")
    if requested != "1":
        return False
    from nsa.fa2 import fa2_obstacles  # which imports flash-attn: only when NSA_USE_FA2=1 asks for it

    obstacles = fa2_obstacles(q, k, v)
    reason = "; ".join(obstacles) or f"{FA2_ENV}=1, flash-attn runs the window and compression branches"
    choice = _logged_choice("nsa prefill torch path", BackendChoice("torch" if obstacles else "fa2", reason))
    return choice.name == "fa2"
