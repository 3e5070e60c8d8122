"""NSA context parallelism: nsa_attention and NSAAttention over one sequence split across ranks.

A ``ContextLayout`` (nsa.context_layout: contiguous or zig-zag chunks, any length) gives each of the P ranks
of a torch.distributed group some token rows; each rank passes only its rows and gets its rows' outputs,
equal to the single-process ``nsa_attention`` / ``NSAAttention`` (forward and gradients; float64 CPU tests
with gloo, tests/test_context_parallel.py). Compressed block i (tokens [i*d, i*d + l)) belongs to the rank
holding its last token i*d + l - 1 (``ContextLayout.compressed``).

One call of ``nsa_attention_context_parallel`` on rank r (T tokens in all, T_r local, N = num_cmp(T)):

1. agreement: one all-gather of a few ints (every rank's verdict on its arguments and its shapes), so a bad
   argument raises the same typed error on every rank instead of leaving the others in a collective;
2. compressed keys: each rank sends its blocks to every rank (``fetch_rows``: one all_to_all_single);
   every rank then holds all N compressed K/V, N * Hkv * (Dk + Dv) values, T/d of the raw size;
3. selection: the local queries' top-n blocks from the full compressed scores, chunk by chunk, with the
   rule of nsa_attention (nsa.selection_scorer), without gradient;
4. selected blocks: the union of the blocks this rank selected (over batch, heads and queries) is
   all-gathered as a bool [num_sel(T)] per rank (one host read: the exchange sizes must be known on the
   host), and one all_to_all_single brings those blocks' raw K/V from their owners into a compact store
   (memory and traffic: the distinct selected blocks * l' * B * Hkv * (Dk + Dv); no buffer indexed by
   absolute position). The union is what it costs: with T_r queries each choosing n - 3 free blocks it
   tends to cover most of the rank's causal prefix at long context, and then this step moves as much as
   all-gathering the raw K/V of that prefix (a ring pass of K/V chunks with an online-softmax merge of the
   selection branch would bound the memory to O(T / P); not done here);
5. window: the w - 1 raw keys before each local segment come from their owners (one all_to_all_single,
   w - 1 rows per segment, from however many ranks hold them) into a store with the local rows;
6. the local queries run chunk by chunk at their absolute positions with nsa_attention's PyTorch-path
   pieces (compressed_attention_chunk, the selection gather, sliding_window_chunk, gated_sum: the same
   masks and non-finite rule); with gradients each chunk is recomputed in the backward, as in
   nsa_attention, so training memory is the stores plus O(T_r * (n*l' + w) + N) per rank. The compressed
   scores run once more than in nsa_attention (step 3 runs them without gradient before the blocks are
   fetched);
7. backward: the gradients of the fetched rows go back to their owners through the all_to_all_single's
   autograd (torch's functional collective), and each owner adds them to its rows.

Collectives per call: 2 all-gathers of small int/bool tensors, 3 all_to_all_single (the same in the
backward, reversed), 2 host reads; ``nsa_layer_context_parallel`` adds one all-gather of a few ints and one
all_to_all_single (the l - 1 raw keys before each segment, for the compressed blocks it owns). The PyTorch
path runs whatever NSAConfig.backend says (the fused kernels take whole sequences). Packed sequences
(cu_seqlens) are not supported here.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from nsa.attention_core import attend_gathered_keys
from nsa.block_index import num_compressed_blocks, num_selection_blocks, selection_token_index
from nsa.compressed_attention import compressed_attention_chunk
from nsa.context_layout import (
    ContextLayout,
    FetchPlan,
    agree_on_inputs,
    block_rows,
    fetch_plan,
    fetch_rows,
    gather_wanted_blocks,
    group_rank_and_size,
    interval_rows,
    listed_blocks,
)
from nsa.errors import NSAInputError
from nsa.functional import NSAOutput, NSASizes, check_nsa_inputs, prefill_chunk_size
from nsa.nonfinite import gated_sum, guarded_apply
from nsa.nsa_attention import NSAAttention
from nsa.selected_attention import gather_tokens
from nsa.selection_scorer import select_from_group_probs
from nsa.sliding_window import sliding_window_chunk

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def nsa_attention_context_parallel(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_sel: Tensor, v_sel: Tensor, k_win: Tensor, v_win: Tensor,
    gates: Tensor, *, block_size: int, block_stride: int, sel_block_size: int, num_selected: int, window_size: int,
    layout: ContextLayout, group: dist.ProcessGroup | None = None, scale: float | None = None,
    query_chunk_size: int | None = None,
) -> NSAOutput:
    """nsa_attention over a sequence split across the ranks of ``group`` (None: the default group) by ``layout``.

    Local layouts on rank r (T_r = layout.local_length(r), rows in layout order: layout.positions(r) gives
    their absolute positions): q [B, T_r, HQ, Dk] (rotated at the absolute positions), k_sel / v_sel / k_win
    / v_win [B, T_r, Hkv, Dk/Dv], gates [B, T_r, HQ, 3]; k_cmp / v_cmp [B, N_r, Hkv, Dk/Dv] the compressed
    blocks this rank owns, ascending (layout.compressed(l, d) lists them: block i belongs to the rank holding
    token i*d + l - 1). Every rank calls with the same sizes and layout. Returns NSAOutput(output
    [B, T_r, HQ, Dv], block_indices [B, T_r, Hkv, n] with absolute block ids): rank r's rows of
    nsa_attention on the whole sequence. Differentiable in every tensor argument. Any T >= P works
    (no divisibility by P, l, d or l'); the layout fixes which rows each rank holds. Design, collectives and
    costs: the module docstring.
    """
    rank = group_rank_and_size(group, layout)
    cmp_layout = layout.compressed(block_size, block_stride)
    tensors = (q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates)
    rejection = None
    try:
        check_nsa_inputs(*tensors, block_size, block_stride, sel_block_size, num_selected, window_size, scale,
                         query_chunk_size, packed=True)
        _check_local_rows(q, k_cmp, layout.local_length(rank), cmp_layout.local_length(rank))
    except NSAInputError as err:
        rejection = err
    agree_on_inputs(rejection, _signature(rejection, q, k_sel, v_sel), group,
                    q.device if isinstance(q, Tensor) else torch.device("cpu"))
    sizes = NSASizes(block_size, block_stride, sel_block_size, num_selected, window_size)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    k_dim = k_sel.shape[-1]
    kv_cmp = fetch_rows(torch.cat((k_cmp, v_cmp), dim=-1), _everything_plan(cmp_layout, rank), group)
    k_cmp_all, v_cmp_all = kv_cmp[..., :k_dim], kv_cmp[..., k_dim:]
    chunk = query_chunk_size or prefill_chunk_size(q, k_cmp_all, v_sel, sizes)
    chunks = _local_chunks(layout, rank, chunk)
    block_indices = _select_blocks(q, k_cmp_all, v_cmp_all, chunks, sizes, scale)
    sel_plan, block_slot = _selection_plan(block_indices, layout, rank, sel_block_size, group)
    kv_sel = fetch_rows(torch.cat((k_sel, v_sel), dim=-1), sel_plan, group)
    win_plan = _window_plan(layout, rank, window_size)
    kv_win = fetch_rows(torch.cat((k_win, v_win), dim=-1), win_plan, group)
    checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outputs = []
    for (lo, hi), (start, end) in chunks:
        key_lo = int(torch.searchsorted(win_plan.wanted, max(0, start - window_size + 1)))
        key_hi = key_lo + end - max(0, start - window_size + 1)
        step = functools.partial(
            _chunk_output, positions=torch.arange(start, end, device=q.device)[None],
            win_positions=win_plan.wanted[key_lo:key_hi].to(q.device)[None], block_slot=block_slot,
            block_indices=block_indices[:, lo:hi], num_cmp_visible=num_compressed_blocks(end, block_size, block_stride),
            sizes=sizes, scale=scale, k_dim=k_dim)
        args = (q[:, lo:hi], gates[:, lo:hi], k_cmp_all, v_cmp_all, kv_sel, kv_win[:, key_lo:key_hi])
        outputs.append(torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False) if checkpoint
                       else step(*args))
    return NSAOutput(torch.cat(outputs, dim=1), block_indices)


def nsa_layer_context_parallel(layer: NSAAttention, x: Tensor, *, layout: ContextLayout,
                               group: dist.ProcessGroup | None = None) -> Tensor:
    """NSAAttention's forward (no cache, no packing) over a sequence split across ranks: x [B, T_r, hidden], rank
    r's rows in layout order -> y [B, T_r, hidden], rank r's rows of layer(x_whole). Every rank holds the same
    parameters; each runs the projections of its own rows, builds the compressed blocks it owns (fetching the
    l - 1 raw keys before each segment from their owners), then nsa_attention_context_parallel. The parameter
    gradients on a rank are its rows' share: summed over the ranks (all_reduce, as DDP / FSDP do) they equal
    the single-process gradients."""
    rank = group_rank_and_size(group, layout)
    rejection = None
    try:
        layer.check_input(x)
        _check_local_rows(x, None, layout.local_length(rank), None)
    except NSAInputError as err:
        rejection = err
    agree_on_inputs(rejection, [0 if rejection else x.shape[0]], group,
                    x.device if isinstance(x, Tensor) else torch.device("cpu"))
    c = layer.config
    p = layer.project(x, layout.positions(rank, x.device))
    k_cmp, v_cmp = _compress_owned(layer, p.k_cmp_raw, p.v_cmp_raw, layout, rank, group)
    out, _ = nsa_attention_context_parallel(
        p.q, k_cmp, v_cmp, p.k_sel, p.v_sel, p.k_win, p.v_win, p.gates, block_size=c.cmp_block_size,
        block_stride=c.cmp_stride, sel_block_size=c.sel_block_size, num_selected=c.num_selected,
        window_size=c.window_size, layout=layout, group=group, scale=c.attention_scale,
        query_chunk_size=c.query_chunk_size)
    return guarded_apply(layer.o_proj, out.flatten(2))


def _compress_owned(layer: NSAAttention, k_raw: Tensor, v_raw: Tensor, layout: ContextLayout, rank: int,
                    group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """The compressed K/V of the blocks this rank owns (NSAAttention's phi and RoPE at block centres), from the
    raw keys of its rows and the l - 1 before each segment: [B, N_r, Hkv, Dk/Dv]."""
    l, d = layer.config.cmp_block_size, layer.config.cmp_stride
    plan = _compression_plan(layout, rank, l, d)
    raw = fetch_rows(torch.cat((k_raw, v_raw), dim=-1), plan, group)
    owned = layout.compressed(l, d).positions(rank)
    rows = (torch.searchsorted(plan.wanted, owned * d)[:, None] + torch.arange(l)).to(raw.device)
    blocks = raw[:, rows].transpose(2, 3)  # [B, N_r, Hkv, l, Dk + Dv]
    k_dim = k_raw.shape[-1]
    return layer.compress_blocks(blocks[..., :k_dim], blocks[..., k_dim:], owned.to(raw.device))


def _check_local_rows(x: Tensor, k_cmp: Tensor | None, rows: int, blocks: int | None) -> None:
    if x.shape[1] != rows:
        raise NSAInputError(f"this rank holds {rows} rows of the layout but its inputs have {x.shape[1]}")
    if k_cmp is not None and k_cmp.shape[1] != blocks:
        raise NSAInputError(f"this rank owns {blocks} compressed blocks (layout.compressed(l, d)) but k_cmp has "
                            f"{k_cmp.shape[1]}")


def _signature(rejection: Exception | None, q: Tensor, k: Tensor, v: Tensor) -> list[int]:
    """The sizes every rank must share: B, HQ, Hkv, Dk, Dv and the dtype (zeros where the inputs were rejected)."""
    if rejection is not None:
        return [0] * 6
    return [q.shape[0], q.shape[2], k.shape[2], k.shape[3], v.shape[3], _DTYPES.index(q.dtype)]


def _local_chunks(layout: ContextLayout, rank: int, chunk: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Query chunks of at most ``chunk`` rows inside each local segment: ((local lo, hi), (absolute start, end))."""
    chunks, offset = [], 0
    for a, b in layout.segments[rank]:
        for start in range(a, b, chunk):
            end = min(b, start + chunk)
            chunks.append(((offset + start - a, offset + end - a), (start, end)))
        offset += b - a
    return chunks


@torch.no_grad()
def _select_blocks(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, chunks: list[tuple[tuple[int, int], tuple[int, int]]],
                   sizes: NSASizes, scale: float) -> Tensor:
    """Selected blocks [B, T_r, Hkv, n] of the local queries (absolute block ids, -1 = unused): nsa_attention's
    rule (Eq. 8-12) on the full compressed keys."""
    l, d, l_sel, n, _ = sizes
    indices = []
    for (lo, hi), (start, end) in chunks:
        positions = torch.arange(start, end, device=q.device)[None]
        cmp = compressed_attention_chunk(q[:, lo:hi], k_cmp, v_cmp, positions, num_compressed_blocks(end, l, d),
                                         l, d, scale)
        p_grp = (cmp.probs.sum(dim=2).permute(0, 2, 1, 3) if cmp.probs is not None
                 else q.new_zeros(q.shape[0], hi - lo, k_cmp.shape[2], 0, dtype=cmp.lse.dtype))
        indices.append(select_from_group_probs(p_grp, positions, num_selection_blocks(end, l_sel), l, d, l_sel, n))
    return torch.cat(indices, dim=1)


def _selection_plan(block_indices: Tensor, layout: ContextLayout, rank: int, sel_block_size: int,
                    group: dist.ProcessGroup | None) -> tuple[FetchPlan, Tensor]:
    """The fetch of the blocks any local query selected, and each block's slot in the fetched store
    (int64 [num_sel(T)], -1 = not fetched; the store holds block j's tokens at rows slot*l' .. slot*l' + l' - 1)."""
    needed = listed_blocks(block_indices, block_indices >= 0, num_selection_blocks(layout.length, sel_block_size))
    everyone = gather_wanted_blocks(needed, group)
    wanted = [block_rows(row.nonzero().flatten(), sel_block_size, layout.length) for row in everyone]
    block_slot = torch.where(needed, needed.long().cumsum(0) - 1, -1)
    return fetch_plan(layout, rank, wanted), block_slot


@functools.lru_cache(maxsize=64)
def _everything_plan(layout: ContextLayout, rank: int) -> FetchPlan:
    """Every rank receives every row (an all-gather through the same all_to_all)."""
    rows = torch.arange(layout.length)
    return fetch_plan(layout, rank, [rows] * layout.world_size)


@functools.lru_cache(maxsize=64)
def _window_plan(layout: ContextLayout, rank: int, window_size: int) -> FetchPlan:
    """Each rank receives its own rows and the w - 1 before each of its segments."""
    return fetch_plan(layout, rank, [interval_rows([(max(0, a - window_size + 1), b) for a, b in segments])
                                     for segments in layout.segments])


@functools.lru_cache(maxsize=64)
def _compression_plan(layout: ContextLayout, rank: int, block_size: int, block_stride: int) -> FetchPlan:
    """Each rank receives the raw tokens of the compressed blocks it owns (its rows and the l - 1 before)."""
    blocks = layout.compressed(block_size, block_stride)
    return fetch_plan(layout, rank, [
        interval_rows([(a * block_stride, (b - 1) * block_stride + block_size) for a, b in segments])
        for segments in blocks.segments])


def _chunk_output(q: Tensor, gates: Tensor, k_cmp: Tensor, v_cmp: Tensor, kv_sel: Tensor, kv_win: Tensor, *,
                  positions: Tensor, win_positions: Tensor, block_slot: Tensor, block_indices: Tensor,
                  num_cmp_visible: int, sizes: NSASizes, scale: float, k_dim: int) -> Tensor:
    """Gated output [B, C, HQ, Dv] of queries at absolute ``positions`` [1, C]: the three branches of
    nsa_attention_chunk with the selection read from the compact store kv_sel [B, M, Hkv, Dk + Dv] and the
    window from kv_win [B, K, Hkv, Dk + Dv] at win_positions [1, K]."""
    l, d, l_sel, _, w = sizes
    cmp = compressed_attention_chunk(q, k_cmp, v_cmp, positions, num_cmp_visible, l, d, scale,
                                     differentiable_lse=False)
    tokens, valid = selection_token_index(block_indices, positions, l_sel)
    rows = torch.where(valid, block_slot[tokens // l_sel] * l_sel + tokens % l_sel, 0)
    keys, values = gather_tokens(kv_sel[..., :k_dim], rows), gather_tokens(kv_sel[..., k_dim:], rows)
    o_sel = attend_gathered_keys(q, keys, values, valid, scale)
    o_win, _ = sliding_window_chunk(q, kv_win[..., :k_dim], kv_win[..., k_dim:], positions, win_positions, w, scale)
    return gated_sum(gates, (cmp.output, o_sel, o_win))
