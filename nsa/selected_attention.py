"""Selection branch: each query attends the raw tokens of its group's selected blocks."""

from __future__ import annotations

import torch

from nsa.attention_core import attend_gathered_keys, budget_chunk_size, query_chunks
from nsa.block_index import selection_token_index
from nsa.validation import (
    check_attention_inputs,
    check_block_indices,
    check_positive_int,
    check_same_length,
    check_scale,
)


def gather_tokens(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D], tokens [B, C, H, K] -> x at those token ids per head: [B, C, H, K, D]."""
    batch, num_heads = x.shape[0], x.shape[2]
    by_head = x.transpose(1, 2)  # [B, H, T, D]
    b = torch.arange(batch, device=x.device).view(batch, 1, 1, 1)
    h = torch.arange(num_heads, device=x.device).view(1, 1, num_heads, 1)
    return by_head[b, h, tokens]


def selected_attention_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, positions: torch.Tensor,
    block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries at positions [B|1, C] with block_indices [B, C, Hkv, S] over raw k, v [B, >=T, Hkv, D].

    Returns (o [B, C, HQ, Dv], valid [B, C, Hkv, S*l']): valid marks the tokens actually read.
    """
    tokens, valid = selection_token_index(block_indices, positions, block_size)
    return attend_gathered_keys(q, gather_tokens(k, tokens), gather_tokens(v, tokens), valid, scale), valid


def selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, block_size: int,
    scale: float | None = None, *, check_indices: bool = True,
) -> torch.Tensor:
    """Block-sparse attention over selected blocks (NSA selection branch).

    Layout: q [B, T, HQ, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv],
    block_indices [B, T, Hkv, S] (int, -1 = unused slot) -> o [B, T, HQ, Dv].
    Query t of head h attends the tokens of blocks block_indices[b, t, h // G] (block j covers
    [j*l', (j+1)*l')) that lie at positions <= t. A row with no valid token gives o = 0.
    Non-finite inputs (nsa.nonfinite): o is NaN in the rows whose q is non-finite or whose group's
    selected tokens (<= t) include a non-finite k / v vector; every other row is unaffected.
    check_indices validates range, causality and uniqueness of the indices (one host sync); pass
    False only for indices the library built itself.
    """
    seq_len, num_heads, num_kv_heads = check_attention_inputs(q, k, v)
    check_same_length("k", k, seq_len)
    check_positive_int("block_size", block_size)
    check_scale(scale)
    check_block_indices(block_indices, q, num_kv_heads, block_size, validate_values=check_indices)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    keys_per_query = block_indices.shape[-1] * block_size
    chunk = budget_chunk_size(keys_per_query * (num_heads + num_kv_heads * (k.shape[-1] + v.shape[-1])))
    outs = [
        selected_attention_chunk(q[:, s:e], k, v, block_indices[:, s:e], torch.arange(s, e, device=q.device)[None],
                                 block_size, scale)[0]
        for s, e in query_chunks(seq_len, chunk)
    ]
    return torch.cat(outs, dim=1)
