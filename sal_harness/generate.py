"""Autoregressive generation for a GPT of NSA layers (sal_harness.model), through the per-layer decode caches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from nsa import NSAInputError, NSAKVCache
from sal_harness.model import GPT


class Generation(NamedTuple):
    tokens: torch.Tensor  # [B, max_new_tokens] generated ids
    caches: list[NSAKVCache]  # per layer, holding prompt and all generated tokens (read counters inside)


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> ids [B]: argmax when temperature == 0, else a seeded sample of softmax(logits / T)
    restricted to the top_k logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT, prompt: torch.Tensor, max_new_tokens: int, *, prompt_lengths: Sequence[int] | None = None,
    temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
    capacity: int | None = None,
) -> Generation:
    """Prefill `prompt` [B, T] (right-padded; prompt_lengths[b] real tokens, default T) into fresh
    caches, then decode max_new_tokens tokens per sequence, one step at a time.

    Greedy by default; temperature > 0 samples (top_k optional) from `generator` so runs repeat.
    Each sequence continues from its own last prompt token, so a ragged batch equals its sequences
    generated one by one.
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise NSAInputError(f"prompt must be [B, T] with T >= 1, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise NSAInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise NSAInputError(f"temperature must be >= 0 and top_k >= 1, got {temperature}, {top_k}")
    batch, prompt_len = prompt.shape
    lengths = list(prompt_lengths) if prompt_lengths is not None else [prompt_len] * batch
    if len(lengths) != batch or not all(1 <= n <= prompt_len for n in lengths):
        raise NSAInputError(f"prompt_lengths must give {batch} lengths in [1, {prompt_len}], got {lengths}")
    caches = model.new_caches(batch, capacity or max(lengths) + max_new_tokens)
    logits = model(prompt, caches=caches, num_valid=lengths).logits
    last = logits[torch.arange(batch, device=prompt.device), torch.tensor(lengths, device=prompt.device) - 1]
    generated = []
    for _ in range(max_new_tokens):
        token = next_token(last, temperature, top_k, generator)
        generated.append(token)
        last = model(token[:, None], caches=caches).logits[:, -1]
    return Generation(torch.stack(generated, dim=1), caches)
