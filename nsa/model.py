"""A small nanoGPT-style decoder whose attention is NSA or a dense causal baseline.

Layouts: token ids ``idx`` [B, T] (int64); hidden states [B, T, hidden_size]; per-head tensors
[B, T, H, D] as everywhere in the library (docs/API_CONTRACT.md); logits [B, T, vocab_size].

The attention geometry (heads, kv heads, head dims, RoPE theta) is set once on ``GPTConfig``; the NSA
layers get it through ``GPTConfig.nsa`` (an ``NSAConfig``), which ``from_dict`` fills from the model
level when the nested ``nsa`` dict leaves it out and rejects when it disagrees. Positions are encoded
by RoPE inside the attention only (no learned position embedding), so ``max_seq_len`` is a checked
limit rather than the size of a table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nsa import NSAAttention, NSAAux, NSAConfig, NSAConfigError, NSAInputError, NSAKVCache, apply_rope
from nsa.config import reject_unknown_keys

ATTENTION_KINDS = ("nsa", "dense")
NORM_KINDS = ("rmsnorm", "layernorm")
# GPTConfig fields copied into NSAConfig (name in GPTConfig -> name in NSAConfig).
_SHARED_GEOMETRY = {
    "hidden_size": "hidden_size",
    "num_heads": "num_heads",
    "num_kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "head_dim_v": "head_dim_v",
    "rope_theta": "rope_theta",
}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise NSAConfigError(f"GPTConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise NSAConfigError(f"GPTConfig.{name} must be a number > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Decoder hyperparameters.

    attention: "nsa" (every layer is an NSAAttention built from ``nsa``) or "dense" (causal SDPA
    baseline with the same projections geometry; ``nsa`` must be None). head_dim_v: value head dim
    (None -> head_dim; the dense baseline needs head_dim_v == head_dim). mlp_ratio: MLP width over
    hidden_size. tie_weights: share the token embedding with the output head.
    """

    vocab_size: int = 256
    n_layer: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    head_dim_v: int | None = None
    mlp_ratio: float = 4.0
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"
    tie_weights: bool = True
    attention: str = "nsa"
    nsa: NSAConfig | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "max_seq_len"):
            _check_int(name, getattr(self, name), 1)
        if self.head_dim_v is None:
            object.__setattr__(self, "head_dim_v", self.head_dim)
        _check_int("head_dim_v", self.head_dim_v, 1)
        _check_positive_float("mlp_ratio", self.mlp_ratio)
        _check_positive_float("rope_theta", self.rope_theta)
        if self.num_heads % self.num_kv_heads:
            raise NSAConfigError(
                f"GPTConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise NSAConfigError(f"GPTConfig.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.norm not in NORM_KINDS:
            raise NSAConfigError(f"GPTConfig.norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if not isinstance(self.tie_weights, bool):
            raise NSAConfigError(f"GPTConfig.tie_weights must be a bool, got {self.tie_weights!r}")
        self._check_attention()

    def _check_attention(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise NSAConfigError(f"GPTConfig.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention == "dense":
            if self.nsa is not None:
                raise NSAConfigError("GPTConfig.nsa must be None when attention='dense' (drop the nsa section)")
            if self.head_dim_v != self.head_dim:
                raise NSAConfigError("GPTConfig.head_dim_v must equal head_dim for attention='dense'")
            return
        if self.nsa is None:
            object.__setattr__(self, "nsa", NSAConfig.from_dict(self._geometry()))
        assert self.nsa is not None
        if not isinstance(self.nsa, NSAConfig):
            raise NSAConfigError(f"GPTConfig.nsa must be an NSAConfig or None, got {type(self.nsa).__name__}")
        for ours, theirs in _SHARED_GEOMETRY.items():
            if getattr(self.nsa, theirs) != getattr(self, ours):
                raise NSAConfigError(
                    f"GPTConfig.nsa.{theirs}={getattr(self.nsa, theirs)!r} disagrees with "
                    f"GPTConfig.{ours}={getattr(self, ours)!r}"
                )

    def _geometry(self) -> dict[str, Any]:
        """The NSAConfig fields this config determines."""
        return {theirs: getattr(self, ours) for ours, theirs in _SHARED_GEOMETRY.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from plain values; unknown keys raise NSAConfigError naming them.

        A nested ``nsa`` dict goes through ``NSAConfig.from_dict``; the shared geometry
        (hidden_size, heads, head dims, rope_theta) it leaves out is filled from this level.
        """
        if not isinstance(d, dict):
            raise NSAConfigError(f"GPTConfig.from_dict expects a dict, got {type(d).__name__}")
        reject_unknown_keys(cls, d, "GPTConfig")
        kwargs = dict(d)
        nsa = kwargs.pop("nsa", None)
        if isinstance(nsa, dict):
            geometry = _geometry_from(kwargs)
            nsa = NSAConfig.from_dict({**geometry, **nsa})
        return cls(**kwargs, nsa=nsa)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (``nsa`` as a dict or None) that ``from_dict`` accepts back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.nsa is None:
            del d["nsa"]
        else:
            d["nsa"] = self.nsa.to_dict()
        return d


def _geometry_from(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The shared geometry implied by GPTConfig keyword values (defaults where absent)."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    values = {name: kwargs.get(name, defaults[name]) for name in _SHARED_GEOMETRY}
    if values["head_dim_v"] is None:
        values["head_dim_v"] = values["head_dim"]
    return {theirs: values[ours] for ours, theirs in _SHARED_GEOMETRY.items()}


class GPTOutput(NamedTuple):
    """logits [B, T, vocab]; loss: scalar mean cross-entropy over non-ignored targets, or None;
    aux: per-layer NSAAux (None for dense layers) when return_aux, else None."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux: list[NSAAux | None] | None


class DenseCausalAttention(nn.Module):
    """Dense causal baseline: q/k/v/o projections, GQA, RoPE per head, torch SDPA.

    forward(x [B, T, hidden], return_aux=False) -> y [B, T, hidden], or (y, None) with return_aux,
    so it is interchangeable with NSAAttention inside ``Block``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, return_aux: bool = False) -> Any:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        positions = torch.arange(T, device=x.device)
        q = apply_rope(q, positions, theta=self.rope_theta)
        k = apply_rope(k, positions, theta=self.rope_theta)
        # SDPA wants [B, H, T, D]; full square prefill, so is_causal=True is aligned correctly. enable_gqa: query
        # head h reads kv head h // G without materialising G copies of k and v.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        return (y, None) if return_aux else y


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(hidden -> ratio*hidden), GELU, Linear back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        inner = round(config.mlp_ratio * config.hidden_size)
        self.up = nn.Linear(config.hidden_size, inner, bias=False)
        self.down = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def make_norm(config: GPTConfig) -> nn.Module:
    """RMSNorm or LayerNorm over the hidden dimension."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size)
    return nn.LayerNorm(config.hidden_size)


def make_attention(config: GPTConfig) -> nn.Module:
    """NSAAttention(config.nsa) or DenseCausalAttention(config)."""
    if config.attention == "nsa":
        assert config.nsa is not None
        return NSAAttention(config.nsa)
    return DenseCausalAttention(config)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). x: [B, T, hidden]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = make_attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, return_aux: bool = False, cache: NSAKVCache | None = None,
        num_valid: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, NSAAux | None]:
        """Returns (x [B, T, hidden], aux): aux is the layer's NSAAux when return_aux and NSA, else None.
        With a cache, x holds the next tokens of each sequence (see NSAAttention.forward)."""
        aux = None
        h = self.attn_norm(x)
        cached = {} if cache is None else {"cache": cache, "num_valid": num_valid}
        if return_aux:
            a, aux = self.attn(h, return_aux=True, **cached)
        else:
            a = self.attn(h, **cached)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, aux


class GPT(nn.Module):
    """Token embedding -> n_layer Blocks -> final norm -> LM head (tied to the embedding by default)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """GPT-2 init for the modules defined here: N(0, 0.02) weights, residual outputs scaled by
        1/sqrt(2 n_layer). NSAAttention keeps the initialisation its own module chose."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.mlp.up.weight, std=0.02)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)
            if isinstance(block.attn, DenseCausalAttention):
                for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                    nn.init.normal_(proj.weight, std=0.02)
                nn.init.normal_(block.attn.o_proj.weight, std=residual_std)

    def num_parameters(self) -> int:
        """Distinct trainable parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())

    def new_caches(self, batch_size: int, capacity: int) -> list[NSAKVCache]:
        """One empty decode cache per layer (NSA attention only), for sequences of up to `capacity` tokens."""
        if self.config.attention != "nsa":
            raise NSAInputError(f"decode caches need attention='nsa', this model uses {self.config.attention!r}")
        layers = [block.attn for block in self.blocks if isinstance(block, Block)]
        return [layer.new_cache(batch_size, capacity) for layer in layers if isinstance(layer, NSAAttention)]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_aux: bool = False, *,
        caches: Sequence[NSAKVCache] | None = None, num_valid: Sequence[int] | None = None,
    ) -> GPTOutput:
        """idx: LongTensor [B, T]. targets: LongTensor [B, T] of next-token ids, -100 where ignored.
        Returns GPTOutput(logits [B, T, vocab], loss or None, aux list or None).

        Without caches T <= max_seq_len (a whole sequence). With caches (from new_caches) idx holds the
        next T tokens of every sequence, of which num_valid[b] are real (right padding after them), and
        each layer appends them to its cache; the total length is bounded by the caches' capacity.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T], got shape {tuple(idx.shape)}")
        if caches is None and idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")
        if caches is not None and len(caches) != len(self.blocks):
            raise NSAInputError(f"caches must hold one cache per layer ({len(self.blocks)}), got {len(caches)}")
        x = self.tok_emb(idx)
        auxes: list[NSAAux | None] = []
        for i, block in enumerate(self.blocks):
            x, aux = block(x, return_aux=return_aux, cache=None if caches is None else caches[i],
                           num_valid=num_valid)
            auxes.append(aux)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return GPTOutput(logits, loss, auxes if return_aux else None)
