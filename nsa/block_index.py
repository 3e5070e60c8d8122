"""Block arithmetic shared by the branches.

Compressed block i covers raw tokens [i*d, i*d + l) and becomes visible to query t once its last
token i*d + l - 1 <= t. Selection block j covers [j*l', (j+1)*l'). The Eq. 9 map from compressed to
selection scores weights compressed block i into selection block j by |tokens(i) ∩ tokens(j)| / l.
"""

from __future__ import annotations

import torch

from nsa.validation import check_nonnegative_int, check_positive_int


def num_compressed_blocks(seq_len: int, block_size: int, block_stride: int) -> int:
    """Number of compressed blocks fully inside the first seq_len tokens: num_cmp(S). Public (NSAInputError
    naming the argument: seq_len an int >= 0, the sizes positive ints); the checks are host-only."""
    check_nonnegative_int("seq_len", seq_len)
    check_positive_int("block_size", block_size)
    check_positive_int("block_stride", block_stride)
    return 0 if seq_len < block_size else (seq_len - block_size) // block_stride + 1


def num_selection_blocks(seq_len: int, sel_block_size: int) -> int:
    """ceil(seq_len / l'): selection blocks touching the first seq_len tokens (last may be partial)."""
    check_nonnegative_int("seq_len", seq_len)
    check_positive_int("sel_block_size", sel_block_size)
    return -(-seq_len // sel_block_size)


def compressed_visibility(
    positions: torch.Tensor, num_blocks: int, block_size: int, block_stride: int
) -> torch.Tensor:
    """Bool [..., num_blocks]: query at `positions` [...] sees compressed block i (i*d + l - 1 <= t)."""
    block_last_token = torch.arange(num_blocks, device=positions.device) * block_stride + block_size - 1
    return block_last_token <= positions[..., None]


def overlap_matrix(
    num_cmp: int, num_sel: int, block_size: int, block_stride: int, sel_block_size: int
) -> torch.Tensor:
    """Dense Eq. 9 weights [num_cmp, num_sel]: |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / l (float64)."""
    cmp_start = torch.arange(num_cmp, dtype=torch.float64)[:, None] * block_stride
    sel_start = torch.arange(num_sel, dtype=torch.float64)[None, :] * sel_block_size
    lo = torch.maximum(cmp_start, sel_start)
    hi = torch.minimum(cmp_start + block_size, sel_start + sel_block_size)
    return (hi - lo).clamp_min(0) / block_size


def overlap_kernel(
    block_size: int, block_stride: int, sel_block_size: int, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, int]:
    """Eq. 9 as a strided correlation: (weights [K], left padding P).

    With r = l'/d, compressed block i = j*r + u overlaps selection block j by a count that depends
    on u alone, nonzero for u in [-(l/d - 1), r - 1]. So p_sel[j] = sum_k p_cmp_padded[j*r + k] * w[k]
    with P = l/d - 1 zeros on the left and w[k] = overlap(u = k - P) / l. Built on `device` from
    integers (no host-to-device copy, so a decode step that uses it can be captured in a CUDA graph).
    """
    pad = block_size // block_stride - 1
    offsets = torch.arange(-pad, sel_block_size // block_stride, device=device, dtype=dtype) * block_stride
    overlap = (offsets + block_size).clamp_max(sel_block_size) - offsets.clamp_min(0)
    return overlap.clamp_min(0) / block_size, pad


def selection_token_index(
    block_indices: torch.Tensor, positions: torch.Tensor, sel_block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and validity of the selected blocks.

    block_indices [B, Tq, H_kv, S] (-1 = unused), positions [B|1, Tq] -> (tokens [B, Tq, H_kv, S*l'],
    valid [B, Tq, H_kv, S*l']). A token is valid when its slot is used and token <= the query position;
    invalid tokens are clamped to 0 so they can be gathered safely and then masked.
    """
    offsets = torch.arange(sel_block_size, device=block_indices.device)
    tokens = block_indices[..., None].long() * sel_block_size + offsets  # [B, Tq, H, S, l']
    valid = (block_indices[..., None] >= 0) & (tokens <= positions[:, :, None, None, None])
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    return tokens.flatten(-2), valid.flatten(-2)
