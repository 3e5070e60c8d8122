"""Context parallelism's plumbing: how a sequence is split across ranks, and how rows move between them.

A ``ContextLayout`` splits the rows 0 .. length-1 of one sequence (tokens, or compressed blocks) into
contiguous *segments*, each held by one rank; a rank's *local* tensors hold its segments' rows one after
the other, in ascending order. Two splits are built in (both in whole units of ``unit`` rows, so SCOPE can
keep its query blocks whole; a length that the units or the ranks do not divide is fine, the first chunks
take one unit more):

- ``contiguous``: P chunks, rank r holds chunk r;
- ``zigzag`` (load-balanced for causal attention, whose later rows cost more): 2P chunks, rank r holds
  chunks r and 2P-1-r.

Rows move with ``fetch_rows``: each rank names the rows it wants (``wanted``: ascending ids, one list per
rank, known on every rank), and one all_to_all_single carries them (torch's functional collective with
autograd, ``all_to_all_single_autograd``: the backward sends each row's gradient back to its owner, where the
send indexing adds it into the owner's row); a rank's own rows go through the same collective (a local copy).
Every rank computes the same ``FetchPlan`` from the same lists, so no sizes need exchanging first.

``agree_on_inputs`` makes argument errors collective: a rank that rejects its inputs would otherwise leave
the others waiting in the next collective, so every rank reports its verdict and a signature of its shapes
in one small all-gather and all of them raise the same typed error.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from nsa.block_index import num_compressed_blocks
from nsa.errors import NSAInputError
from nsa.validation import check_positive_int, is_int

Segment = tuple[int, int]  # [start, end) rows


@dataclass(frozen=True)
class ContextLayout:
    """Rows [0, length) split into contiguous segments per rank: ``segments[r]`` holds rank r's [start, end)
    ranges, ascending and non-empty; together they cover [0, length) exactly once. A rank may hold none
    (a compressed-block layout can leave a rank without blocks); the token layouts give every rank rows."""

    length: int
    segments: tuple[tuple[Segment, ...], ...]

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise NSAInputError(f"ContextLayout.length must be an int >= 0, got {self.length!r}")
        if not self.segments:
            raise NSAInputError("ContextLayout.segments must list at least one rank")
        if not all(isinstance(rank, tuple) and all(
                isinstance(seg, tuple) and len(seg) == 2 and all(is_int(end) for end in seg) for seg in rank)
                for rank in self.segments):
            raise NSAInputError("ContextLayout.segments must be a tuple per rank of (start, end) int pairs, got "
                                f"{self.segments!r}")
        covered = sorted(seg for rank in self.segments for seg in rank)
        if any(not (0 <= a < b) for a, b in covered) or any(
                sorted(rank) != list(rank) for rank in self.segments):
            raise NSAInputError("ContextLayout.segments must be non-empty [start, end) ranges, ascending per rank")
        ends = [0] + [b for _, b in covered]
        if [a for a, _ in covered] != ends[:-1] or ends[-1] != self.length:
            raise NSAInputError(f"ContextLayout.segments must cover [0, length={self.length}) exactly once, "
                                f"got {covered}")

    @classmethod
    def contiguous(cls, length: int, world_size: int, *, unit: int = 1) -> ContextLayout:
        """P near-equal chunks of whole units; rank r holds chunk r. Needs length / unit >= P (every rank
        holds rows) and unit | length."""
        chunks = _split_units(length, world_size, world_size, unit)
        return cls(length, tuple((chunk,) for chunk in chunks))

    @classmethod
    def zigzag(cls, length: int, world_size: int, *, unit: int = 1) -> ContextLayout:
        """2P near-equal chunks of whole units; rank r holds chunks r and 2P-1-r (an early, cheap chunk and a
        late, costly one under causal attention). Needs length / unit >= 2P and unit | length."""
        chunks = _split_units(length, 2 * world_size, world_size, unit)
        return cls(length, tuple((chunks[r], chunks[-1 - r]) for r in range(world_size)))

    @property
    def world_size(self) -> int:
        return len(self.segments)

    def local_length(self, rank: int) -> int:
        return sum(b - a for a, b in self.segments[self._checked(rank)])

    def positions(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """int64 [local_length(rank)]: the absolute row of each local row."""
        return interval_rows(self.segments[self._checked(rank)]).to("cpu" if device is None else device)

    def _checked(self, rank: int) -> int:
        if not is_int(rank) or not 0 <= rank < self.world_size:
            raise NSAInputError(f"rank must be an int in [0, world_size={self.world_size}), got {rank!r}")
        return rank

    def shard(self, x: Tensor, rank: int, dim: int = 1) -> Tensor:
        """Rank ``rank``'s rows of a whole-sequence tensor x (rows along ``dim``), in local order."""
        return x.index_select(dim, self.positions(rank, x.device))

    def owners(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Absolute rows [N] (int64, CPU) -> (owning rank [N], row inside the owner's local tensors [N])."""
        starts, ranks, offsets = self._segment_table
        seg = torch.searchsorted(starts, rows, right=True) - 1
        return ranks[seg], offsets[seg] + rows - starts[seg]

    def compressed(self, block_size: int, block_stride: int) -> ContextLayout:
        """The layout of the num_cmp(length) compressed blocks: block i (tokens [i*d, i*d + l)) belongs to the
        rank holding its last token i*d + l - 1, the token from which queries see it."""
        blocks = num_compressed_blocks(self.length, block_size, block_stride)

        def first_block(token: int) -> int:  # the first block whose last token is >= token
            return min(blocks, max(0, -(-(token - block_size + 1) // block_stride)))

        return ContextLayout(blocks, tuple(
            tuple((first_block(a), first_block(b)) for a, b in rank if first_block(a) < first_block(b))
            for rank in self.segments))

    @functools.cached_property
    def _segment_table(self) -> tuple[Tensor, Tensor, Tensor]:
        """(segment starts ascending, their rank, their first local row), int64 CPU tensors [S]."""
        table = []
        for rank, segments in enumerate(self.segments):
            offset = 0
            for a, b in segments:
                table.append((a, rank, offset))
                offset += b - a
        table.sort()
        starts, ranks, offsets = torch.tensor(table, dtype=torch.long).view(-1, 3).T.contiguous()
        return starts, ranks, offsets


def _split_units(length: int, chunks: int, world_size: int, unit: int) -> list[Segment]:
    """[start, end) of ``chunks`` near-equal chunks of whole units (the first length/unit mod chunks get one more)."""
    check_positive_int("world_size", world_size)
    check_positive_int("unit", unit)
    check_positive_int("length", length)
    if length % unit:
        raise NSAInputError(f"length={length} must be a multiple of unit={unit} (the layout splits whole units)")
    units = length // unit
    if units < chunks:
        raise NSAInputError(f"length={length} holds {units} units of {unit} rows, fewer than the {chunks} chunks "
                            f"this layout gives {world_size} ranks; every chunk needs one")
    sizes = [units // chunks + (i < units % chunks) for i in range(chunks)]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size * unit)
    return list(itertools.pairwise(bounds))


def group_rank_and_size(group: dist.ProcessGroup | None, layout: ContextLayout,
                        error: type[Exception] = NSAInputError) -> int:
    """This process's rank in ``group`` (None: the default group); ``error`` unless the group has the layout's
    number of ranks (the same verdict on every rank: the sizes are global)."""
    if not isinstance(layout, ContextLayout):
        raise error(f"layout must be a ContextLayout, got {type(layout).__name__}")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise error(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise error("context parallelism needs an initialised torch.distributed process group")
    size = dist.get_world_size(group)
    if size != layout.world_size:
        raise error(f"layout splits the sequence over {layout.world_size} ranks but the group has {size}")
    return dist.get_rank(group)


def agree_on_inputs(rejection: Exception | None, signature: Sequence[int], group: dist.ProcessGroup | None,
                    device: torch.device, error: type[Exception] = NSAInputError) -> None:
    """Raise on every rank when one rank rejected its arguments (``rejection``: its error, raised there) or the
    ranks' ``signature``s (a fixed-length list of ints: sizes that must match everywhere) differ. One
    all-gather of (1 + len(signature)) int64 per rank and one host read."""
    mine = torch.tensor([rejection is not None, *signature], dtype=torch.long, device=device)
    rows = all_gather_host(mine, group).tolist()
    if rejection is not None:
        raise rejection
    rejected = [rank for rank, row in enumerate(rows) if row[0]]
    if rejected:
        raise error(f"rank(s) {rejected} rejected their inputs (their error names the argument)")
    if any(row != rows[0] for row in rows):
        raise error(f"the ranks' inputs disagree in their shared sizes (per rank: {[row[1:] for row in rows]})")


class FetchPlan(NamedTuple):
    """What one rank sends and receives in ``fetch_rows`` (CPU int64 tensors and host ints)."""

    send_rows: Tensor  # [S] local rows to send, grouped by destination rank 0, 1, ...
    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    order: Tensor  # [R]: received row order[j] holds wanted[j]
    wanted: Tensor  # [R] the absolute rows this rank receives, ascending


def fetch_plan(layout: ContextLayout, rank: int, wanted: Sequence[Tensor]) -> FetchPlan:
    """The plan of rank ``rank`` when rank r wants the absolute rows ``wanted[r]`` (ascending, unique, CPU int64).
    Every rank computes its plan from the same lists, so what one sends is what the other expects."""
    owned = [layout.owners(rows) for rows in wanted]
    mine = [owner == rank for owner, _ in owned]
    send_rows = torch.cat([local[keep] for (_, local), keep in zip(owned, mine, strict=True)])
    own_owner = owned[rank][0]
    by_owner = torch.argsort(own_owner, stable=True)  # received row k holds wanted[rank][by_owner[k]]
    order = torch.empty_like(by_owner)
    order[by_owner] = torch.arange(len(by_owner))
    return FetchPlan(send_rows, [int(keep.sum()) for keep in mine],
                     torch.bincount(own_owner, minlength=layout.world_size).tolist(), order, wanted[rank])


def fetch_rows(x: Tensor, plan: FetchPlan, group: dist.ProcessGroup | None) -> Tensor:
    """x [B, N_local, ...] (rows along dim 1) -> [B, len(plan.wanted), ...]: the wanted rows, ascending, from
    their owners; differentiable (the gradient of a row goes back to its owner)."""
    by_row = x.transpose(0, 1)
    send = by_row[plan.send_rows.to(x.device)].contiguous()
    world = group if group is not None else dist.group.WORLD
    assert world is not None  # group_rank_and_size checked that a process group exists
    received = all_to_all_single_autograd(send, plan.recv_counts, plan.send_counts, world)
    return received[plan.order.to(x.device)].transpose(0, 1)


def interval_rows(intervals: Sequence[Segment]) -> Tensor:
    """int64 [N]: the rows of the union of [start, end) intervals, ascending and unique."""
    merged: list[list[int]] = []
    for a, b in sorted(i for i in intervals if i[0] < i[1]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    ranges = [torch.arange(a, b) for a, b in merged]
    return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long)


def listed_blocks(ids: Tensor, listed: Tensor, num_blocks: int) -> Tensor:
    """bool [num_blocks]: the blocks named by ``ids`` where ``listed`` (same shape) is True (no host sync)."""
    marks = torch.zeros(num_blocks + 1, dtype=torch.bool, device=ids.device)
    return marks.index_fill_(0, torch.where(listed, ids, num_blocks).flatten().long(), True)[:num_blocks]


def gather_wanted_blocks(needed: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """needed bool [N] (the blocks this rank reads) -> bool [P, N] on the CPU: every rank's, in rank order
    (one all-gather and one host read: fetch_rows needs the exchange sizes on the host)."""
    return all_gather_host(needed, group)


def all_gather_host(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """x [N] (the same N on every rank) -> [P, N] on the CPU: every rank's x in rank order (not differentiable)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts).cpu()


def block_rows(blocks: Tensor, block: int, length: int) -> Tensor:
    """Ascending block ids [K] (CPU int64) -> their rows [j*block, (j+1)*block) clipped to ``length``, ascending."""
    rows = (blocks[:, None] * block + torch.arange(block)).flatten()
    return rows[rows < length]
