"""Putting NSA / SCOPE into a transformers model: the module swap, the dense-checkpoint conversion, reloading.

``swap_attention(model, "nsa" | "scope", **overrides)`` replaces the ``self_attn`` of every decoder layer by a
``NSASelfAttention`` / ``ScopeSelfAttention`` (sal_hf.attention) built from the model's config (hidden size, heads,
kv heads, head dim, RoPE theta) and ``overrides`` (any other NSAConfig / ScopeConfig field: block sizes, n, w,
compression, backend, ...), records the layer config in ``model.config.sparse_attention`` (saved in config.json by
``save_pretrained``) and sets ``attn_implementation`` to the kind. With ``copy_dense_weights=True`` (the default) the
new layers start from the dense ones (the conversion):

- NSA: q_proj and o_proj are copied (weights and biases); the dense k_proj / v_proj are copied into each branch's
  K/V (k_proj / v_proj of NSAAttention hold the compression, selection and window sets one after the other, or one
  set with shared_kv=True); gate_proj's weight and bias are zero, so every gate starts at sigmoid(0) = 0.5 (1/3 with
  gate="softmax"); phi (compress_k / compress_v) starts as mean pooling (its MLP's output layer is zero at init;
  the rest of the MLP and the intra-block position encodings are freshly drawn so it can learn). With sigmoid gates
  a converted layer outputs 0.5 * (cmp + sel + win); where a query sees no compressed block and its selected blocks
  and window cover its whole prefix (short prompts), that is exactly the dense layer's output.
- SCOPE: q_proj, k_proj, v_proj and o_proj are copied; the spectral bias starts at exactly zero (its pointer head's gain
  is zero at init), so a converted layer is the dense layer restricted to the pointer block mask.

``load_swapped(path)`` re-loads a saved swapped model: the model class is rebuilt with the swap in its __init__, so
transformers' ``from_pretrained`` reads every parameter (sharding, dtype and device_map included).
``convert_checkpoint(dense_path, out_path, kind, **overrides)`` does load -> swap -> save_pretrained.
Plain ``from_pretrained(path, attn_implementation="nsa")`` without the swap would build dense layers: their
attention calls the function registered for "nsa", which raises a typed error naming what to do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from nsa import NSAConfig, NSAConfigError, NSAInputError
from sal_hf.attention import NSASelfAttention, ScopeSelfAttention, SparseSelfAttention
from scope import ScopeConfig, ScopeConfigError, ScopeInputError

SPEC_KEY = "sparse_attention"  # the config attribute (and config.json key) describing the swap
PROJECTIONS = ("q", "k", "v", "o")
# kind -> the swapped module's constructor (layer config, layer index, projection biases)
LAYERS: dict[str, Callable[[Any, int, dict[str, bool]], SparseSelfAttention]] = {
    "nsa": NSASelfAttention, "scope": ScopeSelfAttention}
CONFIGS: dict[str, type[NSAConfig] | type[ScopeConfig]] = {"nsa": NSAConfig, "scope": ScopeConfig}
CONFIG_ERRORS: dict[str, type[Exception]] = {"nsa": NSAConfigError, "scope": ScopeConfigError}


ModelT = TypeVar("ModelT", bound=PreTrainedModel)  # swap_attention returns the model it was given, type included


def swap_attention(model: ModelT, kind: str, *, copy_dense_weights: bool = True, **overrides: Any) -> ModelT:
    """Replace every decoder layer's dense self-attention of `model` (Llama, Mistral, Qwen2, Gemma: the families in
    SUPPORTED_MODEL_TYPES) by NSA or SCOPE in place (module docstring); returns the model. `overrides`: NSAConfig /
    ScopeConfig fields. A rejected swap leaves the model as it was: every new layer is built (and converted) before
    the first is put in place."""
    check_kind(kind)
    error = CONFIG_ERRORS[kind]
    if not isinstance(model, PreTrainedModel):
        raise error(f"model must be a transformers PreTrainedModel (a causal LM), got {type(model).__name__}")
    if not isinstance(copy_dense_weights, bool):
        raise error(f"copy_dense_weights must be a bool, got {copy_dense_weights!r}")
    layers = decoder_layers(model)
    dense = [layer.self_attn for layer in layers]
    if any(isinstance(module, SparseSelfAttention) for module in dense):
        raise error("the model's attention is already swapped")
    check_not_saved_swapped(model.config, error)
    config = layer_config(kind, model.config, overrides)
    biases = projection_biases(dense, error)
    for module in dense:
        check_dense_attention(module, config.head_dim, error)
    weight = dense[0].q_proj.weight
    new = [LAYERS[kind](config, old.layer_idx, biases).to(device=weight.device, dtype=weight.dtype) for old in dense]
    if copy_dense_weights:
        for old, module in zip(dense, new, strict=True):
            copy_dense_weights_into(old, module)
    for layer, module in zip(layers, new, strict=True):
        layer.self_attn = module
    setattr(model.config, SPEC_KEY, {"kind": kind, "config": config.to_dict(), "biases": biases})
    model.set_attn_implementation(kind)
    return model


def load_swapped(path: str, model_class: type[PreTrainedModel] | None = None, **kwargs: Any) -> PreTrainedModel:
    """A model saved after swap_attention, re-loaded with its swapped layers and all their parameters (a file that
    lacks one of them is refused: from_pretrained would initialise it afresh).

    model_class: the transformers class to build (default: the AutoModelForCausalLM class of the saved config);
    kwargs go to from_pretrained (dtype, device_map, ...)."""
    config = AutoConfig.from_pretrained(path)
    kind = read_spec(config)[0]
    if model_class is not None and not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise CONFIG_ERRORS[kind](f"model_class must be a transformers PreTrainedModel class, got {model_class!r}")
    if "output_loading_info" in kwargs:
        raise CONFIG_ERRORS[kind]("output_loading_info is not taken: load_swapped reads the loading info itself and "
                                  "refuses a checkpoint that lacks attention parameters")
    base = model_class or causal_lm_class(config)
    loaded: Any = swapped_class(base).from_pretrained(path, attn_implementation=kind, output_loading_info=True,
                                                      **kwargs)
    model, info = loaded  # (model, loading info) with output_loading_info
    # from_pretrained only warns about a missing parameter and initialises it afresh: the attention would change.
    missing = sorted(key for key in info["missing_keys"] if ".self_attn." in key)
    if missing:
        raise CONFIG_ERRORS[kind](f"{path} lacks {len(missing)} parameter(s) of the swapped attention, e.g. "
                                  f"{missing[0]!r}: its {SPEC_KEY} does not match its weights (a spec edited after "
                                  "saving, or weights saved from another model)")
    return model


def convert_checkpoint(dense_path: str, out_path: str, kind: str, *, from_pretrained: dict[str, Any] | None = None,
                       **overrides: Any) -> PreTrainedModel:
    """Convert a saved dense causal LM into an NSA / SCOPE one at out_path (module docstring for what is copied and
    how the new parameters start); returns the converted model. Tokenizer files are not copied. out_path must be a
    directory other than dense_path (the dense checkpoint is never overwritten)."""
    check_kind(kind)
    error = CONFIG_ERRORS[kind]
    out = Path(out_path)
    if out.resolve() == Path(dense_path).resolve():
        raise error(f"out_path={out_path!r} is dense_path: the conversion would overwrite the dense checkpoint")
    if out.exists() and not out.is_dir():
        raise error(f"out_path={out_path!r} is an existing file: it must be a directory (or not exist yet)")
    dense_config = AutoConfig.from_pretrained(dense_path)
    check_not_saved_swapped(dense_config, error)
    model = causal_lm_class(dense_config).from_pretrained(dense_path, **(from_pretrained or {}))
    swap_attention(model, kind, **overrides)
    model.save_pretrained(out_path)
    return model


# ---- pieces --------------------------------------------------------------------------------------------------


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The AutoModelForCausalLM class of a config (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise NSAConfigError(f"{type(config).__name__} has no causal-LM class in transformers (AutoModelForCausalLM): "
                             "pass model_class, or convert a decoder-only checkpoint")
    return cast(type[PreTrainedModel], MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])


def check_kind(kind: object) -> None:
    if not isinstance(kind, str) or kind not in LAYERS:
        raise NSAConfigError(f"kind={kind!r} must be one of {tuple(LAYERS)}")


def check_not_saved_swapped(config: PretrainedConfig, error: type[Exception]) -> None:
    """`error` when the config records a swap: such a checkpoint loaded as a dense model has freshly drawn dense
    projections (its saved ones live under self_attn.nsa / .scope), and converting them would convert noise."""
    if getattr(config, SPEC_KEY, None) is not None:
        raise error(f"the model's config holds {SPEC_KEY!r}: it was saved after a swap, and loaded as a dense model "
                    "its attention weights are freshly drawn. Load it with sal_hf.load_swapped")


def decoder_layers(model: nn.Module) -> list[Any]:
    """The modules holding a self_attn submodule (transformers' decoder layers), in order."""
    layers = [module for module in model.modules() if isinstance(getattr(module, "self_attn", None), nn.Module)]
    if not layers:
        raise NSAConfigError(f"{type(model).__name__} has no decoder layer with a self_attn module")
    return layers


def swapped_layers(model: nn.Module) -> list[SparseSelfAttention]:
    """The swapped attention modules of `model`, in layer order."""
    return [module for module in model.modules() if isinstance(module, SparseSelfAttention)]


def layer_config(kind: str, hf_config: PretrainedConfig, overrides: dict[str, Any]) -> NSAConfig | ScopeConfig:
    """The NSAConfig / ScopeConfig of a swapped layer: sizes and RoPE theta from the model's config, the rest from
    overrides (unknown or conflicting keys raise the kind's config error). The model's attention must be one the
    swapped layers compute alike (``attention_obstacles``)."""
    error = CONFIG_ERRORS[kind]
    text = hf_config.get_text_config(decoder=True)
    obstacles = attention_obstacles(text)
    if obstacles:
        raise error(f"{type(text).__name__} cannot be swapped without changing its attention: " + "; ".join(obstacles))
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    rope = dict(getattr(text, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", 10000.0)
    sizes: dict[str, Any] = {"hidden_size": text.hidden_size, "num_heads": num_heads,
                             "num_kv_heads": getattr(text, "num_key_value_heads", None) or num_heads,
                             "head_dim": head_dim,  # a real theta as a float; anything else to the config's check
                             "rope_theta": float(theta) if isinstance(theta, int | float) else theta}
    if kind == "nsa":
        sizes["head_dim_v"] = head_dim
    clash = sorted(set(overrides) & set(sizes))
    if clash:
        raise error(f"{clash} come from the model's config and cannot be overridden")
    return CONFIGS[kind].from_dict({**sizes, **overrides})


def attention_obstacles(text: PretrainedConfig) -> list[str]:
    """Why the dense attention of a decoder config differs from what the swapped layers compute (causal softmax
    attention over q/k/v/o projections, scale head_dim^-0.5, RoPE 'default' over the whole head dim with
    rotate-half pairs, no window, no soft-capping, no dropout); empty when it does not. The families are listed
    (SUPPORTED_MODEL_TYPES) because the rotary pairing is not in the config (Cohere's interleaves)."""
    obstacles = []
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        obstacles.append(f"model_type {text.model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}")
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if any(isinstance(value, dict) for value in rope.values()):
        obstacles.append(f"rope_parameters {rope} are per layer type; the swapped layers take one RoPE")
    elif rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        obstacles.append(f"RoPE {rope} is not supported: the swapped layers rotate with rope_type 'default' over the "
                         "whole head dim (rope scaling would change their compressed-key and selection positions)")
    if getattr(text, "sliding_window", None) is not None:
        obstacles.append(f"sliding_window={text.sliding_window}: the dense model attends to a window only (set "
                         "config.sliding_window = None first to convert it as full causal attention)")
    for name in ("attention_dropout", "attn_logit_softcapping"):
        if getattr(text, name, None):
            obstacles.append(f"{name}={getattr(text, name)}: the swapped layers have none")
    return obstacles


SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma"})  # each tested in tests/test_hf.py


def check_dense_attention(module: nn.Module, head_dim: int, error: type[Exception]) -> None:
    """`error` unless the dense layer is plain q/k/v/o attention the swap can copy: no other parameters (q_norm /
    k_norm), causal, scaled by head_dim^-0.5, with RoPE and without a window of its own."""
    names = {name for name, _ in module.named_parameters()}
    extra = sorted(name for name in names if not name.startswith(tuple(f"{p}_proj." for p in PROJECTIONS)))
    reasons = [f"parameters {extra} that the swapped layers do not apply"] if extra else []
    scaling = getattr(module, "scaling", head_dim**-0.5)
    if not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-9):
        reasons.append(f"scaling={scaling} (the swapped layers scale by head_dim^-0.5 = {head_dim**-0.5})")
    for name, wanted in (("is_causal", True), ("use_rope", True), ("sliding_window", None)):
        if getattr(module, name, wanted) != wanted:
            reasons.append(f"{name}={getattr(module, name)}")
    if reasons:
        raise error(f"layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__}) has " + "; ".join(reasons))


def projection_biases(dense: list[nn.Module], error: type[Exception]) -> dict[str, bool]:
    """Which projections carry a bias, the same in every layer (the swap records one set); `error` when a layer
    lacks a q/k/v/o nn.Linear or a layer_idx, or the layers differ."""
    found = []
    for module in dense:
        missing = [f"{p}_proj" for p in PROJECTIONS if not isinstance(getattr(module, f"{p}_proj", None), nn.Linear)]
        if missing or not hasattr(module, "layer_idx"):
            raise error(f"{type(module).__name__} is not a q/k/v/o-projection attention with a layer_idx "
                        f"(missing {missing or ['layer_idx']}): the swap supports Llama-family layers")
        found.append({p: getattr(module, f"{p}_proj").bias is not None for p in PROJECTIONS})
    odd = [index for index, biases in enumerate(found) if biases != found[0]]
    if odd:
        raise error(f"layers {odd} have projection biases unlike layer 0's {found[0]}: the swap needs one set")
    return found[0]


@torch.no_grad()
def copy_dense_weights_into(dense: nn.Module, module: SparseSelfAttention) -> None:
    """The conversion of one layer (module docstring): dense q/k/v/o projections into the swapped layer."""
    if isinstance(module, NSASelfAttention):
        layer: nn.Module = module.nsa
        kv_sets = 1 if module.nsa.config.shared_kv else 3
        nn.init.zeros_(module.nsa.gate_proj.weight)
        nn.init.zeros_(module.nsa.gate_proj.bias)
    else:
        assert isinstance(module, ScopeSelfAttention)
        layer, kv_sets = module.scope, 1
    for name in PROJECTIONS:
        source, target = getattr(dense, f"{name}_proj"), getattr(layer, f"{name}_proj")
        repeat = kv_sets if name in ("k", "v") else 1
        if tuple(target.weight.shape) != (source.weight.shape[0] * repeat, source.weight.shape[1]):
            raise CONFIG_ERRORS[module.kind](f"{name}_proj: dense weight {tuple(source.weight.shape)} does not fit "
                                             f"the swapped layer's {tuple(target.weight.shape)}")
        target.weight.copy_(source.weight.repeat(repeat, 1))
        if source.bias is not None:
            target.bias.copy_(source.bias.repeat(repeat))


def read_spec(config: PretrainedConfig) -> tuple[str, NSAConfig | ScopeConfig, dict[str, bool]]:
    """(kind, layer config, biases) recorded by swap_attention in config.sparse_attention: every config field present,
    and the sizes and RoPE theta those of the model's config (what swap_attention wrote)."""
    spec = getattr(config, SPEC_KEY, None)
    if not isinstance(spec, dict) or set(spec) != {"kind", "config", "biases"}:
        raise NSAConfigError(f"config has no valid {SPEC_KEY!r} entry (written by sal_hf.swap_attention), got {spec!r}")
    kind, fields, biases = spec["kind"], spec["config"], spec["biases"]
    check_kind(kind)
    error = CONFIG_ERRORS[kind]
    if not isinstance(fields, dict):
        raise error(f"{SPEC_KEY}.config must be a table of {CONFIGS[kind].__name__} fields, got {fields!r}")
    missing = sorted({f.name for f in dataclasses.fields(CONFIGS[kind])} - set(fields))
    if missing:
        raise error(f"{SPEC_KEY}.config lacks {missing}: swap_attention records every field")
    if (not isinstance(biases, dict) or set(biases) != set(PROJECTIONS)
            or not all(isinstance(value, bool) for value in biases.values())):
        raise error(f"{SPEC_KEY}.biases must map each of {PROJECTIONS} to a bool, got {biases!r}")
    layer = CONFIGS[kind].from_dict(dict(fields))
    expected = layer_config(kind, config, {})
    differ = [name for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "rope_theta")
              if getattr(layer, name) != getattr(expected, name)]
    if differ:
        raise error(f"{SPEC_KEY}.config's {differ} differ from the model config's "
                    f"{ {name: getattr(expected, name) for name in differ} }")
    return kind, layer, dict(biases)


_SWAPPED_CLASSES: dict[type[PreTrainedModel], type[PreTrainedModel]] = {}


def swapped_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """`base` whose __init__ swaps the attention as config.sparse_attention says (new layers, no copy): what
    from_pretrained needs to find every saved parameter a home. Keeps base's name (save_pretrained records it); one
    class per base."""
    if base in _SWAPPED_CLASSES:
        return _SWAPPED_CLASSES[base]

    def __init__(self: PreTrainedModel, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        kind, layer_config_, biases = read_spec(config)
        for layer in decoder_layers(self):
            weight = layer.self_attn.q_proj.weight
            layer.self_attn = LAYERS[kind](layer_config_, layer.self_attn.layer_idx, biases).to(
                device=weight.device, dtype=weight.dtype)

    swapped = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                            "__doc__": f"{base.__name__} with sal_hf's swapped attention."})
    return _SWAPPED_CLASSES.setdefault(base, swapped)


# ---- transformers' interfaces --------------------------------------------------------------------------------


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask interface for "nsa" / "scope": the swapped layers are causal by construction and need
    only which of the current columns are real tokens: the last q_length columns of the 2D padding mask (bool
    [B, q_length]), or None."""
    return None if attention_mask is None else attention_mask[:, -q_length:]


def attention_needs_swap(kind: str) -> Any:
    """The attention function registered for `kind`: a dense module reached it, which cannot run NSA / SCOPE."""
    error = NSAInputError if kind == "nsa" else ScopeInputError

    def attention(module: nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise error(f"attn_implementation={kind!r} needs the {kind} layers' own parameters (per-branch K/V and gates "
                    f"for NSA, the pointer head for SCOPE): {type(module).__name__} is still dense. Call "
                    f"sal_hf.swap_attention(model, {kind!r}) or load with sal_hf.load_swapped(path)")

    return attention


def register() -> None:
    """Register "nsa" and "scope" with transformers' attention and mask interfaces."""
    for kind in LAYERS:
        AttentionInterface.register(kind, attention_needs_swap(kind))
        AttentionMaskInterface.register(kind, padding_mask)
