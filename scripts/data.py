"""Data for the training harness: a synthetic long-range retrieval task and an embedded English text.

Vocabulary: raw bytes, ids 0..255. Ids below ``FIRST_CONTENT_ID`` are reserved for markers. The next
``value_len * value_vocab`` ids are the value alphabets (value slot i draws from its own ``value_vocab``
ids); filler and key tokens are drawn uniformly from the remaining ids, so a value never occurs in the
filler.

Retrieval sample (``seq_len + 1`` tokens; the model reads ``seq[:-1]`` and predicts ``seq[1:]``)::

    filler ... KEY k_1..k_K v_1..v_V  filler ...  QUERY k_1..k_K v_1..v_V
               ^ needle at p                      ^ query at q = p + distance   (v_V is the last token)

``distance`` is the number of positions from the needle's KEY marker to the QUERY marker. Only the
predictions of the V value tokens after the query are scored (every other target is ``IGNORE_INDEX``),
so the loss and the accuracy measure retrieval alone. This is a passkey-style needle-in-a-haystack
test: one marked needle per sequence, whose values come from alphabets the filler never uses, so the
model need not match keys to find it; what it must do is *reach* a token ``distance`` positions back
and copy it, which a sliding window of ``w < distance`` cannot. (Values drawn from the filler's own
alphabet make it an induction task that a 2-layer toy does not learn within a CPU budget.)

All randomness comes from an explicit ``torch.Generator`` passed by the caller, so a run is
reproducible and resumable from the generator state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

VOCAB_SIZE = 256
PAD_ID = 0  # reserved, unused by the retrieval task
KEY_ID = 1  # marks the planted key/value pair (the needle)
QUERY_ID = 2  # marks the query of the key
FIRST_CONTENT_ID = 16  # ids 0..15 are reserved for markers
MIN_FILLER_IDS = 32  # the filler alphabet must keep at least this many ids
IGNORE_INDEX = -100  # target value ignored by the loss (torch cross_entropy default)
DISTANCE_SAMPLINGS = ("log_uniform", "uniform")


@dataclasses.dataclass(frozen=True)
class RetrievalBatch:
    """One batch of retrieval samples.

    inputs:  LongTensor [B, T] token ids.
    targets: LongTensor [B, T]; the value tokens at the positions that predict them, else IGNORE_INDEX.
    distances: LongTensor [B]; query position minus needle position, per sample.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    distances: torch.Tensor


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """Key/value retrieval at a controlled distance (see the module docstring for the layout).

    seq_len: model input length T. key_len / value_len: K and V tokens per key and value.
    value_vocab: ids in each value slot's alphabet (chance of guessing one value token: 1/value_vocab).
    min_distance / max_distance: range sampled when no distance is requested
    (None -> the smallest / largest distance that fits). distance_sampling: "log_uniform" (default:
    every octave of distance is equally likely, so near needles, which a sliding window can learn
    from, are common and far ones still frequent) or "uniform".
    """

    seq_len: int
    key_len: int = 2
    value_len: int = 2
    value_vocab: int = 16
    min_distance: int | None = None
    max_distance: int | None = None
    distance_sampling: str = "log_uniform"

    def __post_init__(self) -> None:
        if self.distance_sampling not in DISTANCE_SAMPLINGS:
            raise ValueError(f"distance_sampling must be one of {DISTANCE_SAMPLINGS}, got {self.distance_sampling!r}")
        for name in ("seq_len", "key_len", "value_len", "value_vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if VOCAB_SIZE - self.first_filler_id < MIN_FILLER_IDS:
            raise ValueError(
                f"value_len={self.value_len} x value_vocab={self.value_vocab} leaves "
                f"{VOCAB_SIZE - self.first_filler_id} filler ids; at least {MIN_FILLER_IDS} are needed"
            )
        if self.smallest_distance > self.largest_distance:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for key_len={self.key_len} and "
                f"value_len={self.value_len}: no needle distance fits"
            )
        lo, hi = self.distance_range
        if lo > hi:
            raise ValueError(f"min_distance={lo} is larger than max_distance={hi}")

    @property
    def first_filler_id(self) -> int:
        """Filler and key ids are [first_filler_id, VOCAB_SIZE); value slot i uses
        [FIRST_CONTENT_ID + i * value_vocab, FIRST_CONTENT_ID + (i + 1) * value_vocab)."""
        return FIRST_CONTENT_ID + self.value_len * self.value_vocab

    @property
    def pair_len(self) -> int:
        """Tokens of a marker plus key plus value: 1 + K + V."""
        return 1 + self.key_len + self.value_len

    @property
    def query_pos(self) -> int:
        """Index of the QUERY marker in the (seq_len + 1)-token sample; the query block ends the sample."""
        return self.seq_len + 1 - self.pair_len

    @property
    def smallest_distance(self) -> int:
        """The needle must end before the query marker."""
        return self.pair_len

    @property
    def largest_distance(self) -> int:
        """The needle must start at index >= 0."""
        return self.query_pos

    @property
    def distance_range(self) -> tuple[int, int]:
        """Inclusive (low, high) distances sampled for training; checked against what fits."""
        lo = self.smallest_distance if self.min_distance is None else self.min_distance
        hi = self.largest_distance if self.max_distance is None else self.max_distance
        self.check_distance(lo, "min_distance")
        self.check_distance(hi, "max_distance")
        return lo, hi

    @property
    def value_target_positions(self) -> torch.Tensor:
        """LongTensor [V]: input positions whose next-token targets are the query's value tokens."""
        first = self.query_pos + self.key_len  # the last key token predicts v_1
        return torch.arange(first, first + self.value_len)

    def check_distance(self, distance: int, name: str = "distance") -> None:
        """Raise ValueError naming ``name`` unless a needle at ``distance`` fits the sequence."""
        lo, hi = self.smallest_distance, self.largest_distance
        if not isinstance(distance, int) or isinstance(distance, bool) or not lo <= distance <= hi:
            raise ValueError(
                f"{name}={distance!r} does not fit: with seq_len={self.seq_len}, key_len={self.key_len}, "
                f"value_len={self.value_len} it must be an int in [{lo}, {hi}]"
            )

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator,
        distance: int | Sequence[int] | None = None,
    ) -> RetrievalBatch:
        """Draw ``batch_size`` samples using only ``generator``.

        distance: None -> uniform in ``distance_range`` per sample; an int -> every sample; a sequence
        of ``batch_size`` ints -> one per sample. A distance that does not fit raises ValueError.
        """
        distances = self._distances(batch_size, generator, distance)
        n_filler = VOCAB_SIZE - self.first_filler_id
        seq = torch.randint(n_filler, (batch_size, self.seq_len + 1), generator=generator) + self.first_filler_id
        keys = torch.randint(n_filler, (batch_size, self.key_len), generator=generator) + self.first_filler_id
        slot_offsets = FIRST_CONTENT_ID + self.value_vocab * torch.arange(self.value_len)
        values = torch.randint(self.value_vocab, (batch_size, self.value_len), generator=generator) + slot_offsets
        marker = torch.full((batch_size, 1), KEY_ID)
        pair = torch.cat([marker, keys, values], dim=1)  # [B, 1 + K + V]

        offsets = torch.arange(self.pair_len)
        needle_idx = (self.query_pos - distances)[:, None] + offsets  # [B, 1 + K + V]
        seq.scatter_(1, needle_idx, pair)
        seq[:, self.query_pos :] = torch.cat([torch.full_like(marker, QUERY_ID), keys, values], dim=1)

        inputs, next_tokens = seq[:, :-1], seq[:, 1:]
        targets = torch.full_like(inputs, IGNORE_INDEX)
        pos = self.value_target_positions
        targets[:, pos] = next_tokens[:, pos]
        return RetrievalBatch(inputs.contiguous(), targets, distances)

    def _distances(
        self, batch_size: int, generator: torch.Generator, distance: int | Sequence[int] | None
    ) -> torch.Tensor:
        if distance is None:
            lo, hi = self.distance_range
            if self.distance_sampling == "uniform":
                return torch.randint(lo, hi + 1, (batch_size,), generator=generator)
            u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
            log_d = math.log(lo) + u * (math.log(hi + 1) - math.log(lo))  # uniform in [log lo, log(hi + 1))
            return log_d.exp().floor().long().clamp(lo, hi)
        if isinstance(distance, int):
            self.check_distance(distance)
            return torch.full((batch_size,), distance, dtype=torch.long)
        if len(distance) != batch_size:
            raise ValueError(f"distance has {len(distance)} entries, expected batch_size={batch_size}")
        for d in distance:
            self.check_distance(d)
        return torch.tensor(list(distance), dtype=torch.long)


