"""Selection branch: each query attends the raw tokens of its group's selected blocks."""

from __future__ import annotations

import torch

from nsa.attention_core import attend, attend_gathered_keys, budget_chunk_size, query_chunks
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


def selected_token_mask(block_indices: torch.Tensor, positions: torch.Tensor, block_size: int,
                        num_keys: int) -> torch.Tensor:
    """bool [B, C, Hkv, num_keys]: key j is read by the query at positions [B|1, C] of KV head h (its block
    j // l' is among block_indices [B, C, Hkv, S], -1 = unused, and j <= the position)."""
    num_blocks = -(-num_keys // block_size)
    used = (block_indices >= 0) & (block_indices < num_blocks)  # a block past the keys has no token <= position
    slots = torch.where(used, block_indices.long(), num_blocks)  # unused slots: a spare column
    chosen = torch.zeros(*block_indices.shape[:-1], num_blocks + 1, dtype=torch.bool, device=block_indices.device)
    chosen.scatter_(-1, slots, True)
    keys = torch.arange(num_keys, device=block_indices.device)
    return chosen[..., keys // block_size] & (keys <= positions[:, :, None, None])


def masks_whole_prefix(num_keys: int, tokens_per_query: int, group: int, dims: int) -> bool:
    """Whether the selection branch is cheaper as attention over all num_keys keys under the selection's mask
    than over gathered copies of each query's tokens_per_query (S * l') keys: when the keys are few (at most 4x
    the selected tokens: the dense scores' extra work) and the dense scores (num_keys x G per query and KV head)
    hold no more elements than the gathered keys and values (S * l' x (Dk + Dv)), so the memory budget holds."""
    return num_keys <= 4 * tokens_per_query and num_keys * group <= tokens_per_query * dims


def selected_attention_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, positions: torch.Tensor,
    block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries at positions [B|1, C] with block_indices [B, C, Hkv, S] over raw k, v [B, >=T, Hkv, D].

    Returns (o [B, C, HQ, Dv], valid [B, C, Hkv, S*l']): valid marks the tokens actually read. On the CPU,
    short prefixes attend keys 0 .. max(positions) under the selection's mask (``masks_whole_prefix``; the
    gather's backward, an accumulating index_put, was a third of a training step at 128 tokens): the same
    keys and softmax, and a key count set by the positions alone, so a cache's layout (rows, pages) does
    not change a bit of the result. Elsewhere each query's selected keys are gathered.
    """
    tokens, valid = selection_token_index(block_indices, positions, block_size)
    if q.device.type == "cpu":
        # the CPU reads the positions without a device sync; a chunk of padding rows may hold none >= 0
        num_keys = min(k.shape[1], max(1, int(positions.max()) + 1))
        group, dims = q.shape[2] // k.shape[2], k.shape[-1] + v.shape[-1]
        if num_keys > 0 and masks_whole_prefix(num_keys, tokens.shape[-1], group, dims):
            mask = selected_token_mask(block_indices, positions, block_size, num_keys)
            return attend(q, k[:, :num_keys], v[:, :num_keys], mask, scale), valid
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
    chunk = budget_chunk_size(keys_per_query * (num_heads + num_kv_heads * (k.shape[-1] + v.shape[-1])), q.shape[0])
    outs = [
        selected_attention_chunk(q[:, s:e], k, v, block_indices[:, s:e], torch.arange(s, e, device=q.device)[None],
                                 block_size, scale)[0]
        for s, e in query_chunks(seq_len, chunk)
    ]
    return torch.cat(outs, dim=1)
