"""The one place that chooses an implementation backend, and says why.

Backends: "torch" (the reference path: plain PyTorch, any device, differentiable) and "triton"
(fused NVIDIA kernels, inference only; today the single-token decode step; on CPU tensors they run
only when asked for explicitly under TRITON_INTERPRET=1, the way the CPU parity tests run them). NSAConfig.backend
asks for one: "auto" takes triton when it can run the call and torch otherwise, logging the reason
once per distinct reason; "triton" raises when it cannot run (never a silent change of path);
"torch" always uses the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import NamedTuple

import torch

from nsa.errors import NSAInputError

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256

logger = logging.getLogger("nsa.dispatch")
_logged: set[tuple[str, str, str]] = set()


class BackendChoice(NamedTuple):
    name: str  # "torch" or "triton"
    reason: str


@functools.cache
def triton_available() -> bool:
    """Looked up once: the dispatch runs on every decode step and the answer cannot change."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (the CPU parity tests use it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_decode_obstacles(tensors: tuple[torch.Tensor, ...], allow_interpreter: bool) -> list[str]:
    """Why the Triton decode step cannot run on these inputs (empty when it can). CPU tensors are
    allowed under the interpreter only when asked for (tests); "auto" never picks the interpreter."""
    first = tensors[0]
    obstacles = []
    if not triton_available():
        obstacles.append("triton is not installed")
    if first.device.type != "cuda" and not (allow_interpreter and interpreter_enabled()):
        obstacles.append(f"tensors are on {first.device.type}, not CUDA")
    if first.dtype not in TRITON_DTYPES:
        obstacles.append(f"dtype {first.dtype} is not one of float16/bfloat16/float32")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        obstacles.append("gradients are required and the Triton decode step is inference-only")
    if max(t.shape[-1] for t in tensors) > MAX_TRITON_HEAD_DIM:
        obstacles.append(f"head dim > {MAX_TRITON_HEAD_DIM}")
    return obstacles


def choose_decode_backend(requested: str, *tensors: torch.Tensor) -> BackendChoice:
    """Backend for one decode step over `tensors` (queries first, then everything read)."""
    if requested not in BACKENDS:
        raise NSAInputError(f"backend={requested!r} must be one of {BACKENDS}")
    if requested == "torch":
        return _logged_choice("decode", BackendChoice("torch", "backend='torch' requested"))
    obstacles = triton_decode_obstacles(tensors, allow_interpreter=requested == "triton")
    if requested == "triton" and obstacles:
        raise NSAInputError(f"backend='triton' cannot run this decode step: {'; '.join(obstacles)}")
    if obstacles:
        return _logged_choice("decode", BackendChoice("torch", "; ".join(obstacles)))
    return _logged_choice("decode", BackendChoice("triton", f"backend={requested!r}, inputs supported"))


def _logged_choice(op: str, choice: BackendChoice) -> BackendChoice:
    key = (op, choice.name, choice.reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("nsa %s backend: %s (%s)", op, choice.name, choice.reason)
    return choice
