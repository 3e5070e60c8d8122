"""The whole gated NSA attention given projected inputs, one pass over query chunks."""

from __future__ import annotations

from typing import NamedTuple

import torch

from nsa.attention_core import budget_chunk_size, query_chunks
from nsa.compressed_attention import check_compressed_inputs, compressed_attention_chunk
from nsa.errors import NSAInputError
from nsa.selected_attention import selected_attention_chunk
from nsa.selection_scorer import check_selection_sizes, select_from_group_probs
from nsa.sliding_window import sliding_window_chunk
from nsa.validation import check_attention_inputs, check_gates, check_positive_int, check_same_length


class NSAOutput(NamedTuple):
    output: torch.Tensor  # [B, T, HQ, Dv]
    block_indices: torch.Tensor  # [B, T, Hkv, n], int64, -1 = unused


def check_nsa_inputs(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
    k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int, window_size: int, scale: float | None,
) -> int:
    """Validate every argument of nsa_attention; return T."""
    seq_len = check_compressed_inputs(q, k_cmp, v_cmp, block_size, block_stride, scale)
    for k_name, k, v_name, v in (("k_sel", k_sel, "v_sel", v_sel), ("k_win", k_win, "v_win", v_win)):
        check_attention_inputs(q, k, v, k_name=k_name, v_name=v_name)
        check_same_length(k_name, k, seq_len)
        if k.shape[2] != k_cmp.shape[2]:
            raise NSAInputError(f"{k_name} has H_kv={k.shape[2]} but k_cmp has H_kv={k_cmp.shape[2]}; they must match")
        if v.shape[-1] != v_cmp.shape[-1]:
            raise NSAInputError(f"{v_name} head dim {v.shape[-1]} must equal v_cmp head dim {v_cmp.shape[-1]}")
    check_selection_sizes(block_stride, sel_block_size, num_selected)
    check_positive_int("window_size", window_size)
    check_gates(gates, q)
    return seq_len


def nsa_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
    k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int, window_size: int, scale: float | None = None,
    query_chunk_size: int | None = None,
) -> NSAOutput:
    """Gated NSA attention: o = g_cmp * cmp + g_sel * sel + g_win * win.

    Layout: q [B, T, HQ, Dk] (already rotated); k_cmp/v_cmp [B, num_cmp(T), Hkv, Dk/Dv] (already
    compressed by phi); k_sel/v_sel and k_win/v_win raw [B, T, Hkv, Dk/Dv]; gates [B, T, HQ, 3] in
    the order (cmp, sel, win), already activated. Causal alignment: query t sees compressed block i
    iff i*d + l - 1 <= t, selected tokens <= t, window keys t-w+1 .. t.
    The selection branch reads the blocks chosen from the compression branch's probabilities
    (Eq. 8-12); selection carries no gradient. Works chunk by chunk over queries, so memory is
    O(T * (n*l' + w + T/d)) and no [T, T] tensor exists. Returns NSAOutput(output [B, T, HQ, Dv],
    block_indices [B, T, Hkv, n]).
    """
    seq_len = check_nsa_inputs(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, block_size, block_stride,
                               sel_block_size, num_selected, window_size, scale)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    num_heads, num_kv_heads = q.shape[2], k_cmp.shape[2]
    dims = k_sel.shape[-1] + v_sel.shape[-1]
    per_query = (2 * num_heads * max(1, k_cmp.shape[1])
                 + num_selected * sel_block_size * (num_heads + num_kv_heads * dims) + 4 * num_heads * window_size)
    chunk = query_chunk_size or budget_chunk_size(per_query)
    outputs, indices = [], []
    for start, end in query_chunks(seq_len, chunk):
        q_chunk = q[:, start:end]
        o_cmp, _, probs = compressed_attention_chunk(q_chunk, k_cmp, v_cmp, start, block_size, block_stride, scale)
        with torch.no_grad():
            p_grp = (probs.sum(dim=2).permute(0, 2, 1, 3) if probs is not None
                     else q.new_zeros(q.shape[0], end - start, num_kv_heads, 0, dtype=torch.float32))
            block_indices = select_from_group_probs(
                p_grp, start, block_size, block_stride, sel_block_size, num_selected
            )
        o_sel = selected_attention_chunk(q_chunk, k_sel, v_sel, block_indices, start, sel_block_size, scale)
        o_win = torch.cat([
            sliding_window_chunk(q_chunk[:, a - start:b - start], k_win, v_win, a, window_size, scale)
            for a, b in _sub_ranges(start, end, window_size)
        ], dim=1)
        g = gates[:, start:end].unsqueeze(-1)
        outputs.append(g[:, :, :, 0] * o_cmp + g[:, :, :, 1] * o_sel + g[:, :, :, 2] * o_win)
        indices.append(block_indices)
    return NSAOutput(torch.cat(outputs, dim=1), torch.cat(indices, dim=1))


def _sub_ranges(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """Split [start, end) into pieces of at most `size` (window chunks stay O(w) per query)."""
    return [(a, min(end, a + size)) for a in range(start, end, size)]
