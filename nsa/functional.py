"""The whole gated NSA attention given projected inputs, one pass over query chunks."""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch

from nsa.attention_core import budget_chunk_size, query_chunks
from nsa.block_index import num_compressed_blocks, num_selection_blocks
from nsa.compressed_attention import check_compressed_inputs, compressed_attention_chunk
from nsa.dispatch import choose_fa2, choose_prefill_backend
from nsa.errors import NSAInputError
from nsa.nonfinite import gated_sum, nsa_nonfinite_guard
from nsa.selected_attention import selected_attention_chunk
from nsa.selection_scorer import check_selection_sizes, select_from_group_probs
from nsa.sliding_window import sliding_window_chunk
from nsa.validation import check_attention_inputs, check_gates, check_positive_int, check_same_length

# Elements of the PyTorch path's per-chunk tensors that a training forward may keep for its backward (about 1 GB in
# float32) before it recomputes chunks in the backward instead.
CHECKPOINT_ELEMENTS = 1 << 28


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
    cmp = compressed_attention_chunk(q, k_cmp, v_cmp, positions, num_cmp_visible, l, d, scale,
                                     differentiable_lse=False)
    with torch.no_grad():
        batch, chunk, num_kv_heads = q.shape[0], q.shape[1], k_sel.shape[2]
        p_grp = (cmp.probs.sum(dim=2).permute(0, 2, 1, 3) if cmp.probs is not None
                 else q.new_zeros(batch, chunk, num_kv_heads, 0, dtype=cmp.lse.dtype))
        block_indices = select_from_group_probs(p_grp, positions, num_sel_blocks, l, d, l_sel, n)
    o_sel, sel_read = selected_attention_chunk(q, k_sel, v_sel, block_indices, positions, l_sel, scale)
    o_win, win_read = sliding_window_chunk(q, k_win, v_win, positions, win_positions, w, scale)
    output = gated_sum(gates, (cmp.output, o_sel, o_win))  # NaN rows: those a branch or a gate poisoned
    per_query = (batch, chunk, num_kv_heads)
    reads = torch.stack((cmp.visible.sum(-1)[..., None].expand(per_query), sel_read.sum(-1),
                         win_read.sum(-1)[..., None].expand(per_query)), dim=-1)
    return ChunkResult(output, block_indices, reads)


def check_nsa_inputs(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
    k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int, window_size: int, scale: float | None,
    query_chunk_size: int | None = None, packed: bool = False,
) -> int:
    """Validate every argument of nsa_attention; return T. packed: cu_seqlens is given (nsa_attention)."""
    seq_len = check_compressed_inputs(q, k_cmp, v_cmp, block_size, block_stride, scale, packed=packed)
    for k_name, k, v_name, v in (("k_sel", k_sel, "v_sel", v_sel), ("k_win", k_win, "v_win", v_win)):
        check_attention_inputs(q, k, v, k_name=k_name, v_name=v_name)
        check_same_length(k_name, k, seq_len)
        if k.shape[2] != k_cmp.shape[2]:
            raise NSAInputError(f"{k_name} has H_kv={k.shape[2]} but k_cmp has H_kv={k_cmp.shape[2]}; they must match")
        if v.shape[-1] != v_cmp.shape[-1]:
            raise NSAInputError(f"{v_name} head dim {v.shape[-1]} must equal v_cmp head dim {v_cmp.shape[-1]}")
    check_selection_sizes(block_stride, sel_block_size, num_selected)
    check_positive_int("window_size", window_size)
    if query_chunk_size is not None:
        check_positive_int("query_chunk_size", query_chunk_size)
    check_gates(gates, q)
    return seq_len


def per_query_elements(q: torch.Tensor, k_cmp: torch.Tensor, v_sel: torch.Tensor, sizes: NSASizes) -> int:
    """Elements of score / gather tensors the PyTorch path holds per query (all branches, all heads)."""
    num_heads, num_kv_heads = q.shape[2], k_cmp.shape[2]
    dims = q.shape[-1] + v_sel.shape[-1]
    return (2 * num_heads * max(1, k_cmp.shape[1]) + 4 * num_heads * sizes.window_size
            + sizes.num_selected * sizes.sel_block_size * (num_heads + num_kv_heads * dims))


def prefill_chunk_size(q: torch.Tensor, k_cmp: torch.Tensor, v_sel: torch.Tensor, sizes: NSASizes) -> int:
    """Queries per chunk: within the memory budget, and at most max(w, 64) so the window's candidate
    keys (chunk + w) stay O(w) per query."""
    return min(budget_chunk_size(per_query_elements(q, k_cmp, v_sel, sizes), q.shape[0]), max(sizes.window_size, 64))


