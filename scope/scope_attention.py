"""ScopeAttention: q/k/v/o projections, RoPE, the pointer head and mask, and SCOPE attention (scope.functional).

Layouts: x [B, T, hidden] at the module edge; q/k/v [B, H, T, D] inside (FlexAttention's layout),
H query heads and H_kv key/value heads (GQA, query head h reads kv head h // G).

Causal representative. The pointer mask is chosen per query block from one representative row of
pointer parameters. SCOPE.md names "the block's last token" (or the block mean); taken literally,
the keys an early query of a block may read would depend on later tokens of its own block, and a
decoder could not reproduce the prefill mask. Here the representative of query block qb is the
*previous* block: its last token (representative="last", position qb*block - 1) or the mean of its
rows ("mean"). Every query of block qb has seen it, so prefill is causal and decode applies exactly
the same rule. Block 0 uses row 0 (its pointers can only reach block 0 anyway).

The pointer head reads q before RoPE (content, not position); the bias is a function of the
distance i - j alone.

The attention itself is scope.functional.scope_attention (the op; its docstring states the layout, the
causal alignment and the backends, chosen by nsa.dispatch with the reason logged once). The layer's public
steps are ``project`` (projections and RoPE), ``attend`` (pointer head, representatives, mask, the op) and
``pointer_mask``; forward is project -> attend -> o_proj.

Non-finite inputs (nsa.nonfinite). x is sanitized at entry (its NaN / inf entries replaced by 0, so no
parameter gradient turns non-finite); the output rows that read a non-finite token are NaN: the token's own
row and the rows whose listed key blocks hold it at a position <= the row (in their document). Every other
row, and the gradients of the rows before a non-finite token, equal the run without it. The decode cache
keeps a non-finite token's k / v as NaN, so later decode steps that read it are NaN too, as in prefill.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from nsa.dispatch import accumulation_dtype
from nsa.nonfinite import finite_or_zero, finite_or_zero_under_poison, nonfinite_rows, poison_rows
from nsa.rope import apply_rope
from nsa.validation import FLOAT_DTYPES, check_device, check_layer_input, check_positive_int
from scope.block_sparse_attention import rows_that_read
from scope.config import ScopeConfig, check_step
from scope.errors import ScopeInputError
from scope.functional import scope_attention, scope_attention_backend
from scope.pointer_mask import (
    PointerMask,
    build_pointer_block_mask,
    document_starts,
    sliding_window_block_mask,
)
from scope.spectral_bias import BiasCoefficients, SpectralBias


class ScopeProjection(NamedTuple):
    """ScopeAttention.project's result."""

    q: Tensor  # [B, H, T, D], rotated
    k: Tensor  # [B, H_kv, T, D], rotated
    v: Tensor  # [B, H_kv, T, D]
    q_content: Tensor  # [B, H, T, D], q before RoPE (the pointer head's input)


class ScopeAux(NamedTuple):
    coeffs: BiasCoefficients  # per-row bias coefficients and pointer parameters
    pointer_mask: PointerMask
    block_d_star: Tensor  # [B, H, QB, M] representative D* per query block (tokens)
    block_budget_logits: Tensor  # [B, H, QB, M]


def causal_representative_positions(num_blocks: int, block: int, kind: str, device: torch.device) -> Tensor:
    """float64 [QB]: the causal representative position of each query block (previous block's last
    token, or its mean position); negative for block 0, whose centres clamp to block 0."""
    start = torch.arange(num_blocks, dtype=torch.float64, device=device) * block
    return start - 1 if kind == "last" else start - (block + 1) / 2


def representative_rows(values: Tensor, num_blocks: int, block: int, kind: str) -> Tensor:
    """Per-row values [B, H, >= (num_blocks-1)*block, ...] -> one row per query block [B, H, num_blocks, ...]
    taken at the block's causal representative (see the module docstring); block 0 takes row 0."""
    first = values[:, :, :1]
    if num_blocks == 1:
        return first
    previous = values[:, :, : (num_blocks - 1) * block].unflatten(2, (num_blocks - 1, block))
    later = previous[:, :, :, -1] if kind == "last" else previous.mean(dim=3)
    return torch.cat((first, later), dim=2)


