"""SCOPE pointer block-sparse KV mask for FlexAttention (SCOPE.md section 2, SCOPE_CONTRACT.md).

Blocks of ``block`` tokens; QB = T / block query blocks, the same number of key blocks. For every
(b, h, query block qb) the mask keeps, deduplicated and sorted ascending:

- the local band ``max(doc_start, qb - local_blocks + 1) .. qb``;
- M pointer windows: peak m is centred on ``c_m = clamp(floor((t_rep - D*_m) / block), doc_start, qb)``
  (t_rep: the block's last token, its mean position, or positions the caller passes) and covers
  ``n_m`` blocks ``[c_m - floor((n_m - 1) / 2), c_m + ceil((n_m - 1) / 2)]`` clipped to
  ``[doc_start, qb]``; the n_m split the total ``budget`` (see :func:`allocate_budget`);
- ``global_blocks`` blocks ``doc_start .. doc_start + global_blocks - 1`` (those <= qb).

Documents. ``doc_ids`` [B, T] (or [T]) label tokens; a *document* is a maximal run of equal
consecutive ids (packing: a re-used id after another document is a new document). Keys of
another document and keys after the query are masked at token level by
:func:`document_causal_mask`. ``doc_start_block[b, qb]`` is the block holding the start of the
document of the query block's *first* token, i.e. the earliest document start among the block's
queries: a query block that straddles a document boundary keeps the local band and globals of
its older queries' document (the newer document's keys are all in block qb, which is always kept).

BlockMask. Tile (qb, kb) is *full* (the kernel skips mask_mod) when every query of qb may read
every key of kb: kb < qb and the first token of kb and the last token of qb are in one document;
otherwise (the diagonal, tiles crossing a document boundary) it is *partial*. The kv side is built
with static width ``max_kv = local_blocks + global_blocks + budget + M`` (int32, padding after
``kv_num_blocks``), memory O(QB * max_kv); no dense [QB, QB] or [T, T] tensor and no host sync.

Kernel notes (torch 2.13):
- Eager (uncompiled) ``flex_attention`` ignores the block lists entirely and applies only
  ``mask_mod`` at token level, so in eager mode this mask reduces to document-causal attention.
  :func:`exact_mask_mod` gives a mask_mod that also checks block membership (O(max_kv) per score;
  for eager/CPU runs and tests).
- The compiled CPU kernel asserts ``kv_indices.shape[-1] * block >= T`` (it wants width QB: pad
  the lists for it); the GPU (Triton) lowering has no such check and reads only the first
  kv_num_blocks entries (not yet run on a GPU here). ``BlockMask.from_kv_blocks`` with its
  default ``compute_q_blocks=True`` densifies to [QB, width] and fails when width < QB, so it is
  called with ``compute_q_blocks=False``; the q side (needed only by the backward pass) is built
  here by a sparse transpose when ``compute_q_blocks`` is on (default: ``training``). FlexAttention's
  q-side layout is [B, H, KVB, QB] (a global block is read by every query block), so that index
  tensor is O(QB^2) int32 -- the kernel's format, not a dense mask; it is never built for inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from nsa.validation import parse_device
from scope.errors import ScopeInputError

__all__ = [
    "PointerMask",
    "allocate_budget",
    "build_pointer_block_mask",
    "doc_start_blocks",
    "document_causal_mask",
    "document_starts",
    "exact_mask_mod",
    "gumbel_keep",
    "pointer_centres",
    "pointer_stats",
    "representative_positions",
    "sliding_window_block_mask",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]  # FlexAttention's score_mod


@dataclass(frozen=True)
class PointerMask:
    """Result of :func:`build_pointer_block_mask` (and of :func:`sliding_window_block_mask`, M = 0).

    block_mask: FlexAttention BlockMask, shape [B, H, T, T] (H = 1 for the sliding window).
    kv_indices: int32 [B, H, QB, max_kv], the kept key blocks ascending, -1 after kv_num_blocks.
    kv_num_blocks: int32 [B, H, QB], number of kept key blocks (partial + full).
    centres: int32 [B, H, QB, M], pointer centres after clamping; -1 for peaks dropped by Gumbel top-k.
    alloc: int32 [B, H, QB, M], blocks allocated to each peak (before clipping to [doc_start, qb]).
    clamped: bool [B, H, QB, M], the centre was clamped at doc_start or at qb (False when dropped).
    budget_used: int32 [B, H, QB], sum of alloc.
    doc_start_block: int32 [B, QB] (B = 1 without documents), see the module docstring.
    t_rep: float64 [QB], the representative positions the centres were measured from.

    Do not print ``block_mask`` or call its ``to_dense()`` / ``to_string()`` when max_kv < QB: torch's
    helpers assume one column per key block and raise IndexError (``repr`` of this class skips it).
    """

    block_mask: BlockMask = field(repr=False)  # BlockMask.__str__ densifies with width = max_kv
    kv_indices: Tensor
    kv_num_blocks: Tensor
    centres: Tensor
    alloc: Tensor
    clamped: Tensor
    budget_used: Tensor
    doc_start_block: Tensor
    t_rep: Tensor


# ----------------------------------------------------------------------------------------------
# validation helpers (shape / Python-value checks only: no tensor data is read, so no host sync)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScopeInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ScopeInputError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_flags(**flags: Any) -> None:
    """Each flag a bool (or None, where None means the default): a truthy string is not a switch."""
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise ScopeInputError(f"{name} must be a bool, got {value!r}")


def _check_seq(seq_len: Any, block: Any) -> int:
    _check_int("block", block, 1)
    _check_int("seq_len", seq_len, 1)
    if seq_len % block != 0:
        raise ScopeInputError(f"seq_len ({seq_len}) must be a multiple of block ({block})")
    return seq_len // block


def _check_temp(temp: Any) -> float:
    if isinstance(temp, bool) or not isinstance(temp, int | float) or not math.isfinite(temp) or temp <= 0:
        raise ScopeInputError(f"budget_temp must be a finite number > 0, got {temp!r}")
    return float(temp)


def _check_doc_ids(doc_ids: Tensor | None, seq_len: int, batch: int | None) -> Tensor | None:
    """doc_ids [T] or [B|1, T] integer -> [B|1, T] (None stays None)."""
    if doc_ids is None:
        return None
    if not isinstance(doc_ids, Tensor):
        raise ScopeInputError(f"doc_ids must be a tensor or None, got {type(doc_ids).__name__}")
    if doc_ids.is_floating_point() or doc_ids.is_complex() or doc_ids.dtype == torch.bool:
        raise ScopeInputError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
    ids = doc_ids.unsqueeze(0) if doc_ids.dim() == 1 else doc_ids
    if ids.dim() != 2 or ids.shape[-1] != seq_len:
        raise ScopeInputError(f"doc_ids must have shape [T] or [B, T] with T = seq_len = {seq_len}, "
                              f"got {tuple(doc_ids.shape)}")
    if batch is not None and ids.shape[0] not in (1, batch):
        raise ScopeInputError(f"doc_ids batch ({ids.shape[0]}) must be 1 or the batch of d_star ({batch})")
    return ids


# ----------------------------------------------------------------------------------------------
# documents


def _segments(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """doc_ids [B, T] -> (segment id [B, T] int64 non-decreasing, document start token [B, T] int64).

    A segment is a maximal run of equal consecutive ids."""
    ids = doc_ids.long()
    seq_len = ids.shape[-1]
    boundary = torch.ones_like(ids, dtype=torch.bool)
    boundary[:, 1:] = ids[:, 1:] != ids[:, :-1]
    seg = boundary.long().cumsum(-1) - 1
    pos = torch.arange(seq_len, device=ids.device).expand_as(ids)
    start = torch.where(boundary, pos, torch.zeros_like(pos)).cummax(-1).values
    return seg, start


def doc_start_blocks(doc_ids: Tensor | None, seq_len: int, block: int, device: torch.device | None = None) -> Tensor:
    """int64 [B|1, QB]: block of the document start of each query block's first token (0 without docs)."""
    num_blocks = _check_seq(seq_len, block)
    ids = _check_doc_ids(doc_ids, seq_len, None)
    if ids is None:
        return torch.zeros(1, num_blocks, dtype=torch.long, device=device)
    _, start = _segments(ids)
    return start[:, ::block] // block