def nsa_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
    k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int, window_size: int, scale: float | None = None,
    query_chunk_size: int | None = None, cu_seqlens: torch.Tensor | None = None, backend: str = "auto",
) -> NSAOutput:
    """Gated NSA attention: o = g_cmp * cmp + g_sel * sel + g_win * win.

    Layout: q [B, T, HQ, Dk] (already rotated); k_cmp/v_cmp [B, num_cmp(T), Hkv, Dk/Dv] (already
    compressed by phi); k_sel/v_sel and k_win/v_win raw [B, T, Hkv, Dk/Dv]; gates [B, T, HQ, 3] in
    the order (cmp, sel, win), already activated. Causal alignment: query t sees compressed block i
    iff i*d + l - 1 <= t, selected tokens <= t, window keys t-w+1 .. t.
    The selection branch reads the blocks chosen from the compression branch's probabilities
    (Eq. 8-12); selection carries no gradient. Returns NSAOutput(output [B, T, HQ, Dv],
    block_indices [B, T, Hkv, n]).
    Non-finite inputs (nsa.nonfinite): the output is NaN in exactly the rows that see a NaN / inf (in q,
    a visible key or value of any branch, or the row's gates); every other row, its selection and the
    gradients reaching it are as if those entries were finite; selections stay valid in every row.

    Packed sequences: with ``cu_seqlens`` (int [S + 1], 0 = cu[0] <= ... <= cu[S] = T, B = 1) the T rows hold
    S sequences, positions restart at 0 in each, and k_cmp/v_cmp hold each sequence's num_cmp(len) compressed
    blocks one after the other; block indices are per sequence. (Validation reads cu_seqlens on the host once.)

    backend (nsa.dispatch; the NSA_BACKEND environment variable overrides it): "triton", the fused kernels of
    nsa.prefill (CUDA; forward and backward); "torch", this module's PyTorch path, which works chunk by chunk
    over queries so memory is O(T * (n*l' + w + T/d)) and no [T, T] tensor exists; "auto" takes the kernels
    where they can run and logs why not otherwise. Both compute the same function.
    """
    check_nsa_inputs(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, block_size, block_stride,
                     sel_block_size, num_selected, window_size, scale, query_chunk_size, packed=cu_seqlens is not None)
    lengths = check_cu_seqlens(cu_seqlens, q, k_cmp, block_size, block_stride)
    sizes = NSASizes(block_size, block_stride, sel_block_size, num_selected, window_size)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    choice = choose_prefill_backend(backend, q, (k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates), sizes)
    if choice.name == "triton":
        from nsa.prefill import PrefillSizes, nsa_attention_triton

        # The kernels read masked tiles (0 x NaN would leak): they run on sanitized inputs (nsa.nonfinite).
        kernels = functools.partial(nsa_attention_triton, cu_seqlens=cu_seqlens, sizes=PrefillSizes(*sizes),
                                    scale=scale)
        return NSAOutput(*nsa_nonfinite_guard(kernels, q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates,
                                              block_size=block_size, block_stride=block_stride,
                                              sel_block_size=sel_block_size, window_size=window_size,
                                              cu_seqlens=cu_seqlens))
    if choose_fa2(q, k_cmp, v_cmp):  # NSA_USE_FA2=1: the window and compression branches in flash-attn (nsa.fa2)
        from nsa.fa2 import nsa_attention_fa2

        parts = ([SequenceInputs(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)] if lengths is None
                 else split_sequences(lengths, sizes, q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates))
        return concat_outputs([nsa_attention_fa2(*part, sizes=sizes, scale=scale) for part in parts])
    if lengths is None:
        return _nsa_attention_torch(q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates, sizes=sizes, scale=scale,
                                    chunk=query_chunk_size or prefill_chunk_size(q, k_cmp, v_sel, sizes))
    pieces = []
    for part in split_sequences(lengths, sizes, q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates):
        chunk = query_chunk_size or prefill_chunk_size(part.q, part.k_cmp, part.v_sel, sizes)
        pieces.append(_nsa_attention_torch(*part, sizes=sizes, scale=scale, chunk=chunk))
    return concat_outputs(pieces)


def concat_outputs(pieces: list[NSAOutput] | list[ChunkResult]) -> NSAOutput:
    """Outputs of consecutive query ranges (chunks, or packed sequences) joined along T."""
    return NSAOutput(torch.cat([p.output for p in pieces], dim=1), torch.cat([p.block_indices for p in pieces], dim=1))


