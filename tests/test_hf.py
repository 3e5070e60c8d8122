"""sal_hf: NSA and SCOPE in transformers' Llama and Qwen2 models (tiny in-process configs, float64, no downloads).

- a converted model equals the dense model wherever the sparse layer reads every key (transformers' own attention
  is the independent reference there);
- inside a model, each swapped layer's output equals the project's layer (a fresh NSAAttention / ScopeAttention
  loaded with the same state dict) run on each sequence's real tokens alone: padding and packed sequences taken out;
- generate() through the per-layer caches equals a full recomputation without cache, token by token (caches
  growing on the way), and a left-padded batch equals each prompt generated alone;
- save_pretrained -> load_swapped restores every parameter; convert_checkpoint copies what swap's docstring says;
- typed errors for what is not supported.

Tolerances. transformers' RMSNorm and rotary embedding compute in float32 even in a float64 model, so two float64
computations of the same logits that differ in the last bits before a norm (decode against prefill: another
summation order) can differ by a float32 rounding after it, and generate() hands out float32 logits: logits are
compared at 1e-6 (a wrong key, block or position moves them by > 1e-3). Layer against layer (same float64 inputs,
no norm between) uses TOL64.
"""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import F64, TOL64
from torch import nn
from transformers import (
    DynamicCache,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import sal_hf
import sal_hf.cache
from nsa import NSAAttention, NSAConfigError, NSAInputError
from scope import ScopeAttention, ScopeConfigError, ScopeInputError

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Not float64's 1e-10: transformers builds its RoPE tables in float32 (cast to the float64 model afterwards) where
# the swapped layers rotate in float64, ~3.5e-9 on these logits; generate hands out float32 logits (~6e-8 relative).
# A wrong mask, position or weight moves the logits by ~1e-2.
LOGITS: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
# sal_hf.swap.SUPPORTED_MODEL_TYPES: the conversion test runs every family; the rest run the two above
ALL_FAMILIES = {**FAMILIES, "mistral": (MistralConfig, MistralForCausalLM), "gemma": (GemmaConfig, GemmaForCausalLM)}
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {"mistral": {"sliding_window": None}, "gemma": {"head_dim": 8}}
# Small blocks so that 10-40 tokens exercise every branch: NSA sees compressed blocks after 4 tokens, selects 3 of
# up to 10 blocks, windows 6 keys; SCOPE's pointer mask reads 1 local + 1 global + 1 budget block of 4 tokens.
OVERRIDES: dict[str, dict[str, Any]] = {
    "nsa": dict(cmp_block_size=4, cmp_stride=2, sel_block_size=4, num_selected=3, window_size=6),
    "scope": dict(block=4, budget=1, local_blocks=1, global_blocks=1, max_radius=2, num_pointers=2, num_freqs=4,
                  mlp_hidden=8, min_period=4.0, l_max=64.0, delta_max=32.0),
}
KINDS_FAMILIES = [(kind, family) for kind in OVERRIDES for family in FAMILIES]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP stalls on the shared 2-core machine (see test_decode.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_model(family: str, seed: int = 0, **settings: Any) -> PreTrainedModel:
    """A 2-layer float64 model: hidden 32, 4 query heads in 2 kv groups, head dim 8 (Qwen2: q/k/v biases);
    `settings`: more config fields."""
    config_class, model_class = ALL_FAMILIES[family]
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                          bos_token_id=None, eos_token_id=None, **{**FAMILY_SETTINGS.get(family, {}), **settings})
    torch.manual_seed(seed)
    model = model_class(config).to(F64).eval()
    if family == "qwen2":  # transformers initialises biases to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.3)
    return model


# -> Any: a *ForCausalLM (generate() comes from GenerationMixin, which transformers' PreTrainedModel does not include)
def swapped_model(family: str, kind: str, seed: int = 0, **overrides: Any) -> Any:
    """dense_model converted to `kind`, its new parameters moved off their neutral init (gates, phi, the spectral
    bias's gain) so that every part of the layer shows in the outputs."""
    model = sal_hf.swap_attention(dense_model(family, seed), kind, **{**OVERRIDES[kind], **overrides})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in ("gate_proj", "compress_", "spectral")):
                p.add_(torch.randn(p.shape, generator=generator, dtype=F64) * 0.3)
    return model


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def project_layer(module: sal_hf.SparseSelfAttention) -> nn.Module:
    """A fresh NSAAttention / ScopeAttention (with the dense model's projection biases) loaded with the swapped
    module's state dict: strict loading proves its parameters are exactly the project layer's."""
    assert isinstance(module, sal_hf.NSASelfAttention | sal_hf.ScopeSelfAttention)
    inner = module.nsa if isinstance(module, sal_hf.NSASelfAttention) else module.scope
    layer = (NSAAttention(inner.config) if isinstance(inner, NSAAttention) else ScopeAttention(inner.config)).to(F64)
    for name in ("q", "k", "v", "o"):
        linear = getattr(layer, f"{name}_proj")
        if getattr(inner, f"{name}_proj").bias is not None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=F64))
    layer.load_state_dict(inner.state_dict())
    return layer.eval()


