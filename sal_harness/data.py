"""Data, all offline: an embedded text corpus and synthetic long-range retrieval tasks.

Vocabulary (``VOCAB_SIZE`` ids at most): raw bytes 0..255, then markers ``PAD_ID``, ``BOS_ID``,
``KEY_ID``, ``QUERY_ID``, then symbol ids from ``FIRST_SYMBOL_ID``: ``key_vocab`` key symbols and
``value_len`` value alphabets of ``value_vocab`` symbols each (value slot i has its own alphabet).
Text never contains a marker or a symbol, so a planted key or value is never part of the haystack.

Corpus (``corpus_documents``, the task's ``corpus``): Python's pydoc topic pages (``pydoc_data.topics``,
one document per topic) with either a fixed list of long standard-library sources (``"core"``,
``STDLIB_SOURCES``, those present in this installation: ~2.7 MB, the CPU default) or every Python source
of the standard library (``"stdlib"``, ~30 MB: a GPU run reads the core corpus dozens of times over and
its held-out loss then measures memorisation); split into train and held-out *by document*
(``document_split``: a stable CRC32 of the document name, so the split does not depend on what else is
present).

Retrieval sample (``seq_len + 1`` tokens; the model reads ``sample[:-1]`` and predicts ``sample[1:]``)::

    PAD .. PAD  BOS  haystack (b tokens)  NEEDLE  haystack  QUERY-SEGMENT (answers are its last tokens)
                ^ s                       ^ p              ^ q = p + distance

``distance`` = q - p: from the needle's first token to the query segment's first token. ``depth`` =
b / (b + distance - needle_len): the fraction of the haystack that lies before the needle (0 = the
needle opens the context, -> 1 = it sits right before the query). A (distance, depth) pair fixes the
context length, so long distances only fit at small depths; ``RetrievalTask.fits`` says which do.
Only the answer tokens are scored (every other target is ``IGNORE_INDEX``). Tasks:

- ``needle``: needle ``KEY k_1..k_K v_1..v_V``, query ``QUERY k_1..k_K v_1..v_V``; answers: the V values.
- ``mqar`` (multi-query associative recall): needle ``KEY`` + ``num_pairs`` pairs ``k v`` with distinct
  keys, query ``num_queries`` x ``QUERY k v`` for distinct pairs; answers: each queried value.
- ``passkey`` (bytes only): needle "The pass key is 71432. Remember it. 71432 is the pass key. ", query
  "What is the pass key? The pass key is 71432"; answers: the digits; haystack: the task's own
  repeated sentences (no digits), whatever ``haystack`` says.

The haystack of needle / mqar is real text of the split (``haystack="text"``) or uniform random bytes
(``"random"``). All randomness comes from the ``torch.Generator`` the caller passes.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from sal_harness.schema import StrictModel

BYTE_VOCAB = 256
PAD_ID, BOS_ID, KEY_ID, QUERY_ID = 256, 257, 258, 259
FIRST_SYMBOL_ID = 264
IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index
SPLITS = ("train", "val")

# Long standard-library sources (paths under the stdlib directory); missing ones are skipped.
STDLIB_SOURCES = (
    "argparse.py", "typing.py", "inspect.py", "dataclasses.py", "functools.py", "pathlib.py", "subprocess.py",
    "threading.py", "logging/__init__.py", "difflib.py", "textwrap.py", "tarfile.py", "zipfile.py",
    "unittest/case.py", "_pydecimal.py", "enum.py", "ast.py", "shutil.py", "tempfile.py", "configparser.py",
    "statistics.py", "fractions.py", "random.py", "pickle.py", "doctest.py", "pdb.py", "imaplib.py",
    "http/client.py", "email/message.py", "collections/__init__.py", "calendar.py", "string.py", "csv.py",
)
PASSKEY_FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


# ----------------------------------------------------------------------------------------------
# Corpus


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # "pydoc:<topic>" or "stdlib:<relative path>"
    data: bytes


CORPORA = ("core", "stdlib")
SMALLEST_SOURCE = 1024  # bytes: "stdlib" skips smaller files (empty __init__.py, stubs)


@functools.cache
def corpus_documents(corpus: str = "core") -> tuple[Document, ...]:
    """Every document of ``corpus`` (``CORPORA``), sorted by name (pydoc topics, then stdlib sources)."""
    from pydoc_data.topics import topics

    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    docs = [Document(f"pydoc:{name}", text.encode("utf-8")) for name, text in topics.items()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if corpus == "core":
        present = [rel for rel in STDLIB_SOURCES if (stdlib / rel).is_file()]
        docs += [Document(f"stdlib:{rel}", (stdlib / rel).read_bytes()) for rel in present]
        return tuple(sorted(docs, key=lambda d: d.name))
    sources = sorted(path.relative_to(stdlib).as_posix() for path in stdlib.rglob("*.py")
                     if not {"site-packages", "dist-packages"} & set(path.parts)
                     and path.stat().st_size >= SMALLEST_SOURCE)
    docs += [Document(f"stdlib:{rel}", (stdlib / rel).read_bytes()) for rel in sources]
    # One document per distinct text: a copy in both splits would leak train text into the held-out loss.
    distinct = {d.data: d for d in sorted(docs, key=lambda d: d.name, reverse=True)}  # the first name wins
    return tuple(sorted(distinct.values(), key=lambda d: d.name))


def document_split(name: str, val_fraction: float) -> str:
    """'val' for about val_fraction of the documents, chosen by a stable hash of the name, else 'train'."""
    return "val" if zlib.crc32(name.encode()) / 2**32 < val_fraction else "train"


@functools.cache
def corpus_bytes(split: str, val_fraction: float, corpus: str = "core") -> bytes:
    """The split's documents ("train", "val" or "all"), in name order, joined by a blank line."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    docs = [d.data for d in corpus_documents(corpus)
            if split == "all" or document_split(d.name, val_fraction) == split]
    return b"\n\n".join(docs)


