"""Pieces shared by the prefill kernels (Eq. 9's overlap weights also by the decode step): tile loads, head-dim
splits, and packed-sequence tables.

Every prefill kernel works on *packed* sequences: tokens of all sequences are rows of one
[N_tokens, H, D] tensor (a batch [B, T, H, D] is B sequences of T tokens), described by cumulative
lengths ``cu`` [S + 1] (int32). A program handles a tile of one sequence; the tables below map a
program id to its sequence without any host sync (the grid is an upper bound and the programs past
the real tiles exit at once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa.sized_tensors import sized_tensors

_Built = TypeVar("_Built")
# Tests set this: every buffer a kernel must fill starts as NaN (float) or INT_MIN (int), so an element a kernel
# failed to write shows in the result instead of passing as leftover memory.
POISON_OUTPUTS = False


def output_buffer(*shape: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised buffer for a kernel to fill (poisoned when POISON_OUTPUTS), on like's device."""
    dtype = like.dtype if dtype is None else dtype
    if not POISON_OUTPUTS:
        return torch.empty(*shape, device=like.device, dtype=dtype)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, device=like.device, dtype=dtype)


@triton.jit
def eq9_overlap(u, e, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr):
    """Eq. 9 weight of the compressed block starting u * d after a selection block's start, for the selection
    block e blocks later: |[u d, u d + l) intersect [e l', (e + 1) l')| / l."""
    lo = tl.maximum(u * CMP_STRIDE, e * SEL_BLOCK)
    hi = tl.minimum(u * CMP_STRIDE + CMP_BLOCK, (e + 1) * SEL_BLOCK)
    return tl.maximum(hi - lo, 0).to(tl.float32) / CMP_BLOCK