class ScopeKVCache:
    """Decode state of one ScopeAttention layer: rotated keys and values [B, H_kv, capacity, D] and the
    per-row pointer parameters (D*, budget logits) the block representatives are taken from.

    config: a ScopeConfig; batch_size, capacity: ints >= 1 (not bools); device: a torch.device or a string
    this build and machine have; dtype: a floating dtype (fp16 / bf16 / fp32 / fp64). ScopeInputError naming
    the argument otherwise. ScopeAttention runs every check of an append before its first write: a refused
    append leaves the cache as it was.
    """

    def __init__(self, config: ScopeConfig, batch_size: int, capacity: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(config, ScopeConfig):
            raise ScopeInputError(f"config must be a ScopeConfig, got {type(config).__name__}")
        check_positive_int("batch_size", batch_size, error=ScopeInputError)
        check_positive_int("capacity", capacity, error=ScopeInputError)
        if dtype not in FLOAT_DTYPES:
            raise ScopeInputError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        self.config, self.batch_size, self.capacity = config, batch_size, capacity
        self.device = check_device("device", "cpu" if device is None else device, error=ScopeInputError)
        self.dtype = dtype
        rows = -(-capacity // config.block) * config.block
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)
        pointer_shape = (batch_size, config.num_heads, rows, config.num_pointers)
        self.acc_dtype = accumulation_dtype(dtype)  # pointer parameters and scores: fp32, fp64 for fp64
        self.d_star = torch.zeros(pointer_shape, device=self.device, dtype=self.acc_dtype)
        self.budget_logits = torch.zeros(pointer_shape, device=self.device, dtype=self.acc_dtype)
        self.length = 0
        self._block_lists: tuple[int, Tensor] | None = None  # (query block, kv block list [B|1, H|1, W])

    def check_append(self, x: Tensor, num_tokens: int) -> None:
        """ScopeInputError unless x [B, T, ...] fits: the cache's batch, dtype and device, and room for
        num_tokens more tokens. Changes nothing."""
        if x.shape[0] != self.batch_size:
            raise ScopeInputError(f"x has batch {x.shape[0]} but the cache holds {self.batch_size} sequences")
        if x.dtype != self.dtype or x.device != self.device:
            raise ScopeInputError(f"x is {x.dtype} on {x.device} but the cache is {self.dtype} on {self.device}")
        if self.length + num_tokens > self.capacity:
            raise ScopeInputError(
                f"appending {num_tokens} tokens to {self.length} would pass the cache capacity {self.capacity}"
            )


class ScopeAttention(nn.Module):
    """SCOPE attention layer: x [B, T, hidden] -> y [B, T, hidden], causal.

    forward(x) runs whole sequences (T a positive multiple of config.block); forward(x, cache=...) prefills
    an empty cache or appends tokens one at a time with the same mask rule and bias (decode).
    ``doc_ids`` [B, T] (or [T]) restricts attention to each token's document (prefill only).
    x must be a floating tensor [B, T, hidden_size] with the parameters' device and dtype (any float dtype
    under torch.autocast), step None or an int >= 0; ScopeInputError naming the argument otherwise.
    With a cache, the cache must have been built for this layer's config (ScopeInputError naming the
    fields that differ) and every check runs before the first write: a call that raises leaves the cache
    as it was. An empty append (T = 0, as NSAAttention) returns an empty y [B, 0, hidden] and leaves the
    cache unchanged; without a cache T = 0 is a ScopeInputError (a prefill needs whole blocks).
    """

    def __init__(self, config: ScopeConfig) -> None:
        super().__init__()
        self.config = c = config
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.spectral = SpectralBias(config)
        self.scale = c.head_dim**-0.5

    def new_cache(self, batch_size: int, capacity: int) -> ScopeKVCache:
        weight = self.q_proj.weight
        return ScopeKVCache(self.config, batch_size, capacity, device=weight.device, dtype=weight.dtype)

    def forward(
        self, x: Tensor, *, doc_ids: Tensor | None = None, step: int | None = None,
        generator: torch.Generator | None = None, cache: ScopeKVCache | None = None, return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, ScopeAux]:
        self.check_input(x)
        check_step(step)
        if cache is not None:
            if doc_ids is not None or return_aux:
                raise ScopeInputError("doc_ids and return_aux are not supported with a decode cache")
            return self._append(x, cache, step)
        y, aux, _, _ = self._prefill(x, doc_ids, step, generator)
        return (y, aux) if return_aux else y

    def check_input(self, x: Tensor) -> None:
        """ScopeInputError unless x is a floating [B, T, hidden_size] tensor with the parameters' device and
        dtype (under autocast any floating dtype: nsa.validation.check_layer_input)."""
        check_layer_input(x, self.config.hidden_size, self.q_proj.weight, error=ScopeInputError)

    def _prefill(self, x: Tensor, doc_ids: Tensor | None, step: int | None, generator: torch.Generator | None
                 ) -> tuple[Tensor, ScopeAux, ScopeProjection, Tensor]:
        """Whole sequences: -> (y, aux, the projections of finite_or_zero(x), bool [B, T]: x's non-finite
        tokens)."""
        c = self.config
        seq_len = x.shape[1]
        if seq_len % c.block != 0:
            raise ScopeInputError(f"sequence length T={seq_len} must be a multiple of block={c.block}")
        bad = nonfinite_rows(x)  # [B, T]
        proj = self.project(finite_or_zero(x), None)
        out, aux = self.attend(*proj, doc_ids=doc_ids, step=step, generator=generator)
        mask = aux.pointer_mask
        reads_bad = rows_that_read(bad[:, None], mask.kv_num_blocks, mask.kv_indices, block=c.block,
                                   num_heads=c.num_heads, doc_start=document_starts(doc_ids, seq_len, x.shape[0]))
        out = out.transpose(1, 2).flatten(2)  # [B, T, H * D]
        poisoned = bad | reads_bad.any(1) | nonfinite_rows(out)  # the last: q / k / v that overflowed
        # o_proj mixes no tokens and every row of out holding a non-finite entry is poisoned in y, so the
        # gradient reaching those entries is exactly 0 without finite_or_zero's backward mask (two passes)
        (out,) = finite_or_zero_under_poison(out)
        y = poison_rows(self.o_proj(out), poisoned)
        return y, aux, proj, bad

    def project(self, x: Tensor, positions: Tensor | None) -> ScopeProjection:
        """x [B, T, hidden] at ``positions`` [T] (None: 0 .. T - 1, whose RoPE tables are kept per size,
        nsa.rope.apply_rope) -> q, k, v [B, H|H_kv, T, D] (q, k rotated) and q before RoPE."""
        c = self.config
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(batch, seq_len, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(batch, seq_len, c.num_kv_heads, c.head_dim)
        q_rot = apply_rope(q, positions, c.rope_theta).transpose(1, 2)
        k_rot = apply_rope(k, positions, c.rope_theta).transpose(1, 2)
        return ScopeProjection(q_rot, k_rot, v.transpose(1, 2), q.transpose(1, 2))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_content: Tensor, *, doc_ids: Tensor | None = None,
               step: int | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, ScopeAux]:
        """The layer between ``project`` and o_proj (prefill, T a multiple of config.block): the pointer head's
        bias coefficients, the block representatives, the pointer mask, then scope.functional.scope_attention.
        q, k, v, q_content as ``project`` returns them -> (out [B, H, T, D], aux)."""
        c = self.config
        seq_len = q.shape[2]
        coeffs = self.spectral.coefficients(q_content, step)
        num_blocks = seq_len // c.block
        d_blk, u_blk = (representative_rows(values, num_blocks, c.block, c.representative)
                        for values in (coeffs.params.d_star, coeffs.params.budget_logits))
        bias = None if c.bias_impl == "none" else self.spectral.terms(coeffs)
        bias_impl = "qk_aug" if c.bias_impl == "qk_aug" else "score_mod"  # none: bias is None
        backend = scope_attention_backend(q, k, v, block=c.block, bias=bias, bias_impl=bias_impl,
                                          qk_align=c.qk_align, doc_ids=doc_ids, backend=c.backend).name
        mask = self.pointer_mask(d_blk, u_blk, seq_len, doc_ids=doc_ids, generator=generator,
                                 q_side=backend == "flex" and (self.training or torch.is_grad_enabled()))
        out = scope_attention(q, k, v, mask, block=c.block, bias=bias, bias_impl=bias_impl, scale=self.scale,
                              qk_align=c.qk_align, doc_ids=doc_ids, backend=c.backend,  # the same choice
                              check_lists=False)  # the builder's lists: no host sync on the hot path
        return out, ScopeAux(coeffs, mask, d_blk, u_blk)

    def pointer_mask(self, d_blk: Tensor, u_blk: Tensor, seq_len: int, *, doc_ids: Tensor | None = None,
                     generator: torch.Generator | None = None, q_side: bool = False) -> PointerMask:
        """The block lists of a prefill of ``seq_len`` tokens from block-level D* and budget logits
        [B, H, QB, M] (``representative_rows`` of the pointer parameters): the pointer mask, or the sliding
        window when config.pointer_mask is off. ``q_side``: also the q-side lists FlexAttention's backward reads."""
        c = self.config
        if not c.pointer_mask:
            return sliding_window_block_mask(seq_len, c.block, c.local_blocks, doc_ids, device=d_blk.device,
                                             compute_q_blocks=q_side)
        t_rep = causal_representative_positions(seq_len // c.block, c.block, c.representative, d_blk.device)
        return build_pointer_block_mask(
            d_blk, u_blk, seq_len, block=c.block, budget=c.budget, local_blocks=c.local_blocks,
            global_blocks=c.global_blocks, max_radius=c.max_radius, budget_temp=c.budget_temp, t_rep=t_rep,
            doc_ids=doc_ids, gumbel_topk=c.gumbel_topk, generator=generator, training=self.training,
            compute_q_blocks=q_side,
        )

    # ---- decode ---------------------------------------------------------------------------------

    def _append(self, x: Tensor, cache: ScopeKVCache, step: int | None) -> Tensor:
        """Prefill an empty cache with a whole-sequence forward, or decode x's tokens one by one. x and step
        are checked (forward); every check of the cache runs here, before anything is written."""
        c = self.config
        self._check_cache(cache)
        cache.check_append(x, x.shape[1])
        if x.shape[1] == 0:  # o_proj of nothing: y still reaches the parameters' autograd graph, as NSA's
            return self.o_proj(x.new_zeros(x.shape[0], 0, c.num_heads * c.head_dim))
        if cache.length == 0 and x.shape[1] % c.block == 0:
            return self._prefill_into(x, cache, step)
        return torch.cat([self._decode_token(x[:, t : t + 1], cache, step) for t in range(x.shape[1])], dim=1)

    def _check_cache(self, cache: ScopeKVCache) -> None:
        """ScopeInputError unless cache is a ScopeKVCache built for this layer's config (its buffers' layout
        follows block, the head counts and sizes, and the pointer count)."""
        if not isinstance(cache, ScopeKVCache):
            raise ScopeInputError(f"cache must be a ScopeKVCache, got {type(cache).__name__}")
        if cache.config != self.config:
            ours, theirs = self.config.to_dict(), cache.config.to_dict()
            differ = ", ".join(f"{k}={theirs[k]!r} (layer: {ours[k]!r})" for k in ours if ours[k] != theirs[k])
            raise ScopeInputError(f"cache was built for a different ScopeConfig than this layer's: {differ}")

    def _prefill_into(self, x: Tensor, cache: ScopeKVCache, step: int | None) -> Tensor:
        seq_len = x.shape[1]
        y, aux, proj, bad = self._prefill(x, None, step, None)
        # NaN at x's non-finite tokens, so that the decode steps reading them are NaN too (only a cache pays for it)
        cache.k[:, :, :seq_len] = poison_rows(proj.k, bad[:, None])
        cache.v[:, :, :seq_len] = poison_rows(proj.v, bad[:, None])
        cache.d_star[:, :, :seq_len] = aux.coeffs.params.d_star
        cache.budget_logits[:, :, :seq_len] = aux.coeffs.params.budget_logits
        cache.length = seq_len
        return y

    def _decode_token(self, x: Tensor, cache: ScopeKVCache, step: int | None) -> Tensor:
        """One query at position t = cache.length: the same block rule as prefill, dense over its blocks."""
        c = self.config
        t = cache.length
        bad = nonfinite_rows(x)  # [B, 1]
        q, k, v, q_content = self.project(finite_or_zero(x), torch.tensor([t], device=x.device))
        cache.k[:, :, t : t + 1], cache.v[:, :, t : t + 1] = poison_rows(k, bad[:, None]), poison_rows(v, bad[:, None])
        coeffs = self.spectral.coefficients(q_content, step)
        cache.d_star[:, :, t : t + 1] = coeffs.params.d_star
        cache.budget_logits[:, :, t : t + 1] = coeffs.params.budget_logits
        cache.length = t + 1
        blocks = self._decode_block_list(cache, t // c.block)  # [B|1, H|1, W], -1 padded
        tokens = (blocks[..., None].long() * c.block + torch.arange(c.block, device=x.device)).flatten(-2)
        valid = (blocks[..., None] >= 0).expand(*blocks.shape, c.block).flatten(-2) & (tokens <= t)
        tokens = torch.where(valid, tokens, 0).expand(x.shape[0], c.num_heads, -1)
        kv_head = torch.arange(c.num_heads, device=x.device) // (c.num_heads // c.num_kv_heads)
        keys = cache.k[:, kv_head].gather(2, tokens[..., None].expand(-1, -1, -1, c.head_dim))
        values = cache.v[:, kv_head].gather(2, tokens[..., None].expand(-1, -1, -1, c.head_dim))
        reads_bad = ((nonfinite_rows(keys) | nonfinite_rows(values)) & valid).any(-1)  # [B, H]
        keys, values = finite_or_zero(keys), finite_or_zero(values)
        acc = cache.acc_dtype
        scores = (q.to(acc) @ keys.to(acc).transpose(-1, -2)) * self.scale  # [B, H, 1, N]
        if c.bias_impl != "none":
            scores = scores + c.beta * self.spectral.bias(coeffs, (t - tokens)[:, :, None, :]).to(acc)
        scores = scores.masked_fill(~valid.expand_as(tokens)[:, :, None, :], float("-inf"))
        out = scores.softmax(dim=-1).to(values.dtype) @ values
        y = self.o_proj(out.transpose(1, 2).flatten(2))  # [B, 1, hidden]
        return poison_rows(y, bad | reads_bad.any(-1, keepdim=True))

    def _decode_block_list(self, cache: ScopeKVCache, query_block: int) -> Tensor:
        """KV blocks of `query_block`, built once per block with the prefill rule over blocks 0..qb."""
        if cache._block_lists is not None and cache._block_lists[0] == query_block:
            return cache._block_lists[1]
        c = self.config
        num_blocks = query_block + 1
        rows = num_blocks * c.block
        d_blk, u_blk = (representative_rows(values[:, :, :rows], num_blocks, c.block, c.representative)
                        for values in (cache.d_star, cache.budget_logits))
        mask = self.pointer_mask(d_blk, u_blk, num_blocks * c.block)
        lists = mask.kv_indices[:, :, query_block]
        cache._block_lists = (query_block, lists)
        return lists

