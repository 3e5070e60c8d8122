"""Per-layer decode state of NSAAttention: per-branch buffers, emission schedule, read counters.

Buffers (preallocated once for `capacity` tokens per sequence, never re-concatenated):
- selection branch: raw rotated keys and values indexed by absolute position [B, capacity, Hkv, D];
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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nsa.block_index import num_compressed_blocks
from nsa.config import NSAConfig
from nsa.errors import NSAInputError
from nsa.validation import check_device, check_positive_int


class NSAKVCache:
    """Decode cache of one NSAAttention layer for `batch_size` sequences of up to `capacity` tokens.

    Counters: `last_reads` [B, C, Hkv, 3] holds the tokens each query of the last append read per
    branch (cmp, sel, win), taken from the masks the attention used; `total_reads` [B, Hkv, 3]
    accumulates them over all valid queries since the cache was created.
    device: a torch.device or a string such as "cuda:0" (NSAInputError naming it when this build or
    machine lacks it). An append that is refused (NSAInputError) changes nothing: NSAAttention runs
    every check, the decode backend's included, before its first write.
    """

    def __init__(self, config: NSAConfig, batch_size: int, capacity: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 static_shapes: bool = False) -> None:
        check_positive_int("batch_size", batch_size)
        check_positive_int("capacity", capacity)
        c = self.config = config
        self.batch_size, self.capacity = batch_size, capacity
        self.device, self.dtype = check_device("device", device or "cpu"), dtype
        self.static_shapes = static_shapes
        self.lengths: list[int] = [0] * batch_size
        self.device_lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.num_cmp_capacity = num_compressed_blocks(capacity, c.cmp_block_size, c.cmp_stride)

        def buffer(rows: int, dim: int) -> torch.Tensor:
            return torch.zeros(batch_size, rows + 1, c.num_kv_heads, dim, device=self.device, dtype=dtype)

        self.k_sel, self.v_sel = buffer(capacity, c.head_dim), buffer(capacity, c.head_dim_v)
        self.k_win, self.v_win = buffer(c.window_size, c.head_dim), buffer(c.window_size, c.head_dim_v)
        self.k_cmp_raw = buffer(c.cmp_block_size, c.head_dim)
        self.v_cmp_raw = buffer(c.cmp_block_size, c.head_dim_v)
        self.k_cmp = buffer(self.num_cmp_capacity, c.head_dim)
        self.v_cmp = buffer(self.num_cmp_capacity, c.head_dim_v)
        self.total_reads = torch.zeros(batch_size, c.num_kv_heads, 3, dtype=torch.long, device=self.device)
        self.last_reads: torch.Tensor | None = None

    @torch.no_grad()
    def fill_random_(self, length: int, seed: int = 0) -> None:
        """Put every sequence in the state of `length` appended tokens with random content.

        For benchmarks and read-count checks at lengths a CPU prefill would take minutes to reach:
        decode cost and reads depend on lengths and shapes, not on what the keys hold.
        """
        if self.lengths != [0] * self.batch_size or not 0 < length <= self.capacity:
            raise NSAInputError(f"fill_random_ needs an empty cache and 0 < length <= {self.capacity}, got {length}")
        c = self.config
        num_cmp = num_compressed_blocks(length, c.cmp_block_size, c.cmp_stride)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for buffer, rows in ((self.k_sel, length), (self.v_sel, length), (self.k_cmp, num_cmp),
                             (self.v_cmp, num_cmp), (self.k_win, c.window_size), (self.v_win, c.window_size),
                             (self.k_cmp_raw, c.cmp_block_size), (self.v_cmp_raw, c.cmp_block_size)):
            buffer[:, :rows] = torch.randn(buffer[:, :rows].shape, generator=generator, device=self.device,
                                           dtype=self.dtype)
        self.lengths = [length] * self.batch_size
        self.device_lengths.fill_(length)

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
        if (len(counts) != self.batch_size or not all(_is_int(n) for n in counts)
                or any(n < 0 or n > chunk for n in counts)):
            raise NSAInputError(f"num_valid must give {self.batch_size} ints in [0, C={chunk}], got {counts}")
        if start_positions is not None:
            if len(start_positions) != self.batch_size or not all(_is_int(n) for n in start_positions):
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
        return counts

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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _gather_rows(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """buffer [B, R, H, D], rows [B, K] -> [B, K, H, D]."""
    batch_index = torch.arange(buffer.shape[0], device=buffer.device)[:, None]
    return buffer[batch_index, rows]
