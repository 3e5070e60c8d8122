"""A small GPT (RMSNorm, RoPE, SwiGLU) whose attention is chosen by config.

Attention kinds (the ``attention`` config group):
- ``dense``: causal SDPA over every earlier token (GQA, RoPE).
- ``window``: the same projections, each query reads the last ``window_size`` keys (its own included):
  SDPA with a [T, T] band mask (``impl="sdpa"``, O(T^2) scores), SDPA over pairs of window-long chunks
  (``impl="banded"``, O(T * 2w) scores, any shape without compilation) or compiled FlexAttention with a
  sliding-window block mask (``impl="flex"``, CUDA, fixed shapes: each new batch or length compiles anew).
  ``auto``: banded on CUDA (a length curriculum changes the shape every few steps), sdpa elsewhere. Stacked
  layers reach ``n_layer * (window_size - 1)`` tokens back (``receptive_field``).
- ``nsa``: ``nsa.NSAAttention`` (its backend -- Triton kernels on CUDA, the PyTorch path on the CPU -- is
  chosen by ``nsa.dispatch``).
- ``scope``: ``scope.ScopeAttention`` (backend ``auto``: the dense torch path for CPU gradients). Its
  sequence length must be a multiple of ``block``: shorter inputs are right-padded with zeros for the
  layer and cut back, which changes no output row (the layer is causal).

Layouts: token ids ``idx`` [B, T] (int64); hidden states [B, T, hidden_size]; per-head tensors
[B, T, H, D] (docs/API_CONTRACT.md); logits [B, T, vocab_size]. Positions are RoPE only (no table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from nsa import NSAAttention, NSAAux, NSAConfig, NSAConfigError, NSAInputError, NSAKVCache, apply_rope
from sal_harness.schema import StrictModel
from scope import ScopeAttention, ScopeAux, ScopeConfig, ScopeConfigError

IGNORE_INDEX = -100


class ModelConfig(StrictModel):
    """The ``model`` group: the decoder's size. ffn_hidden: SwiGLU width (None: 8/3 x hidden_size rounded up
    to a multiple of 16). max_seq_len: the longest input accepted (a checked limit: positions are RoPE)."""

    vocab_size: int = Field(320, ge=2)
    n_layer: int = Field(2, ge=1, le=128)
    hidden_size: int = Field(64, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(16, ge=2)
    ffn_hidden: int | None = Field(None, ge=1)
    max_seq_len: int = Field(256, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    tie_weights: bool = True
    init_std: float = Field(0.02, gt=0, le=1)

    @model_validator(mode="after")
    def _check_geometry(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        return self

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden or 16 * math.ceil(8 * self.hidden_size / 3 / 16)


class DenseAttentionConfig(StrictModel):
    kind: Literal["dense"] = "dense"


class WindowAttentionConfig(StrictModel):
    kind: Literal["window"] = "window"
    window_size: int = Field(32, ge=1)
    impl: Literal["auto", "sdpa", "banded", "flex"] = "auto"


class NSAAttentionConfig(StrictModel):
    """NSA's own settings; the geometry (hidden size, heads, head dims, RoPE theta) comes from ``model``."""

    kind: Literal["nsa"] = "nsa"
    cmp_block_size: int = Field(16, ge=1)
    cmp_stride: int = Field(8, ge=1)
    sel_block_size: int = Field(16, ge=1)
    num_selected: int = Field(8, ge=3)
    window_size: int = Field(32, ge=1)
    compression: Literal["mlp", "mean"] = "mlp"
    gate: Literal["sigmoid", "softmax"] = "sigmoid"
    shared_kv: bool = False
    backend: Literal["auto", "torch", "triton"] = "auto"
    query_chunk_size: int | None = Field(None, ge=1)

    def build(self, model: ModelConfig) -> NSAConfig:
        """The layer's NSAConfig (raises NSAConfigError on a combination NSA rejects)."""
        fields = self.model_dump(exclude={"kind"})
        return NSAConfig(hidden_size=model.hidden_size, num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
                         head_dim=model.head_dim, head_dim_v=model.head_dim, rope_theta=model.rope_theta, **fields)