# ----------------------------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("kind, family", [(kind, family) for kind in OVERRIDES for family in ALL_FAMILIES])
def test_converted_model_equals_dense_where_the_layer_reads_every_key(kind: str, family: str) -> None:
    """12 tokens. NSA: blocks of 16 are never complete (the compression branch reads nothing), the 3 selection blocks
    of 4 and the 12-token window cover every prefix, gates 0.5 + 0.5: the dense layer. SCOPE: 3 local blocks cover
    every prefix, the spectral bias is zero at conversion: the dense layer."""
    reads_all = {"nsa": dict(cmp_block_size=16, cmp_stride=4, sel_block_size=4, num_selected=3, window_size=12),
                 "scope": dict(block=4, local_blocks=3, budget=0)}[kind]
    dense = dense_model(family)
    ids = tokens(2, 12, seed=1)
    with torch.no_grad():
        expected = dense(ids).logits
        sal_hf.swap_attention(dense, kind, **{**OVERRIDES[kind], **reads_all})
        got = dense(ids).logits
    torch.testing.assert_close(got, expected, **LOGITS)


@pytest.mark.parametrize("kind, family", KINDS_FAMILIES)
def test_each_layer_equals_the_project_layer_on_each_sequence_alone(kind: str, family: str) -> None:
    """A left-padded and a right-padded row (4 and 8 real tokens of 12) and a full row: each layer's output at a
    row's real tokens equals the project's layer run on those tokens alone; padding rows are zero."""
    model = swapped_model(family, kind)
    ids = tokens(3, 12, seed=2)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :8] = 0
    mask[1, 8:] = 0
    captured = capture_layers(model, lambda: model(ids, attention_mask=mask, use_cache=False))
    for module, x, y in captured:
        layer = project_layer(module)
        for row, valid in enumerate(mask.bool()):
            with torch.no_grad():
                alone = layer(x[row, valid][None])[0]
            torch.testing.assert_close(y[row, valid], alone, **TOL64)
            assert torch.equal(y[row, ~valid], torch.zeros_like(y[row, ~valid]))


def test_scope_layer_pads_to_whole_blocks_causally() -> None:
    """SCOPE prefills whole blocks: 10 tokens are run as 12; the project's layer given those 10 tokens followed by
    any 2 others gives the same 10 rows (SCOPE is causal)."""
    model = swapped_model("llama", "scope")
    captured = capture_layers(model, lambda: model(tokens(2, 10, seed=3), use_cache=False))
    for module, x, y in captured:
        tail = torch.randn(2, 2, x.shape[-1], generator=torch.Generator().manual_seed(4), dtype=F64)
        with torch.no_grad():
            expected = project_layer(module)(torch.cat((x, tail), dim=1))[:, :10]
        torch.testing.assert_close(y, expected, **TOL64)


