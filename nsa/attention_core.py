"""Masked-softmax attention over a small key set, with GQA, shared by the torch paths' branches.

Rows whose mask is empty produce a zero output and lse = -inf (never NaN, in value or gradient).
Scores and softmax run in float32 for half inputs (float64 stays float64). The layer's branches attend through
torch's scaled_dot_product_attention under their masks (``attend``, ``attend_gathered_keys``): one fused kernel
that keeps no score tensor for the backward. The compression branch's probabilities, which the selection reads
(Eq. 8), come from ``shared_key_probs`` without autograd; ``attend_shared_keys`` (explicit einsum and masked
softmax, with a differentiable lse) serves the public compressed_attention.

Non-finite inputs (nsa.nonfinite): both attend functions read q, k and v with NaN / inf replaced by
0 and return NaN (output and lse) in exactly the rows whose own q is non-finite or whose mask
selects a non-finite key or value vector of their group. Every branch, in prefill, in chunked
prefill through the cache and in the decode reference, attends through these two functions, so
this is where the torch paths flag their rows, with the mask they attend with.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nsa.nonfinite import finite_or_zero, kv_nonfinite, nonfinite_rows, per_query_head, poison_rows, poison_values

# Elements of the per-chunk score/gather tensors the reference path allows itself; bounds peak
# memory at a few hundred MB whatever T is.
CHUNK_ELEMENT_BUDGET = 1 << 24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of scores [..., K] over entries where mask is True; returns (probs, lse [...]).

    The row maximum is taken over the masked-filled scores: in any non-empty row it belongs to a
    valid entry, so the shifted sum is >= 1 there and exactly 0 in empty rows, which makes
    clamp_min(1) an exact guard (a tiny clamp would blow up the gradient of empty rows).
    """
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    row_max = filled.amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(filled - row_max) * mask
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / total.clamp_min(1.0)
    lse = torch.where(total > 0, row_max + torch.log(total.clamp_min(1.0)), float("-inf"))
    return probs, lse.squeeze(-1)


def attend_shared_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries of a chunk against one key set.

    q [B, C, HQ, Dk], k [B, K, Hkv, Dk], v [B, K, Hkv, Dv], mask bool [B|1, C, K] (True = attend; every
    group alike) or [B|1, C, Hkv, K] (a mask per KV head, as the selection's).
    Returns o [B, C, HQ, Dv] (q's dtype), lse [B, C, HQ] and probs [B, Hkv, G, C, K] (accumulation dtype);
    o and lse are NaN in the rows that see a non-finite input, probs are always finite.
    """
    poisoned = shared_key_poison(q, k, v, mask)
    probs, lse = shared_key_probs(q, k, mask, scale)
    out = torch.einsum("bhgck,bkhd->bchgd", probs, finite_or_zero(v).to(probs.dtype))
    return poison_rows(out.flatten(2, 3).to(q.dtype), poisoned), poison_values(lse, poisoned), probs


def shared_key_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_shared_keys' probabilities [B, Hkv, G, C, K] and lse [B, C, HQ] (not poisoned), in the
    accumulation dtype."""
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qg = finite_or_zero(q).to(acc).unflatten(2, (num_kv_heads, num_heads // num_kv_heads))
    scores = torch.einsum("bchgd,bkhd->bhgck", qg, finite_or_zero(k).to(acc)) * scale
    probs, lse = masked_softmax(scores, _by_head(mask).permute(0, 2, 1, 3)[:, :, None])
    return probs, lse.permute(0, 3, 1, 2).flatten(2)


def shared_key_poison(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """bool [B, C, HQ]: the rows of attend_shared_keys / attend that see a non-finite input."""
    reads_nonfinite = (_by_head(mask) & kv_nonfinite(k, v).transpose(1, 2)[:, None]).any(dim=-1)  # [B, C, Hkv]
    return nonfinite_rows(q) | per_query_head(reads_nonfinite, q.shape[2])


def _by_head(mask: torch.Tensor) -> torch.Tensor:
    """A shared-keys mask as [B|1, C, Hkv|1, K]."""
    return mask[:, :, None] if mask.dim() == 3 else mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """attend_shared_keys' output alone (the same arguments, the same non-finite rows), on
    scaled_dot_product_attention."""
    return poison_rows(shared_key_sdpa(q, k, v, mask, scale), shared_key_poison(q, k, v, mask))


def shared_key_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                    ) -> torch.Tensor:
    """attend's output before its non-finite rows are poisoned: [B, C, HQ, Dv] in q's dtype."""
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    by_head = _by_head(mask)
    head_mask = by_head.repeat_interleave(num_heads // num_kv_heads, dim=2) if by_head.shape[2] > 1 else by_head
    acc = accumulation_dtype(q.dtype)
    q_t, k_t, v_t = (finite_or_zero(x).to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, C|K, D]
    out = masked_sdpa(q_t, k_t, v_t, head_mask.transpose(1, 2), scale, enable_gqa=num_heads != num_kv_heads)
    return out.transpose(1, 2).to(q.dtype)


def attend_gathered_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Each query against its own gathered keys.

    q [B, C, HQ, Dk], k [B, C, Hkv, K, Dk], v [B, C, Hkv, K, Dv], mask bool [B, C, Hkv, K].
    Returns o [B, C, HQ, Dv] in q's dtype; all G heads of a group share the group's keys. o is NaN
    in the rows that see a non-finite input.
    """
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    poisoned = nonfinite_rows(q) | per_query_head((mask & kv_nonfinite(k, v)).any(dim=-1), num_heads)
    acc = accumulation_dtype(q.dtype)
    qg = finite_or_zero(q).to(acc).unflatten(2, (num_kv_heads, num_heads // num_kv_heads))  # [B, C, Hkv, G, Dk]
    out = masked_sdpa(qg, finite_or_zero(k).to(acc), finite_or_zero(v).to(acc), mask[:, :, :, None], scale)
    return poison_rows(out.flatten(2, 3).to(q.dtype), poisoned)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                enable_gqa: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention of q [..., L, Dk] over k [..., K, Dk], v [..., K, Dv] where mask (bool,
    broadcastable to [..., L, K]) is True; rows whose mask is empty get o = 0 and zero gradient (SDPA alone would
    return NaN there)."""
    if k.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    has_keys = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_keys, scale=scale, enable_gqa=enable_gqa)
    return torch.where(has_keys, out, 0.0)


def budget_chunk_size(elements_per_query: int, batch: int) -> int:
    """Queries per chunk such that one chunk's score/gather tensors stay within the element budget. A chunk
    holds its queries for every sequence of the batch, so the budget is shared by all of them."""
    return max(1, CHUNK_ELEMENT_BUDGET // max(1, elements_per_query * batch))


def query_chunks(seq_len: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Yield [start, end) query ranges of at most chunk_size queries."""
    for start in range(0, seq_len, chunk_size):
        yield start, min(seq_len, start + chunk_size)
