"""Autoregressive generation for a GPT of NSA layers (sal_harness.model), through the per-layer decode caches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from nsa import NSAInputError, NSAKVCache
from nsa.validation import check_positive_int
from sal_harness.model import GPT

# The smallest sampling temperature: below it sampling is greedy in effect, and logits / T would overflow float32
# (max 3.4e38) for logits beyond 3.4e32 (1e-45, a subnormal, overflows logits of 0.01 already).
MIN_TEMPERATURE = 1e-6


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
    check_prompt(prompt, model.config.model.vocab_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_sampling(temperature, top_k)
    batch, prompt_len = prompt.shape
    lengths = list(prompt_lengths) if prompt_lengths is not None else [prompt_len] * batch
    if len(lengths) != batch or not all(1 <= n <= prompt_len for n in lengths):
        raise NSAInputError(f"prompt_lengths must give {batch} lengths in [1, {prompt_len}], got {lengths}")
    caches = model.new_caches(batch, max(lengths) + max_new_tokens if capacity is None else capacity)
    logits = model(prompt, caches=caches, num_valid=lengths).logits
    last = logits[torch.arange(batch, device=prompt.device), torch.tensor(lengths, device=prompt.device) - 1]
    generated = []
    for _ in range(max_new_tokens):
        token = next_token(last, temperature, top_k, generator)
        generated.append(token)
        last = model(token[:, None], caches=caches).logits[:, -1]
    return Generation(torch.stack(generated, dim=1), caches)


def check_prompt(prompt: torch.Tensor, vocab_size: int) -> None:
    """[B, T], T >= 1, integer token ids in [0, vocab_size) (padding included: it is embedded too)."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise NSAInputError(f"prompt must be [B, T] with T >= 1, got shape {tuple(prompt.shape)}")
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
        raise NSAInputError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= vocab_size:
        raise NSAInputError(f"prompt token ids must be in [0, {vocab_size}) (the model's vocab_size), got "
                            f"{low if low < 0 else high}")


def check_sampling(temperature: float, top_k: int | None) -> None:
    """temperature 0 (greedy) or finite and >= MIN_TEMPERATURE; top_k None or an int >= 1."""
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):  # NaN fails both
        raise NSAInputError(f"temperature must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE} (smaller ones "
                            f"overflow logits / temperature in float32), got {temperature!r}")
    if top_k is not None:
        check_positive_int("top_k", top_k)
