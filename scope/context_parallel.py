"""SCOPE context parallelism: scope_attention and ScopeAttention over one sequence split across ranks.

The split is an nsa.context_layout ``ContextLayout`` in whole query blocks (``ContextLayout.contiguous`` /
``zigzag`` with ``unit=block``): T a multiple of ``block`` (as SCOPE requires anyway) and at least P query
blocks (2P for the zig-zag split); a query block never straddles two ranks, so its key-block list is one
rank's business. Each rank passes its rows (q, k, v and the bias coefficients) and gets its rows of
scope_attention's result (forward and gradients; float64 CPU tests with gloo, tests/test_context_parallel.py).

``scope_attention_context_parallel`` on rank r:

1. agreement: one all-gather of a few ints (every rank's verdict on its arguments and its sizes);
2. the key blocks the local query blocks list (the pointer mask's lists of the whole sequence, the same on
   every rank: O(T / block * width) ints) are all-gathered as a bool [T / block] per rank (one host read:
   the exchange sizes must be known on the host);
3. one all_to_all_single (torch.distributed.nn.functional: autograd sends the gradients back to the owners)
   brings those blocks' K/V into a compact store: traffic and memory = the distinct listed blocks * block *
   B * H_kv * (Dqk + Dv), at most the sequence;
4. each local query block attends its listed blocks (gathered per query head: O(T_r * width * D) per head)
   with the token-level causal and document rules and the spectral bias at absolute distances, in float32
   (float64 for float64 inputs), as scope_attention's "torch" path does, with its non-finite rule.

``scope_layer_context_parallel`` runs ScopeAttention's prefill this way: local projections and pointer head,
the block representatives of the whole sequence from one all-reduce of a [B, H, T / block, M] table (each
block's representative comes from the previous block, which may live on another rank), the full pointer mask
on every rank (the same rule and, in training, the same Gumbel draws from the same seeded generator), then the
op above. Collectives per layer call: 1 all-reduce, 2 all-gathers, 1 all_to_all_single (and its reverse in
the backward), 2 host reads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from nsa.context_layout import (
    ContextLayout,
    agree_on_inputs,
    block_rows,
    fetch_plan,
    fetch_rows,
    gather_wanted_blocks,
    group_rank_and_size,
    listed_blocks,
)
from nsa.dispatch import accumulation_dtype
from nsa.nonfinite import finite_or_zero, nonfinite_rows, poison_rows
from scope.config import check_step
from scope.errors import ScopeInputError
from scope.functional import check_arguments, check_mask, finite_bias
from scope.pointer_mask import PointerMask, document_starts
from scope.scope_attention import ScopeAttention, representative_rows
from scope.spectral_bias import BiasTerms, PointerParams, bias_score_mod

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def scope_attention_context_parallel(
    q: Tensor, k: Tensor, v: Tensor, mask: PointerMask, *, block: int, layout: ContextLayout,
    group: dist.ProcessGroup | None = None, bias: BiasTerms | None = None, scale: float | None = None,
    doc_ids: Tensor | None = None, check_lists: bool = True,
) -> Tensor:
    """scope_attention (its "torch" path) over a sequence split across the ranks of ``group`` by ``layout``.

    Local layouts on rank r (T_r = layout.local_length(r), rows in layout order, whole query blocks):
    q [B, H, T_r, Dqk] and k [B, H_kv, T_r, Dqk] rotated at their absolute positions, v [B, H_kv, T_r, Dv];
    bias: BiasTerms whose coefficients hold the local rows ([B, H, T_r, K], ...), None for no bias. mask: the
    PointerMask of the whole sequence (its lists kv_num_blocks / kv_indices, over T / block query blocks; the
    BlockMask is not read); doc_ids: the whole sequence's [B|1, T] or [T]. Every rank calls with the same sizes,
    mask and layout. -> out [B, H, T_r, Dv]: rank r's rows of scope_attention on the whole sequence (module
    docstring of scope.functional for the rule), differentiable in q, k, v and the bias. check_lists: check the
    mask lists' values (as scope_attention; every rank, before the ranks agree).
    """
    rank = group_rank_and_size(group, layout, ScopeInputError)
    rejection = None
    try:
        check_arguments(q, k, v, block, bias, "score_mod", scale, 16)
        check_mask(mask, q.shape[0], q.shape[1], layout.length // block, q.device, values=check_lists)
        _check_layout(layout, rank, q.shape[2], block)
        doc_start = document_starts(doc_ids, layout.length, q.shape[0])
    except ScopeInputError as err:
        rejection = err
    signature = [0] * 5 if rejection else [*q.shape[:2], k.shape[1], v.shape[3], _DTYPES.index(q.dtype)]
    agree_on_inputs(rejection, signature, group, q.device if isinstance(q, Tensor) else torch.device("cpu"),
                    ScopeInputError)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    positions = layout.positions(rank, q.device)
    lists, listed = _local_lists(mask, positions[::block] // block)
    store, block_slot = _fetch_listed_blocks(torch.cat((k, v), dim=-1), lists, listed, layout, rank, block, group)
    return _attend_listed(q, store, k.shape[-1], lists, listed, block_slot, positions, block=block, bias=bias,
                          scale=scale, doc_start=doc_start)


def scope_layer_context_parallel(
    layer: ScopeAttention, x: Tensor, *, layout: ContextLayout, group: dist.ProcessGroup | None = None,
    doc_ids: Tensor | None = None, step: int | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """ScopeAttention's prefill over a sequence split across ranks: x [B, T_r, hidden], rank r's rows in layout
    order (whole blocks) -> y [B, T_r, hidden], rank r's rows of layer(x_whole, doc_ids=..., step=...,
    generator=...). Every rank holds the same parameters (and, in training with Gumbel top-k, a generator in
    the same state). The parameter gradients on a rank are its rows' share: summed over the ranks (all_reduce,
    as DDP / FSDP do) they equal the single-process gradients. Non-finite tokens follow the layer's rule."""
    rank = group_rank_and_size(group, layout, ScopeInputError)
    c = layer.config
    rejection = None
    try:
        layer.check_input(x)
        check_step(step)
        _check_layout(layout, rank, x.shape[1], c.block)
        document_starts(doc_ids, layout.length, x.shape[0])  # checks doc_ids
    except ScopeInputError as err:
        rejection = err
    agree_on_inputs(rejection, [0 if rejection else x.shape[0]], group,
                    x.device if isinstance(x, Tensor) else torch.device("cpu"), ScopeInputError)
    bad = nonfinite_rows(x)  # [B, T_r]
    proj = layer.project(finite_or_zero(x), layout.positions(rank, x.device))
    coeffs = layer.spectral.coefficients(proj.q_content, step)
    d_blk, u_blk = _block_representatives(coeffs.params, layout, rank, c.block, c.representative, group)
    mask = layer.pointer_mask(d_blk, u_blk, layout.length, doc_ids=doc_ids, generator=generator)
    bias = None if c.bias_impl == "none" else layer.spectral.terms(coeffs)
    # The op poisons the rows that read a non-finite key: the layer's own rule for tokens of x that are.
    out = scope_attention_context_parallel(
        proj.q, poison_rows(proj.k, bad[:, None]), poison_rows(proj.v, bad[:, None]), mask, block=c.block,
        layout=layout, group=group, bias=bias, scale=layer.scale, doc_ids=doc_ids,
        check_lists=False).transpose(1, 2).flatten(2)
    return poison_rows(layer.o_proj(finite_or_zero(out)), bad | nonfinite_rows(out))