@functools.cache
def corpus_stream(split: str, val_fraction: float, corpus: str = "core") -> torch.Tensor:
    """LongTensor [N]: corpus_bytes as token ids."""
    return torch.frombuffer(bytearray(corpus_bytes(split, val_fraction, corpus)), dtype=torch.uint8).long()


def embedded_text() -> str:
    """The whole corpus as text (both splits), e.g. for the demo's input."""
    return corpus_bytes("all", 0.5).decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------
# Task config


class TaskConfig(StrictModel):
    """The ``task`` group: which task feeds the model (see the module docstring).

    seq_len: tokens per sample. haystack: "text" or "random" (needle, mqar). key_len / value_len:
    tokens per key and value; key_vocab / value_vocab: symbols per key slot and per value alphabet.
    num_pairs / num_queries: mqar's dictionary size and queries. passkey_digits: digits of a passkey.
    min_distance / max_distance: training range of distances (None: all that fit), sampled
    log-uniformly (every octave equally often) or uniformly. val_fraction: share of corpus documents
    held out. corpus: the text of the text task and of "text" haystacks (``CORPORA``).
    """

    name: Literal["needle", "mqar", "passkey", "text"] = "needle"
    seq_len: int = Field(256, ge=16)
    haystack: Literal["text", "random"] = "random"
    key_len: int = Field(2, ge=1, le=8)
    value_len: int = Field(2, ge=1, le=8)
    key_vocab: int = Field(16, ge=2, le=256)
    value_vocab: int = Field(16, ge=2, le=256)
    num_pairs: int = Field(8, ge=1, le=256)
    num_queries: int = Field(4, ge=1, le=256)
    passkey_digits: int = Field(5, ge=1, le=20)
    min_distance: int | None = Field(None, ge=1)
    max_distance: int | None = Field(None, ge=1)
    distance_sampling: Literal["log_uniform", "uniform"] = "log_uniform"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    corpus: Literal["core", "stdlib"] = "core"

    @model_validator(mode="after")
    def _check_task(self) -> TaskConfig:
        if self.name == "mqar":
            if self.num_queries > self.num_pairs:
                raise ValueError(f"num_queries={self.num_queries} must be <= num_pairs={self.num_pairs}")
            if self.key_vocab**self.key_len < self.num_pairs:
                raise ValueError(f"key_vocab**key_len={self.key_vocab**self.key_len} cannot give num_pairs="
                                 f"{self.num_pairs} distinct keys")
            if self.key_vocab**self.key_len > 2**16:
                raise ValueError("key_vocab**key_len must be <= 65536 (distinct keys are drawn from all of them)")
        task = build_task(self)
        if isinstance(task, RetrievalTask):
            task.distance_range  # noqa: B018 (raises when the range does not fit)
        return self

    @property
    def answer_len(self) -> int:
        """Tokens per answer (an answer is right when all of them are)."""
        return self.passkey_digits if self.name == "passkey" else self.value_len

    @property
    def vocab_needed(self) -> int:
        """The smallest model vocabulary that holds every id this task emits."""
        if self.name in ("passkey", "text"):
            return BYTE_VOCAB
        return FIRST_SYMBOL_ID + self.key_vocab + self.value_len * self.value_vocab