@triton.jit
def load_at(ptr, row_offsets, row_ok, COL0: tl.constexpr, WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    """[len(row_offsets), WIDTH] tile of columns COL0 .. COL0 + WIDTH of the rows starting at ``ptr +
    row_offsets`` (element offsets) where row_ok; zeros elsewhere and past NCOLS."""
    cols = COL0 + tl.arange(0, WIDTH)
    return tl.load(ptr + row_offsets[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < NCOLS)[None, :],
                   other=0.0)


@triton.jit
def store_at(ptr, row_offsets, row_ok, value, COL0: tl.constexpr, WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    tl.store(ptr + row_offsets[:, None] + cols[None, :], value, mask=row_ok[:, None] & (cols < NCOLS)[None, :])


@triton.jit
def add_store_at(ptr, row_offsets, row_ok, value, ACCUMULATE: tl.constexpr, COL0: tl.constexpr,
                 WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    """store_at of float32 ``value`` in ptr's dtype; ACCUMULATE: plus what ptr holds there (an earlier branch's or
    token range's result), added in float32."""
    if ACCUMULATE:
        value += load_at(ptr, row_offsets, row_ok, COL0, WIDTH, NCOLS).to(tl.float32)
    store_at(ptr, row_offsets, row_ok, value.to(ptr.dtype.element_ty), COL0, WIDTH, NCOLS)


@triton.jit
def load_tile(ptr, rows, row_ok, stride_row, COL0: tl.constexpr, WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    """load_at for rows ``stride_row`` apart. ``rows`` count from ``ptr`` in int32: callers advance ``ptr`` to the
    tile's first row with int64 scalar arithmetic (T * H * D passes 2^31 at 512k tokens) and keep the
    per-element offsets small, which keeps the address tensors 32-bit."""
    return load_at(ptr, rows * stride_row, row_ok, COL0, WIDTH, NCOLS)


@triton.jit
def desc_rows(desc, row, head, COL0: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """[ROWS, WIDTH] tile of head ``head``'s rows row .. row + ROWS - 1, columns from COL0, through a descriptor of
    ``row_descriptors`` (zeros past the tensor's rows and columns)."""
    return desc.load([row.to(tl.int32), head, COL0]).reshape(ROWS, WIDTH)


@triton.jit
def store_tile(ptr, rows, row_ok, stride_row, value, COL0: tl.constexpr, WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    store_at(ptr, rows * stride_row, row_ok, value, COL0, WIDTH, NCOLS)


@triton.jit
def tile_origin(table_seq_ptr, table_first_ptr, cu_rows_ptr, cu_other_ptr, num_seqs, TILE: tl.constexpr):
    """This program's tile: (row offset of its sequence in the tiled tensor, its row count, the sequence's
    offset and count in the other tensor, the tile's first local row). Programs past the last tile get
    zero counts, so they load and store nothing."""
    pid = tl.program_id(0)
    seq = tl.load(table_seq_ptr + pid)
    live = seq < num_seqs
    seq = tl.minimum(seq, num_seqs - 1)
    row0 = tl.load(cu_rows_ptr + seq)
    rows = tl.where(live, tl.load(cu_rows_ptr + seq + 1) - row0, 0)
    other0 = tl.load(cu_other_ptr + seq)
    others = tl.where(live, tl.load(cu_other_ptr + seq + 1) - other0, 0)
    first = (pid - tl.load(table_first_ptr + seq)) * TILE
    return row0.to(tl.int64), rows, other0.to(tl.int64), others, first


@triton.jit
def visible_key_count(last, num_keys, STRIDE: tl.constexpr, SPAN: tl.constexpr):
    """Keys i with i * STRIDE + SPAN - 1 <= last (causally visible to the query at ``last``), at most num_keys."""
    return tl.minimum(tl.where(last >= SPAN - 1, (last - (SPAN - 1)) // STRIDE + 1, 0), num_keys)


def tma_capable(device: torch.device) -> bool:
    """Whether kernels on ``device`` can load through tensor descriptors (TMA): Hopper or newer, or the CPU
    interpreter (which emulates them, so the tests cover the same code)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    from nsa.dispatch import interpreter_enabled

    return interpreter_enabled()


def row_descriptors(x: Tensor, rows: int, widths: tuple[int, ...]) -> tuple[Any, ...] | None:
    """Tensor descriptors over token rows x [N, H, D] that load ``rows`` consecutive rows of one head, one per
    column part: widths (D1, D2) give boxes of D1 columns from column 0 and D2 from column D1 (a width 0: None).
    TMA zero-fills past the tensor's rows and past column D. None where TMA cannot read x: strides or base not
    16-byte aligned, or a box side over 256 elements."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    size = x.element_size()
    aligned = x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:-1])
    if not aligned or max(rows, *widths) > 256 or min(w for w in widths if w) * size < 16:
        return None
    return tuple(TensorDescriptor(x, list(x.shape), list(x.stride()), [rows, 1, w]) if w else None for w in widths)


def kv_descriptors(k: Tensor, v: Tensor | None, rows: int, consts: dict, wanted: bool) -> dict[str, Any]:
    """A kernel's keyword arguments k_desc1 / k_desc2 (the D1 and D2 column parts of k) and v_desc (v's BLOCK_DV
    columns; none where v is None, for a kernel that reads keys only), descriptors of ``rows`` rows
    (``row_descriptors``), and TMA: loads through them where ``wanted`` and the device and the tensors allow it, else
    pointer loads."""
    pointers = {"k_desc1": None, "k_desc2": None, **({} if v is None else {"v_desc": None}), "TMA": False}
    if not (wanted and tma_capable(k.device)):
        return pointers
    k_desc = row_descriptors(k, rows, (consts["D1"], consts["D2"]))
    v_desc = () if v is None else row_descriptors(v, rows, (consts["BLOCK_DV"],))
    if k_desc is None or v_desc is None:
        return pointers
    return {"k_desc1": k_desc[0], "k_desc2": k_desc[1], **({"v_desc": v_desc[0]} if v_desc else {}), "TMA": True}


class Packed(NamedTuple):
    """Sequences packed as rows of one tensor: ``cu`` [S + 1] int32 cumulative token counts on the device,
    ``num_seqs`` S, ``total`` the number of token rows, ``max_len`` a host upper bound on one sequence's length;
    ``equal``: every sequence has exactly max_len rows (a [B, T, ...] batch), so the tables over them are
    arithmetic on the host's sizes (``tile_table``, ``token_sequences``)."""

    cu: Tensor
    num_seqs: int
    total: int
    max_len: int
    equal: bool = False


def batch_offsets(batch: int, length: int, device: torch.device) -> Tensor:
    """[B + 1] int32 cumulative counts of B sequences of ``length`` rows each (sized_tensors)."""
    return sized_tensors(("offsets", batch, length), device,
                         lambda: torch.arange(batch + 1, device=device, dtype=torch.int32).mul_(length))


def packed_batch(batch: int, seq_len: int, device: torch.device) -> Packed:
    """B sequences of T tokens each (a [B, T, ...] tensor viewed as [B * T, ...])."""
    return Packed(batch_offsets(batch, seq_len, device), batch, batch * seq_len, seq_len, equal=True)


def packed_varlen(cu_seqlens: Tensor, total: int) -> Packed:
    """Sequences given by cu_seqlens [S + 1] (B = 1 packing); the longest length is bounded by the total."""
    return Packed(cu_seqlens.to(torch.int32).contiguous(), cu_seqlens.numel() - 1, total, total)


def derived_counts(packed: Packed, count_of_length) -> Tensor:
    """Cumulative per-sequence counts [S + 1] int32 of ``count_of_length(lengths)`` (e.g. compressed keys or
    selection blocks per sequence), computed on the device."""
    lengths = (packed.cu[1:] - packed.cu[:-1]).long()
    counts = count_of_length(lengths)
    return torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(torch.int32)


def num_compressed(lengths: Tensor, block_size: int, block_stride: int) -> Tensor:
    """num_cmp per sequence on the device: 0 if len < l else (len - l) // d + 1."""
    return torch.where(lengths >= block_size, (lengths - block_size).clamp_min(0) // block_stride + 1, 0)


class TileTable(NamedTuple):
    """Program id -> sequence for tiles of ``tile`` rows: ``seq`` [grid] int32 (num_seqs past the real tiles),
    ``first`` [S + 1] int32 cumulative tile counts. ``grid`` is a host upper bound on the tile count."""

    seq: Tensor
    first: Tensor
    grid: int


def tile_grid(total: int, num_seqs: int, tile: int) -> int:
    """Host bound on the tiles of ``tile`` rows over ``total`` rows in ``num_seqs`` sequences: each sequence adds at
    most one partial tile."""
    return max(1, -(-total // tile) + num_seqs)


def tile_table(cu: Tensor, num_seqs: int, total: int, tile: int, equal_length: int | None = None) -> TileTable:
    """Tiles of ``tile`` rows over sequences with cumulative row counts ``cu`` (``total`` rows in all).
    ``equal_length``: every sequence has this many rows, and the table follows from the host's sizes: built once
    (``sized_tensors``; 10 tables per forward + backward, and the eager layer is host-bound at small widths)."""
    grid = tile_grid(total, num_seqs, tile)
    if equal_length is not None:
        return sized_tensors(("tiles", num_seqs, equal_length, tile, grid), cu.device,
                             lambda: _equal_tile_table(num_seqs, equal_length, tile, grid, cu.device))
    lengths = (cu[1:] - cu[:-1]).long()
    per_seq = (lengths + tile - 1) // tile
    first = torch.cat((per_seq.new_zeros(1), per_seq.cumsum(0)))
    programs = torch.arange(grid, device=cu.device)
    seq = torch.searchsorted(first[1:], programs, right=True)
    return TileTable(seq.to(torch.int32), first.to(torch.int32), grid)


def _equal_tile_table(num_seqs: int, length: int, tile: int, grid: int, device: torch.device) -> TileTable:
    tiles_each = -(-length // tile)
    first = torch.arange(num_seqs + 1, device=device, dtype=torch.int32).mul_(tiles_each)
    if tiles_each == 0:  # no tiles at all: every program is past the real tiles
        return TileTable(torch.full((grid,), num_seqs, device=device, dtype=torch.int32), first, grid)
    programs = torch.arange(grid, device=device, dtype=torch.int32)
    return TileTable(programs.div_(tiles_each, rounding_mode="floor").clamp_max_(num_seqs), first, grid)


def packed_tiles(packed: Packed, tile: int) -> TileTable:
    """``tile_table`` over the token rows of ``packed``."""
    return tile_table(packed.cu, packed.num_seqs, packed.total, tile, packed.max_len if packed.equal else None)


def packed_sized(packed: Packed, key: tuple, build: Callable[[], _Built]) -> _Built:
    """``build()``, kept per (key, the batch's sizes) for an unpacked [B, T] batch (``sized_tensors``); built at
    every call for packed sequences, whose tables follow from cu's values."""
    if not packed.equal:
        return build()
    return sized_tensors((*key, packed.num_seqs, packed.max_len), packed.cu.device, build)


def token_sequences(packed: Packed) -> Tensor:
    """Sequence index of every token row: int32 [total]."""
    if packed.equal:
        def build() -> Tensor:
            rows = torch.arange(packed.total, device=packed.cu.device, dtype=torch.int32)
            return rows.div_(max(1, packed.max_len), rounding_mode="floor")

        return packed_sized(packed, ("sequences",), build)
    rows = torch.arange(packed.total, device=packed.cu.device)
    return torch.searchsorted(packed.cu[1:].long(), rows, right=True).to(torch.int32)


def rows_view(x: Tensor) -> Tensor:
    """[B, T, H, D] -> [B * T, H, D] token rows with a contiguous last dim (copies only when the batch and
    time strides cannot be merged, e.g. a transposed view, or when the last head's offset passes 2^31 elements:
    the kernels add head offsets in int32, and a heads-major layout at 512k tokens would overflow them)."""
    if x.stride(-1) != 1 or (x.shape[2] - 1) * x.stride(2) >= 2**31:
        x = x.contiguous()
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
