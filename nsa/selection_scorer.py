"""Block selection (paper Eq. 8-12): which selection blocks each query group reads.

p_cmp (Eq. 8) is the compression branch's own softmax, reused (no second projection). Eq. 9 maps
it to selection blocks by token overlap, Eq. 10 sums it over the G heads of a group, and top-n
picks n blocks per (t, group): the forced blocks {0, t // l', t // l' - 1} plus the best remaining
*complete* blocks (end <= t + 1). Selection carries no gradient. Eq. 9 and Eq. 10 are linear, so the
chunked path sums over the group first.

Tie rule (every backend follows it, the Triton decode kernel included): blocks whose importance
values are equal (==, i.e. bitwise equal for these non-negative sums) go to the lower block index,
exactly, with no epsilon. Importance is a floating-point sum: computed in another order (another
backend, chunking, or CPU vector width, whose exp and dot-product lanes round differently) values
equal in exact arithmetic may differ in the last bits, and then they are not ties: the larger wins.
So end-to-end selections equal a float64 reference's except where the reference's scores at the
selection boundary are within rounding of each other (then either block may be chosen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nsa.attention_core import accumulation_dtype, query_chunks
from nsa.block_index import (
    compressed_visibility,
    num_compressed_blocks,
    num_selection_blocks,
    overlap_kernel,
)
from nsa.compressed_attention import check_compressed_inputs, compressed_chunk_size
from nsa.errors import NSAInputError
from nsa.validation import (
    check_divides,
    check_lse,
    check_nonnegative_int,
    check_positions_layout,
    check_positive_int,
    describe,
)


def check_selection_sizes(block_stride: int, sel_block_size: int, num_selected: int) -> None:
    check_positive_int("sel_block_size", sel_block_size)
    check_positive_int("num_selected", num_selected)
    check_divides("block_stride", block_stride, "sel_block_size", sel_block_size)
    if num_selected < 3:
        raise NSAInputError(f"num_selected={num_selected} must be >= 3 (it includes the three forced blocks)")


def map_cmp_to_sel(
    p_cmp: torch.Tensor, block_size: int, block_stride: int, sel_block_size: int, num_sel_blocks: int
) -> torch.Tensor:
    """Eq. 9: p_sel[..., j] = sum_i p_cmp[..., i] * |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / l.

    p_cmp [..., N_cmp] -> [..., num_sel_blocks]. Requires d | l and d | l'. Computed as a strided
    correlation (see block_index.overlap_kernel), O(N_cmp * (l + l') / d) work and no N_cmp x N_sel matrix.
    """
    check_positive_int("block_size", block_size)
    check_positive_int("block_stride", block_stride)
    check_divides("block_stride", block_stride, "block_size", block_size)
    check_positive_int("sel_block_size", sel_block_size)
    check_divides("block_stride", block_stride, "sel_block_size", sel_block_size)
    check_nonnegative_int("num_sel_blocks", num_sel_blocks)
    if not isinstance(p_cmp, torch.Tensor) or p_cmp.dim() == 0 or not p_cmp.is_floating_point():
        raise NSAInputError(f"p_cmp must be a floating tensor [..., N_cmp], got {describe(p_cmp)}")
    weights, pad = overlap_kernel(block_size, block_stride, sel_block_size, p_cmp.device, p_cmp.dtype)
    ratio = sel_block_size // block_stride
    num_cmp = p_cmp.shape[-1]
    if num_cmp == 0:
        return p_cmp.new_zeros(*p_cmp.shape[:-1], num_sel_blocks)
    right = max(0, (num_sel_blocks - 1) * ratio + weights.numel() - pad - num_cmp)
    flat = F.pad(p_cmp.reshape(-1, 1, num_cmp), (pad, right))
    kernel = weights.view(1, 1, -1)
    out = F.conv1d(flat, kernel, stride=ratio)[..., :num_sel_blocks]
    return out.reshape(*p_cmp.shape[:-1], num_sel_blocks)


def group_reduce(p: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Eq. 10: sum scores over the G query heads of each group. [B, T, HQ, N] -> [B, T, Hkv, N]."""
    check_positive_int("num_kv_heads", num_kv_heads)
    if not isinstance(p, torch.Tensor) or p.dim() != 4 or p.shape[2] % num_kv_heads != 0:
        raise NSAInputError(
            f"p must be [B, T, HQ, N] with HQ a multiple of num_kv_heads={num_kv_heads}, got {describe(p)}"
        )
    return p.unflatten(2, (num_kv_heads, -1)).sum(dim=3)


def topn_blocks(
    scores: torch.Tensor, sel_block_size: int, num_selected: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 11-12: top-n selection blocks per row with the three forced blocks.

    scores [B, T, Hkv, N] (group importance per selection block); positions an integer tensor [B|1, T] or [T]
    on scores' device (absolute query positions, each in [0, N * l'): the block holding it is forced, so it must
    be one of the N; checking that reads the values, one host sync; None -> arange(T), which requires
    N >= ceil(T / l')). Other arguments break NSAInputError's rules as in select_blocks.
    Returns int64 [B, T, Hkv, num_selected]: chosen blocks ascending, then -1 for unused slots.
    Never a future or incomplete block (except the forced current block), never a duplicate;
    equal scores go to the lower block index, exactly (stable sort, no epsilon arithmetic; see the
    module docstring for what counts as equal).
    """
    check_positive_int("sel_block_size", sel_block_size)
    check_positive_int("num_selected", num_selected)
    if num_selected < 3:
        raise NSAInputError(f"num_selected={num_selected} must be >= 3 (it includes the three forced blocks)")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise NSAInputError(f"scores must be [B, T, Hkv, N], got {describe(scores)}")
    if positions is None:
        if scores.shape[-1] < num_selection_blocks(scores.shape[1], sel_block_size):
            raise NSAInputError(
                f"scores has N={scores.shape[-1]} blocks but T={scores.shape[1]} needs ceil(T / sel_block_size)"
            )
        positions = torch.arange(scores.shape[1], device=scores.device)
    else:
        _check_topn_positions(positions, scores, sel_block_size)
    return _topn(scores, sel_block_size, num_selected, positions)


def _check_topn_positions(positions: torch.Tensor, scores: torch.Tensor, sel_block_size: int) -> None:
    """positions: integer [T] or [B|1, T] on scores' device, each in [0, N * l') so that the block holding it
    (forced) is one of the scores' N blocks. The range costs one host sync; the library's own callers build
    their positions and go to _topn directly."""
    if not isinstance(positions, torch.Tensor) or positions.dtype == torch.bool or positions.is_floating_point() \
            or positions.is_complex():
        raise NSAInputError(f"positions must be an integer tensor (token positions), got {describe(positions)}")
    batch, seq_len, _, num_blocks = scores.shape
    check_positions_layout(positions, batch, seq_len, scores.device, of="scores")
    limit = num_blocks * sel_block_size
    if positions.numel() and bool(((positions < 0) | (positions >= limit)).any()):
        raise NSAInputError(f"positions must lie in [0, {limit - 1}]: scores has N={num_blocks} blocks of "
                            f"sel_block_size={sel_block_size}, and the block holding each position is forced")


def _topn(scores: torch.Tensor, sel_block_size: int, num_selected: int, positions: torch.Tensor) -> torch.Tensor:
    """topn_blocks without its checks (the chunk step calls it with positions it built, so no host sync)."""
    num_blocks = scores.shape[-1]
    if positions.dim() == 1:
        positions = positions[None]
    t = positions[:, :, None, None]  # [B|1, T, 1, 1]
    block = torch.arange(num_blocks, device=scores.device)
    current = t // sel_block_size
    forced = (block == 0) | (block == current) | (block == current - 1)
    complete = (block + 1) * sel_block_size <= t + 1
    # Rank by (class, score): forced (2) before complete candidates (1) before the rest (0). Two
    # stable sorts, secondary key first, keep equal scores in index order: ties go to the lower index.
    rank_class = torch.where(forced, 2, complete.long()).expand(scores.shape)
    by_score = scores.sort(dim=-1, descending=True, stable=True).indices
    class_by_score = rank_class.gather(-1, by_score)
    by_class = class_by_score.sort(dim=-1, descending=True, stable=True).indices
    ranked = by_score.gather(-1, by_class)
    take = min(num_selected, num_blocks)
    chosen = torch.where(class_by_score.gather(-1, by_class)[..., :take] == 0, num_blocks, ranked[..., :take])
    chosen = chosen.sort(dim=-1).values
    chosen = torch.where(chosen == num_blocks, -1, chosen)
    if take < num_selected:
        chosen = F.pad(chosen, (0, num_selected - take), value=-1)
    return chosen


def select_from_group_probs(
    p_grp_cmp: torch.Tensor, positions: torch.Tensor, num_sel: int, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int,
) -> torch.Tensor:
    """Chunk helper: group-summed compressed probabilities [B, C, Hkv, N_vis] of queries at
    positions [B|1, C] -> block indices over the first num_sel (host bound) selection blocks."""
    p_sel = map_cmp_to_sel(p_grp_cmp, block_size, block_stride, sel_block_size, num_sel)
    return _topn(p_sel, sel_block_size, num_selected, positions)


@torch.no_grad()
def select_blocks(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, block_size: int, block_stride: int,
    sel_block_size: int, num_selected: int, scale: float | None = None,
) -> torch.Tensor:
    """Block indices for the selection branch from the compression branch's scores.

    Layout: q [B, T, HQ, Dk], k_cmp [B, N_cmp, Hkv, Dk], lse [B, T, HQ] from compressed_attention
    (same q, k_cmp and scale). Recomputes p_cmp = exp(q . k_cmp * scale - lse) over visible blocks
    (Eq. 8), then Eq. 9, Eq. 10 and top-n. Returns int64 [B, T, Hkv, num_selected] (-1 = unused).
    """
    seq_len = check_compressed_inputs(q, k_cmp, k_cmp, block_size, block_stride, scale)
    check_selection_sizes(block_stride, sel_block_size, num_selected)
    check_lse(lse, q)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    num_kv_heads = k_cmp.shape[2]
    acc = accumulation_dtype(q.dtype)
    chunk = compressed_chunk_size(q, k_cmp)
    outs = []
    for start, end in query_chunks(seq_len, chunk):
        num_visible = num_compressed_blocks(end, block_size, block_stride)
        positions = torch.arange(start, end, device=q.device)
        visible = compressed_visibility(positions, num_visible, block_size, block_stride)
        keys = k_cmp[:, :num_visible].to(acc).repeat_interleave(q.shape[2] // num_kv_heads, dim=2)
        scores = torch.einsum("bthd,bnhd->bthn", q[:, start:end].to(acc), keys) * scale
        p_cmp = torch.where(visible[None, :, None], torch.exp(scores - lse[:, start:end, :, None].to(acc)), 0)
        outs.append(select_from_group_probs(
            group_reduce(p_cmp, num_kv_heads), positions[None], num_selection_blocks(end, sel_block_size),
            block_size, block_stride, sel_block_size, num_selected,
        ))
    return torch.cat(outs, dim=1)