def embedded_text() -> str:
    """A long English text shipped with Python itself (no download): the pydoc topic help pages.

    ``pydoc_data.topics.topics`` maps ~80 topic names to their reference text (about 0.5 MB in
    all); the values are joined in the module's own order, separated by blank lines.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


@dataclasses.dataclass(frozen=True)
class TextTask:
    """Byte-level language modelling on ``embedded_text()``: random windows of seq_len + 1 bytes.

    The last ``val_fraction`` of the bytes is held out for evaluation.
    """

    seq_len: int
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")

    def tokens(self, split: str) -> torch.Tensor:
        """LongTensor [N] of byte ids for split 'train' or 'val'."""
        data = torch.frombuffer(bytearray(embedded_text().encode("utf-8")), dtype=torch.uint8).long()
        cut = int(len(data) * (1.0 - self.val_fraction))
        if split == "train":
            return data[:cut]
        if split == "val":
            return data[cut:]
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> RetrievalBatch:
        """Random windows: inputs [B, T], targets [B, T] = inputs shifted by one; distances empty."""
        data = self._cached(split)
        if len(data) < self.seq_len + 1:
            raise ValueError(f"seq_len={self.seq_len} is longer than the {split} text ({len(data)} bytes)")
        starts = torch.randint(len(data) - self.seq_len, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        seq = data[idx]
        return RetrievalBatch(seq[:, :-1], seq[:, 1:], torch.empty(0, dtype=torch.long))

    def _cached(self, split: str) -> torch.Tensor:
        cache = _TEXT_CACHE.get((split, self.val_fraction))
        if cache is None:
            cache = _TEXT_CACHE[(split, self.val_fraction)] = self.tokens(split)
        return cache


_TEXT_CACHE: dict[tuple[str, float], torch.Tensor] = {}