class ScopeAttentionConfig(StrictModel):
    """SCOPE's settings (scope.ScopeConfig's names); the geometry comes from ``model``."""

    kind: Literal["scope"] = "scope"
    block: int = Field(16, ge=1)
    budget: int = Field(4, ge=0)
    local_blocks: int = Field(2, ge=1)
    global_blocks: int = Field(1, ge=0)
    max_radius: int = Field(2, ge=0)
    num_pointers: int = Field(2, ge=1)
    num_freqs: int = Field(8, ge=1)
    l_max: float = Field(65536.0, gt=0)
    min_period: float = Field(8.0, gt=0)
    delta_max: float = Field(256.0, gt=0)
    mlp_hidden: int = Field(32, ge=1)
    per_head_mlp: bool = True
    beta: float = 1.0
    bias_impl: Literal["score_mod", "qk_aug", "none"] = "qk_aug"
    representative: Literal["last", "mean"] = "last"
    backend: Literal["auto", "flex", "triton", "torch"] = "auto"

    def build(self, model: ModelConfig) -> ScopeConfig:
        """The layer's ScopeConfig (raises ScopeConfigError on a combination SCOPE rejects)."""
        fields = self.model_dump(exclude={"kind"})
        return ScopeConfig(hidden_size=model.hidden_size, num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
                           head_dim=model.head_dim, rope_theta=model.rope_theta, **fields)


AttentionConfig = Annotated[
    DenseAttentionConfig | WindowAttentionConfig | NSAAttentionConfig | ScopeAttentionConfig,
    Field(discriminator="kind"),
]
ATTENTION_KINDS = ("dense", "window", "nsa", "scope")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # nn.Linear attributes of every attention module


class GPTConfig(StrictModel):
    """A whole model: the decoder and its attention (validated together: NSA's and SCOPE's own rules)."""

    model: ModelConfig = ModelConfig()
    attention: AttentionConfig = NSAAttentionConfig()

    @model_validator(mode="after")
    def _check_attention(self) -> GPTConfig:
        attention = self.attention
        if isinstance(attention, NSAAttentionConfig | ScopeAttentionConfig):
            try:
                attention.build(self.model)
            except (NSAConfigError, ScopeConfigError) as err:
                raise ValueError(f"attention ({attention.kind}): {err}") from err
        return self


def window_of(config: GPTConfig) -> int | None:
    """The window of a window or NSA model (each query's local band), None for dense and SCOPE."""
    attention = config.attention
    return attention.window_size if isinstance(attention, WindowAttentionConfig | NSAAttentionConfig) else None


def receptive_field(config: GPTConfig) -> int | None:
    """How far back a window model can reach at all: n_layer hops of window_size - 1 tokens (None for the others).
    Needles farther than this are out of reach for the window baseline, whatever it learns."""
    if isinstance(config.attention, WindowAttentionConfig):
        return config.model.n_layer * (config.attention.window_size - 1)
    return None


