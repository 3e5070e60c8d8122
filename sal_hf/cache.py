"""Decode caches of swapped NSA / SCOPE layers in transformers' cache API.

transformers keeps one cache layer per decoder layer in a ``Cache`` (``cache.layers``). A swapped layer stores its
state in a ``SparseCacheLayer`` there: NSA's per-branch ``nsa.NSAKVCache`` (raw selection tokens, window ring,
compression ring and emitted blocks, read counters) or SCOPE's ``scope.ScopeKVCache`` (keys, values and the pointer
parameters its block lists are rebuilt from). ``SparseAttentionCache(model)`` is a Cache made of these layers; a
swapped layer handed transformers' default ``DynamicCache`` (what ``generate`` and ``use_cache=True`` create) puts
its own layer in place of the untouched ``DynamicLayer`` at its index, so ``model.generate()`` needs no argument.

The project's caches are preallocated for a capacity; here they are created at the first append (batch size, device
and dtype from the hidden states) and, when an append would pass the capacity, replaced by one of twice the needed
size holding the same contents (amortised O(1) copies per token). ``get_seq_length`` counts the columns transformers
has fed the layer (padding included: transformers' positions and masks count them), while the project's caches
track each sequence's real tokens.

Supported: greedy and sampled generation, batches (with left or right padding for NSA), prompts and chunks of any
length. Beam search (reorder_cache), assisted decoding and prompt-lookup (crop), offloading and batch expansion of a
filled cache raise the layer's typed error (NSAInputError / ScopeInputError) instead of silently doing something else.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from nsa import NSAInputError, NSAKVCache
from scope import ScopeInputError, ScopeKVCache

MIN_CAPACITY = 64  # tokens a cache is first created for (at least): short prompts do not grow at every step


def grown_capacity(needed: int) -> int:
    """Capacity for `needed` tokens: the next power of two, at least MIN_CAPACITY."""
    return max(MIN_CAPACITY, 1 << (needed - 1).bit_length())


class SparseCacheLayer(CacheLayerMixin):
    """One swapped layer's decode state (see the module docstring); ``state`` is the project's cache or None."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    error: type[Exception] = NSAInputError
    kind = "sparse"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state: Any = None
        self.seen_tokens = 0  # columns appended through transformers (padding included)

    # ---- transformers' dense K/V interface: a dense layer must never write here ------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.update(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise self.error(f"a dense attention layer tried to store keys and values in a swapped {self.kind} layer's "
                         "cache: swap every decoder layer (sal_hf.swap_attention) or use a separate cache")

    # ---- sizes ----------------------------------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen_tokens, self.is_initialized = None, 0, False

    # ---- what the project's caches cannot do ------------------------------------------------------------------

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise self.error(f"beam search is not supported with {self.kind} caches (use greedy or sampled generation)")

    def crop(self, tokens_to_remove: int) -> None:
        raise self.error(f"{self.kind} caches cannot drop tokens (assisted decoding and prompt lookup need that)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported_batch_change()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported_batch_change()

    def offload(self) -> None:
        raise self.error(f"{self.kind} caches do not support offloading")

    def prefetch(self) -> None:
        self.offload()

    def _unsupported_batch_change(self) -> None:
        if self.seen_tokens:  # an empty cache has nothing to expand or select (generate calls it before prefill)
            raise self.error(f"{self.kind} caches cannot change the batch of a filled cache")

    # ---- the project's cache ----------------------------------------------------------------------------------

    def reserve(self, layer: Any, hidden_states: torch.Tensor, new_tokens: int) -> Any:
        """The project's cache for this layer with room for `new_tokens` more tokens per sequence: created at the
        first call for hidden_states [B, C, hidden] (its batch, device and dtype), grown when full."""
        batch = hidden_states.shape[0]
        if self.state is None:
            self.state = self.new_state(layer, batch, grown_capacity(max(1, new_tokens)))
            self.is_initialized = True
        elif self.state.batch_size != batch:
            raise self.error(f"the cache holds {self.state.batch_size} sequences but the input has {batch}")
        needed = self.longest() + new_tokens
        if needed > self.state.capacity:
            self.state = self.grown(grown_capacity(needed))
        return self.state

    def new_state(self, layer: Any, batch: int, capacity: int) -> Any:
        """An empty cache of the swapped layer (sal_hf.attention) for `batch` sequences of up to `capacity` tokens."""
        return layer.new_cache(batch, capacity)

    @abstractmethod
    def longest(self) -> int:
        """Tokens held by the longest sequence."""

    @abstractmethod
    def grown(self, capacity: int) -> Any:
        """The current cache's contents in a cache of `capacity` tokens per sequence."""


class NSACacheLayer(SparseCacheLayer):
    """SparseCacheLayer holding an nsa.NSAKVCache."""

    kind = "NSA"
    error = NSAInputError

    def longest(self) -> int:
        return max(self.state.lengths)

    def grown(self, capacity: int) -> NSAKVCache:
        """A cache of `capacity` tokens per sequence in the state of the current one. The buffers are those of
        nsa/kv_cache.py's docstring: tokens by absolute position (selection branch) and emitted compressed blocks
        keep their rows; the window and compression rings keep theirs (same sizes: slots are position mod w / l)."""
        old: NSAKVCache = self.state
        new = NSAKVCache(old.config, old.batch_size, capacity, device=old.device, dtype=old.dtype,
                         static_shapes=old.static_shapes)
        for name, rows in (("k_sel", old.capacity), ("v_sel", old.capacity), ("k_cmp", old.num_cmp_capacity),
                           ("v_cmp", old.num_cmp_capacity), ("k_win", None), ("v_win", None), ("k_cmp_raw", None),
                           ("v_cmp_raw", None)):
            source, target = getattr(old, name), getattr(new, name)
            if rows is None:  # rings: the same size in both caches
                target.copy_(source)
            else:  # the discard row (last) stays behind
                target[:, :rows] = source[:, :rows]
        new.lengths = list(old.lengths)
        new.device_lengths.copy_(old.device_lengths)
        new.total_reads.copy_(old.total_reads)
        new.last_reads = old.last_reads
        return new


class ScopeCacheLayer(SparseCacheLayer):
    """SparseCacheLayer holding a scope.ScopeKVCache."""

    kind = "SCOPE"
    error = ScopeInputError

    def longest(self) -> int:
        return int(self.state.length)

    def grown(self, capacity: int) -> ScopeKVCache:
        """A cache of `capacity` tokens in the state of the current one: keys, values and per-row pointer parameters
        keep their rows; the block lists cached for the current query block stay valid (they depend on rows <=
        the block, which do not change)."""
        old: ScopeKVCache = self.state
        new = ScopeKVCache(old.config, old.batch_size, capacity, device=old.device, dtype=old.dtype)
        length = old.length
        for name in ("k", "v", "d_star", "budget_logits"):
            getattr(new, name)[:, :, :length] = getattr(old, name)[:, :, :length]
        new.length = length
        new._block_lists = old._block_lists
        return new


class SparseAttentionCache(Cache):
    """A transformers Cache for a swapped model: one NSACacheLayer / ScopeCacheLayer per decoder layer.

    ``model.generate(input_ids, cache=SparseAttentionCache(model))`` (optional: a swapped layer also takes
    generate's default DynamicCache, see the module docstring). ``layers[i].state`` is layer i's NSAKVCache or
    ScopeKVCache (its read counters, lengths, ...).
    """

    def __init__(self, model: nn.Module) -> None:
        from sal_hf.swap import swapped_layers  # the swap module imports this one

        if not isinstance(model, nn.Module):
            raise NSAInputError(f"model must be a swapped transformers model, got {type(model).__name__}")
        layers: list[Any] = [module.cache_layer_class() for module in swapped_layers(model)]
        if not layers:
            raise NSAInputError("the model has no swapped attention layer (sal_hf.swap_attention)")
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Never valid: only a dense attention layer stores keys and values this way (any layer index)."""
        layer = self.layers[0]
        assert isinstance(layer, SparseCacheLayer)
        return layer.update(key_states, value_states)  # raises the layer's typed error


def layer_cache(cache: Cache, layer_idx: int, layer_class: type[SparseCacheLayer]) -> SparseCacheLayer:
    """The SparseCacheLayer of layer `layer_idx` in `cache`, put in place of an untouched dense layer (or appended
    to a cache that grows its layer list lazily) at the first use."""
    if not isinstance(cache, Cache):
        raise layer_class.error(f"cache must be a transformers Cache (e.g. sal_hf.SparseAttentionCache), got "
                                f"{type(cache).__name__}")
    layers = cache.layers
    if layer_idx == len(layers):
        layers.append(layer_class())
    elif layer_idx > len(layers):
        raise layer_class.error(f"cache has {len(layers)} layers; layer {layer_idx} cannot be its next one")
    current = layers[layer_idx]
    if isinstance(current, layer_class):
        return current
    if isinstance(current, CacheLayerMixin) and not current.is_initialized and not isinstance(current,
                                                                                             SparseCacheLayer):
        fresh = layer_class()
        layers[layer_idx] = fresh
        return fresh
    raise layer_class.error(f"cache layer {layer_idx} is a {type(current).__name__} already in use; a swapped "
                            f"{layer_class.kind} layer needs an empty cache (or sal_hf.SparseAttentionCache)")
