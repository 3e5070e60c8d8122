"""Tensors that follow from host sizes alone (index tables, RoPE frequencies), built once and handed out again.

An eager training step of a small model is host-bound on the GPU: the 4-layer GPT of bench/bench_prefill.py (d = 64,
16k tokens) spends more host time per step than GPU time, and each small tensor op costs a launch. What depends only
on sizes (an unpacked [B, T] batch's tile tables, the RoPE frequencies of a head dim) is therefore built once per
(key, device, stream) and kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import torch

_Built = TypeVar("_Built")
_SIZED: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()  # full key -> (the tensors, their bytes)
# Past either bound the oldest entries go. Entries: enough for every table of a few models' layers. Bytes: a run of
# many sequence lengths (prefill of prompts of every length, at up to 1M tokens the tables take ~50 MB per length)
# must not pin GPU memory without bound.
SIZED_ENTRIES = 256
SIZED_BYTES = 1 << 28


def sized_tensors(key: tuple, device: torch.device, build: Callable[[], _Built]) -> _Built:
    """``build()``: device tensors that depend on host sizes alone, kept per (key, device, current stream) and handed
    out again instead of being rebuilt. The tensors are read-only to every caller. Per stream, because a kernel on
    another stream could read a tensor before the stream that builds it has. Not kept while a CUDA graph is
    captured, nor read there: a capture records the build without running it, and a graph that read a kept tensor
    would read freed memory once the tensor left the cache. Built outside inference mode, so a tensor first built
    under torch.inference_mode() serves training steps too. Under torch.compile, built in the graph (inductor fuses
    it with its neighbours); under FakeTensorMode or make_fx (memory estimates, export), built as their tensors and
    never kept (a kept fake tensor would reach real steps; a kept real one fails in a fake step)."""
    if _traced():
        return build()
    stream = 0
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return build()
        stream = torch.cuda.current_stream(device).cuda_stream
    full_key = (*key, device, stream)
    entry = _SIZED.get(full_key)
    if entry is not None:
        return entry[0]
    with torch.inference_mode(False):
        built = build()
    size = _bytes(built)
    if size > SIZED_BYTES:  # would push out everything else
        return built
    _SIZED[full_key] = (built, size)
    while len(_SIZED) > SIZED_ENTRIES or sum(size for _, size in _SIZED.values()) > SIZED_BYTES:
        _SIZED.popitem(last=False)
    return built


def _bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or a tuple of tensors and host values)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_bytes(item) for item in value) if isinstance(value, tuple) else 0


def _traced() -> bool:
    """Whether the tensors made now are not real values to keep: torch.compile / export, or a FakeTensorMode or
    make_fx's proxy mode on the dispatch stack."""
    modes = torch._C._TorchDispatchModeKey
    return (torch.compiler.is_compiling() or torch._C._get_dispatch_mode(modes.FAKE) is not None
            or torch._C._get_dispatch_mode(modes.PROXY) is not None)
