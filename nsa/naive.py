"""Plain dense references with the same signatures as the fast ops.

Each builds the full [T, T] (or [T, N_cmp]) mask and runs one masked softmax: O(T^2) memory, easy
to read, used as the in-package baseline for tests and benchmarks on small T.

Non-finite inputs follow the ops' rule (nsa.nonfinite): the twins attend over the sanitized inputs
and poison the rows that the whole-sequence flags of nsa.nonfinite name, while the ops flag rows
from the masks they attend with, so comparing the two also checks those flags.
"""

from __future__ import annotations

import torch

from nsa.attention_core import accumulation_dtype
from nsa.block_index import compressed_visibility, num_selection_blocks, overlap_matrix
from nsa.compressed_attention import check_compressed_inputs
from nsa.dispatch import BACKENDS
from nsa.errors import NSAInputError
from nsa.functional import (
    NSAOutput,
    NSASizes,
    SequenceInputs,
    check_cu_seqlens,
    check_nsa_inputs,
    concat_outputs,
    split_sequences,
)
from nsa.nonfinite import (
    compressed_nonfinite_rows,
    finite_or_zero,
    nsa_nonfinite_rows,
    poison_rows,
    poison_values,
    selected_nonfinite_rows,
    window_nonfinite_rows,
)
from nsa.selected_attention import selected_token_mask
from nsa.selection_scorer import check_selection_sizes, group_reduce, topn_blocks
from nsa.validation import (
    check_attention_inputs,
    check_block_indices,
    check_lse,
    check_positive_int,
    check_same_length,
    check_scale,
)


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B,T,HQ,Dk], k/v [B,N,Hkv,D], mask bool [B|1,HQ|1,T,N] -> (o [B,T,HQ,Dv], probs [B,HQ,T,N], lse [B,T,HQ])."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    group = q.shape[2] // k.shape[2]
    acc = accumulation_dtype(q.dtype)
    k_full = k.to(acc).repeat_interleave(group, dim=2)
    v_full = v.to(acc).repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bnhd->bhtn", q.to(acc), k_full) * scale
    # Rows with nothing visible give NaN in softmax; their output is defined as zero.
    masked = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(masked, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhtn,bnhd->bthd", probs, v_full)
    return out.to(q.dtype), probs, torch.logsumexp(masked, dim=-1).transpose(1, 2)


def _naive_compressed(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int, block_stride: int,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    positions = torch.arange(q.shape[1], device=q.device)
    mask = compressed_visibility(positions, k_cmp.shape[1], block_size, block_stride)
    return _dense_attention(q, k_cmp, v_cmp, mask[None, None], scale)


def naive_compressed_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int, block_stride: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense reference of compressed_attention: returns (o, lse)."""
    check_compressed_inputs(q, k_cmp, v_cmp, block_size, block_stride, scale)
    rows = compressed_nonfinite_rows(q, k_cmp, v_cmp, block_size, block_stride)
    out, _, lse = _naive_compressed(finite_or_zero(q), finite_or_zero(k_cmp), finite_or_zero(v_cmp), block_size,
                                    block_stride, scale)
    return poison_rows(out, rows), poison_values(lse, rows)


def naive_selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, block_size: int,
    scale: float | None = None, *, check_indices: bool = True,
) -> torch.Tensor:
    """Dense reference of selected_attention: a [T, T] token mask built from the block indices."""
    seq_len, _, num_kv_heads = check_attention_inputs(q, k, v)
    check_same_length("k", k, seq_len)
    check_positive_int("block_size", block_size)
    check_scale(scale)
    check_block_indices(block_indices, q, num_kv_heads, block_size, validate_values=check_indices)
    rows = selected_nonfinite_rows(q, k, v, block_indices, block_size)
    out = _naive_selected(finite_or_zero(q), finite_or_zero(k), finite_or_zero(v), block_indices, block_size, scale)
    return poison_rows(out, rows)


def _naive_selected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, block_size: int,
    scale: float | None,
) -> torch.Tensor:
    seq_len, num_heads, num_kv_heads = q.shape[1], q.shape[2], k.shape[2]
    positions = torch.arange(seq_len, device=q.device)[None]
    mask = selected_token_mask(block_indices, positions, block_size, seq_len).permute(0, 2, 1, 3)  # [B, Hkv, T, T]
    mask = mask.repeat_interleave(num_heads // num_kv_heads, dim=1)
    return _dense_attention(q, k, v, mask, scale)[0]


def naive_sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float | None = None
) -> torch.Tensor:
    """Dense reference of sliding_window_attention."""
    seq_len, _, _ = check_attention_inputs(q, k, v)
    check_same_length("k", k, seq_len)
    check_positive_int("window_size", window_size)
    check_scale(scale)
    rows = window_nonfinite_rows(q, k, v, window_size)
    return poison_rows(_naive_window(finite_or_zero(q), finite_or_zero(k), finite_or_zero(v), window_size, scale), rows)


def _naive_window(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float | None
) -> torch.Tensor:
    positions = torch.arange(q.shape[1], device=q.device)
    distance = positions[:, None] - positions[None, :]
    mask = (distance >= 0) & (distance < window_size)
    return _dense_attention(q, k, v, mask[None, None], scale)[0]


def naive_select_blocks(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int, scale: float | None = None,
) -> torch.Tensor:
    """Dense reference of select_blocks: full p_cmp, the dense Eq. 9 matrix, Eq. 10, top-n."""
    seq_len = check_compressed_inputs(q, k_cmp, k_cmp, block_size, block_stride, scale)
    check_selection_sizes(block_stride, sel_block_size, num_selected)
    check_lse(lse, q)  # unused here (the twin renormalises itself), checked as select_blocks checks it
    q, k_cmp = finite_or_zero(q), finite_or_zero(k_cmp)
    _, probs, _ = _naive_compressed(q, k_cmp, k_cmp, block_size, block_stride, scale)
    return _select_from_probs(probs.permute(0, 2, 1, 3), k_cmp.shape[2], seq_len, block_size, block_stride,
                              sel_block_size, num_selected)


def _select_from_probs(
    p_cmp: torch.Tensor, num_kv_heads: int, seq_len: int, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int,
) -> torch.Tensor:
    num_sel = num_selection_blocks(seq_len, sel_block_size)
    weights = overlap_matrix(p_cmp.shape[-1], num_sel, block_size, block_stride, sel_block_size)
    p_sel = p_cmp @ weights.to(p_cmp)  # Eq. 9
    return topn_blocks(group_reduce(p_sel, num_kv_heads), sel_block_size, num_selected)  # Eq. 10-12


def naive_nsa_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
    k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int, window_size: int, scale: float | None = None,
    query_chunk_size: int | None = None, cu_seqlens: torch.Tensor | None = None, backend: str = "auto",
) -> NSAOutput:
    """Dense reference of nsa_attention: one [T, T]-masked softmax per branch (per sequence when packed by
    cu_seqlens). query_chunk_size and backend are checked like nsa_attention's, then ignored."""
    check_nsa_inputs(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, block_size, block_stride, sel_block_size,
                     num_selected, window_size, scale, query_chunk_size, packed=cu_seqlens is not None)
    if backend not in BACKENDS:
        raise NSAInputError(f"backend={backend!r} must be one of {BACKENDS}")
    lengths = check_cu_seqlens(cu_seqlens, q, k_cmp, block_size, block_stride)
    sizes = NSASizes(block_size, block_stride, sel_block_size, num_selected, window_size)
    parts = ([SequenceInputs(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)] if lengths is None
             else split_sequences(lengths, sizes, q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates))
    results = [_naive_nsa_sequence(*part, sizes=sizes, scale=scale) for part in parts]
    return concat_outputs(results)


def _naive_nsa_sequence(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
    k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, sizes: NSASizes, scale: float | None,
) -> NSAOutput:
    """naive_nsa_attention over one batch of equal-length sequences."""
    block_size, block_stride, sel_block_size, num_selected, window_size = sizes
    raw = (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)
    q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates = (finite_or_zero(x) for x in raw)
    o_cmp, probs, _ = _naive_compressed(q, k_cmp, v_cmp, block_size, block_stride, scale)
    with torch.no_grad():
        block_indices = _select_from_probs(probs.detach().permute(0, 2, 1, 3), k_cmp.shape[2], q.shape[1],
                                           block_size, block_stride, sel_block_size, num_selected)
    o_sel = _naive_selected(q, k_sel, v_sel, block_indices, sel_block_size, scale)
    o_win = _naive_window(q, k_win, v_win, window_size, scale)
    g = gates.unsqueeze(-1)
    out = g[:, :, :, 0] * o_cmp + g[:, :, :, 1] * o_sel + g[:, :, :, 2] * o_win
    rows = nsa_nonfinite_rows(*raw, block_indices, block_size=block_size, block_stride=block_stride,
                              sel_block_size=sel_block_size, window_size=window_size)
    return NSAOutput(poison_rows(out, rows), block_indices)