class GPTOutput(NamedTuple):
    """logits [B, T, vocab]; loss: mean cross-entropy over non-ignored targets, or None; aux: per layer the
    attention's aux (NSAAux, ScopeAux, None for dense / window) when return_aux, else None."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux: list[NSAAux | ScopeAux | None] | None


class SDPAAttention(nn.Module):
    """Dense or sliding-window causal attention: q/k/v/o projections, GQA, RoPE, SDPA or FlexAttention.

    forward(x [B, T, hidden]) -> y [B, T, hidden]; window: None (dense) or the number of keys each query reads.
    """

    def __init__(self, model: ModelConfig, window: int | None = None, impl: str = "sdpa") -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = model.num_heads, model.num_kv_heads, model.head_dim
        self.rope_theta, self.window, self.impl = model.rope_theta, window, impl
        self.q_proj = nn.Linear(model.hidden_size, model.num_heads * model.head_dim, bias=False)
        self.k_proj = nn.Linear(model.hidden_size, model.num_kv_heads * model.head_dim, bias=False)
        self.v_proj = nn.Linear(model.hidden_size, model.num_kv_heads * model.head_dim, bias=False)
        self.o_proj = nn.Linear(model.num_heads * model.head_dim, model.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = apply_rope(self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim), None, self.rope_theta)
        k = apply_rope(self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim), None, self.rope_theta)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA / Flex layout [B, H, T, D]
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.impl == "flex":
            o = flex_window_attention(q, k, v, self.window)
        elif self.impl == "banded" or (self.impl == "auto" and x.device.type == "cuda"):
            o = banded_window_attention(q, k, v, self.window)
        else:
            positions = torch.arange(seq_len, device=x.device)
            i = positions[:, None]
            band = (positions[None, :] <= i) & (positions[None, :] > i - self.window)  # [T, T]: a dense baseline
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))


def banded_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window causal attention: query t reads keys max(0, t - window + 1) .. t.

    Layout: q [B, H, T, D], k / v [B, H_kv, T, D] (H a multiple of H_kv) -> o [B, H, T, D]. The sequence is cut
    into chunks of C = min(window, T) queries; chunk c > 0 reads key chunks c - 1 and c under one [C, 2C] band
    mask, chunk 0 its own keys causally. Scores are O(T * 2C) and plain SDPA runs every shape, so a length
    curriculum never waits on a compiler.
    """
    seq_len = q.shape[2]
    group = q.shape[1] // k.shape[1]
    # Each chunk reads its own keys: GQA is expanded here (O(T) extra) so SDPA's masked kernels take it.
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    chunk = min(window, seq_len)
    num_chunks = math.ceil(seq_len / chunk)
    # Zero rows after the end: the attention is causal, so no kept row reads them.
    q, k, v = (F.pad(t, (0, 0, 0, num_chunks * chunk - seq_len)) for t in (q, k, v))
    first = F.scaled_dot_product_attention(q[:, :, :chunk], k[:, :, :chunk], v[:, :, :chunk], is_causal=True)
    if num_chunks == 1:
        return first[:, :, :seq_len]

    def chunks(t: torch.Tensor, start: int) -> torch.Tensor:  # chunks start .. start + num_chunks - 2: [B, H, m, C, D]
        return t[:, :, start * chunk:(start + num_chunks - 1) * chunk].unflatten(2, (num_chunks - 1, chunk))

    pair_k, pair_v = (torch.cat([chunks(t, 0), chunks(t, 1)], dim=3).flatten(1, 2) for t in (k, v))
    i = torch.arange(chunk, device=q.device)[:, None]
    j = torch.arange(2 * chunk, device=q.device)[None, :]
    band = (j <= i + chunk) & (j > i + chunk - window)  # key j of the pair sits at j - C relative to the chunk
    rest = F.scaled_dot_product_attention(chunks(q, 1).flatten(1, 2), pair_k, pair_v, attn_mask=band)
    rest = rest.unflatten(1, (q.shape[1], num_chunks - 1)).flatten(2, 3)
    return torch.cat([first, rest], dim=2)[:, :, :seq_len]


_COMPILED_FLEX: dict[str, Any] = {}


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window causal attention through compiled FlexAttention (q [B, H, T, D], k / v [B, H_kv, T, D])."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _COMPILED_FLEX:
        _COMPILED_FLEX["fn"] = torch.compile(flex_attention, dynamic=False)

    def sliding(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    seq_len = q.shape[2]
    mask = create_block_mask(sliding, None, None, seq_len, seq_len, device=q.device)
    return _COMPILED_FLEX["fn"](q, k, v, block_mask=mask, enable_gqa=True)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x [..., hidden]."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(model.hidden_size, model.ffn_width, bias=False)
        self.up = nn.Linear(model.hidden_size, model.ffn_width, bias=False)
        self.down = nn.Linear(model.ffn_width, model.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_attention(config: GPTConfig) -> nn.Module:
    attention = config.attention
    if isinstance(attention, NSAAttentionConfig):
        return NSAAttention(attention.build(config.model))
    if isinstance(attention, ScopeAttentionConfig):
        return ScopeAttention(attention.build(config.model))
    if isinstance(attention, WindowAttentionConfig):
        return SDPAAttention(config.model, attention.window_size, attention.impl)
    return SDPAAttention(config.model)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). x: [B, T, hidden]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.model.hidden_size)
        self.attn = make_attention(config)
        self.mlp_norm = nn.RMSNorm(config.model.hidden_size)
        self.mlp = SwiGLU(config.model)

    def forward(self, x: torch.Tensor, *, return_aux: bool = False, step: int | None = None,
                cache: NSAKVCache | None = None, num_valid: Sequence[int] | None = None,
                ) -> tuple[torch.Tensor, NSAAux | ScopeAux | None]:
        """-> (x [B, T, hidden], the layer's aux when return_aux and NSA / SCOPE, else None). With a cache
        (NSA), x holds the next tokens of each sequence (see NSAAttention.forward)."""
        a, aux = self._attend(self.attn_norm(x), return_aux, step, cache, num_valid)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), aux

    def _attend(self, h: torch.Tensor, return_aux: bool, step: int | None, cache: NSAKVCache | None,
                num_valid: Sequence[int] | None) -> tuple[torch.Tensor, NSAAux | ScopeAux | None]:
        if isinstance(self.attn, NSAAttention):
            cached: dict[str, Any] = {} if cache is None else {"cache": cache, "num_valid": num_valid}
            out = self.attn(h, return_aux, **cached)
            return out if return_aux else (out, None)
        if cache is not None:
            raise NSAInputError("decode caches are NSA's: this layer has none")
        if isinstance(self.attn, ScopeAttention):
            return scope_padded(self.attn, h, step, return_aux)
        return self.attn(h), None


