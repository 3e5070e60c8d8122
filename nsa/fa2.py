"""Opt-in FlashAttention-2 path (the design card's NSA_USE_FA2=1) for the PyTorch path's window and compressed branches.

With the ``flash-attn`` package (>= 2.3) importable, the environment variable NSA_USE_FA2=1 and inputs it runs (CUDA,
float16 / bfloat16, Dk == Dv <= 256), nsa_attention's PyTorch path (backend "torch", or "auto" where the Triton
kernels cannot run) computes, per batch of equal-length sequences (layout [B, T, H, D], GQA: head h reads kv head
h // G, which is also flash-attn's convention):

- the window branch in one ``flash_attn_func(q, k_win, v_win, causal=True, window_size=(w - 1, 0))`` call: flash-attn
  lets query i read keys [i - left, i + right] when seqlen_q == seqlen_k, so query t reads t - w + 1 .. t;
- the compression branch with the causal offset trick, one ``flash_attn_func(..., causal=True)`` call per residue
  class c = t mod d of the query positions (d = block_stride). Query t = c + r*d sees compressed block i iff
  i*d + l - 1 <= t, i.e. the first r + n0(c) blocks with n0(c) = (c + 1 - l) // d + 1 (d | l): one more block per
  row of the class. flash-attn aligns its causal mask to the bottom right corner (since 2.1: row r of seqlen_q rows
  reads keys j <= r + seqlen_k - seqlen_q), so the class's rows q[:, c::d] against the first
  seqlen_k = seqlen_q + n0(c) - 1 compressed blocks read exactly their visible blocks (no key is copied). Rows that
  see no block come back zero (flash-attn's all-masked rows); a class whose seqlen_k <= 0 is not launched;
- the selection from that branch's ``softmax_lse`` (``return_attn_probs=True``; the returned probabilities are
  documented as "for testing only" and are not used): ``nsa.selection_scorer.select_blocks`` recomputes
  p_cmp = exp(q . k_cmp * scale - lse) over each query's visible blocks (Eq. 8) and applies Eq. 9-12, i.e. the
  selection reads the same probabilities the default path takes from its own softmax (the lse of rows that see
  nothing is never read);
- the selection branch and the gated sum on the PyTorch path, chunk by chunk over queries (each chunk recomputed
  in the backward when gradients are needed, so memory stays O(T * n * l')).

Non-finite inputs follow the library's rule (nsa.nonfinite.nsa_nonfinite_guard): flash-attn runs on sanitized
inputs and the rows that see a NaN / inf come back NaN. Elsewhere (flash-attn missing or too old, CPU tensors,
float32 / float64, Dk != Dv, head dims > 256) the default path runs and nsa.dispatch.choose_fa2 logs why, once.
flash-attn is imported only when NSA_USE_FA2=1 asks for it.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from nsa.attention_core import budget_chunk_size, query_chunks
from nsa.functional import NSAOutput, NSASizes
from nsa.nonfinite import gated_sum, nsa_nonfinite_guard
from nsa.selected_attention import selected_attention_chunk
from nsa.selection_scorer import select_blocks

# window_size arrived in flash-attn 2.3 (bottom-right causal alignment in 2.1, GQA in 2.0).
FA2_MIN_VERSION = (2, 3)
FA2_DEVICE_TYPES = ("cuda",)
FA2_DTYPES = (torch.float16, torch.bfloat16)
FA2_MAX_HEAD_DIM = 256


def flash_attn_module() -> ModuleType | None:
    """The flash_attn package, or None where it is not importable."""
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


def fa2_obstacles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why flash-attn cannot run NSA's window and compression branches for queries q [B, T, HQ, Dk] over keys
    k [..., Dk] and values v [..., Dv] (empty when it can)."""
    obstacles = []
    module = flash_attn_module()
    if module is None:
        obstacles.append("flash-attn is not installed (pip install 'flash-attn>=2.3')")
    elif _version(getattr(module, "__version__", "0")) < FA2_MIN_VERSION:
        obstacles.append(f"flash-attn {module.__version__} is older than 2.3 (window_size)")
    if q.device.type not in FA2_DEVICE_TYPES:
        obstacles.append(f"tensors are on {q.device.type}, not CUDA")
    if q.dtype not in FA2_DTYPES:
        obstacles.append(f"dtype {q.dtype} is not float16/bfloat16")
    if k.shape[-1] != v.shape[-1]:
        obstacles.append(f"flash-attn needs head_dim == head_dim_v, got {k.shape[-1]} and {v.shape[-1]}")
    if max(k.shape[-1], v.shape[-1]) > FA2_MAX_HEAD_DIM:
        obstacles.append(f"head dim > {FA2_MAX_HEAD_DIM}")
    return obstacles


