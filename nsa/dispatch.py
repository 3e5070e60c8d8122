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


def choose_decode_backend(requested: str, *tensors: torch.Tensor) -> BackendChoice:
    """Backend for one NSA decode step over `tensors` (the Triton step is inference-only)."""
    return choose_backend("nsa decode", requested, tensors, inference_only=True, error=NSAInputError)


def _logged_choice(op: str, choice: BackendChoice) -> BackendChoice:
    key = (op, choice.name, choice.reason)
    if key not in _logged and not torch.compiler.is_compiling():  # logged from eager calls, not while traced
        _logged.add(key)
        logger.info("%s backend: %s (%s)", op, choice.name, choice.reason)
    return choice
