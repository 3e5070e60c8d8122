"""Sliding-window branch: each query attends its last w keys."""

from __future__ import annotations

import torch

from nsa.attention_core import attend, budget_chunk_size, query_chunks
from nsa.validation import check_attention_inputs, check_positive_int, check_same_length, check_scale


def window_mask(positions: torch.Tensor, key_positions: torch.Tensor, window_size: int) -> torch.Tensor:
    """Bool [B|1, C, K]: query at positions [B|1, C] reads key at key_positions [B|1, K] (-1 = empty slot)."""
    query_pos, key_pos = positions[:, :, None], key_positions[:, None, :]
    return (key_pos >= 0) & (key_pos <= query_pos) & (key_pos > query_pos - window_size)


def sliding_window_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor,
    window_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries at positions [B|1, C] against candidate keys k/v [B, K, Hkv, D] at key_positions [B|1, K].

    Returns (o [B, C, HQ, Dv], mask [B|1, C, K]): the mask marks the keys actually read.
    """
    mask = window_mask(positions, key_positions, window_size)
    return attend(q, k, v, mask, scale), mask


def window_chunk_from_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window_size: int, scale: float
) -> torch.Tensor:
    """Prefill form: queries [start, start + C) of a full sequence against keys [start - w + 1, start + C)."""
    end = start + q.shape[1]
    key_start = max(0, start - window_size + 1)
    positions = torch.arange(start, end, device=q.device)[None]
    key_positions = torch.arange(key_start, end, device=q.device)[None]
    return sliding_window_chunk(q, k[:, key_start:end], v[:, key_start:end], positions, key_positions,
                                window_size, scale)[0]


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float | None = None
) -> torch.Tensor:
    """Causal sliding-window attention (NSA window branch).

    Layout: q [B, T, HQ, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] -> o [B, T, HQ, Dv].
    Query t attends keys max(0, t - w + 1) .. t (w = window_size, the query's own key included).
    Non-finite inputs (nsa.nonfinite): o is NaN in the rows whose q is non-finite or whose window
    holds a non-finite k / v vector of their group; every other row is unaffected.
    """
    seq_len, num_heads, _ = check_attention_inputs(q, k, v)
    check_same_length("k", k, seq_len)
    check_positive_int("window_size", window_size)
    check_scale(scale)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    # A chunk of C <= w queries reads at most 2w keys, so its scores stay O(C * w).
    chunk = min(window_size, budget_chunk_size(num_heads * 4 * window_size, q.shape[0]))
    outs = [
        window_chunk_from_sequence(q[:, start:end], k, v, start, window_size, scale)
        for start, end in query_chunks(seq_len, chunk)
    ]
    return torch.cat(outs, dim=1)
