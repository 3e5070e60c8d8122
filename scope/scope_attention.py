"""ScopeAttention: q/k/v/o projections, RoPE, spectral bias and pointer block mask on FlexAttention.

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

Eager vs compiled. Eager ``flex_attention`` evaluates mask_mod on every score and ignores block
lists, so outside torch.compile the mask is applied through ``exact_mask_mod`` (token-level block
membership); under torch.compile the BlockMask's block lists drive the sparse kernel. Both compute
the same function; the eager form is the CPU reference.

Kernels. ``config.backend`` picks the prefill attention: FlexAttention ("flex"), or the block-sparse
Triton kernels of scope.block_sparse_attention ("triton": bias_impl qk_aug or none, no documents;
they split qk_aug's 128 + 2K head dim into two dots where Flex pays for 256), or "auto" (triton when
the call allows it, flex otherwise; the reason is logged once).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nsa.attention_core import accumulation_dtype
from nsa.dispatch import choose_backend
from nsa.rope import apply_rope
from scope.block_sparse_attention import block_sparse_attention
from scope.config import ScopeConfig
from scope.errors import ScopeInputError
from scope.pointer_mask import (
    PointerMask,
    build_pointer_block_mask,
    exact_mask_mod,
    sliding_window_block_mask,
)
from scope.spectral_bias import BiasCoefficients, SpectralBias


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
    per-row pointer parameters (D*, budget logits) the block representatives are taken from."""

    def __init__(self, config: ScopeConfig, batch_size: int, capacity: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if batch_size < 1 or capacity < 1:
            raise ScopeInputError(f"batch_size and capacity must be >= 1, got {batch_size}, {capacity}")
        self.config, self.batch_size, self.capacity = config, batch_size, capacity
        self.device, self.dtype = torch.device(device or "cpu"), dtype
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

    forward(x) runs whole sequences (T a multiple of config.block); forward(x, cache=...) prefills an
    empty cache or appends tokens one at a time with the same mask rule and bias (decode).
    ``doc_ids`` [B, T] (or [T]) restricts attention to each token's document (prefill only).
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
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.hidden_size:
            raise ScopeInputError(f"x must be [B, T, hidden_size={c.hidden_size}], got shape {tuple(x.shape)}")
        if cache is not None:
            if doc_ids is not None or return_aux:
                raise ScopeInputError("doc_ids and return_aux are not supported with a decode cache")
            return self._append(x, cache, step)
        y, aux, _, _ = self._prefill(x, doc_ids, step, generator)
        return (y, aux) if return_aux else y

    def _prefill(self, x: Tensor, doc_ids: Tensor | None, step: int | None, generator: torch.Generator | None
                 ) -> tuple[Tensor, ScopeAux, Tensor, Tensor]:
        """Whole sequences: -> (y, aux, rotated k, v) (k and v are what a decode cache stores)."""
        c = self.config
        seq_len = x.shape[1]
        if seq_len % c.block != 0:
            raise ScopeInputError(f"sequence length T={seq_len} must be a multiple of block={c.block}")
        q, k, v, q_content = self._project(x, torch.arange(seq_len, device=x.device))
        coeffs = self.spectral.coefficients(q_content, step)
        num_blocks = seq_len // c.block
        d_blk, u_blk = (representative_rows(values, num_blocks, c.block, c.representative)
                        for values in (coeffs.params.d_star, coeffs.params.budget_logits))
        backend = self.attention_backend(q, doc_ids)
        mask = self._pointer_mask(d_blk, u_blk, seq_len, doc_ids, generator, backend)
        out = self._attend(q, k, v, coeffs, mask, doc_ids, backend)
        y = self.o_proj(out.transpose(1, 2).flatten(2))
        return y, ScopeAux(coeffs, mask, d_blk, u_blk), k, v

    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> q, k, v [B, H|H_kv, T, D] (q, k rotated at positions) and q before RoPE (pointer input)."""
        c = self.config
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(batch, seq_len, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(batch, seq_len, c.num_kv_heads, c.head_dim)
        q_rot = apply_rope(q, positions, c.rope_theta).transpose(1, 2)
        k_rot = apply_rope(k, positions, c.rope_theta).transpose(1, 2)
        return q_rot, k_rot, v.transpose(1, 2), q.transpose(1, 2)

    def attention_backend(self, q: Tensor, doc_ids: Tensor | None) -> str:
        """"flex" or "triton" for a prefill of rotated queries q (config.backend, through nsa.dispatch).
        "auto" takes the Triton kernels where the q.k width is not a power of two (qk_aug's 128 + 2K), which
        Flex rounds up (H100, bf16, 128k, fwd+bwd: 54 ms vs Flex's 127 ms), and Flex elsewhere, the path
        its score_mod and document masks need. (At D=128 without the bias the kernels measured 38.2 ms
        against Flex's 39.5 ms, in runs of different commits: too close to switch the default.) float32
        goes the same way: on the H100 the layer's float32 gradients through the kernels equal Flex's to
        1%; its float32 speed was not measured. "triton" runs whenever the kernels can."""
        c = self.config
        obstacles = []
        if c.bias_impl == "score_mod":
            obstacles.append("bias_impl='score_mod' runs in FlexAttention")
        if doc_ids is not None:
            obstacles.append("document masks run in FlexAttention")
        if c.block < 16 or c.block & (c.block - 1):
            obstacles.append(f"block={c.block} is not a power of two >= 16 (the Triton kernels' tile rule)")
        width = self.spectral.qk_width(c.head_dim) if c.bias_impl == "qk_aug" else c.head_dim
        if c.backend == "auto" and width & (width - 1) == 0:
            obstacles.append(f"q.k width {width} is a power of two, which FlexAttention runs unpadded")
        return choose_backend("scope attention", c.backend, (q,), inference_only=False, error=ScopeInputError,
                              extra_obstacles=tuple(obstacles), fallback="flex").name

    def _pointer_mask(self, d_blk: Tensor, u_blk: Tensor, seq_len: int, doc_ids: Tensor | None,
                      generator: torch.Generator | None, backend: str = "flex") -> PointerMask:
        c = self.config
        if not c.pointer_mask:
            return sliding_window_block_mask(seq_len, c.block, c.local_blocks, doc_ids, device=d_blk.device)
        t_rep = causal_representative_positions(seq_len // c.block, c.block, c.representative, d_blk.device)
        return build_pointer_block_mask(
            d_blk, u_blk, seq_len, block=c.block, budget=c.budget, local_blocks=c.local_blocks,
            global_blocks=c.global_blocks, max_radius=c.max_radius, budget_temp=c.budget_temp, t_rep=t_rep,
            doc_ids=doc_ids, gumbel_topk=c.gumbel_topk, generator=generator, training=self.training,
            # Flex's backward needs the q side (the Triton kernels transpose the lists themselves)
            compute_q_blocks=backend == "flex" and (self.training or torch.is_grad_enabled()),
        )

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, coeffs: BiasCoefficients, mask: PointerMask,
                doc_ids: Tensor | None, backend: str = "flex") -> Tensor:
        c = self.config
        seq_len = q.shape[2]
        score_mod, scale = None, self.scale
        if c.bias_impl == "score_mod":
            score_mod = self.spectral.score_mod(coeffs)
        elif c.bias_impl == "qk_aug":
            q, k, v, scale = self.spectral.qk_augment(q, k, v, coeffs, self.scale)
        if backend == "triton":
            lists_shape = (q.shape[0], q.shape[1], seq_len // c.block)  # the sliding window's lists have H = 1
            return block_sparse_attention(
                q, k, v, mask.kv_num_blocks.expand(lists_shape), mask.kv_indices.expand(*lists_shape, -1),
                block=c.block, scale=scale, backend="triton")
        block_mask = mask.block_mask if torch.compiler.is_compiling() else _eager_block_mask(
            mask, seq_len, c.block, doc_ids)
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                             enable_gqa=c.num_heads != c.num_kv_heads)
        assert isinstance(out, Tensor)
        return out[..., : c.head_dim]

    # ---- decode ---------------------------------------------------------------------------------

    def _append(self, x: Tensor, cache: ScopeKVCache, step: int | None) -> Tensor:
        """Prefill an empty cache with a whole-sequence forward, or decode x's tokens one by one."""
        c = self.config
        cache.check_append(x, x.shape[1])
        if cache.length == 0 and x.shape[1] % c.block == 0:
            return self._prefill_into(x, cache, step)
        return torch.cat([self._decode_token(x[:, t : t + 1], cache, step) for t in range(x.shape[1])], dim=1)

    def _prefill_into(self, x: Tensor, cache: ScopeKVCache, step: int | None) -> Tensor:
        seq_len = x.shape[1]
        y, aux, k, v = self._prefill(x, None, step, None)
        cache.k[:, :, :seq_len], cache.v[:, :, :seq_len] = k, v
        cache.d_star[:, :, :seq_len] = aux.coeffs.params.d_star
        cache.budget_logits[:, :, :seq_len] = aux.coeffs.params.budget_logits
        cache.length = seq_len
        return y

    def _decode_token(self, x: Tensor, cache: ScopeKVCache, step: int | None) -> Tensor:
        """One query at position t = cache.length: the same block rule as prefill, dense over its blocks."""
        c = self.config
        t = cache.length
        q, k, v, q_content = self._project(x, torch.tensor([t], device=x.device))
        cache.k[:, :, t : t + 1], cache.v[:, :, t : t + 1] = k, v
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
        acc = cache.acc_dtype
        scores = (q.to(acc) @ keys.to(acc).transpose(-1, -2)) * self.scale  # [B, H, 1, N]
        if c.bias_impl != "none":
            scores = scores + c.beta * self.spectral.bias(coeffs, (t - tokens)[:, :, None, :]).to(acc)
        scores = scores.masked_fill(~valid.expand_as(tokens)[:, :, None, :], float("-inf"))
        out = scores.softmax(dim=-1).to(values.dtype) @ values
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _decode_block_list(self, cache: ScopeKVCache, query_block: int) -> Tensor:
        """KV blocks of `query_block`, built once per block with the prefill rule over blocks 0..qb."""
        if cache._block_lists is not None and cache._block_lists[0] == query_block:
            return cache._block_lists[1]
        c = self.config
        num_blocks = query_block + 1
        rows = num_blocks * c.block
        d_blk, u_blk = (representative_rows(values[:, :, :rows], num_blocks, c.block, c.representative)
                        for values in (cache.d_star, cache.budget_logits))
        mask = self._pointer_mask(d_blk, u_blk, num_blocks * c.block, None, None)
        lists = mask.kv_indices[:, :, query_block]
        cache._block_lists = (query_block, lists)
        return lists


def _eager_block_mask(mask: PointerMask, seq_len: int, block: int, doc_ids: Tensor | None) -> BlockMask:
    """A BlockMask whose mask_mod carries the block lists at token level (eager flex ignores the lists).
    Keeps the builder's q-side lists when it made them: the backward refuses a mask without them."""
    exact = exact_mask_mod(mask, block, doc_ids)
    built = mask.block_mask
    if built.q_indices is not None:
        return BlockMask(
            seq_lengths=(seq_len, seq_len), kv_num_blocks=built.kv_num_blocks, kv_indices=built.kv_indices,
            full_kv_num_blocks=built.full_kv_num_blocks, full_kv_indices=built.full_kv_indices,
            q_num_blocks=built.q_num_blocks, q_indices=built.q_indices, full_q_num_blocks=built.full_q_num_blocks,
            full_q_indices=built.full_q_indices, BLOCK_SIZE=(block, block), mask_mod=exact,
        )
    return BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices.clamp_min(0), BLOCK_SIZE=block,
        mask_mod=exact, seq_lengths=(seq_len, seq_len), compute_q_blocks=False,
    )
