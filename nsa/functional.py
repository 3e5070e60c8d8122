"""The whole gated NSA attention given projected inputs, one pass over query chunks."""

from __future__ import annotations

from typing import NamedTuple

import torch

from nsa.attention_core import budget_chunk_size, query_chunks
from nsa.block_index import num_compressed_blocks, num_selection_blocks
from nsa.compressed_attention import check_compressed_inputs, compressed_attention_chunk
from nsa.errors import NSAInputError
from nsa.selected_attention import selected_attention_chunk
from nsa.selection_scorer import check_selection_sizes, select_from_group_probs
from nsa.sliding_window import sliding_window_chunk
from nsa.validation import check_attention_inputs, check_gates, check_positive_int, check_same_length


class NSAOutput(NamedTuple):
    output: torch.Tensor  # [B, T, HQ, Dv]
    block_indices: torch.Tensor  # [B, T, Hkv, n], int64, -1 = unused


class NSASizes(NamedTuple):
    block_size: int  # l
    block_stride: int  # d
    sel_block_size: int  # l'
    num_selected: int  # n
    window_size: int  # w


class ChunkResult(NamedTuple):
    output: torch.Tensor  # [B, C, HQ, Dv]
    block_indices: torch.Tensor  # [B, C, Hkv, n]
    reads: torch.Tensor  # [B, C, Hkv, 3] int64: tokens each query read per branch (cmp, sel, win)


def nsa_attention_chunk(
    q: torch.Tensor, gates: torch.Tensor, positions: torch.Tensor, *,
    k_cmp: torch.Tensor, v_cmp: torch.Tensor, num_cmp_visible: int,
    k_sel: torch.Tensor, v_sel: torch.Tensor, num_sel_blocks: int,
    k_win: torch.Tensor, v_win: torch.Tensor, win_positions: torch.Tensor,
    sizes: NSASizes, scale: float,
) -> ChunkResult:
    """One chunk of queries at absolute positions [B|1, C], shared by prefill and decode.

    k_cmp/v_cmp: compressed blocks (first num_cmp_visible are read); k_sel/v_sel: raw tokens indexed by
    absolute position (the first num_sel_blocks selection blocks are candidates); k_win/v_win: window
    candidates at win_positions [B|1, K] (-1 = empty slot). The read counts come from the masks the
    attention used, not from a formula.
    """
    l, d, l_sel, n, w = sizes
    cmp = compressed_attention_chunk(q, k_cmp, v_cmp, positions, num_cmp_visible, l, d, scale)
    with torch.no_grad():
        batch, chunk, num_kv_heads = q.shape[0], q.shape[1], k_sel.shape[2]
        p_grp = (cmp.probs.detach().sum(dim=2).permute(0, 2, 1, 3) if cmp.probs is not None
                 else q.new_zeros(batch, chunk, num_kv_heads, 0, dtype=cmp.lse.dtype))
        block_indices = select_from_group_probs(p_grp, positions, num_sel_blocks, l, d, l_sel, n)
    o_sel, sel_read = selected_attention_chunk(q, k_sel, v_sel, block_indices, positions, l_sel, scale)
    o_win, win_read = sliding_window_chunk(q, k_win, v_win, positions, win_positions, w, scale)
    g = gates.unsqueeze(-1)
    output = g[:, :, :, 0] * cmp.output + g[:, :, :, 1] * o_sel + g[:, :, :, 2] * o_win
    per_query = (batch, chunk, num_kv_heads)
    reads = torch.stack((cmp.visible.sum(-1)[..., None].expand(per_query), sel_read.sum(-1),
                         win_read.sum(-1)[..., None].expand(per_query)), dim=-1)
    return ChunkResult(output, block_indices, reads)


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


def prefill_chunk_size(q: torch.Tensor, k_cmp: torch.Tensor, v_sel: torch.Tensor, sizes: NSASizes) -> int:
    """Queries per chunk: within the memory budget, and at most max(w, 64) so the window's candidate
    keys (chunk + w) stay O(w) per query."""
    num_heads, num_kv_heads = q.shape[2], k_cmp.shape[2]
    dims = q.shape[-1] + v_sel.shape[-1]
    per_query = (2 * num_heads * max(1, k_cmp.shape[1]) + 4 * num_heads * sizes.window_size
                 + sizes.num_selected * sizes.sel_block_size * (num_heads + num_kv_heads * dims))
    return min(budget_chunk_size(per_query), max(sizes.window_size, 64))


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
    sizes = NSASizes(block_size, block_stride, sel_block_size, num_selected, window_size)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    chunk = query_chunk_size or prefill_chunk_size(q, k_cmp, v_sel, sizes)
    outputs, indices = [], []
    for start, end in query_chunks(seq_len, chunk):
        key_start = max(0, start - window_size + 1)
        result = nsa_attention_chunk(
            q[:, start:end], gates[:, start:end], torch.arange(start, end, device=q.device)[None],
            k_cmp=k_cmp, v_cmp=v_cmp, num_cmp_visible=num_compressed_blocks(end, block_size, block_stride),
            k_sel=k_sel, v_sel=v_sel, num_sel_blocks=num_selection_blocks(end, sel_block_size),
            k_win=k_win[:, key_start:end], v_win=v_win[:, key_start:end],
            win_positions=torch.arange(key_start, end, device=q.device)[None], sizes=sizes, scale=scale,
        )
        outputs.append(result.output)
        indices.append(result.block_indices)
    return NSAOutput(torch.cat(outputs, dim=1), torch.cat(indices, dim=1))