def _version(text: str) -> tuple[int, ...]:
    """'2.7.4.post1' -> (2, 7): the major and minor release numbers."""
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def nsa_attention_fa2(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor,
    k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *, sizes: NSASizes, scale: float,
) -> NSAOutput:
    """nsa_attention's PyTorch path with the window and compression branches in flash-attn (module docstring).

    Same arguments and result as the default path for one batch of equal-length sequences: q [B, T, HQ, Dk] rotated,
    k_cmp / v_cmp [B, num_cmp(T), Hkv, D] compressed, k_sel / v_sel / k_win / v_win [B, T, Hkv, D], gates
    [B, T, HQ, 3] activated (cmp, sel, win) -> NSAOutput(output [B, T, HQ, Dv], block_indices [B, T, Hkv, n]).
    The caller has validated the inputs and checked fa2_obstacles (nsa.dispatch.choose_fa2).
    """
    module = flash_attn_module()
    if module is None:  # choose_fa2 saw it: only a module removed since then lands here
        raise ImportError("nsa_attention_fa2 needs the flash-attn package")
    attend = functools.partial(_attend, module.flash_attn_func, sizes=sizes, scale=scale)
    return NSAOutput(*nsa_nonfinite_guard(attend, q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win, gates,
                                          block_size=sizes.block_size, block_stride=sizes.block_stride,
                                          sel_block_size=sizes.sel_block_size, window_size=sizes.window_size))


def _attend(flash_attn_func: Any, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_sel: torch.Tensor,
            v_sel: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, gates: torch.Tensor, *,
            sizes: NSASizes, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated layer on finite inputs: (output [B, T, HQ, Dv], block_indices [B, T, Hkv, n])."""
    l, d, l_sel, n, w = sizes
    o_cmp, lse = compressed_branch_fa2(flash_attn_func, q, k_cmp, v_cmp, l, d, scale)
    block_indices = select_blocks(q, k_cmp, lse, block_size=l, block_stride=d, sel_block_size=l_sel, num_selected=n,
                                  scale=scale)
    o_win = flash_attn_func(q, k_win, v_win, softmax_scale=scale, causal=True, window_size=(w - 1, 0))
    o_sel = selected_branch(q, k_sel, v_sel, block_indices, l_sel, scale)
    return gated_sum(gates, (o_cmp, o_sel, o_win)), block_indices


def compressed_branch_fa2(flash_attn_func: Any, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                          block_size: int, block_stride: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The compression branch through flash_attn_func, one call per residue class of query positions mod d.

    q [B, T, HQ, Dk], k_cmp / v_cmp [B, num_cmp(T), Hkv, D] -> (o [B, T, HQ, Dv] in q's dtype, lse [B, T, HQ]
    float32: flash-attn's softmax_lse of the scaled scores; rows that see no block: o = 0, lse = -inf).
    """
    batch, seq_len, num_heads, _ = q.shape
    out = q.new_zeros(batch, seq_len, num_heads, v_cmp.shape[-1])
    lse = torch.full((batch, seq_len, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for residue in range(min(block_stride, seq_len)):
        rows = q[:, residue::block_stride]  # positions residue + r*d, r = 0 .. seqlen_q - 1
        num_keys = rows.shape[1] + (residue + 1 - block_size) // block_stride  # seqlen_q + n0(c) - 1
        if num_keys <= 0:
            continue
        o, class_lse, _ = flash_attn_func(rows, k_cmp[:, :num_keys], v_cmp[:, :num_keys], softmax_scale=scale,
                                          causal=True, return_attn_probs=True)
        out[:, residue::block_stride] = o
        visible = torch.arange(rows.shape[1], device=q.device) + num_keys - rows.shape[1] >= 0  # row r reads r+n0 > 0
        lse[:, residue::block_stride] = torch.where(visible[:, None], class_lse.transpose(1, 2).float(), float("-inf"))
    return out, lse


def selected_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                    sel_block_size: int, scale: float) -> torch.Tensor:
    """The selection branch (q [B, T, HQ, Dk], k / v [B, T, Hkv, D], block_indices [B, T, Hkv, n] -> [B, T, HQ, Dv])
    chunk by chunk over queries; with gradients each chunk is recomputed in the backward instead of keeping its
    gathered keys (as the default path does)."""
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    per_query = block_indices.shape[-1] * sel_block_size * (num_heads + num_kv_heads * (k.shape[-1] + v.shape[-1]))
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outputs = []
    for start, end in query_chunks(q.shape[1], budget_chunk_size(per_query, q.shape[0])):
        step = functools.partial(_selected_chunk, block_indices=block_indices[:, start:end],
                                 positions=torch.arange(start, end, device=q.device)[None],
                                 sel_block_size=sel_block_size, scale=scale)
        outputs.append(checkpoint(step, q[:, start:end], k, v, use_reentrant=False) if recompute
                       else step(q[:, start:end], k, v))
    return torch.cat(outputs, dim=1)


def _selected_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_indices: torch.Tensor,
                    positions: torch.Tensor, sel_block_size: int, scale: float) -> torch.Tensor:
    return selected_attention_chunk(q, k, v, block_indices, positions, sel_block_size, scale)[0]
