"""One NSA decode step: a single new query per sequence against the layer's cached branches.

decode_attention chooses the backend (nsa.dispatch) between decode_attention_reference (plain
PyTorch, the chunk step shared with prefill) and the fused Triton kernels of nsa.kernels.decode,
registered as the torch.library op nsa::decode_attention_triton so torch.compile can trace it.
Both take the same arguments and return the same DecodeResult.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nsa.dispatch import BackendChoice, choose_decode_backend
from nsa.errors import NSAInputError
from nsa.functional import NSASizes, nsa_attention_chunk
from nsa.kv_cache import gather_pages


class DecodeResult(NamedTuple):
    output: torch.Tensor  # [B, HQ, Dv], q's dtype
    block_indices: torch.Tensor  # [B, Hkv, n] int64, -1 = unused
    reads: torch.Tensor  # [B, Hkv, 3] int64: keys read per branch (cmp, sel, win), from the masks used


def decode_attention(
    q: torch.Tensor, gates: torch.Tensor, positions: torch.Tensor, *, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    num_cmp_bound: int, k_sel: torch.Tensor, v_sel: torch.Tensor, num_sel_blocks: int, k_win: torch.Tensor,
    v_win: torch.Tensor, sizes: NSASizes, scale: float, backend: str | BackendChoice = "auto",
    page_table: torch.Tensor | None = None,
) -> DecodeResult:
    """Gated NSA attention of one new token per sequence, after its K/V were written to the cache.

    Layout: q [B, HQ, Dk] (rotated), gates [B, HQ, 3] (activated; cmp, sel, win), positions [B] int64
    (absolute position t of each new token). k_cmp/v_cmp [B, rows, Hkv, D]: emitted compressed blocks
    (block i visible iff i*d + l - 1 <= t); k_sel/v_sel [B, rows, Hkv, D]: raw rotated tokens by
    absolute position; k_win/v_win [B, >= w, Hkv, D]: the window ring, slot s holding the latest
    position p <= t with p % w == s. num_cmp_bound / num_sel_blocks: host bounds on the compressed
    and selection blocks any sequence of the batch can see (the cache's largest length, or its
    capacity for static shapes). Causal alignment as in nsa_attention: the query at t reads
    compressed blocks ending <= t, selected tokens <= t and window keys t-w+1..t.
    backend: "auto" | "torch" | "triton" (chosen here by nsa.dispatch), or the BackendChoice a caller
    already made (NSAAttention chooses before writing the step's keys into its cache, so that a refused
    backend changes nothing).
    page_table (paged KV, NSAKVCache's paged layout): k_sel/v_sel are then pools [num_pages + 1, P, Hkv, D]
    of P-token pages (P a multiple of l') and page_table [B, pages] (int32) maps logical page position // P
    of sequence b to its physical page.
    Non-finite entries (nsa.nonfinite): both steps give NaN in every column of exactly the rows whose query holds a
    NaN / inf or that read a cache entry holding one (a hand-built cache's +-inf included), and every other row as
    if the entry were finite (a non-finite query attends as zeros toward its group's selection).
    """
    if page_table is not None and k_sel.shape[1] % sizes.sel_block_size:
        raise NSAInputError(f"page_table given: k_sel must be a pool of pages whose size is a multiple of "
                            f"sel_block_size={sizes.sel_block_size}, got pages of {k_sel.shape[1]} tokens")
    choice = backend if isinstance(backend, BackendChoice) else choose_decode_backend(
        backend, q, k_cmp, v_cmp, k_sel, v_sel, k_win, v_win)
    args = (q, gates, positions, k_cmp, v_cmp, num_cmp_bound, k_sel, v_sel, num_sel_blocks, k_win, v_win)
    if choice.name == "torch":
        return decode_attention_reference(*args, sizes=sizes, scale=scale, page_table=page_table)
    return DecodeResult(*torch.ops.nsa.decode_attention_triton(
        q, gates.contiguous(), positions.contiguous(), *args[3:], *sizes, scale, page_table))


def decode_attention_reference(
    q: torch.Tensor, gates: torch.Tensor, positions: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    num_cmp_bound: int, k_sel: torch.Tensor, v_sel: torch.Tensor, num_sel_blocks: int, k_win: torch.Tensor,
    v_win: torch.Tensor, *, sizes: NSASizes, scale: float, page_table: torch.Tensor | None = None,
) -> DecodeResult:
    """Plain PyTorch twin of the Triton decode step (same arguments and meaning, see decode_attention). A paged
    k_sel/v_sel is gathered into a transient [B, rows, Hkv, D] copy of the rows the bounds allow (this path's
    cost; the Triton step reads the pool in place)."""
    if page_table is not None:
        rows = num_sel_blocks * sizes.sel_block_size
        k_sel, v_sel = gather_pages(k_sel, page_table, rows), gather_pages(v_sel, page_table, rows)
    window = sizes.window_size
    lag = (positions[:, None] - torch.arange(window, device=q.device)).remainder(window)
    slot_positions = positions[:, None] - lag
    result = nsa_attention_chunk(
        q[:, None], gates[:, None], positions[:, None], k_cmp=k_cmp, v_cmp=v_cmp, num_cmp_visible=num_cmp_bound,
        k_sel=k_sel, v_sel=v_sel, num_sel_blocks=num_sel_blocks, k_win=k_win[:, :window], v_win=v_win[:, :window],
        win_positions=torch.where(slot_positions >= 0, slot_positions, -1), sizes=sizes, scale=scale,
    )
    return DecodeResult(result.output[:, 0], result.block_indices[:, 0], result.reads[:, 0])


@torch.library.custom_op("nsa::decode_attention_triton", mutates_args=())
def _decode_attention_triton(
    q: torch.Tensor, gates: torch.Tensor, positions: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    num_cmp_bound: int, k_sel: torch.Tensor, v_sel: torch.Tensor, num_sel_blocks: int, k_win: torch.Tensor,
    v_win: torch.Tensor, block_size: int, block_stride: int, sel_block_size: int, num_selected: int,
    window_size: int, scale: float, page_table: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from nsa.kernels.decode import decode_attention_triton  # triton is imported only when used

    sizes = NSASizes(block_size, block_stride, sel_block_size, num_selected, window_size)
    return decode_attention_triton(q, gates, positions, k_cmp, v_cmp, num_cmp_bound, k_sel, v_sel,
                                   num_sel_blocks, k_win, v_win, sizes, scale, page_table)


@_decode_attention_triton.register_fake
def _(q: torch.Tensor, gates: torch.Tensor, positions: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
      num_cmp_bound: int, k_sel: torch.Tensor, v_sel: torch.Tensor, num_sel_blocks: int, k_win: torch.Tensor,
      v_win: torch.Tensor, block_size: int, block_stride: int, sel_block_size: int, num_selected: int,
      window_size: int, scale: float,
      page_table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_heads, num_kv_heads = q.shape[0], q.shape[1], k_cmp.shape[2]
    out = q.new_empty(batch, num_heads, v_cmp.shape[-1])
    indices = q.new_empty(batch, num_kv_heads, num_selected, dtype=torch.long)
    return out, indices, q.new_empty(batch, num_kv_heads, 3, dtype=torch.long)
