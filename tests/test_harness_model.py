"""sal_harness.model: every attention kind runs forward and backward on the CPU, is causal, and reaches what
it should (the window exactly its band, stacked windows n_layer x (w - 1) tokens, SCOPE's padding invisible)."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_sliding_window

from nsa import NSAAttention, NSAAux
from sal_harness.config import HarnessConfigError, load_run_config
from sal_harness.model import (
    GPT,
    AttentionConfig,
    DenseAttentionConfig,
    GPTConfig,
    ModelConfig,
    NSAAttentionConfig,
    ScopeAttentionConfig,
    WindowAttentionConfig,
    banded_window_attention,
    receptive_field,
)
from scope import ScopeAux

MODEL = ModelConfig(vocab_size=64, n_layer=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=96)
ATTENTIONS: dict[str, AttentionConfig] = {
    "dense": DenseAttentionConfig(),
    "window": WindowAttentionConfig(window_size=6),
    "nsa": NSAAttentionConfig(cmp_block_size=8, cmp_stride=4, sel_block_size=8, num_selected=4, window_size=8),
    "scope": ScopeAttentionConfig(block=16, budget=2, local_blocks=1, max_radius=1, delta_max=64.0),
}
AUX = {"dense": type(None), "window": type(None), "nsa": NSAAux, "scope": ScopeAux}


def gpt(kind: str, model: ModelConfig = MODEL, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(model=model, attention=ATTENTIONS[kind])).double()


@pytest.mark.parametrize("kind", list(ATTENTIONS))
def test_forward_backward_and_causality(kind: str) -> None:
    """T=40 is not a multiple of SCOPE's block (16): the padding must not show."""
    model = gpt(kind)
    idx = torch.randint(64, (2, 40), generator=torch.Generator().manual_seed(1))
    out = model(idx, targets=idx, return_aux=True)
    assert out.logits.shape == (2, 40, 64) and out.loss is not None and torch.isfinite(out.loss)
    assert out.aux is not None and all(isinstance(a, AUX[kind]) for a in out.aux)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    changed = idx.clone()
    changed[:, 25:] = (changed[:, 25:] + 7) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(changed).logits[:, :25], out.logits[:, :25].detach(), rtol=0, atol=1e-12)
        assert not torch.allclose(model(changed).logits[:, 25:], out.logits[:, 25:].detach())


def test_window_wider_than_the_sequence_is_dense() -> None:
    dense = gpt("dense")
    window = GPT(GPTConfig(model=MODEL, attention=WindowAttentionConfig(window_size=96))).double()
    window.load_state_dict(dense.state_dict())
    idx = torch.randint(64, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(window(idx).logits, dense(idx).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["sdpa", "banded"])
@pytest.mark.parametrize("n_layer", [1, 2, 3])
def test_stacked_windows_reach_exactly_their_receptive_field(
        n_layer: int, impl: Literal["auto", "sdpa", "banded", "flex"]) -> None:
    """The last position depends on the token n_layer x (w - 1) back, never on the one just before it."""
    model_config = MODEL.model_copy(update={"n_layer": n_layer})
    model = GPT(GPTConfig(model=model_config, attention=WindowAttentionConfig(window_size=6, impl=impl))).double()
    reach = receptive_field(model.config)
    assert reach == n_layer * 5
    idx = torch.randint(64, (1, 40), generator=torch.Generator().manual_seed(3))
    last = 39

    def last_logits_with(position: int) -> torch.Tensor:
        changed = idx.clone()
        changed[0, position] = (changed[0, position] + 1) % 64
        with torch.no_grad():
            return model(changed).logits[0, last]

    with torch.no_grad():
        base = model(idx).logits[0, last]
    assert torch.equal(last_logits_with(last - reach - 1), base)
    assert not torch.allclose(last_logits_with(last - reach), base)


def test_projection_init_is_the_same_for_every_attention() -> None:
    """q/k/v/o get N(0, init_std) (o scaled for the residual) whatever the attention: runs differ in attention only."""
    big = ModelConfig(vocab_size=64, n_layer=2, hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=32)
    stds = {}
    for kind in ATTENTIONS:
        model = GPT(GPTConfig(model=big, attention=ATTENTIONS[kind]))
        attn = model.blocks[0].attn
        stds[kind] = [float(getattr(attn, n).weight.std()) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    for kind, values in stds.items():
        assert values[:3] == pytest.approx([0.02] * 3, rel=0.05), kind
        assert values[3] == pytest.approx(0.02 / 2, rel=0.05), kind


def test_attention_rules_are_checked_with_the_model_geometry(tmp_path) -> None:
    with pytest.raises(HarnessConfigError, match=r"attention.*cmp_stride=3 must divide"):
        load_run_config([f"out_dir={tmp_path}", "attention.cmp_stride=3"])
    with pytest.raises(ValueError, match="num_heads=3 must be a multiple of num_kv_heads=2"):
        ModelConfig(num_heads=3, num_kv_heads=2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seq_len=st.integers(1, 70), window=st.integers(1, 40), group=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_banded_window_equals_the_float64_reference(seq_len: int, window: int, group: int, seed: int) -> None:
    """Any T against any window (T < w, T a multiple of w or not, w = 1), GQA: outputs and gradients equal the
    row-by-row reference; later rows hold garbage (huge values) in a second run and the rows before them do not
    change. (Not NaN: SDPA adds its mask to the scores, and NaN + -inf is NaN; the harness feeds embeddings.)"""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2 * group, seq_len, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, seq_len, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "kv")
    out = banded_window_attention(q, k, v, window)
    expected = ref_sliding_window(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    cut = seq_len // 2
    poisoned = [t.detach().clone() for t in (q, k, v)]
    for t in poisoned:
        t[:, :, cut:] = 1e6 * torch.randn(t[:, :, cut:].shape, generator=gen, dtype=torch.float64)
    pq, pk, pv = poisoned
    with torch.no_grad():
        torch.testing.assert_close(banded_window_attention(pq, pk, pv, window)[:, :, :cut], out[:, :, :cut].detach(),
                                   rtol=0, atol=0)


def test_nsa_shared_kv_reaches_the_layer() -> None:
    """attention.shared_kv: one K/V projection for the three branches (NSAConfig.shared_kv), instead of three."""
    sizes = {}
    for shared in (False, True):
        attention = ATTENTIONS["nsa"].model_copy(update={"shared_kv": shared})
        model = GPT(GPTConfig(model=MODEL, attention=attention))
        layer = model.blocks[0].attn
        assert isinstance(layer, NSAAttention)
        sizes[shared] = layer.k_proj.out_features, layer.v_proj.out_features
        assert layer.config.shared_kv is shared
    kv_width = MODEL.num_kv_heads * MODEL.head_dim
    assert sizes == {False: (3 * kv_width, 3 * kv_width), True: (kv_width, kv_width)}
    attention = load_run_config(["attention=nsa", "attention.shared_kv=true"]).attention
    assert isinstance(attention, NSAAttentionConfig) and attention.shared_kv is True