def document_starts(doc_ids: Tensor | None, seq_len: int, batch: int | None = None) -> Tensor | None:
    """int64 [B|1, T]: the position of the first token of each token's document (None without documents).
    Query i and key j <= i share a document iff j >= document_starts[i]. ``batch``: the batch doc_ids must
    match (1 or it), when given."""
    ids = _check_doc_ids(doc_ids, seq_len, batch)
    return None if ids is None else _segments(ids)[1]


def document_causal_mask(doc_ids: Tensor | None) -> MaskMod:
    """FlexAttention mask_mod: key kv_idx <= q_idx and both in the same document.

    doc_ids: None (causal only), [T] (shared by the batch) or [B|1, T]; a document is a maximal run of
    equal consecutive ids."""
    if doc_ids is None:

        def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return q_idx >= kv_idx

        return causal
    ids = _check_doc_ids(doc_ids, doc_ids.shape[-1], None)
    assert ids is not None
    seg, _ = _segments(ids)
    if seg.shape[0] == 1:
        seg1 = seg[0]

        def doc_causal_shared(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx >= kv_idx) & (seg1[q_idx] == seg1[kv_idx])

        return doc_causal_shared

    def doc_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (seg[b, q_idx] == seg[b, kv_idx])

    return doc_causal


def exact_mask_mod(pm: PointerMask, block: int, doc_ids: Tensor | None = None) -> MaskMod:
    """mask_mod equal to the BlockMask's token-level semantics: document-causal and key block in the
    row's kv list. For eager flex_attention (which ignores block lists) and tests; costs O(max_kv)
    per score. Broadcasts over B or H of size 1 in ``pm.kv_indices``."""
    base = document_causal_mask(doc_ids)
    kvi = pm.kv_indices.long()
    b_one, h_one = kvi.shape[0] == 1, kvi.shape[1] == 1

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        row = kvi[0 if b_one else b, 0 if h_one else h, q_idx // block]
        return base(b, h, q_idx, kv_idx) & (row == kv_idx // block).any()

    return mask_mod


# ----------------------------------------------------------------------------------------------
# steps 1-3 of the rule


def representative_positions(seq_len: int, block: int, kind: str, device: torch.device | None = None) -> Tensor:
    """float64 [QB]: each query block's representative position *inside the block*: ``"last"`` token
    (qb*block + block - 1) or ``"mean"`` position (qb*block + (block - 1) / 2). Not causal: an early
    query of the block would read keys chosen by a later token. ScopeAttention passes ``t_rep`` from
    ``scope.scope_attention.causal_representative_positions`` (the previous block) instead."""
    num_blocks = _check_seq(seq_len, block)
    start = torch.arange(num_blocks, dtype=torch.float64, device=device) * block
    if kind == "last":
        return start + (block - 1)
    if kind == "mean":
        return start + (block - 1) / 2
    raise ScopeInputError(f"representative must be 'last' or 'mean', got {kind!r}")


def pointer_centres(d_star: Tensor, t_rep: Tensor, block: int, doc_start_block: Tensor) -> tuple[Tensor, Tensor]:
    """Centres c_m = clamp(floor((t_rep - D*_m) / block), doc_start_block, qb).

    d_star [B, H, QB, M] tokens, t_rep [QB], doc_start_block [B|1, QB].
    Returns (centres int64 [B, H, QB, M], clamped bool [B, H, QB, M]); arithmetic in float64.
    t_rep may be any positions (e.g. causal ones before the block); a NaN D* counts as clamped."""
    num_blocks = d_star.shape[2]
    raw = torch.floor((t_rep.to(torch.float64)[:, None] - d_star.detach().to(torch.float64)) / block)
    raw = torch.nan_to_num(raw, nan=-math.inf)  # a NaN D* clamps to the document start, never garbage
    low = doc_start_block.to(torch.float64)[:, None, :, None]
    high = torch.arange(num_blocks, dtype=torch.float64, device=d_star.device)[:, None]
    clamped = (raw < low) | (raw > high)
    centres = torch.minimum(torch.maximum(raw, low), high).long()
    return centres, clamped


def allocate_budget(budget_logits: Tensor, budget: int, max_radius: int, temp: float = 1.0,
                    active: Tensor | None = None) -> Tensor:
    """Split ``budget`` blocks over the M peaks of each row: int64 [..., M] (0 for inactive peaks).

    Rule: shares softmax(u / temp) over the eligible peaks (active and below the cap); each gets the
    floor of its share of the blocks to distribute, the remainder goes one block each to the largest
    fractional parts (ties -> lower m). A peak above the cap 2*max_radius + 1 is cut to the cap and
    the freed blocks are distributed again, by the same rule, over the peaks still below the cap;
    repeated until nothing is freed (at most M rounds: each round that frees blocks caps one more
    peak). Hence sum n_m = min(budget, M_active * (2*max_radius + 1)). Vectorised over rows, float64
    shares, no host sync. Non-finite logits (a NaN pointer head's rows: the layer poisons them) and shares that
    overflow float64 are clamped first (NaN -> 0, +-inf -> +-1e300), so the sum rule holds for every row.
    """
    budget = _check_int("budget", budget, 0)
    max_radius = _check_int("max_radius", max_radius, 0)
    temp = _check_temp(temp)
    if active is not None and active.shape != budget_logits.shape:
        raise ScopeInputError(f"active must have the shape of budget_logits {tuple(budget_logits.shape)}, "
                              f"got {tuple(active.shape)}")
    cap = 2 * max_radius + 1
    u = torch.nan_to_num(budget_logits.detach().to(torch.float64) / temp, nan=0.0, posinf=1e300, neginf=-1e300)
    num_peaks = u.shape[-1]
    act = torch.ones_like(u, dtype=torch.bool) if active is None else active.to(torch.bool)
    n = torch.zeros_like(u, dtype=torch.long)
    remaining = torch.full(u.shape[:-1], budget, dtype=torch.long, device=u.device)
    ranks = torch.arange(num_peaks, device=u.device).expand_as(n)
    for _ in range(num_peaks):
        elig = act & (n < cap)
        p = torch.softmax(u.masked_fill(~elig, -math.inf), dim=-1)
        p = torch.where(elig, p, torch.zeros_like(p))  # rows with no eligible peak: NaN -> 0
        x = remaining.unsqueeze(-1).to(torch.float64) * p
        f = torch.floor(x)
        rem = remaining - f.sum(-1).long()
        frac = torch.where(elig, x - f, torch.full_like(x, -1.0))
        order = torch.argsort(frac, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, ranks)
        extra = elig & (rank < rem.unsqueeze(-1))
        n = n + f.long() + extra.long()
        over = (n - cap).clamp_min(0)
        n = n - over
        remaining = over.sum(-1)
    return n


def gumbel_keep(budget_logits: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """bool [..., M]: the k peaks with the largest u + Gumbel(0, 1) noise (noise from ``generator``).

    Exactly k True per row; no host sync."""
    num_peaks = budget_logits.shape[-1]
    _check_int("gumbel_topk", k, 1)
    if k > num_peaks:
        raise ScopeInputError(f"gumbel_topk ({k}) must be <= the number of pointers M ({num_peaks})")
    uni = torch.rand(budget_logits.shape, generator=generator, dtype=torch.float64, device=budget_logits.device)
    uni = uni.clamp(min=torch.finfo(torch.float64).tiny)
    scores = budget_logits.detach().to(torch.float64) - torch.log(-torch.log(uni))
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


# ----------------------------------------------------------------------------------------------
# steps 4-5: union, full / partial split, BlockMask


def _compact(values: Tensor, keep: Tensor, width: int, pad: int) -> Tensor:
    """Move the kept entries of each row to the front (order kept), pad to ``width`` with ``pad``."""
    pos = keep.long().cumsum(-1) - 1
    idx = torch.where(keep, pos, torch.full_like(pos, width))
    out = torch.full((*values.shape[:-1], width + 1), pad, dtype=values.dtype, device=values.device)
    out.scatter_(-1, idx, torch.where(keep, values, torch.full_like(values, pad)))
    return out[..., :width]


def _transpose_sparse(num: Tensor, idx: Tensor, num_kv_blocks: int, width: int) -> tuple[Tensor, Tensor]:
    """kv-side lists (num [B, H, QB], idx [B, H, QB, W]) -> q-side (int32 [B, H, KVB],
    int32 [B, H, KVB, width]: query blocks ascending, 0-padded) by sort + scatter, no dense matrix."""
    bsz, heads, num_q, w = idx.shape
    valid = torch.arange(w, device=idx.device) < num.long().unsqueeze(-1)
    qb = torch.arange(num_q, device=idx.device)[:, None]
    sentinel = num_kv_blocks * num_q
    key = torch.where(valid, idx.long() * num_q + qb, torch.full_like(valid, sentinel, dtype=torch.long))
    key = key.reshape(bsz, heads, num_q * w).sort(-1).values
    ok = key < sentinel
    kb = torch.where(ok, key // num_q, torch.full_like(key, num_kv_blocks))
    counts = torch.zeros(bsz, heads, num_kv_blocks + 1, dtype=torch.long, device=idx.device)
    counts.scatter_add_(-1, kb, torch.ones_like(kb))
    starts = counts.cumsum(-1) - counts
    rank = torch.arange(key.shape[-1], device=idx.device) - starts.gather(-1, kb)
    flat = torch.where(ok, kb * width + rank, torch.full_like(kb, num_kv_blocks * width))
    out = torch.zeros(bsz, heads, (num_kv_blocks + 1) * width, dtype=torch.long, device=idx.device)
    out.scatter_(-1, flat, torch.where(ok, key % num_q, torch.zeros_like(key)))
    q_idx = out.view(bsz, heads, num_kv_blocks + 1, width)[:, :, :num_kv_blocks]
    return counts[..., :num_kv_blocks].to(torch.int32), q_idx.to(torch.int32).contiguous()


def _assemble(
    *, seq_len: int, block: int, dsb: Tensor, seg: Tensor | None, ptr_blocks: Tensor, ptr_valid: Tensor,
    heads: int, local_blocks: int, global_blocks: int, width: int, mask_mod: MaskMod,
    compute_q_blocks: bool, q_width: int,
) -> tuple[BlockMask, Tensor, Tensor]:
    """Union (step 4) and BlockMask (step 5). dsb [B, QB]; ptr_blocks/ptr_valid [B, H, QB, P]."""
    device = dsb.device
    num_blocks = seq_len // block
    bsz = dsb.shape[0]
    qb = torch.arange(num_blocks, device=device)
    lo = dsb[:, None, :, None]  # [B, 1, QB, 1]
    local = (qb[:, None] - torch.arange(local_blocks, device=device)).expand(bsz, 1, num_blocks, local_blocks)
    glob = lo + torch.arange(global_blocks, device=device)
    qcol = qb[:, None]
    sentinel = num_blocks
    parts = [
        torch.where(local >= lo, local, sentinel).expand(bsz, heads, num_blocks, local_blocks),
        torch.where(glob <= qcol, glob, sentinel).expand(bsz, heads, num_blocks, global_blocks),
        torch.where(ptr_valid, ptr_blocks, sentinel).expand(bsz, heads, num_blocks, ptr_blocks.shape[-1]),
    ]
    cand = torch.cat(parts, dim=-1).sort(-1).values
    keep = cand < sentinel
    keep[..., 1:] &= cand[..., 1:] != cand[..., :-1]
    kv_num = keep.sum(-1)
    kv_idx = _compact(cand, keep, width, -1)  # [B, H, QB, width] int64, -1 padded

    valid = torch.arange(width, device=device) < kv_num.unsqueeze(-1)
    kb = kv_idx.clamp_min(0)
    full = valid & (kb < qcol)
    if seg is not None:
        seg_first = seg[:, ::block]  # [B, KVB]
        seg_last = seg[:, block - 1 :: block]  # [B, QB]
        b_idx = torch.arange(bsz, device=device)[:, None, None, None]
        full &= seg_first[b_idx, kb] == seg_last[:, None, :, None]
    partial = valid & ~full
    part_idx = _compact(kv_idx, partial, width, 0).to(torch.int32)
    full_idx = _compact(kv_idx, full, width, 0).to(torch.int32)
    part_num = partial.sum(-1).to(torch.int32)
    full_num = full.sum(-1).to(torch.int32)
    if compute_q_blocks:
        q_num, q_idx = _transpose_sparse(part_num, part_idx, num_blocks, q_width)
        fq_num, fq_idx = _transpose_sparse(full_num, full_idx, num_blocks, q_width)
        block_mask = BlockMask(
            seq_lengths=(seq_len, seq_len), kv_num_blocks=part_num, kv_indices=part_idx,
            full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=q_num, q_indices=q_idx,
            full_q_num_blocks=fq_num, full_q_indices=fq_idx, BLOCK_SIZE=(block, block), mask_mod=mask_mod,
        )
    else:
        block_mask = BlockMask.from_kv_blocks(
            part_num, part_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
            seq_lengths=(seq_len, seq_len), compute_q_blocks=False,
        )
    return block_mask, kv_idx.to(torch.int32), kv_num.to(torch.int32)


def _documents(doc_ids: Tensor | None, seq_len: int, block: int, batch: int | None,
               device: torch.device | None) -> tuple[Tensor, Tensor | None]:
    """-> (doc_start_block int64 [B|1, QB], segment ids [B|1, T] or None)."""
    ids = _check_doc_ids(doc_ids, seq_len, batch)
    if ids is None:
        return torch.zeros(1, seq_len // block, dtype=torch.long, device=device), None
    seg, start = _segments(ids.to(device) if device is not None else ids)
    return start[:, ::block] // block, seg


def build_pointer_block_mask(
    d_star: Tensor,
    budget_logits: Tensor,
    seq_len: int,
    *,
    block: int,
    budget: int,
    local_blocks: int,
    global_blocks: int,
    max_radius: int,
    budget_temp: float = 1.0,
    representative: str = "last",
    doc_ids: Tensor | None = None,
    gumbel_topk: int | None = None,
    generator: torch.Generator | None = None,
    training: bool = False,
    compute_q_blocks: bool | None = None,
    t_rep: Tensor | None = None,
) -> PointerMask:
    """Pointer block-sparse mask (the contract's rule, steps 1-5; see the module docstring).

    d_star [B, H, QB, M] (tokens) and budget_logits [B, H, QB, M] are block-level (one row per query
    block, taken at its representative query). ``gumbel_topk`` acts only when ``training``.
    ``compute_q_blocks`` (default: ``training``) also builds the q-side lists the backward pass needs.
    ``t_rep`` [QB] (float, tokens) overrides ``representative``: the positions the centres are measured
    from (e.g. a causal representative, the previous block's last token; negative values are allowed
    and clamp to the document start).
    """
    num_blocks = _check_seq(seq_len, block)
    budget = _check_int("budget", budget, 0)
    local_blocks = _check_int("local_blocks", local_blocks, 1)
    global_blocks = _check_int("global_blocks", global_blocks, 0)
    max_radius = _check_int("max_radius", max_radius, 0)
    budget_temp = _check_temp(budget_temp)
    _check_flags(training=training, compute_q_blocks=compute_q_blocks)
    if not isinstance(d_star, Tensor) or d_star.dim() != 4:
        raise ScopeInputError(f"d_star must be a 4-d tensor [B, H, QB, M], got "
                              f"{tuple(d_star.shape) if isinstance(d_star, Tensor) else type(d_star).__name__}")
    if d_star.shape[2] != num_blocks:
        raise ScopeInputError(f"d_star must have QB = seq_len / block = {num_blocks} rows in dim 2, "
                              f"got {tuple(d_star.shape)}")
    if d_star.shape[3] < 1:
        raise ScopeInputError(f"d_star must have M >= 1 pointers in dim 3, got {tuple(d_star.shape)}")
    if not isinstance(budget_logits, Tensor) or budget_logits.shape != d_star.shape:
        got = tuple(budget_logits.shape) if isinstance(budget_logits, Tensor) else type(budget_logits).__name__
        raise ScopeInputError(f"budget_logits must have the shape of d_star {tuple(d_star.shape)}, got {got}")
    if gumbel_topk is not None:
        _check_int("gumbel_topk", gumbel_topk, 1)
        if gumbel_topk > d_star.shape[3]:
            raise ScopeInputError(f"gumbel_topk ({gumbel_topk}) must be <= the number of pointers "
                                  f"M ({d_star.shape[3]})")
    if t_rep is None:
        t_rep = representative_positions(seq_len, block, representative, device=d_star.device)
    elif not isinstance(t_rep, Tensor) or not t_rep.is_floating_point() or tuple(t_rep.shape) != (num_blocks,):
        seen = f"{tuple(t_rep.shape)} {t_rep.dtype}" if isinstance(t_rep, Tensor) else type(t_rep).__name__
        raise ScopeInputError(f"t_rep must be a floating tensor of shape [QB] = [{num_blocks}], got {seen}")
    t_rep = t_rep.to(device=d_star.device, dtype=torch.float64)
    bsz, heads, _, num_peaks = d_star.shape
    dsb, seg = _documents(doc_ids, seq_len, block, bsz, d_star.device)
    dsb = dsb.expand(bsz, num_blocks)
    seg = None if seg is None else seg.expand(bsz, seq_len)

    centres, clamped = pointer_centres(d_star, t_rep, block, dsb)
    if training and gumbel_topk is not None:
        active = gumbel_keep(budget_logits, gumbel_topk, generator)
    else:
        active = torch.ones(d_star.shape, dtype=torch.bool, device=d_star.device)
    alloc = allocate_budget(budget_logits, budget, max_radius, budget_temp, active)

    # pointer windows through `budget` slots: slot s belongs to the peak m with cum[m-1] <= s < cum[m]
    cum = alloc.cumsum(-1).contiguous()
    slots = torch.arange(budget, device=d_star.device).expand(bsz, heads, num_blocks, budget).contiguous()
    # searchsorted(cum, slots, right=True) as a count over the M peaks: inductor's GPU lowering of
    # searchsorted on these batched shapes fails to compile in torch 2.11 (bucketize loop-carried shape).
    peak = (cum[..., None, :] <= slots[..., None]).sum(-1)
    ptr_valid = peak < num_peaks
    pk = peak.clamp_max(num_peaks - 1)
    n = alloc.gather(-1, pk)
    first = (cum - alloc).gather(-1, pk)
    ptr_blocks = centres.gather(-1, pk) - torch.div(n - 1, 2, rounding_mode="floor") + (slots - first)
    qcol = torch.arange(num_blocks, device=d_star.device)[:, None]
    ptr_valid &= (ptr_blocks >= dsb[:, None, :, None]) & (ptr_blocks <= qcol)

    width = local_blocks + global_blocks + budget + num_peaks
    mask_mod = document_causal_mask(None if seg is None else seg)
    block_mask, kv_idx, kv_num = _assemble(
        seq_len=seq_len, block=block, dsb=dsb, seg=seg, ptr_blocks=ptr_blocks, ptr_valid=ptr_valid,
        heads=heads, local_blocks=local_blocks, global_blocks=global_blocks, width=width, mask_mod=mask_mod,
        compute_q_blocks=training if compute_q_blocks is None else compute_q_blocks, q_width=num_blocks,
    )
    return PointerMask(
        block_mask=block_mask,
        kv_indices=kv_idx,
        kv_num_blocks=kv_num,
        centres=torch.where(active, centres, -1).to(torch.int32),
        alloc=alloc.to(torch.int32),
        clamped=clamped & active,
        budget_used=alloc.sum(-1).to(torch.int32),
        doc_start_block=dsb.to(torch.int32),
        t_rep=t_rep,
    )


def sliding_window_block_mask(
    seq_len: int, block: int, local_blocks: int, doc_ids: Tensor | None = None, *,
    device: torch.device | None = None, compute_q_blocks: bool = False,
) -> PointerMask:
    """Static fallback: the local band ``max(doc_start, qb - local_blocks + 1) .. qb`` only (no globals,
    no pointers), document-causal at token level. Shape [B|1, 1, QB, local_blocks] (broadcast over heads);
    M = 0 in centres/alloc/clamped. The q side, when asked for, has width min(QB, local_blocks)."""
    num_blocks = _check_seq(seq_len, block)
    local_blocks = _check_int("local_blocks", local_blocks, 1)
    _check_flags(compute_q_blocks=compute_q_blocks)
    if device is not None:
        device = parse_device("device", device, error=ScopeInputError)
    elif doc_ids is not None:
        device = doc_ids.device
    dsb, seg = _documents(doc_ids, seq_len, block, None, device)
    bsz = dsb.shape[0]
    empty = torch.zeros(bsz, 1, num_blocks, 0, dtype=torch.long, device=dsb.device)
    block_mask, kv_idx, kv_num = _assemble(
        seq_len=seq_len, block=block, dsb=dsb, seg=seg, ptr_blocks=empty, ptr_valid=empty.bool(), heads=1,
        local_blocks=local_blocks, global_blocks=0, width=local_blocks,
        mask_mod=document_causal_mask(seg), compute_q_blocks=compute_q_blocks,
        q_width=min(num_blocks, local_blocks),
    )
    zeros = torch.zeros(bsz, 1, num_blocks, 0, dtype=torch.int32, device=dsb.device)
    return PointerMask(
        block_mask=block_mask, kv_indices=kv_idx, kv_num_blocks=kv_num, centres=zeros, alloc=zeros,
        clamped=zeros.bool(), budget_used=torch.zeros(bsz, 1, num_blocks, dtype=torch.int32, device=dsb.device),
        doc_start_block=dsb.to(torch.int32), t_rep=representative_positions(seq_len, block, "last", dsb.device),
    )


# ----------------------------------------------------------------------------------------------
# telemetry (SCOPE.md section 4, the pointer fields)


def _hist(x: Tensor, edges: Sequence[float]) -> dict[str, list]:
    """counts[i] = #{edges[i] <= x < edges[i+1]}; below edges[0] -> bin 0, >= edges[-1] -> last bin."""
    e = torch.tensor(list(edges), dtype=torch.float64)
    idx = (torch.bucketize(x.detach().double().flatten().cpu(), e, right=True) - 1).clamp(0, len(e) - 1)
    return {"edges": [float(v) for v in edges], "counts": torch.bincount(idx, minlength=len(e)).tolist()}


def pointer_stats(
    pm: PointerMask,
    d_star: Tensor,
    pi: Tensor | None,
    block: int,
    *,
    budget: int,
    local_blocks: int,
    global_blocks: int,
    max_radius: int,
    dstar_token_edges: Sequence[float] | None = None,
    dstar_block_edges: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Pointer telemetry of one mask (host syncs: call every N steps, not in the forward).

    Rows are the (b, h, qb) of ``pm``; *kept peaks* are the (b, h, qb, m) with centre != -1 (not dropped
    by Gumbel top-k), whatever their allocation. ``d_star`` is the block-level D* given to
    :func:`build_pointer_block_mask` (same ``block``); unclamped centres are measured from ``pm.t_rep``.
    Fractions over an empty set are 0.0.

    kv_unique_blocks: {mean, p50, p90, min, max} over rows of kv_num_blocks (local + global + pointer
        blocks, deduplicated); p50/p90 by linear interpolation (torch.quantile).
    ptr_outside_local_frac: kept peaks whose centre lies below the local band (c < qb - local_blocks + 1).
    ptr_center_docstart_frac: {"genuine": kept peaks whose unclamped centre floor((t_rep - D*)/block)
        equals doc_start_block, "clamped": kept peaks whose unclamped centre lies before doc_start_block
        (overshoots clamped to it)}; both over kept peaks.
    ptr_center_block0_frac: kept peaks whose (clamped) centre is block 0.
    ptr_clamped_frac: kept peaks clamped at either end (pm.clamped).
    ptr_alloc_hist: counts of kept peaks by allocation n = 0 .. 2*max_radius + 1.
    ptr_radius_hist: counts of kept peaks with n >= 1 by radius r = ceil((n - 1) / 2) = n // 2 (the
        window reaches r blocks from its centre on its longer side), r = 0 .. max_radius.
    budget_configured: ``budget`` (extra blocks per query block).
    budget_used: means over rows of {"alloc": sum_m n_m; "placed": sum_m |window_m clipped to
        [doc_start, qb]| (overlaps counted per peak); "unique_extra": kv_num_blocks minus the size of
        (local band U global blocks), i.e. distinct blocks the pointers added}.
    budget_used_frac: budget_used["unique_extra"] / budget (0.0 when budget = 0).
    pi_entropy, pi_entropy_norm (only when pi [..., M] is given): mean over rows of -sum pi log pi, and
        that divided by log M (0.0 when M = 1).
    dstar_hist_tokens: {"edges", "counts"} of all D* values (every peak) in tokens; default edges
        0, 1, 2, 4, ..., 2^20. dstar_hist_blocks: the same for D* / block (fractional blocks); default
        edges 0, 1, 2, 4, ..., up to the first power of two >= 2^20 / block. A bin is
        [edges[i], edges[i+1]); values below edges[0] count in bin 0, >= edges[-1] in the last bin.
    """
    num_blocks = pm.kv_num_blocks.shape[-1]
    out: dict[str, Any] = {}

    kvn = pm.kv_num_blocks.detach().flatten().double().cpu()
    out["kv_unique_blocks"] = {
        "mean": float(kvn.mean()),
        "p50": float(torch.quantile(kvn, 0.5)),
        "p90": float(torch.quantile(kvn, 0.9)),
        "min": float(kvn.min()),
        "max": float(kvn.max()),
    }

    centres = pm.centres.detach().long().cpu()
    alloc = pm.alloc.detach().long().cpu()
    kept = centres >= 0
    n_kept = int(kept.sum())
    dsb = pm.doc_start_block.detach().long().cpu()[:, None, :, None]
    qb = torch.arange(num_blocks)[:, None]

    def frac(sel: Tensor) -> float:
        return float((sel & kept).sum()) / n_kept if n_kept else 0.0

    raw = torch.floor((pm.t_rep.detach().double().cpu()[:, None] - d_star.detach().double().cpu()) / block)
    out["ptr_outside_local_frac"] = frac(centres < qb - local_blocks + 1)
    out["ptr_center_docstart_frac"] = {"genuine": frac(raw == dsb), "clamped": frac(raw < dsb)}
    out["ptr_center_block0_frac"] = frac(centres == 0)
    out["ptr_clamped_frac"] = frac(pm.clamped.detach().cpu())
    cap = 2 * max_radius + 1
    out["ptr_alloc_hist"] = torch.bincount(alloc[kept].clamp(0, cap), minlength=cap + 1).tolist()
    placed_n = alloc[kept & (alloc >= 1)]
    out["ptr_radius_hist"] = torch.bincount(placed_n // 2, minlength=max_radius + 1).tolist()

    # budget: allocated, placed after clipping, unique extra blocks beyond local U global
    start = centres - torch.div(alloc - 1, 2, rounding_mode="floor")
    end = start + alloc - 1
    placed = ((torch.minimum(end, qb) - torch.maximum(start, dsb) + 1).clamp_min(0) * (kept & (alloc >= 1))).sum(-1)
    dsb3 = dsb[..., 0]
    qb2 = torch.arange(num_blocks)
    local_lo = torch.maximum(dsb3, qb2 - local_blocks + 1)
    n_local = qb2 - local_lo + 1
    glob_hi = torch.minimum(dsb3 + global_blocks - 1, qb2)
    n_glob = (glob_hi - dsb3 + 1).clamp_min(0)
    overlap = (torch.minimum(glob_hi, qb2) - torch.maximum(dsb3, local_lo) + 1).clamp_min(0)
    base = n_local + n_glob - overlap  # [B, 1, QB]
    unique_extra = pm.kv_num_blocks.detach().long().cpu() - base
    out["budget_configured"] = budget
    out["budget_used"] = {
        "alloc": float(pm.budget_used.detach().double().mean()),
        "placed": float(placed.double().mean()),
        "unique_extra": float(unique_extra.double().mean()),
    }
    out["budget_used_frac"] = out["budget_used"]["unique_extra"] / budget if budget else 0.0

    if pi is not None:
        p = pi.detach().double().cpu()
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
        num_peaks = p.shape[-1]
        out["pi_entropy"] = float(ent.mean())
        out["pi_entropy_norm"] = float(ent.mean()) / math.log(num_peaks) if num_peaks > 1 else 0.0

    tok_edges = dstar_token_edges if dstar_token_edges is not None else [0.0] + [2.0**k for k in range(21)]
    if dstar_block_edges is None:
        top = max(0, math.ceil(math.log2(max(1.0, 2.0**20 / block))))
        dstar_block_edges = [0.0] + [2.0**k for k in range(top + 1)]
    out["dstar_hist_tokens"] = _hist(d_star, tok_edges)
    out["dstar_hist_blocks"] = _hist(d_star.detach().double() / block, dstar_block_edges)
    return out