@pytest.mark.parametrize("kind", ["nsa", "scope"])
def test_packed_sequences_equal_separate_sequences(kind: str) -> None:
    """transformers' packed format (position_ids restarting at 0, batch 1): each sequence's logits equal those of
    the sequence run alone (NSA: cu_seqlens; SCOPE: documents, whose 4-token blocks line up when every sequence
    starts at a multiple of 4)."""
    model = swapped_model("llama", kind)
    lengths = [8, 12, 4]
    ids = tokens(1, sum(lengths), seed=5)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, use_cache=False).logits[0]
        start = 0
        for n in lengths:
            alone = model(ids[:, start:start + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, **LOGITS)
            start += n


# ----------------------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("kind, family", KINDS_FAMILIES)
def test_generate_equals_full_recomputation(kind: str, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy generate() through the per-layer caches (created for the 11-token prompt at 16 tokens, grown to 32)
    against the model run without cache on every prefix: the same logits at each step, hence the same tokens."""
    monkeypatch.setattr(sal_hf.cache, "MIN_CAPACITY", 4)
    model = swapped_model(family, kind)
    prompt = tokens(2, 11, seed=6)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 25)
    with torch.no_grad():
        for step, logits in enumerate(out.logits):
            recomputed = model(out.sequences[:, :11 + step], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, recomputed.float(), **LOGITS)  # generate hands out float32 logits
            assert torch.equal(out.sequences[:, 11 + step], recomputed.argmax(dim=-1))
    state = out.cache.layers[0].state
    assert state.capacity == 32 and state.batch_size == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_nsa_generate_with_left_padding_equals_each_prompt_alone(family: str) -> None:
    model = swapped_model(family, "nsa")
    prompts = [tokens(1, 7, seed=7)[0], tokens(1, 13, seed=8)[0]]
    batch = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 13 - len(prompt):], mask[row, 13 - len(prompt):] = prompt, 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=9, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=9, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(together.sequences[row, 13:], alone.sequences[0, len(prompt):])
        for step_together, step_alone in zip(together.logits, alone.logits, strict=True):
            torch.testing.assert_close(step_together[row], step_alone[0], **LOGITS)
    reads = together.cache.layers[0].state.total_reads  # NSAKVCache's measured reads, per sequence
    assert reads.shape == (2, 2, 3) and (reads[1] > reads[0]).all()


def test_explicit_sparse_cache_equals_the_default_cache() -> None:
    model = swapped_model("qwen2", "nsa")
    prompt = tokens(1, 9, seed=9)
    cache = sal_hf.SparseAttentionCache(model)
    explicit = model.generate(prompt, cache=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(explicit, model.generate(prompt, max_new_tokens=6, do_sample=False))
    assert all(isinstance(layer, sal_hf.NSACacheLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 9 + 5  # the last token is generated, not fed back


# ----------------------------------------------------------------------------------------------------------------
# save / load / convert


@pytest.mark.parametrize("kind, family", KINDS_FAMILIES)
def test_save_pretrained_and_load_swapped_round_trip(kind: str, family: str, tmp_path: Path) -> None:
    model = swapped_model(family, kind)
    model.save_pretrained(tmp_path)
    loaded = sal_hf.load_swapped(str(tmp_path), dtype=F64).eval()
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert f"model.layers.1.self_attn.{kind}.q_proj.weight" in restored
    assert ("model.layers.0.self_attn.nsa.gate_proj.weight" in restored if kind == "nsa"
            else "model.layers.0.self_attn.scope.spectral.pointer_head.gain" in restored)
    for name, value in saved.items():
        assert torch.equal(restored[name], value), name
    assert type(loaded).__name__ == type(model).__name__ and loaded.config._attn_implementation == kind
    prompt = tokens(2, 9, seed=10)
    with torch.no_grad():  # equal parameters; the loaded ones may sit in memory differently (BLAS order: TOL64)
        torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits, **TOL64)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=5, do_sample=False),
                       model.generate(prompt, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("kind, family", KINDS_FAMILIES)
def test_convert_checkpoint_copies_the_dense_projections(kind: str, family: str, tmp_path: Path) -> None:
    """What swap's docstring promises: q/o copied; k/v into each NSA branch (compression, selection, window) or
    SCOPE's single set; biases with them; NSA gates at exactly 0.5, phi exactly mean pooling; SCOPE's bias zero."""
    dense = dense_model(family)
    dense.save_pretrained(tmp_path / "dense")
    sal_hf.convert_checkpoint(str(tmp_path / "dense"), str(tmp_path / kind), kind,
                              from_pretrained={"dtype": F64}, **OVERRIDES[kind])
    converted = sal_hf.load_swapped(str(tmp_path / kind), dtype=F64)
    for dense_layer, layer in zip(dense.model.layers, converted.model.layers, strict=True):
        inner = getattr(layer.self_attn, kind)
        sets = 3 if kind == "nsa" else 1
        for name in ("q", "k", "v", "o"):
            source, target = getattr(dense_layer.self_attn, f"{name}_proj"), getattr(inner, f"{name}_proj")
            repeat = sets if name in ("k", "v") else 1
            assert torch.equal(target.weight, torch.cat([source.weight] * repeat))
            assert (target.bias is None) == (source.bias is None)
            if source.bias is not None:
                assert torch.equal(target.bias, torch.cat([source.bias] * repeat))
        x = torch.randn(1, 9, 32, dtype=F64, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            if kind == "nsa":
                _, aux = inner(x, return_aux=True)
                assert torch.equal(aux.gates, torch.full_like(aux.gates, 0.5))
                blocks = torch.randn(2, 3, 2, 4, 8, dtype=F64, generator=torch.Generator().manual_seed(12))
                torch.testing.assert_close(inner.compress_k.pool(blocks), blocks.mean(dim=-2), **TOL64)
            else:
                gain = inner.spectral.pointer_head.gain
                assert torch.equal(gain, torch.zeros_like(gain))


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_attn_implementation_without_the_swap_says_what_to_do() -> None:
    model = dense_model("llama")
    model.set_attn_implementation("nsa")
    with pytest.raises(NSAInputError, match="swap_attention"):
        model(tokens(1, 5, seed=0))
    model.set_attn_implementation("scope")
    with pytest.raises(ScopeInputError, match="load_swapped"):
        model(tokens(1, 5, seed=0))


def test_swap_rejects_what_it_cannot_honour() -> None:
    with pytest.raises(NSAConfigError, match="kind="):
        sal_hf.swap_attention(dense_model("llama"), "dense")
    with pytest.raises(NSAConfigError, match="come from the model's config"):
        sal_hf.swap_attention(dense_model("llama"), "nsa", num_heads=8)
    with pytest.raises(NSAConfigError, match="unknown NSAConfig key"):
        sal_hf.swap_attention(dense_model("llama"), "nsa", windw_size=4)
    with pytest.raises(ScopeConfigError, match="unknown ScopeConfig key"):
        sal_hf.swap_attention(dense_model("llama"), "scope", blok=4)
    scaled = dense_model("llama")
    scaled.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(NSAConfigError, match="RoPE"):
        sal_hf.swap_attention(scaled, "nsa")
    model = swapped_model("llama", "nsa")
    with pytest.raises(NSAConfigError, match="already swapped"):
        sal_hf.swap_attention(model, "nsa")


def test_unsupported_inputs_raise_typed_errors() -> None:
    nsa_model, scope_model = swapped_model("llama", "nsa"), swapped_model("llama", "scope")
    ids = tokens(2, 8, seed=13)
    with pytest.raises(NSAInputError, match="position_ids must rise by one"):
        nsa_model(ids, position_ids=torch.tensor([[0, 1, 2, 4, 5, 6, 7, 8]]), use_cache=False)
    with pytest.raises(NSAInputError, match="batch size 1"):
        nsa_model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), use_cache=False)
    padded = torch.ones(2, 8, dtype=torch.long)
    padded[0, :3] = 0
    with pytest.raises(ScopeInputError, match="padded batches"):
        scope_model.generate(ids, attention_mask=padded, max_new_tokens=2)
    with pytest.raises(NSAInputError, match="beam search"):
        nsa_model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    cache = sal_hf.SparseAttentionCache(nsa_model)
    with pytest.raises(NSAInputError, match="dense attention layer"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)


def model_state(model: PreTrainedModel) -> tuple:
    """What a rejected swap must leave as it was: each layer's attention module, the parameters, the config's
    swap entry and attention implementation."""
    return ([id(layer.self_attn) for layer in model.model.layers],
            {name: p.clone() for name, p in model.state_dict().items()},
            getattr(model.config, sal_hf.SPEC_KEY, None), model.config._attn_implementation)


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[2:] == after[2:]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][name], after[1][name]) for name in before[1])


def _scaled(model: PreTrainedModel) -> None:
    model.model.layers[1].self_attn.scaling = 0.5


def _normed(model: PreTrainedModel) -> None:
    model.model.layers[1].self_attn.register_parameter("q_norm", nn.Parameter(torch.ones(8, dtype=F64)))


def _pruned(model: PreTrainedModel) -> None:
    model.model.layers[1].self_attn.k_proj = nn.Linear(32, 8, bias=False, dtype=F64)


def _biased(model: PreTrainedModel) -> None:
    model.model.layers[1].self_attn.q_proj.bias = nn.Parameter(torch.zeros(32, dtype=F64))


def _saved_swapped(model: PreTrainedModel) -> None:
    setattr(model.config, sal_hf.SPEC_KEY, {"kind": "nsa"})


def _per_layer_rope(model: PreTrainedModel) -> None:
    model.config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}


# `model: Any` below: transformers wraps PreTrainedModel.to in functools.wraps, which mypy reads as an unbound
# function (F64 taken for self).
def _qwen3() -> PreTrainedModel:
    model: Any = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    return model.to(F64)


def _granite() -> PreTrainedModel:
    model: Any = GraniteForCausalLM(GraniteConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_multiplier=0.5))
    return model.to(F64)


# (what makes the dense model one the swap would change, the error's words); each layer of the model is checked
REJECTED_MODELS: dict[str, tuple[Any, str]] = {
    "qwen3 (q_norm / k_norm)": (_qwen3, "model_type 'qwen3'"),
    "granite (attention_multiplier)": (_granite, "model_type 'granite'"),
    "mistral sliding window": (lambda: dense_model("mistral", sliding_window=8), "sliding_window=8"),
    "qwen2 sliding window": (lambda: dense_model("qwen2", use_sliding_window=True, sliding_window=8,
                                                 max_window_layers=0), "sliding_window=8"),
    "one layer's scaling": (lambda: _changed(_scaled), r"layer 1 .*scaling=0.5"),
    "one layer's extra parameter": (lambda: _changed(_normed), r"layer 1 .*\['q_norm'\]"),
    "one layer's k_proj size": (lambda: _changed(_pruned), "k_proj: dense weight"),
    "one layer's biases": (lambda: _changed(_biased), r"layers \[1\] have projection biases"),
    "per-layer-type RoPE": (lambda: _changed(_per_layer_rope), "per layer type"),
    "a config saved swapped": (lambda: _changed(_saved_swapped), "load_swapped"),
}


def _changed(change: Any) -> PreTrainedModel:
    model = dense_model("llama")
    change(model)
    return model


@pytest.mark.parametrize("kind", ["nsa", "scope"])
@pytest.mark.parametrize("case", REJECTED_MODELS)
def test_swap_rejects_attention_it_would_change_and_leaves_the_model(kind: str, case: str) -> None:
    """A dense attention the swapped layers would compute differently (q/k norms, another scale, a window, per-layer
    RoPE, a family whose rotary pairs are not Llama's) is a typed error, raised before any layer changes: also when
    only layer 1 differs, and when a layer's weights do not fit after layer 0 was built."""
    build, words = REJECTED_MODELS[case]
    model = build()
    before = model_state(model)
    with pytest.raises({"nsa": NSAConfigError, "scope": ScopeConfigError}[kind], match=words):
        sal_hf.swap_attention(model, kind, **OVERRIDES[kind])
    assert_same_state(before, model_state(model))


def test_swap_arguments_are_checked() -> None:
    model = dense_model("llama")
    before = model_state(model)
    for kind in (["nsa"], None, "NSA"):
        with pytest.raises(NSAConfigError, match="kind="):
            sal_hf.swap_attention(model, kind)  # type: ignore[arg-type]
    with pytest.raises(NSAConfigError, match="PreTrainedModel"):
        sal_hf.swap_attention(model.model.layers[0], "nsa")
    with pytest.raises(ScopeConfigError, match="copy_dense_weights must be a bool"):
        sal_hf.swap_attention(model, "scope", copy_dense_weights="no")  # type: ignore[arg-type]
    with pytest.raises(NSAConfigError, match="rope_theta"):
        theta = dense_model("llama")
        theta.config.rope_parameters = {"rope_type": "default", "rope_theta": "abc"}
        sal_hf.swap_attention(theta, "nsa")
    assert_same_state(before, model_state(model))
    with pytest.raises(NSAInputError, match="swapped transformers model"):
        sal_hf.SparseAttentionCache(None)  # type: ignore[arg-type]


def _edit_spec(path: Path, edit: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config[sal_hf.SPEC_KEY])
    (path / "config.json").write_text(json.dumps(config))


SPEC_EDITS: dict[str, tuple[Any, str]] = {
    "a field left out": (lambda spec: spec["config"].pop("window_size"), r"lacks \['window_size'\]"),
    "another rope_theta": (lambda spec: spec["config"].update(rope_theta=5.0), r"\['rope_theta'\] differ"),
    "another head count": (lambda spec: spec["config"].update(num_heads=8, num_kv_heads=4), "num_heads"),
    "a bias as a string": (lambda spec: spec["biases"].update(q="false"), "biases must map"),
    "a bias left out": (lambda spec: spec["biases"].pop("q"), "biases must map"),
    "config not a table": (lambda spec: spec.update(config="nsa"), "must be a table"),
}


@pytest.mark.parametrize("case", SPEC_EDITS)
def test_load_swapped_rejects_a_corrupted_spec(case: str, tmp_path: Path) -> None:
    swapped_model("llama", "nsa").save_pretrained(tmp_path)
    edit, words = SPEC_EDITS[case]
    _edit_spec(tmp_path, edit)
    with pytest.raises(NSAConfigError, match=words):
        sal_hf.load_swapped(str(tmp_path))


@pytest.mark.parametrize("kind", ["nsa", "scope"])
def test_load_swapped_refuses_weights_without_the_attention_parameters(kind: str, tmp_path: Path) -> None:
    """A parameter from_pretrained would initialise afresh (it only warns): the spec claims an o bias the file lacks,
    or one attention tensor was dropped from the file."""
    from safetensors.torch import load_file, save_file

    error = NSAConfigError if kind == "nsa" else ScopeConfigError
    swapped_model("llama", kind).save_pretrained(tmp_path / "bias")
    _edit_spec(tmp_path / "bias", lambda spec: spec["biases"].update(o=True))
    with pytest.raises(error, match=r"lacks 2 parameter\(s\) of the swapped attention, e\.g\. .*o_proj\.bias"):
        sal_hf.load_swapped(str(tmp_path / "bias"))

    swapped_model("llama", kind).save_pretrained(tmp_path / "dropped")
    weights = load_file(tmp_path / "dropped" / "model.safetensors")
    dropped = sorted(name for name in weights if ".self_attn." in name)[-1]
    del weights[dropped]
    save_file(weights, tmp_path / "dropped" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(error, match=f"lacks 1 parameter.*{re.escape(dropped)}"):
        sal_hf.load_swapped(str(tmp_path / "dropped"))
    with pytest.raises(error, match="output_loading_info is not taken"):
        sal_hf.load_swapped(str(tmp_path / "bias"), output_loading_info=True)


def test_convert_checkpoint_never_overwrites_or_reconverts(tmp_path: Path) -> None:
    dense_model("llama").save_pretrained(tmp_path / "dense")
    weights = (tmp_path / "dense" / "model.safetensors").read_bytes()
    with pytest.raises(NSAConfigError, match="overwrite the dense checkpoint"):
        sal_hf.convert_checkpoint(str(tmp_path / "dense"), str(tmp_path / "dense" / "."), "nsa")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ScopeConfigError, match="existing file"):
        sal_hf.convert_checkpoint(str(tmp_path / "dense"), str(tmp_path / "file"), "scope")
    assert (tmp_path / "dense" / "model.safetensors").read_bytes() == weights
    swapped_model("llama", "nsa").save_pretrained(tmp_path / "swapped")
    with pytest.raises(NSAConfigError, match="load_swapped"):
        sal_hf.convert_checkpoint(str(tmp_path / "swapped"), str(tmp_path / "again"), "nsa")
    assert not (tmp_path / "again").exists()
    with pytest.raises(NSAConfigError, match="model_class must be"):
        sal_hf.load_swapped(str(tmp_path / "swapped"), model_class="LlamaForCausalLM")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["nsa", "scope"])
def test_module_checks_its_arguments_before_the_cache(kind: str) -> None:
    """Bad hidden states, masks and position_ids are typed errors; a rejected first call leaves the cache empty,
    so the next valid call runs (SCOPE: whole blocks of 4)."""
    error = {"nsa": NSAInputError, "scope": ScopeInputError}[kind]
    attention = swapped_model("llama", kind).model.layers[0].self_attn
    x = torch.randn(2, 8, 32, dtype=F64, generator=torch.Generator().manual_seed(14))
    cache = DynamicCache()
    for bad in (torch.randn(3, 8, 31, dtype=F64), x[0], x[None], x.float()):
        with pytest.raises(error, match="x "):
            attention(bad, cache=cache)
    assert cache.get_seq_length() == 0 and not cache.layers  # no layer put in, no state reserved
    for mask in (torch.ones(2, 9, dtype=torch.bool), torch.ones(3, 8, dtype=torch.bool)):
        with pytest.raises(error, match=r"attention_mask must be bool \[B, C\]"):
            attention(x, attention_mask=mask, cache=cache)
    for positions in (torch.arange(8.0)[None], torch.arange(9)[None], torch.arange(8).expand(3, 8), torch.arange(8)):
        with pytest.raises(error, match="position_ids must be an integer tensor"):
            attention(x, position_ids=positions)
    with pytest.raises(error, match="restart at 0"):
        attention(x, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), cache=cache)
    with pytest.raises(error, match="must be a transformers Cache"):
        attention(x, cache={})
    assert cache.get_seq_length() == 0
    with torch.no_grad():
        attention(x, cache=cache)
    assert cache.get_seq_length() == 8
    sparse_cache = sal_hf.SparseAttentionCache(swapped_model("llama", kind))
    with pytest.raises(error, match="dense attention layer"):
        sparse_cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 5)


def capture_layers(model: nn.Module, run: Any) -> list[tuple[sal_hf.SparseSelfAttention, torch.Tensor, torch.Tensor]]:
    """(module, hidden_states in, output) of every swapped layer during run()."""
    captured: list[tuple[sal_hf.SparseSelfAttention, torch.Tensor, torch.Tensor]] = []

    def hook(module: sal_hf.SparseSelfAttention, args: tuple, kwargs: dict, output: tuple) -> None:
        captured.append((module, kwargs["hidden_states"].detach(), output[0].detach()))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, sal_hf.SparseSelfAttention)]
    with torch.no_grad():
        run()
    for handle in handles:
        handle.remove()
    assert len(captured) == len(handles) > 0
    return captured
