"""Compression branch: attention of every query over the compressed blocks it can see."""

from __future__ import annotations

import torch

from nsa.attention_core import attend_shared_keys, budget_chunk_size, query_chunks
from nsa.block_index import compressed_visibility, num_compressed_blocks
from nsa.errors import NSAInputError
from nsa.validation import check_attention_inputs, check_divides, check_positive_int, check_scale


def compressed_attention_chunk(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, start: int,
    block_size: int, block_stride: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries at positions [start, start + C) over the compressed blocks visible to the last of them.

    Returns (o [B, C, HQ, Dv], lse [B, C, HQ], probs [B, Hkv, G, C, N_vis] or None when N_vis = 0).
    """
    batch, chunk, num_heads, _ = q.shape
    num_visible = num_compressed_blocks(start + chunk, block_size, block_stride)
    if num_visible == 0:
        out = q.new_zeros(batch, chunk, num_heads, v_cmp.shape[-1])
        lse = torch.full((batch, chunk, num_heads), float("-inf"), device=q.device)
        return out, lse, None
    positions = torch.arange(start, start + chunk, device=q.device)
    mask = compressed_visibility(positions, num_visible, block_size, block_stride)
    return attend_shared_keys(q, k_cmp[:, :num_visible], v_cmp[:, :num_visible], mask[None], scale)


def check_compressed_inputs(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int, block_stride: int,
    scale: float | None,
) -> int:
    """Validate the compression-branch arguments; return T."""
    seq_len, _, _ = check_attention_inputs(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp")
    check_positive_int("block_size", block_size)
    check_positive_int("block_stride", block_stride)
    check_divides("block_stride", block_stride, "block_size", block_size)
    check_scale(scale)
    expected = num_compressed_blocks(seq_len, block_size, block_stride)
    if k_cmp.shape[1] != expected:
        raise NSAInputError(
            f"k_cmp has {k_cmp.shape[1]} blocks but T={seq_len}, block_size={block_size}, "
            f"block_stride={block_stride} give num_cmp(T) = {expected}"
        )
    return seq_len


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
    """
    seq_len = check_compressed_inputs(q, k_cmp, v_cmp, block_size, block_stride, scale)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    chunk = budget_chunk_size(q.shape[2] * max(1, k_cmp.shape[1]) * 2)
    outs, lses = [], []
    for start, end in query_chunks(seq_len, chunk):
        out, lse, _ = compressed_attention_chunk(
            q[:, start:end], k_cmp, v_cmp, start, block_size, block_stride, scale
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
