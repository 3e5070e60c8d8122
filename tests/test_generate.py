"""Generation through the decode caches equals generation by recomputing whole sequences."""

from __future__ import annotations

import math

import pytest
import torch

from nsa import NSAInputError
from sal_harness.generate import MIN_TEMPERATURE, generate, next_token
from sal_harness.model import GPT, DenseAttentionConfig, GPTConfig, ModelConfig, NSAAttentionConfig

NSA_BLOCKS = NSAAttentionConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=8, num_selected=3, window_size=8)


def tiny_gpt(attention: str = "nsa") -> GPT:
    torch.manual_seed(0)
    model_config = ModelConfig(vocab_size=64, n_layer=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                               max_seq_len=256)
    config = GPTConfig(model=model_config, attention=NSA_BLOCKS if attention == "nsa" else DenseAttentionConfig())
    model = GPT(config).double().eval()
    for name, param in model.named_parameters():  # wake the zero-initialised phi MLP output layers
        if "compress" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model


def recompute_generate(model: GPT, prompt: torch.Tensor, steps: int, temperature: float = 0.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The cache-free baseline: run the whole sequence again for every new token."""
    sequence = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = model(sequence).logits[:, -1]
            sequence = torch.cat((sequence, next_token(logits, temperature, None, generator)[:, None]), dim=1)
    return sequence[:, prompt.shape[1]:]


def test_greedy_generation_equals_recomputation():
    """Prompt 21 tokens + 40 new crosses l, d, l', w and n*l' in every layer."""
    model = tiny_gpt()
    prompt = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, 40)
    assert torch.equal(out.tokens, recompute_generate(model, prompt, 40))
    assert all(cache.lengths == [61, 61] for cache in out.caches)


def test_sampling_with_a_seed_repeats_and_equals_recomputation():
    model = tiny_gpt()
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    first = generate(model, prompt, 25, temperature=1.0, generator=torch.Generator().manual_seed(7)).tokens
    again = generate(model, prompt, 25, temperature=1.0, generator=torch.Generator().manual_seed(7)).tokens
    baseline = recompute_generate(model, prompt, 25, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and torch.equal(first, baseline)
    other = generate(model, prompt, 25, temperature=1.0, generator=torch.Generator().manual_seed(8)).tokens
    assert not torch.equal(first, other)


def test_ragged_prompts_continue_each_sequence_from_its_own_end():
    model = tiny_gpt()
    prompts = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (17, 6)]
    padded = torch.zeros(2, 17, dtype=torch.long)
    padded[0], padded[1, :6] = prompts[0][0], prompts[1][0]
    batched = generate(model, padded, 12, prompt_lengths=[17, 6]).tokens
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], generate(model, prompt, 12).tokens[0])


@pytest.mark.parametrize(("third", "temperature", "top_k", "expected"), [
    (-30.0, 1.0, None, (0.25, 0.75, 0.0)),
    (-30.0, 0.5, None, (0.1, 0.9, 0.0)),
    (math.log(2.0), 1.0, None, (1 / 6, 0.5, 1 / 3)),
    (math.log(2.0), 1.0, 2, (0.0, 0.6, 0.4)),
])
def test_samples_follow_the_softmax_of_logits_over_temperature(third: float, temperature: float, top_k: int | None,
                                                              expected: tuple[float, ...]) -> None:
    """Logits [0, ln 3, third]: with third = -30 (~1e-13 of the mass), softmax(logits / T) is (1/4, 3/4) at T = 1
    and (1/10, 9/10) at T = 1/2; with third = ln 2 it is (1/6, 1/2, 1/3), and top_k = 2 drops the first: (0, 3/5,
    2/5). 40000 seeded draws land within 1% of it (the binomial's standard error is ~0.2%)."""
    logits = torch.tensor([[0.0, math.log(3.0), third]]).expand(40000, -1)
    drawn = next_token(logits, temperature, top_k, torch.Generator().manual_seed(0))
    shares = torch.bincount(drawn, minlength=3).double() / drawn.numel()
    assert shares.tolist() == pytest.approx(expected, abs=0.01)


def test_top_k_one_is_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    sampled = next_token(logits, 1.0, 1, torch.Generator().manual_seed(0))
    assert sampled.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt=torch.zeros(2, 0, dtype=torch.long), max_new_tokens=3), "prompt"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=0), "max_new_tokens"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, prompt_lengths=[4, 5]), "prompt_lengths"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, capacity=5), "capacity"),
        # Crashed deep in torch.multinomial (NaN; 1e-45 overflows logits / T), sampled uniformly (inf).
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, temperature=math.nan), "temperature"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, temperature=math.inf), "temperature"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, temperature=1e-45), "temperature"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, temperature=1.0, top_k=2.5), "top_k"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2.5), "max_new_tokens"),
        (dict(prompt=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, capacity=0), "capacity"),
        (dict(prompt=torch.full((2, 4), 64), max_new_tokens=2), r"token ids must be in \[0, 64\).*got 64"),
        (dict(prompt=torch.full((2, 4), -1), max_new_tokens=2), r"token ids must be in \[0, 64\).*got -1"),
        (dict(prompt=torch.zeros(2, 4), max_new_tokens=2), "integer token ids"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(NSAInputError, match=match):
        generate(tiny_gpt(), **kwargs)


def test_the_smallest_temperature_samples_the_argmax() -> None:
    model = tiny_gpt()
    prompt = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    sampled = generate(model, prompt, 5, temperature=MIN_TEMPERATURE, generator=torch.Generator().manual_seed(0)).tokens
    assert torch.equal(sampled, generate(model, prompt, 5).tokens)


def test_dense_models_have_no_nsa_caches():
    with pytest.raises(NSAInputError, match="attention 'nsa'"):
        tiny_gpt("dense").new_caches(1, 16)