def scope_padded(layer: ScopeAttention, h: torch.Tensor, step: int | None, return_aux: bool
                 ) -> tuple[torch.Tensor, ScopeAux | None]:
    """ScopeAttention over h [B, T, hidden] right-padded to a multiple of its block; y [B, T, hidden]."""
    seq_len = h.shape[1]
    padded = F.pad(h, (0, 0, 0, -seq_len % layer.config.block))
    if return_aux:
        y, aux = layer(padded, step=step, return_aux=True)
        return y[:, :seq_len], aux
    return layer(padded, step=step)[:, :seq_len], None


class GPT(nn.Module):
    """Token embedding -> n_layer Blocks -> RMSNorm -> LM head (tied to the embedding by default)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        m = config.model
        self.tok_emb = nn.Embedding(m.vocab_size, m.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(m.n_layer))
        self.norm = nn.RMSNorm(m.hidden_size)
        self.lm_head = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        self._init_weights()
        if m.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """N(0, init_std) weights, residual outputs (o_proj, mlp.down) scaled by 1/sqrt(2 n_layer) (GPT-2). The
        q/k/v/o projections get the same init in every attention kind, so models differ in attention only; the
        rest of NSAAttention and ScopeAttention (gates, phi, pointer head) keeps its own neutral init."""
        std = self.config.model.init_std
        residual_std = std / math.sqrt(2 * self.config.model.n_layer)
        nn.init.normal_(self.tok_emb.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            assert isinstance(block, Block)
            for linear in (block.mlp.gate, block.mlp.up):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)
            for name in PROJECTIONS:
                nn.init.normal_(getattr(block.attn, name).weight, std=residual_std if name == "o_proj" else std)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())

    def new_caches(self, batch_size: int, capacity: int) -> list[NSAKVCache]:
        """One empty decode cache per layer (NSA attention only), for sequences of up to ``capacity`` tokens."""
        layers = [block.attn for block in self.blocks if isinstance(block, Block)]
        if not all(isinstance(layer, NSAAttention) for layer in layers):
            raise NSAInputError(f"decode caches need attention 'nsa', this model uses {self.config.attention.kind!r}")
        return [layer.new_cache(batch_size, capacity) for layer in layers if isinstance(layer, NSAAttention)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_aux: bool = False, *,
                step: int | None = None, caches: Sequence[NSAKVCache] | None = None,
                num_valid: Sequence[int] | None = None) -> GPTOutput:
        """idx: LongTensor [B, T]; targets: LongTensor [B, T] of next-token ids (IGNORE_INDEX where not scored).
        step: the training step (SCOPE's delta_max schedule). Without caches T <= max_seq_len. With caches
        (new_caches) idx holds the next T tokens of every sequence, num_valid[b] of them real (right padding
        after them); each layer appends them to its cache."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T], got shape {tuple(idx.shape)}")
        if caches is None and idx.shape[1] > self.config.model.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds max_seq_len={self.config.model.max_seq_len}")
        if caches is not None and len(caches) != len(self.blocks):
            raise NSAInputError(f"caches must hold one cache per layer ({len(self.blocks)}), got {len(caches)}")
        x = self.tok_emb(idx)
        auxes: list[NSAAux | ScopeAux | None] = []
        for i, block in enumerate(self.blocks):
            x, aux = block(x, return_aux=return_aux, step=step, cache=None if caches is None else caches[i],
                           num_valid=num_valid)
            auxes.append(aux)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return GPTOutput(logits, loss, auxes if return_aux else None)