# ----------------------------------------------------------------------------------------------
# Batches and tasks


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch.

    inputs / targets: LongTensor [B, T]; targets are next-token ids, IGNORE_INDEX where not scored.
    distances: LongTensor [B] (empty for text); depths: float64 [B] (empty for text).
    answer_positions: LongTensor [A], the input positions whose targets are the answers (same for every
    row). sources: LongTensor [B, A], the position of the token each answer copies (recall metrics).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    distances: torch.Tensor
    depths: torch.Tensor
    answer_positions: torch.Tensor
    sources: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


@dataclasses.dataclass(frozen=True)
class Segments:
    """What a retrieval task plants in one batch: needle [B, Ln] and query [B, Lq] tokens, the answers'
    offsets inside the query segment [A] and the offsets (inside the needle) of the tokens they copy [B, A]."""

    needle: torch.Tensor
    query: torch.Tensor
    answer_offsets: torch.Tensor
    source_offsets: torch.Tensor


class RetrievalTask(abc.ABC):
    """Layout and sampling shared by needle, mqar and passkey (module docstring); ``segments`` is per task."""

    def __init__(self, config: TaskConfig, needle_len: int, query_len: int) -> None:
        self.config = config
        self.needle_len = needle_len
        self.query_len = query_len
        self.sample_len = config.seq_len + 1
        self.query_pos = self.sample_len - query_len
        if self.query_pos - needle_len < 1:
            raise ValueError(f"seq_len={config.seq_len} is too short for a needle of {needle_len} tokens and a "
                             f"query of {query_len} tokens")

    @property
    def smallest_distance(self) -> int:
        return self.needle_len

    @property
    def largest_distance(self) -> int:
        """The BOS marker (position p - 1 at depth 0) must fit at position >= 0."""
        return self.query_pos - 1

    @property
    def distance_range(self) -> tuple[int, int]:
        c = self.config
        lo = self.smallest_distance if c.min_distance is None else c.min_distance
        hi = self.largest_distance if c.max_distance is None else c.max_distance
        self.check_distance(lo, "min_distance")
        self.check_distance(hi, "max_distance")
        if lo > hi:
            raise ValueError(f"min_distance={lo} is larger than max_distance={hi}")
        return lo, hi

    def check_distance(self, distance: int, name: str = "distance") -> None:
        lo, hi = self.smallest_distance, self.largest_distance
        if isinstance(distance, bool) or not isinstance(distance, int) or not lo <= distance <= hi:
            raise ValueError(f"{name}={distance!r} does not fit: with seq_len={self.config.seq_len} and this "
                             f"{self.config.name} layout it must be an int in [{lo}, {hi}]")

    def before_needle(self, distance: int, depth: float) -> int:
        """Haystack tokens before the needle for a (distance, depth) pair (module docstring)."""
        after = distance - self.needle_len
        return round(depth * after / (1.0 - depth)) if depth < 1.0 else self.query_pos

    def fits(self, distance: int, depth: float) -> bool:
        """Whether a needle at this distance and depth fits in seq_len."""
        lo, hi = self.smallest_distance, self.largest_distance
        return lo <= distance <= hi and 0.0 <= depth < 1.0 and self.before_needle(distance, depth) <= hi - distance

    @abc.abstractmethod
    def segments(self, batch_size: int, generator: torch.Generator) -> Segments:
        """The task's needle and query tokens for one batch."""

    def haystack(self, batch_size: int, generator: torch.Generator, split: str) -> torch.Tensor:
        """LongTensor [B, sample_len] of filler: random bytes or windows of the split's text."""
        if self.config.haystack == "random":
            return torch.randint(BYTE_VOCAB, (batch_size, self.sample_len), generator=generator)
        stream = corpus_stream(split, self.config.val_fraction, self.config.corpus)
        return text_windows(stream, batch_size, self.sample_len, generator)

    def sample(self, batch_size: int, generator: torch.Generator, *, split: str = "train",
               distance: int | Sequence[int] | None = None, depth: float | None = None) -> Batch:
        """Draw a batch from ``generator`` only. distance: None (the training range, sampled per row), an
        int, or one int per row. depth: None (uniform over what fits, per row) or a value in [0, 1) that
        must fit every row's distance."""
        distances = self._distances(batch_size, generator, distance)
        p = self.query_pos - distances  # needle start [B]
        if depth is None:
            before = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * p).floor().long()
        else:
            if not all(self.fits(int(d), depth) for d in distances.tolist()):
                raise ValueError(f"depth={depth} does not fit distance(s) {sorted(set(distances.tolist()))} "
                                 f"with seq_len={self.config.seq_len}")
            before = torch.tensor([self.before_needle(int(d), depth) for d in distances.tolist()])
        seq = self.haystack(batch_size, generator, split)
        seg = self.segments(batch_size, generator)
        positions = torch.arange(self.sample_len)
        start = p - before - 1  # BOS position [B]
        seq = torch.where(positions < start[:, None], PAD_ID, seq)
        seq.scatter_(1, start[:, None], BOS_ID)
        seq.scatter_(1, p[:, None] + torch.arange(self.needle_len), seg.needle)
        seq[:, self.query_pos:] = seg.query

        inputs, next_tokens = seq[:, :-1], seq[:, 1:]
        answer_positions = self.query_pos + seg.answer_offsets - 1
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, answer_positions] = next_tokens[:, answer_positions]
        after = (distances - self.needle_len).double()
        depths = torch.where(before + after > 0, before / (before + after).clamp(min=1), 0.0)
        return Batch(inputs.contiguous(), targets, distances, depths, answer_positions,
                     p[:, None] + seg.source_offsets)

    def _distances(self, batch_size: int, generator: torch.Generator, distance: int | Sequence[int] | None
                   ) -> torch.Tensor:
        if distance is None:
            lo, hi = self.distance_range
            if self.config.distance_sampling == "uniform":
                return torch.randint(lo, hi + 1, (batch_size,), generator=generator)
            u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
            return (math.log(lo) + u * (math.log(hi + 1) - math.log(lo))).exp().floor().long().clamp(lo, hi)
        values = [distance] * batch_size if isinstance(distance, int) else list(distance)
        if len(values) != batch_size:
            raise ValueError(f"distance has {len(values)} entries, expected batch_size={batch_size}")
        for d in values:
            self.check_distance(d)
        return torch.tensor(values, dtype=torch.long)


