"""The numeric precision of a run's forward passes, shared by training and evaluation (a model evaluated in
another precision than it trained in would be measured on different numbers, and on the GPU an fp32 SDPA with
grouped heads falls back to the math kernel, which holds a [B, H, T, T] score matrix: 48 GiB at 16k)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (precision auto or bf16), or on the CPU when asked for; else nothing."""
    device = torch.device(device)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