def _check_layout(layout: ContextLayout, rank: int, rows: int, block: int) -> None:
    if any(a % block or b % block for a, b in layout.segments[rank]) or layout.length % block:
        raise ScopeInputError(f"layout must split the sequence in whole query blocks of block={block} rows "
                              f"(ContextLayout.contiguous / zigzag with unit=block), got {layout.segments[rank]}")
    if rows != layout.local_length(rank):
        raise ScopeInputError(f"this rank holds {layout.local_length(rank)} rows of the layout but its inputs "
                              f"have {rows}")


def _local_lists(mask: PointerMask, query_blocks: Tensor) -> tuple[Tensor, Tensor]:
    """The key-block lists of the local query blocks: (ids int64 [B|1, H|1, QB_r, L], 0 where unlisted; listed
    bool of the same shape)."""
    lists = mask.kv_indices.index_select(2, query_blocks).long()
    slots = torch.arange(lists.shape[-1], device=lists.device)
    listed = slots < mask.kv_num_blocks.index_select(2, query_blocks)[..., None]
    return torch.where(listed, lists, 0), listed


def _fetch_listed_blocks(kv: Tensor, lists: Tensor, listed: Tensor, layout: ContextLayout, rank: int, block: int,
                         group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """The K/V rows (kv [B, H_kv, T_r, Dqk + Dv]) of every key block a local query block lists, from their owners:
    (store [B, H_kv, M, Dqk + Dv], block slot int64 [T / block]: block j's rows are slot*block .. + block - 1)."""
    needed = listed_blocks(lists, listed, layout.length // block)
    wanted = [block_rows(row.nonzero().flatten(), block, layout.length) for row in gather_wanted_blocks(needed, group)]
    store = fetch_rows(kv.transpose(1, 2), fetch_plan(layout, rank, wanted), group).transpose(1, 2)
    return store, torch.where(needed, needed.long().cumsum(0) - 1, -1)


def _attend_listed(q: Tensor, store: Tensor, k_dim: int, lists: Tensor, listed: Tensor, block_slot: Tensor,
                   positions: Tensor, *, block: int, bias: BiasTerms | None, scale: float,
                   doc_start: Tensor | None) -> Tensor:
    """Local queries q [B, H, T_r, Dqk] at absolute ``positions`` [T_r] over the listed key blocks held in ``store``:
    softmax(scale * q.k + beta * b_i(i - j)) v over the keys j <= i of the listed blocks (and i's document), rows
    that read nothing 0, rows that read a non-finite value NaN. -> [B, H, T_r, Dv] in q's dtype."""
    batch, heads, rows, _ = q.shape
    work = accumulation_dtype(q.dtype)
    kv_head = torch.arange(heads, device=q.device) // (heads // store.shape[1])
    offsets = torch.arange(block, device=q.device)
    if store.shape[2] == 0:  # no local query block lists a key block: one zero row to gather from
        store = store.new_zeros(*store.shape[:2], 1, store.shape[3])
    slots = torch.where(listed, block_slot[lists], 0)
    store_rows = (slots[..., None] * block + offsets).flatten(-2).expand(batch, heads, -1, -1)
    keys = store[:, kv_head].gather(2, store_rows.flatten(2)[..., None].expand(-1, -1, -1, store.shape[-1]))
    keys = keys.unflatten(2, store_rows.shape[2:])  # [B, H, QB_r, N, Dqk + Dv], N = L * block
    key_pos = (lists[..., None] * block + offsets).flatten(-2).repeat_interleave(block, dim=2)  # [B|1, H|1, T_r, N]
    visible = listed.repeat_interleave(block, dim=-1).repeat_interleave(block, dim=2) & (key_pos <= positions[:, None])
    if doc_start is not None:
        visible = visible & (key_pos >= doc_start[:, None, positions, None])
    poisoned = nonfinite_rows(q) | (visible & nonfinite_rows(keys).repeat_interleave(block, dim=2)).any(-1)
    keys = finite_or_zero(keys).to(work)
    scores = torch.einsum("bhqtd,bhqnd->bhqtn", finite_or_zero(q).to(work).unflatten(2, (-1, block)),
                          keys[..., :k_dim]).flatten(2, 3) * scale  # [B, H, T_r, N]
    if bias is not None:
        bias, bias_rows = finite_bias(bias)
        poisoned = poisoned | bias_rows
        local = torch.arange(rows, device=q.device)
        # score_mod adds b at q_offset + q_idx - kv_idx with q_idx a local row: shift the keys by each row's
        # (absolute - local) position so that the distance is the absolute i - j.
        shifted_keys = key_pos - (positions - local)[:, None]
        scores = bias_score_mod(bias)(scores, torch.arange(batch, device=q.device).view(-1, 1, 1, 1),
                                      torch.arange(heads, device=q.device).view(1, -1, 1, 1),
                                      local.view(1, 1, -1, 1), shifted_keys)
    reads = visible.any(-1, keepdim=True)
    # rows that read nothing softmax a finite dummy row and are weighted 0 (no -inf-only row: no NaN anywhere)
    scores = torch.where(reads, scores.masked_fill(~visible, float("-inf")), 0.0)
    probs = (torch.softmax(scores, dim=-1) * reads).unflatten(2, (-1, block))
    out = torch.einsum("bhqtn,bhqnd->bhqtd", probs, keys[..., k_dim:]).flatten(2, 3)
    return poison_rows(out.to(q.dtype), poisoned)


@torch.no_grad()
def _block_representatives(params: PointerParams, layout: ContextLayout, rank: int, block: int, kind: str,
                           group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """representative_rows of the whole sequence's D* and budget logits ([B, H, T / block, M] on every rank) from
    the local rows [B, H, T_r, M]: block qb's representative comes from block qb - 1 (block 0's from row 0), so
    each segment fills its blocks' successors and one all-reduce of the otherwise zero table sums them (exactly:
    every entry has one contributor)."""
    local = torch.stack((params.d_star, params.budget_logits))  # [2, B, H, T_r, M]
    num_blocks = layout.length // block
    table = local.new_zeros(*local.shape[:3], num_blocks, local.shape[-1])
    offset = 0
    for a, b in layout.segments[rank]:
        count = (b - a) // block
        reps = representative_rows(local[:, :, :, offset : offset + b - a].flatten(0, 1), count + 1, block, kind)
        reps = reps.unflatten(0, (2, -1))  # [2, B, H, count + 1, M]: row 0 of the segment, then blocks +1 .. +count
        first = 0 if a == 0 else 1
        last = min(count + 1, num_blocks - a // block)
        table[:, :, :, a // block + first : a // block + last] = reps[:, :, :, first:last]
        offset += b - a
    dist.all_reduce(table, group=group)
    return table[0], table[1]