def text_windows(stream: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """LongTensor [B, length]: windows of ``stream`` at uniformly drawn starts."""
    if len(stream) < length:
        raise ValueError(f"a window of {length} tokens is longer than the text ({len(stream)} bytes)")
    starts = torch.randint(len(stream) - length + 1, (batch_size,), generator=generator)
    return stream[starts[:, None] + torch.arange(length)]


class NeedleTask(RetrievalTask):
    """One key/value needle; the query repeats the key and the answers are the value tokens."""

    def __init__(self, config: TaskConfig) -> None:
        pair = 1 + config.key_len + config.value_len
        super().__init__(config, pair, pair)

    def segments(self, batch_size: int, generator: torch.Generator) -> Segments:
        c = self.config
        keys = torch.randint(c.key_vocab, (batch_size, c.key_len), generator=generator) + FIRST_SYMBOL_ID
        values = value_symbols(c, batch_size, 1, generator)[:, 0]
        marker = torch.full((batch_size, 1), KEY_ID)
        needle = torch.cat([marker, keys, values], dim=1)
        query = torch.cat([torch.full_like(marker, QUERY_ID), keys, values], dim=1)
        offsets = 1 + c.key_len + torch.arange(c.value_len)
        return Segments(needle, query, offsets, offsets.expand(batch_size, -1))


def value_symbols(config: TaskConfig, batch_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """LongTensor [B, count, value_len]: values, slot i drawn from its own alphabet."""
    first_value = FIRST_SYMBOL_ID + config.key_vocab
    slots = first_value + config.value_vocab * torch.arange(config.value_len)
    return torch.randint(config.value_vocab, (batch_size, count, config.value_len), generator=generator) + slots


class MQARTask(RetrievalTask):
    """num_pairs key/value pairs with distinct keys after a KEY marker; num_queries of them are queried."""

    def __init__(self, config: TaskConfig) -> None:
        pair = config.key_len + config.value_len
        super().__init__(config, 1 + config.num_pairs * pair, config.num_queries * (1 + pair))

    def segments(self, batch_size: int, generator: torch.Generator) -> Segments:
        c = self.config
        pair = c.key_len + c.value_len
        codes = torch.rand(batch_size, c.key_vocab**c.key_len, generator=generator).argsort(dim=1)[:, :c.num_pairs]
        digits = c.key_vocab ** torch.arange(c.key_len - 1, -1, -1)
        keys = (codes[..., None] // digits) % c.key_vocab + FIRST_SYMBOL_ID  # [B, P, K] distinct per row
        values = value_symbols(c, batch_size, c.num_pairs, generator)  # [B, P, V]
        pairs = torch.cat([keys, values], dim=2)  # [B, P, K + V]
        needle = torch.cat([torch.full((batch_size, 1), KEY_ID), pairs.flatten(1)], dim=1)
        asked = torch.rand(batch_size, c.num_pairs, generator=generator).argsort(dim=1)[:, :c.num_queries]  # [B, Q]
        asked_pairs = pairs.gather(1, asked[..., None].expand(-1, -1, pair))
        query = torch.cat([torch.full((batch_size, c.num_queries, 1), QUERY_ID), asked_pairs], dim=2).flatten(1)
        value_in_pair = c.key_len + torch.arange(c.value_len)
        answer_offsets = ((1 + pair) * torch.arange(c.num_queries)[:, None] + 1 + value_in_pair).flatten()
        source_offsets = (1 + pair * asked[..., None] + value_in_pair).flatten(1)
        return Segments(needle, query, answer_offsets, source_offsets)


class PasskeyTask(RetrievalTask):
    """The passkey test (Mohtashami and Jaggi, 2023) in bytes, with its repeated-sentence haystack."""

    def __init__(self, config: TaskConfig) -> None:
        n = config.passkey_digits
        self.needle_text = (b"The pass key is ", b". Remember it. ", b" is the pass key. ")
        self.query_text = b"What is the pass key? The pass key is "
        super().__init__(config, sum(map(len, self.needle_text)) + 2 * n, len(self.query_text) + n)

    def haystack(self, batch_size: int, generator: torch.Generator, split: str) -> torch.Tensor:
        filler = torch.tensor(list(PASSKEY_FILLER))
        reps = -(-(self.sample_len + len(filler)) // len(filler))
        return text_windows(filler.repeat(reps), batch_size, self.sample_len, generator)

    def segments(self, batch_size: int, generator: torch.Generator) -> Segments:
        n = self.config.passkey_digits
        digits = torch.randint(10, (batch_size, n), generator=generator) + ord("0")
        head, mid, tail = (torch.tensor(list(t)).expand(batch_size, -1) for t in self.needle_text)
        needle = torch.cat([head, digits, mid, digits, tail], dim=1)
        query = torch.cat([torch.tensor(list(self.query_text)).expand(batch_size, -1), digits], dim=1)
        answer_offsets = len(self.query_text) + torch.arange(n)
        return Segments(needle, query, answer_offsets, (len(head[0]) + torch.arange(n)).expand(batch_size, -1))


class TextTask:
    """Byte-level language modelling on the corpus split: windows of seq_len + 1 bytes, every target scored."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    def sample(self, batch_size: int, generator: torch.Generator, *, split: str = "train") -> Batch:
        stream = corpus_stream(split, self.config.val_fraction, self.config.corpus)
        seq = text_windows(stream, batch_size, self.config.seq_len + 1, generator)
        empty = torch.empty(0, dtype=torch.long)
        return Batch(seq[:, :-1], seq[:, 1:], empty, empty.double(), empty, empty.view(batch_size, 0))


Task = NeedleTask | MQARTask | PasskeyTask | TextTask


def build_task(config: TaskConfig) -> Task:
    """The task object of a TaskConfig."""
    tasks: dict[str, type[Task]] = {"needle": NeedleTask, "mqar": MQARTask, "passkey": PasskeyTask, "text": TextTask}
    return tasks[config.name](config)


def chance_accuracy(config: TaskConfig) -> tuple[float, float]:
    """(exact-match, per-token) accuracy of guessing each answer token uniformly within its alphabet."""
    token = 0.1 if config.name == "passkey" else 1.0 / config.value_vocab
    return token**config.answer_len, token
