"""Per-layer decode state of NSAAttention: per-branch buffers, emission schedule, read counters.

Buffers (preallocated once for `capacity` tokens per sequence, never re-concatenated):
- selection branch: raw rotated keys and values indexed by absolute position [B, capacity, Hkv, D];
  or, with page_size set (paged KV, for batches of sequences of different lengths), pools of
  fixed-size pages k_sel / v_sel [num_pages + 1, page_size, Hkv, D] shared by all sequences and a
  page table [B, ceil(capacity / page_size)] int32 on the device mapping (sequence, logical page
  position // page_size) to a physical page. Pages are taken from a host free list when an append
  reaches a new page and returned by release(); the last page is the discard page (padding writes
  land there, unmapped table entries point at it). This branch holds ~94% of the cache's memory
  (the compressed buffers are 1/d of it, the rings a fixed w + l rows), so it is the one paged;
- window branch: a ring of the last w rotated keys/values, slot = position % w;
- compression branch: a ring of the last l un-rotated keys/values (the tokens of the next block to
  emit) and the emitted compressed keys/values [B, num_cmp(capacity), Hkv, D]. Block i is emitted
  in the step that writes its last token i*d + l - 1: the first once l tokens exist, then every d.
Every buffer has one extra "discard" row at the end: writes of padding tokens (a ragged batch) go
there, so a masked write never touches a cached token and no host sync is needed to skip it.
Lengths are kept twice: on the host (they change by amounts the caller passes, so checks and
buffer slices never wait on the device) and on the device (positions used inside a step, so a step
creates no tensor from host data). With static_shapes=True the host-sized bounds of a step (blocks
to emit, compressed and selection blocks to scan) come from the capacity instead of the current
lengths: every decode step then has the same shapes and can be captured in a CUDA graph, at the
cost of scanning the buffers up to capacity (masked; the counters still count what is attended).
A paged step has the same shapes and kernel arguments whichever pages are mapped (the page table is
read on the device), so it captures too; a replay runs no host code, so the pages its steps reach
must be mapped before it (map_pages), else their tokens go to the discard page.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nsa.block_index import num_compressed_blocks
from nsa.config import NSAConfig
from nsa.errors import NSAInputError
from nsa.validation import FLOAT_DTYPES, check_device, check_positive_int, is_int


class NSAKVCache:
    """Decode cache of one NSAAttention layer for `batch_size` sequences of up to `capacity` tokens.

    Counters: `last_reads` [B, C, Hkv, 3] holds the tokens each query of the last append read per
    branch (cmp, sel, win), taken from the masks the attention used; `total_reads` [B, Hkv, 3]
    accumulates them over all valid queries since the cache was created.
    device: a torch.device, a string such as "cuda:0", or an int (a CUDA index, as torch reads it);
    NSAInputError names it when this build or machine lacks it. An append that is refused (NSAInputError)
    changes nothing: NSAAttention runs every check, the decode backend's included, before its first write.
    page_size (None: contiguous buffers per sequence): a positive multiple of config.sel_block_size (a
    selection block never straddles two pages, so a selected block is one page lookup); num_pages: the
    pool's pages (default: enough for batch_size sequences of `capacity` tokens). An append the free
    pages cannot serve raises NSAInputError naming num_pages and changes nothing.
    """

    def __init__(self, config: NSAConfig, batch_size: int, capacity: int, *,
                 device: torch.device | str | int | None = None, dtype: torch.dtype = torch.float32,
                 static_shapes: bool = False, page_size: int | None = None, num_pages: int | None = None) -> None:
        if not isinstance(config, NSAConfig):
            raise NSAInputError(f"config must be an NSAConfig, got {type(config).__name__}")
        check_positive_int("batch_size", batch_size)
        check_positive_int("capacity", capacity)
        if dtype not in FLOAT_DTYPES:
            raise NSAInputError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        if not isinstance(static_shapes, bool):
            raise NSAInputError(f"static_shapes must be a bool, got {static_shapes!r}")
        c = self.config = config
        self.batch_size, self.capacity = batch_size, capacity
        self.device, self.dtype = check_device("device", "cpu" if device is None else device), dtype
        self.static_shapes = static_shapes
        self.lengths: list[int] = [0] * batch_size
        self.device_lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.num_cmp_capacity = num_compressed_blocks(capacity, c.cmp_block_size, c.cmp_stride)

        def buffer(rows: int, dim: int) -> torch.Tensor:
            return torch.zeros(batch_size, rows + 1, c.num_kv_heads, dim, device=self.device, dtype=dtype)

        self.page_size: int | None = None
        self.num_pages: int | None = None
        self.page_table: torch.Tensor | None = None  # [B, ceil(capacity / page_size)] int32, paged layout only
        self.pages: list[list[int]] = [[] for _ in range(batch_size)]  # host: each sequence's pages, logical order
        self.free_pages: list[int] = []  # host; pop() takes the last
        paging = _check_pages(c, batch_size, capacity, page_size, num_pages)
        if paging is None:
            self.k_sel, self.v_sel = buffer(capacity, c.head_dim), buffer(capacity, c.head_dim_v)
        else:
            self.page_size, self.num_pages = page_size, num_pages = paging

            def pool(dim: int) -> torch.Tensor:  # + the discard page
                return torch.zeros(num_pages + 1, page_size, c.num_kv_heads, dim, device=self.device, dtype=dtype)

            self.k_sel, self.v_sel = pool(c.head_dim), pool(c.head_dim_v)
            self.page_table = torch.full((batch_size, -(-capacity // page_size)), num_pages, dtype=torch.int32,
                                         device=self.device)
            self.free_pages = list(range(num_pages - 1, -1, -1))  # the lowest pages are handed out first
        self.k_win, self.v_win = buffer(c.window_size, c.head_dim), buffer(c.window_size, c.head_dim_v)
        self.k_cmp_raw = buffer(c.cmp_block_size, c.head_dim)
        self.v_cmp_raw = buffer(c.cmp_block_size, c.head_dim_v)
        self.k_cmp = buffer(self.num_cmp_capacity, c.head_dim)
        self.v_cmp = buffer(self.num_cmp_capacity, c.head_dim_v)
        self.total_reads = torch.zeros(batch_size, c.num_kv_heads, 3, dtype=torch.long, device=self.device)
        self.last_reads: torch.Tensor | None = None

    @torch.no_grad()
    def fill_random_(self, length: int | Sequence[int], seed: int = 0) -> None:
        """Put sequence b in the state of length[b] appended tokens (one int: every sequence) with random content.

        For benchmarks and read-count checks at lengths a CPU prefill would take minutes to reach:
        decode cost and reads depend on lengths and shapes, not on what the keys hold. A paged cache maps
        the pages the lengths reach (NSAInputError naming num_pages, nothing changed, when they do not fit).
        """
        lengths = [length] * self.batch_size if isinstance(length, int) else list(length)
        if (self.lengths != [0] * self.batch_size or len(lengths) != self.batch_size
                or not all(is_int(n) and 0 < n <= self.capacity for n in lengths)):
            raise NSAInputError(f"fill_random_ needs an empty cache and one length, or {self.batch_size}, in "
                                f"(0, capacity={self.capacity}], got {length}")
        self.map_pages(lengths)
        c = self.config
        longest = max(lengths)
        num_cmp = num_compressed_blocks(longest, c.cmp_block_size, c.cmp_stride)
        sel_rows = longest if self.page_size is None else self.page_size  # a pool: every page, whoever holds it
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for buffer, rows in ((self.k_sel, sel_rows), (self.v_sel, sel_rows), (self.k_cmp, num_cmp),
                             (self.v_cmp, num_cmp), (self.k_win, c.window_size), (self.v_win, c.window_size),
                             (self.k_cmp_raw, c.cmp_block_size), (self.v_cmp_raw, c.cmp_block_size)):
            buffer[:, :rows] = torch.randn(buffer[:, :rows].shape, generator=generator, device=self.device,
                                           dtype=self.dtype)
        self.lengths = lengths
        self.device_lengths.copy_(torch.tensor(lengths))

    # ---- checks -------------------------------------------------------------------------------

    def check_append(self, x: torch.Tensor, num_valid: Sequence[int] | None,
                     start_positions: Sequence[int] | None) -> list[int]:
        """Validate an append of x [B, C, ...] (C = 0 is valid: an empty append); return the valid token
        count per sequence. Reads nothing from the device and changes nothing."""
        if x.shape[0] != self.batch_size:
            raise NSAInputError(f"x has batch {x.shape[0]} but the cache holds {self.batch_size} sequences")
        if x.dtype != self.dtype:
            raise NSAInputError(f"x has dtype {x.dtype} but the cache stores {self.dtype}")
        if x.device != self.device:
            raise NSAInputError(f"x is on {x.device} but the cache is on {self.device}")
        chunk = x.shape[1]
        counts = [chunk] * self.batch_size if num_valid is None else list(num_valid)
        if (len(counts) != self.batch_size or not all(is_int(n) for n in counts)
                or any(n < 0 or n > chunk for n in counts)):
            raise NSAInputError(f"num_valid must give {self.batch_size} ints in [0, C={chunk}], got {counts}")
        if start_positions is not None:
            if len(start_positions) != self.batch_size or not all(is_int(n) for n in start_positions):
                raise NSAInputError(
                    f"start_positions must give {self.batch_size} ints, got {list(start_positions)}"
                )
            for b, (start, length) in enumerate(zip(start_positions, self.lengths, strict=True)):
                if start < length:
                    raise NSAInputError(
                        f"start_positions[{b}]={start} goes backwards: the cache already holds {length} tokens "
                        "of that sequence (cached tokens are never overwritten)"
                    )
                if start > length:
                    raise NSAInputError(f"start_positions[{b}]={start} skips tokens: the cache holds {length}")
        for b, (length, n) in enumerate(zip(self.lengths, counts, strict=True)):
            if length + n > self.capacity:
                raise NSAInputError(
                    f"sequence {b} would reach {length + n} tokens, past the cache capacity {self.capacity}"
                )
        self._pages_to_map([length + n for length, n in zip(self.lengths, counts, strict=True)])
        return counts

    # ---- pages (paged layout) -----------------------------------------------------------------

    def map_pages(self, ends: Sequence[int]) -> None:
        """Map the pages sequence b needs to hold ends[b] tokens (nothing to do for contiguous buffers).

        Appends call it before their first write. Call it before replaying a captured CUDA graph whose
        steps reach a new page: a replay runs no host code, and a token on an unmapped page would be
        written to (and read from) the discard page. NSAInputError naming ends, or num_pages when the
        free pages do not suffice, and nothing changed.
        """
        ends = list(ends)
        if len(ends) != self.batch_size or not all(is_int(n) and 0 <= n <= self.capacity for n in ends):
            raise NSAInputError(f"ends must give {self.batch_size} ints in [0, capacity={self.capacity}], got {ends}")
        needed = self._pages_to_map(ends)
        if not needed or self.page_table is None:
            return
        physical = [self.free_pages.pop() for _ in needed]
        for (b, _), page in zip(needed, physical, strict=True):
            self.pages[b].append(page)
        rows, cols = (list(axis) for axis in zip(*needed, strict=True))
        self.page_table[rows, cols] = torch.tensor(physical, dtype=torch.int32).to(self.device)

    def _pages_to_map(self, ends: Sequence[int]) -> list[tuple[int, int]]:
        """(sequence, logical page) of each page that ends[b] tokens reach and that is not mapped yet, in logical
        order; NSAInputError naming num_pages when the free list is shorter. Changes nothing."""
        if self.page_size is None:
            return []
        needed = [(b, page) for b, end in enumerate(ends)
                  for page in range(len(self.pages[b]), -(-end // self.page_size))]
        if len(needed) > len(self.free_pages):
            raise NSAInputError(
                f"the sequences need {len(needed)} more page(s) of {self.page_size} tokens but only "
                f"{len(self.free_pages)} of num_pages={self.num_pages} are free: release finished sequences "
                "(release) or build the cache with more num_pages"
            )
        return needed

    def release(self, sequences: Sequence[int]) -> None:
        """End the given sequences (continuous batching): each slot restarts empty (length 0 on the host and the
        device, total_reads 0) and its pages go back to the free list.

        Nothing else is cleared, because no read reaches what an old sequence left behind: every read is masked
        by the positions of the slot's own tokens, all written before they are read (selected rows <= t, window
        slots holding positions t - lag >= 0, compressed blocks ending <= t, compression ring entries at
        positions >= 0). The Triton kernels load no masked row and the PyTorch path zeroes masked keys and
        values before its masked softmax, so not even a stale NaN reaches an output.
        """
        if isinstance(sequences, torch.Tensor) or not isinstance(sequences, Sequence):
            raise NSAInputError(f"sequences must be a list of sequence indices, got {type(sequences).__name__}")
        indices = list(sequences)
        if (not all(is_int(b) and 0 <= b < self.batch_size for b in indices)
                or len(set(indices)) != len(indices)):
            raise NSAInputError(f"sequences must be distinct ints in [0, batch_size={self.batch_size}), got {indices}")
        for b in indices:
            self.free_pages.extend(reversed(self.pages[b]))
            self.pages[b] = []
            self.lengths[b] = 0
        index = torch.tensor(indices, dtype=torch.long).to(self.device)
        self.device_lengths[index] = 0
        self.total_reads[index] = 0
        if self.page_table is not None:
            self.page_table[index] = self.k_sel.shape[0] - 1  # the discard page

    # ---- positions ----------------------------------------------------------------------------

    def query_positions(self, chunk: int, counts: Sequence[int] | None) -> torch.Tensor:
        """Absolute positions [B, C] of the appended tokens; -1 for padding (reads and writes nothing).
        counts None means every token is real."""
        positions = self.device_lengths[:, None] + torch.arange(chunk, device=self.device)
        if counts is None:
            return positions
        valid = torch.arange(chunk, device=self.device) < torch.tensor(counts, device=self.device)[:, None]
        return torch.where(valid, positions, -1)

    def ring_stream(self, ring_k: torch.Tensor, ring_v: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ring's tokens in position order followed by the new ones.

        ring_k/v [B, R+1, Hkv, D] (last row = discard), new_k/v [B, C, Hkv, D], positions [B, C].
        Returns (k [B, R+C, ...], v, stream positions [B, R+C]); stream index j < R holds position
        length - R + j (-1 where negative), index R + c holds the c-th new token.
        """
        ring = ring_k.shape[1] - 1
        old_positions = self.device_lengths[:, None] - ring + torch.arange(ring, device=self.device)
        slots = old_positions.remainder(ring)
        old_k = _gather_rows(ring_k, slots)
        old_v = _gather_rows(ring_v, slots)
        stream_positions = torch.cat((torch.where(old_positions >= 0, old_positions, -1), positions), dim=1)
        return torch.cat((old_k, new_k), dim=1), torch.cat((old_v, new_v), dim=1), stream_positions

    # ---- selection branch: writes and reads by absolute position --------------------------------

    def write_selection(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, counts: Sequence[int]
                        ) -> None:
        """Store the appended tokens' selection keys / values k, v [B, C, Hkv, D] at their positions [B, C]
        (-1: padding, dropped into the discard row or page), after mapping the pages the append reaches
        (counts[b]: the valid tokens, from check_append)."""
        self.map_pages([length + n for length, n in zip(self.lengths, counts, strict=True)])
        if self.page_table is None:
            rows = torch.where(positions >= 0, positions, self.capacity)
            self.write_tokens(self.k_sel, k, rows)
            self.write_tokens(self.v_sel, v, rows)
            return
        num_pages, page_size = self.k_sel.shape[0] - 1, self.k_sel.shape[1]  # page num_pages: the discard page
        at = positions.clamp_min(0)
        pages = torch.where(positions >= 0, self.page_table.gather(1, at // page_size), num_pages)
        pool_rows = pages.long() * page_size + at % page_size  # rows of the pool seen as [pages * page_size, ...]
        self.k_sel.flatten(0, 1).index_put_((pool_rows,), k)
        self.v_sel.flatten(0, 1).index_put_((pool_rows,), v)

    def selection_view(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection keys and values by absolute position, [B, >= rows, Hkv, D]: the buffers themselves
        (contiguous layout), or a copy of each sequence's first `rows` rounded up to whole pages gathered
        through the page table (paged: the PyTorch path's cost, a transient copy per call; the Triton decode
        step reads the pool in place)."""
        if self.page_table is None:
            return self.k_sel, self.v_sel
        return gather_pages(self.k_sel, self.page_table, rows), gather_pages(self.v_sel, self.page_table, rows)

    # ---- writes -------------------------------------------------------------------------------

    def write_tokens(self, buffer: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        """buffer[b, rows[b, c]] = values[b, c]; rows equal to the discard row are dropped."""
        batch_index = torch.arange(self.batch_size, device=self.device)[:, None].expand_as(rows)
        buffer.index_put_((batch_index, rows), values)

    def ring_rows(self, positions: torch.Tensor, counts: Sequence[int] | None, ring: int) -> torch.Tensor:
        """Ring slot per new token, or the discard row for padding and for tokens that a later token
        of the same append evicts (only the last `ring` valid tokens land, so slots never collide)."""
        chunk = positions.shape[1]
        offsets = torch.arange(chunk, device=self.device)
        first_kept = chunk - ring if counts is None else torch.tensor(counts, device=self.device)[:, None] - ring
        keep = (positions >= 0) & (offsets >= first_kept)
        return torch.where(keep, positions.remainder(ring), ring)

    def commit(self, counts: Sequence[int], all_valid: bool, reads: torch.Tensor, positions: torch.Tensor) -> None:
        """Advance the lengths (host and device) and record the reads of the valid queries."""
        reads = reads * (positions >= 0)[:, :, None, None]
        self.last_reads = reads
        self.total_reads += reads.sum(dim=1)
        self.lengths = [length + n for length, n in zip(self.lengths, counts, strict=True)]
        self.device_lengths += counts[0] if all_valid else torch.tensor(counts, device=self.device)


def gather_pages(pool: torch.Tensor, page_table: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows [0, rows) of each sequence of a paged pool [num_pages + 1, P, Hkv, D] through its page table
    [B, pages] (int): [B, ceil(rows / P) * P, Hkv, D], a copy (an unmapped page reads the discard page)."""
    pages = page_table[:, :-(-rows // pool.shape[1])]
    return pool[pages.long()].flatten(1, 2)


def _check_pages(config: NSAConfig, batch_size: int, capacity: int, page_size: int | None,
                 num_pages: int | None) -> tuple[int, int] | None:
    """(page_size, num_pages) of a paged cache (num_pages defaulting to batch_size full sequences), None for
    contiguous buffers; NSAInputError naming the argument and its rule."""
    if page_size is None:
        if num_pages is not None:
            raise NSAInputError(f"num_pages={num_pages!r} needs page_size (a paged cache); leave it None otherwise")
        return None
    block = config.sel_block_size
    if not is_int(page_size) or page_size <= 0 or page_size % block:
        raise NSAInputError(f"page_size must be a positive int multiple of sel_block_size={block} (a selection "
                            f"block must not straddle two pages), got {page_size!r}")
    if num_pages is None:
        return page_size, batch_size * -(-capacity // page_size)
    check_positive_int("num_pages", num_pages)
    return page_size, num_pages


def _gather_rows(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """buffer [B, R, H, D], rows [B, K] -> [B, K, H, D]."""
    batch_index = torch.arange(buffer.shape[0], device=buffer.device)[:, None]
    return buffer[batch_index, rows]
