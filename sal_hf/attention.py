"""The swapped attention modules: the project's layers behind the forward signature of transformers' decoder attention.

``NSASelfAttention`` holds an ``nsa.NSAAttention`` (``.nsa``: q/k/v/o projections, the gate projection, the
compression MLPs phi), ``ScopeSelfAttention`` a ``scope.ScopeAttention`` (``.scope``: q/k/v/o projections, the
spectral bias and pointer head). Their parameters are submodules, so ``save_pretrained`` writes them under
``model.layers.{i}.self_attn.nsa.*`` / ``.scope.*`` and ``from_pretrained`` (through ``sal_hf.load_swapped``) reads
them back. Projection biases (Qwen2's q/k/v, Llama's ``attention_bias``) are extra parameters of those Linear layers.

``forward(hidden_states [B, C, hidden], position_embeddings, attention_mask, cache, **kwargs) -> (out [B, C, hidden],
None)``: transformers' rotary embeddings are not used (the layers rotate q and k themselves at their own positions,
NSA its compressed keys at block centres too; only rope_type "default" is accepted by the swap, whose angles they
compute alike); no attention weights are returned. Under ``attn_implementation="nsa"`` / ``"scope"`` (set by the
swap) transformers hands the layers ``attention_mask`` as bool [B, C] (True = a real token of the current
columns) or None (sal_hf.swap.padding_mask).

Positions: the layers number each sequence's real tokens 0, 1, 2, ... themselves (NSA's blocks and SCOPE's are
aligned to them). Padding (False in the mask), anywhere in a row, is taken out: each row's real tokens are moved to
its front (the layers are causal, so trailing padding changes no real row), the layer runs, the outputs go back to
their columns and padding rows are zero. Without a cache, ``position_ids`` only mark packed sequences: a 0 after a
row's first real token starts a new one (transformers' packed format); NSA runs them as ``cu_seqlens`` (batch size
1), SCOPE as documents (``doc_ids``; its blocks stay aligned to the row). Otherwise position_ids must rise by one
from real token to real token (transformers' default arange, left padding included, and generate's
cumsum positions do) or a typed error names the rule. With a cache, positions come from the cache: position_ids
are only checked (rising by one, no packed sequence). position_ids are integers [B | 1, C]. Reading the mask, the
positions and a ragged batch's lengths costs one host synchronisation per layer call (the project's caches take
lengths as host integers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache

from nsa import NSAAttention, NSAConfig, NSAInputError
from sal_hf.cache import NSACacheLayer, ScopeCacheLayer, SparseCacheLayer, layer_cache
from scope import ScopeAttention, ScopeConfig, ScopeInputError


class Layout(NamedTuple):
    """Where the real tokens of a batch [B, C] are (Layout.of)."""

    order: Tensor | None  # [B, C] gather index: each row's real tokens first, in order, then padding; None: no padding
    valid: Tensor | None  # [B, C] bool, in the compacted order (real tokens first); None: no padding
    starts: Tensor | None  # [B, C] bool, compacted order: first token of each packed sequence; None: one per row
    counts: list[int]  # real tokens per row

    @staticmethod
    def of(mask: Tensor | None, position_ids: Tensor | None, batch: int, length: int, error: type[Exception]
           ) -> Layout:
        """The layout of mask (bool [B, C] or None) and, when given, position_ids ([B|1, C]: sequences start where
        they are 0 and must count up by one; None: one sequence per row), read on the host once."""
        if mask is None and position_ids is None:
            return Layout(None, None, None, [length] * batch)
        if position_ids is not None and (not isinstance(position_ids, Tensor) or position_ids.is_floating_point()
                                         or position_ids.is_complex() or position_ids.dtype == torch.bool
                                         or position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch)
                                         or position_ids.shape[1] != length):
            got = (f"{position_ids.dtype} {tuple(position_ids.shape)}" if isinstance(position_ids, Tensor)
                   else type(position_ids).__name__)
            raise error(f"position_ids must be an integer tensor [B | 1, C] = [{batch} | 1, {length}], got {got}")
        given = mask if mask is not None else position_ids
        assert given is not None
        device = given.device
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices if mask is not None else None
        valid_c = valid if order is None else valid.gather(1, order)
        index = torch.arange(length, device=device).expand(batch, length)
        if position_ids is None:
            starts = index == 0
            wrong = torch.zeros((), dtype=torch.bool, device=device)
        else:
            positions = position_ids.to(device).expand(batch, length)
            positions = positions if order is None else positions.gather(1, order)
            starts = (index == 0) | (valid_c & (positions == 0))
            wrong = (valid_c & ~starts & F.pad(positions[:, 1:] != positions[:, :-1] + 1, (1, 0))).any()
        counts, flags = valid.sum(dim=1).tolist(), torch.stack((wrong, starts[:, 1:].any())).tolist()
        if flags[0]:
            raise error("position_ids must rise by one from real token to real token within a sequence (a 0 starts "
                        "a packed sequence): the swapped layers number each sequence's tokens 0, 1, 2, ... themselves")
        padded = any(n != length for n in counts)
        return Layout(order if padded else None, valid_c if padded else None, starts if flags[1] else None, counts)

    def compact(self, x: Tensor) -> Tensor:
        """x [B, C, ...] with each row's real tokens first."""
        return x if self.order is None else x.gather(1, self._index(x))

    def restore(self, y: Tensor) -> Tensor:
        """Inverse of compact for y [B, C, hidden], padding rows zero."""
        if self.order is None or self.valid is None:
            return y
        y = torch.where(self.valid[..., None], y, 0.0)
        return torch.zeros_like(y).scatter(1, self._index(y), y)

    def _index(self, x: Tensor) -> Tensor:
        assert self.order is not None
        return self.order.view(*self.order.shape, *([1] * (x.dim() - 2))).expand_as(x)


