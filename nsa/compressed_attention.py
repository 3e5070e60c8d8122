"""Compression branch: attention of every query over the compressed blocks it can see."""

from __future__ import annotations

from typing import NamedTuple

import torch

from nsa.attention_core import (
    accumulation_dtype,
    attend_shared_keys,
    budget_chunk_size,
    query_chunks,
    shared_key_poison,
    shared_key_probs,
    shared_key_sdpa,
)
from nsa.block_index import compressed_visibility, num_compressed_blocks
from nsa.errors import NSAInputError
from nsa.nonfinite import nonfinite_rows, poison_rows, poison_values
from nsa.validation import check_attention_inputs, check_divides, check_positive_int, check_scale


class CompressedChunk(NamedTuple):
    output: torch.Tensor  # [B, C, HQ, Dv]
    lse: torch.Tensor  # [B, C, HQ], -inf where nothing is visible
    probs: torch.Tensor | None  # [B, Hkv, G, C, num_visible]; None when num_visible = 0
    visible: torch.Tensor  # bool [B|1, C, num_visible]: the blocks each query read


def compressed_attention_chunk(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, positions: torch.Tensor, num_visible: int,
    block_size: int, block_stride: int, scale: float, *, differentiable_lse: bool = True,
) -> CompressedChunk:
    """Queries at absolute `positions` [B|1, C] over the first num_visible compressed blocks.

    num_visible is a host-side bound (num_cmp of the largest position + 1): only those blocks are
    read; the visibility mask handles smaller positions. differentiable_lse=False (the layer, whose selection
    reads lse and probs without gradient): the output comes from scaled_dot_product_attention and lse / probs
    from a pass without autograd, so no score tensor is kept for the backward.
    """
    batch, chunk, num_heads, _ = q.shape
    visible = compressed_visibility(positions, num_visible, block_size, block_stride)
    if num_visible == 0:  # zero output, lse = -inf; NaN only where q itself is non-finite (nsa.nonfinite)
        poisoned = nonfinite_rows(q)
        out = poison_rows(q.new_zeros(batch, chunk, num_heads, v_cmp.shape[-1]), poisoned)
        lse = torch.full((batch, chunk, num_heads), float("-inf"), device=q.device,
                         dtype=accumulation_dtype(q.dtype))
        return CompressedChunk(out, poison_values(lse, poisoned), None, visible)
    k_cmp, v_cmp = k_cmp[:, :num_visible], v_cmp[:, :num_visible]
    if differentiable_lse:
        return CompressedChunk(*attend_shared_keys(q, k_cmp, v_cmp, visible, scale), visible)
    poisoned = shared_key_poison(q, k_cmp, v_cmp, visible)
    out = poison_rows(shared_key_sdpa(q, k_cmp, v_cmp, visible, scale), poisoned)
    with torch.no_grad():
        probs, lse = shared_key_probs(q, k_cmp, visible, scale)
    return CompressedChunk(out, poison_values(lse, poisoned), probs, visible)


def check_compressed_inputs(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int, block_stride: int,
    scale: float | None, *, packed: bool = False,
) -> int:
    """Validate the compression-branch arguments; return T. packed: k_cmp holds several sequences' blocks
    (its count is checked against cu_seqlens instead, by nsa.functional.check_cu_seqlens)."""
    seq_len, _, _ = check_attention_inputs(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp")
    check_positive_int("block_size", block_size)
    check_positive_int("block_stride", block_stride)
    check_divides("block_stride", block_stride, "block_size", block_size)
    check_scale(scale)
    expected = num_compressed_blocks(seq_len, block_size, block_stride)
    if not packed and k_cmp.shape[1] != expected:
        raise NSAInputError(
            f"k_cmp has {k_cmp.shape[1]} blocks but T={seq_len}, block_size={block_size}, "
            f"block_stride={block_stride} give num_cmp(T) = {expected}"
        )
    return seq_len


def compressed_chunk_size(q: torch.Tensor, k_cmp: torch.Tensor) -> int:
    """Queries per chunk over the compressed keys: each query holds its heads' scores and probabilities against
    every block (compressed_attention, and select_blocks, which scores the same blocks again)."""
    return budget_chunk_size(q.shape[2] * max(1, k_cmp.shape[1]) * 2, q.shape[0])


def compressed_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int, block_stride: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over compressed blocks (NSA compression branch).

    Layout: q [B, T, HQ, Dk]; k_cmp [B, N, Hkv, Dk], v_cmp [B, N, Hkv, Dv] with
    N = num_compressed_blocks(T, l, d); block i pools raw tokens [i*d, i*d + l).
    Causality: query t sees block i iff i*d + l - 1 <= t; a query that sees none gets o = 0.
    Returns (o [B, T, HQ, Dv], lse [B, T, HQ]): lse is the log-sum-exp of the scaled scores that
    selection reuses (Eq. 8), float32 (float64 for float64 inputs), -inf where nothing is visible.
    Non-finite inputs (nsa.nonfinite): o and lse are NaN in the rows whose q is non-finite or that
    see a block with a non-finite k_cmp / v_cmp vector of their group; every other row is exactly
    what it would be with those entries finite.
    """
    seq_len = check_compressed_inputs(q, k_cmp, v_cmp, block_size, block_stride, scale)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    chunk = compressed_chunk_size(q, k_cmp)
    outs, lses = [], []
    for start, end in query_chunks(seq_len, chunk):
        positions = torch.arange(start, end, device=q.device)[None]
        num_visible = num_compressed_blocks(end, block_size, block_stride)
        result = compressed_attention_chunk(
            q[:, start:end], k_cmp, v_cmp, positions, num_visible, block_size, block_stride, scale
        )
        outs.append(result.output)
        lses.append(result.lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