def _nsa_attention_torch(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
    k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, sizes: NSASizes, scale: float, chunk: int,
) -> NSAOutput:
    """The PyTorch path over one batch of equal-length sequences, chunk by chunk over queries.

    With gradients, once the chunks' gathered keys and score tensors would pass CHECKPOINT_ELEMENTS in all,
    each chunk is recomputed in the backward (activation checkpointing) instead of kept, so training memory
    stays O(T * (n*l' + w + T/d)) too (keeping them took 47 GB at 8k tokens and ran out of the H200's memory
    at 32k); short sequences keep them (the recomputation would cost a third of a step for nothing). The
    recomputation repeats the same deterministic selection, so the backward sees the blocks the forward used."""
    block_size, block_stride, sel_block_size, _, window_size = sizes
    checkpoint = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)
    ) and q.shape[0] * q.shape[1] * per_query_elements(q, k_cmp, v_sel, sizes) > CHECKPOINT_ELEMENTS
    results = []
    for start, end in query_chunks(q.shape[1], chunk):
        key_start = max(0, start - window_size + 1)
        step = functools.partial(
            nsa_attention_chunk, num_cmp_visible=num_compressed_blocks(end, block_size, block_stride),
            num_sel_blocks=num_selection_blocks(end, sel_block_size), sizes=sizes, scale=scale,
            positions=torch.arange(start, end, device=q.device)[None],
            win_positions=torch.arange(key_start, end, device=q.device)[None])
        args = (q[:, start:end], gates[:, start:end], k_cmp, v_cmp, k_sel, v_sel, k_win[:, key_start:end],
                v_win[:, key_start:end])
        results.append(torch.utils.checkpoint.checkpoint(_chunk_by_position, step, *args, use_reentrant=False)
                       if checkpoint else _chunk_by_position(step, *args))
    return concat_outputs(results)


def _chunk_by_position(step: functools.partial, q: torch.Tensor, gates: torch.Tensor, k_cmp: torch.Tensor,
                       v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor, k_win: torch.Tensor,
                       v_win: torch.Tensor) -> ChunkResult:
    """nsa_attention_chunk with its tensors as positional arguments (what checkpoint() tracks)."""
    return step(q, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_sel=k_sel, v_sel=v_sel, k_win=k_win, v_win=v_win)


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, q: torch.Tensor, k_cmp: torch.Tensor, block_size: int,
                     block_stride: int) -> list[int] | None:
    """Validate packed-sequence boundaries (one host read); return the sequence lengths (None: no packing)."""
    if cu_seqlens is None:
        return None
    lengths = packed_lengths(cu_seqlens, q, "q")
    expected = sum(num_compressed_blocks(n, block_size, block_stride) for n in lengths)
    if k_cmp.shape[1] != expected:
        raise NSAInputError(f"k_cmp has {k_cmp.shape[1]} blocks but the packed sequences need "
                            f"sum of num_cmp(len) = {expected}")
    return lengths


def packed_lengths(cu_seqlens: torch.Tensor, rows: torch.Tensor, name: str) -> list[int]:
    """The sequence lengths of cu_seqlens (one host read, after the checks that need none): a 1-D int32/int64
    tensor [S + 1] on the device of ``rows`` ([1, T, ...], named ``name`` in the errors) rising from 0 to T."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
            torch.int32, torch.int64):
        raise NSAInputError("cu_seqlens must be a 1-D int32/int64 tensor [S + 1]")
    if cu_seqlens.device != rows.device:
        raise NSAInputError(f"cu_seqlens is on {cu_seqlens.device} but {name} is on {rows.device}")
    if rows.shape[0] != 1:
        raise NSAInputError(f"packed sequences (cu_seqlens) need batch size 1, got B={rows.shape[0]}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != rows.shape[1]:
        raise NSAInputError(f"cu_seqlens must start at 0 and end at T={rows.shape[1]}, got "
                            f"{bounds[:3]}...{bounds[-1:]}")
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if min(lengths) < 0:
        raise NSAInputError("cu_seqlens must be non-decreasing")
    return lengths


class SequenceInputs(NamedTuple):
    """nsa_attention's tensors sliced to one packed sequence."""

    q: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_sel: torch.Tensor
    v_sel: torch.Tensor
    k_win: torch.Tensor
    v_win: torch.Tensor
    gates: torch.Tensor


def split_sequences(lengths: list[int], sizes: NSASizes, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                    k_sel: torch.Tensor, v_sel: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                    gates: torch.Tensor) -> list[SequenceInputs]:
    """nsa_attention's tensors per packed sequence (empty sequences dropped)."""
    parts, token, block = [], 0, 0
    for length in lengths:
        blocks = num_compressed_blocks(length, sizes.block_size, sizes.block_stride)
        if length:
            rows, cmp_rows = slice(token, token + length), slice(block, block + blocks)
            parts.append(SequenceInputs(q[:, rows], k_cmp[:, cmp_rows], v_cmp[:, cmp_rows], k_sel[:, rows],
                                        v_sel[:, rows], k_win[:, rows], v_win[:, rows], gates[:, rows]))
        token, block = token + length, block + blocks
    return parts