class SparseSelfAttention(nn.Module, ABC):
    """Base of the swapped modules: transformers' call signature, padding and the cache (module docstring)."""

    error: type[Exception]
    cache_layer_class: type[SparseCacheLayer]
    kind: str

    def __init__(self, layer: nn.Module, layer_idx: int, biases: dict[str, bool]) -> None:
        super().__init__()
        add_biases(layer, biases)
        setattr(self, self.kind, layer)  # self.nsa / self.scope: the prefix of the layer's parameters
        self.layer_idx = layer_idx
        self.is_causal = True

    def new_cache(self, batch_size: int, capacity: int) -> Any:
        """The project's empty decode cache for this layer (SparseCacheLayer creates it)."""
        return getattr(self, self.kind).new_cache(batch_size, capacity)

    def forward(self, hidden_states: Tensor, position_embeddings: Any = None, attention_mask: Tensor | None = None,
                cache: Cache | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        """hidden_states [B, C, hidden] -> (out [B, C, hidden], None). See the module docstring. Every argument is
        checked before the cache is touched: a rejected call leaves it as it was."""
        cache = cache if cache is not None else kwargs.get("past_key_values")  # its name before transformers renamed it
        getattr(self, self.kind).check_input(hidden_states)
        batch, length, _ = hidden_states.shape
        self.check_mask(attention_mask, batch, length)
        position_ids = kwargs.get("position_ids")
        if cache is None:
            layout = Layout.of(attention_mask, position_ids, batch, length, self.error)
            return layout.restore(self.prefill(layout.compact(hidden_states), layout)), None
        layout = Layout.of(attention_mask, position_ids, batch, length, self.error)
        if layout.starts is not None:
            raise self.error("position_ids restart at 0 inside the chunk (packed sequences): a cache holds one "
                             "sequence per row")
        state = layer_cache(cache, self.layer_idx, self.cache_layer_class)
        out = layout.restore(self.append(layout.compact(hidden_states), layout, state))
        state.seen_tokens += length
        return out, None

    def check_mask(self, attention_mask: Tensor | None, batch: int, length: int) -> None:
        """The layer's error unless attention_mask is None or bool [B, C] (what attn_implementation=kind passes)."""
        if attention_mask is None:
            return
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise self.error(f"the swapped {self.kind} layer got an attention mask of shape {got}: it needs "
                             f"attn_implementation={self.kind!r} (which passes the padding mask) and takes no custom "
                             "4D masks")
        if tuple(attention_mask.shape) != (batch, length):
            raise self.error(f"attention_mask must be bool [B, C] = {(batch, length)} (the current columns' padding "
                             f"mask), got {tuple(attention_mask.shape)}")

    @abstractmethod
    def prefill(self, x: Tensor, layout: Layout) -> Tensor:
        """Whole sequences, compacted: x [B, C, hidden] -> y [B, C, hidden] (padding rows: anything)."""

    @abstractmethod
    def append(self, x: Tensor, layout: Layout, state: SparseCacheLayer) -> Tensor:
        """The next tokens of the cached sequences, compacted -> y [B, C, hidden] (padding rows: anything)."""


class NSASelfAttention(SparseSelfAttention):
    """An NSA layer (``self.nsa``) in a transformers decoder layer."""

    error = NSAInputError
    cache_layer_class = NSACacheLayer
    kind = "nsa"
    nsa: NSAAttention

    def __init__(self, config: NSAConfig, layer_idx: int, biases: dict[str, bool]) -> None:
        super().__init__(NSAAttention(config), layer_idx, biases)

    def prefill(self, x: Tensor, layout: Layout) -> Tensor:
        if layout.starts is None:
            return self.nsa(x)
        if x.shape[0] != 1:
            raise NSAInputError(f"packed sequences (position_ids restarting at 0) need batch size 1, got {x.shape[0]}")
        boundaries = layout.starts[0].nonzero()[:, 0].tolist()
        cu_seqlens = torch.tensor([*boundaries, x.shape[1]], device=x.device)
        return self.nsa(x, cu_seqlens=cu_seqlens)

    def append(self, x: Tensor, layout: Layout, state: SparseCacheLayer) -> Tensor:
        cache = state.reserve(self, x, max(layout.counts))
        return self.nsa(x, cache=cache, num_valid=None if layout.order is None else layout.counts)


class ScopeSelfAttention(SparseSelfAttention):
    """A SCOPE layer (``self.scope``) in a transformers decoder layer."""

    error = ScopeInputError
    cache_layer_class = ScopeCacheLayer
    kind = "scope"
    scope: ScopeAttention

    def __init__(self, config: ScopeConfig, layer_idx: int, biases: dict[str, bool]) -> None:
        super().__init__(ScopeAttention(config), layer_idx, biases)

    def prefill(self, x: Tensor, layout: Layout) -> Tensor:
        """SCOPE prefills whole blocks: x is padded at the end to a multiple of the block (causal: no real row
        changes); packed sequences become documents."""
        length, block = x.shape[1], self.scope.config.block
        doc_ids = None if layout.starts is None else layout.starts.long().cumsum(dim=1) - 1
        extra = -length % block
        if extra:
            x = F.pad(x, (0, 0, 0, extra))
            doc_ids = None if doc_ids is None else F.pad(doc_ids, (0, extra), mode="replicate")
        y = self.scope(x, doc_ids=doc_ids)
        assert isinstance(y, Tensor)
        return y[:, :length]

    def append(self, x: Tensor, layout: Layout, state: SparseCacheLayer) -> Tensor:
        """A prompt's whole blocks are prefilled, the rest (and every later token) decoded one by one."""
        if layout.order is not None:
            raise ScopeInputError("SCOPE's decode cache holds one length for all sequences: padded batches cannot "
                                  "use it (generate one sequence at a time, or prompts of equal length)")
        cache = state.reserve(self, x, x.shape[1])
        whole = (x.shape[1] // self.scope.config.block) * self.scope.config.block if cache.length == 0 else 0
        pieces = [piece for piece in (x[:, :whole], x[:, whole:]) if piece.shape[1]]
        outputs = [self.scope(piece, cache=cache) for piece in pieces]
        return torch.cat([y for y in outputs if isinstance(y, Tensor)], dim=1)


def add_biases(layer: nn.Module, biases: dict[str, bool]) -> None:
    """Give layer.{q,k,v,o}_proj a zero bias where biases[name] is True (the dense model's projection has one)."""
    for name, wanted in biases.items():
        linear = getattr(layer, f"{name}_proj")
        if wanted and linear.bias is None:
            weight = linear.weight
            linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
