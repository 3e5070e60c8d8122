"""sal_harness.data: the layout of every retrieval task (checked by parsing the samples back, not with the
module's own helpers), the corpus split by document, and reproducibility from the caller's generator."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sal_harness.data import (
    BOS_ID,
    FIRST_SYMBOL_ID,
    IGNORE_INDEX,
    KEY_ID,
    PAD_ID,
    PASSKEY_FILLER,
    QUERY_ID,
    RetrievalTask,
    TaskConfig,
    TextTask,
    build_task,
    corpus_documents,
    corpus_stream,
    document_split,
)


def retrieval(**fields: object) -> RetrievalTask:
    task = build_task(TaskConfig.model_validate(fields))
    assert isinstance(task, RetrievalTask)
    return task


def full_sample(inputs: torch.Tensor, targets: torch.Tensor, answer_positions: torch.Tensor) -> torch.Tensor:
    """The seq_len + 1 tokens of each row (the last one is the last answer's target)."""
    return torch.cat([inputs, targets[:, -1:]], dim=1)


@given(seq_len=st.integers(24, 160), key_len=st.integers(1, 3), value_len=st.integers(1, 3),
       frac=st.floats(0.0, 1.0), depth=st.floats(0.0, 0.9), seed=st.integers(0, 2**31))
def test_needle_layout_at_distance_and_depth(seq_len: int, key_len: int, value_len: int, frac: float, depth: float,
                                             seed: int) -> None:
    task = retrieval(name="needle", seq_len=seq_len, key_len=key_len, value_len=value_len, haystack="random")
    pair = 1 + key_len + value_len
    lo, hi = pair, seq_len + 1 - pair - 1
    distance = lo + round(frac * (hi - lo))
    if not task.fits(distance, depth):
        with pytest.raises(ValueError, match="depth"):
            task.sample(2, torch.Generator().manual_seed(seed), distance=distance, depth=depth)
        return
    batch = task.sample(2, torch.Generator().manual_seed(seed), distance=distance, depth=depth)
    seq = full_sample(batch.inputs, batch.targets, batch.answer_positions)
    q = seq_len + 1 - pair
    for row in seq.tolist():
        assert row[q] == QUERY_ID and row.count(QUERY_ID) == 1 and row.count(KEY_ID) == 1
        p = row.index(KEY_ID)
        assert q - p == distance
        s = row.index(BOS_ID)
        assert all(t == PAD_ID for t in row[:s]) and row.count(BOS_ID) == 1
        before, after = p - s - 1, q - p - pair
        if before + after:  # the haystack before the needle is depth x the haystack, to one token
            assert before / (before + after) == pytest.approx(depth, abs=1.0 / (before + after) + 1e-9)
        assert row[p + 1 : p + pair] == row[q + 1 :]  # the query repeats key and value
        assert all(t < 256 for i, t in enumerate(row) if s < i < p or p + pair <= i < q)  # haystack: bytes
    scored = batch.targets != IGNORE_INDEX
    assert scored.sum(1).tolist() == [value_len] * 2
    assert torch.equal(batch.targets[:, batch.answer_positions], batch.inputs.gather(1, batch.sources))
    assert (batch.distances == distance).all()


def test_needle_values_use_their_own_alphabets() -> None:
    task = retrieval(name="needle", seq_len=64, key_len=1, value_len=3, key_vocab=8, value_vocab=5)
    batch = task.sample(200, torch.Generator().manual_seed(0))
    values = batch.targets[:, batch.answer_positions]
    for slot in range(3):
        first = FIRST_SYMBOL_ID + 8 + 5 * slot
        assert set(values[:, slot].tolist()) == set(range(first, first + 5))


@given(num_pairs=st.integers(1, 6), extra=st.integers(0, 3), key_len=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_mqar_answers_are_the_values_of_the_queried_keys(num_pairs: int, extra: int, key_len: int, seed: int) -> None:
    num_queries = max(1, num_pairs - extra)
    task = retrieval(name="mqar", seq_len=128, num_pairs=num_pairs, num_queries=num_queries, key_len=key_len,
                     value_len=1, key_vocab=8)
    batch = task.sample(3, torch.Generator().manual_seed(seed))
    seq = full_sample(batch.inputs, batch.targets, batch.answer_positions)
    answers = batch.targets[:, batch.answer_positions]
    for row, row_answers in zip(seq.tolist(), answers.tolist(), strict=True):
        p = row.index(KEY_ID)
        pairs = [row[p + 1 + i * (key_len + 1): p + 1 + (i + 1) * (key_len + 1)] for i in range(num_pairs)]
        table = {tuple(pair[:key_len]): pair[key_len] for pair in pairs}
        assert len(table) == num_pairs  # distinct keys
        queries = [i for i, t in enumerate(row) if t == QUERY_ID]
        assert len(queries) == num_queries
        asked = [tuple(row[i + 1: i + 1 + key_len]) for i in queries]
        assert len(set(asked)) == num_queries
        assert row_answers == [table[key] for key in asked]


def test_passkey_layout() -> None:
    task = retrieval(name="passkey", seq_len=256, passkey_digits=5)
    batch = task.sample(4, torch.Generator().manual_seed(3), distance=150, depth=0.25)
    seq = full_sample(batch.inputs, batch.targets, batch.answer_positions)
    for row, answer in zip(seq.tolist(), batch.targets[:, batch.answer_positions].tolist(), strict=True):
        s = row.index(BOS_ID)
        text = bytes(row[s + 1:]).decode()
        digits = bytes(answer).decode()
        assert digits.isdigit() and len(digits) == 5
        assert f"The pass key is {digits}. Remember it. {digits} is the pass key. " in text
        assert text.endswith(f"What is the pass key? The pass key is {digits}")
        assert sum(c.isdigit() for c in text) == 15  # the haystack holds no digit
    assert not any(chr(b).isdigit() for b in PASSKEY_FILLER)


def test_distance_and_depth_that_do_not_fit() -> None:
    task = retrieval(name="needle", seq_len=64)
    with pytest.raises(ValueError, match="distance=200"):
        task.sample(1, torch.Generator(), distance=200)
    assert task.fits(50, 0.0) and not task.fits(50, 0.5) and not task.fits(10, 1.0)
    with pytest.raises(ValueError, match="max_distance"):
        TaskConfig(name="needle", seq_len=64, max_distance=100)
    with pytest.raises(ValueError, match="num_queries"):
        TaskConfig(name="mqar", num_pairs=2, num_queries=3)


@pytest.mark.parametrize("sampling", ["uniform", "log_uniform"])
def test_sampled_distances_cover_the_range(sampling: str) -> None:
    task = retrieval(name="needle", seq_len=256, min_distance=5, max_distance=230, distance_sampling=sampling)
    d = task.sample(4000, torch.Generator().manual_seed(0)).distances
    assert d.min() >= 5 and d.max() <= 230
    near = (d < 32).double().mean().item()
    expected = {"uniform": 27 / 226, "log_uniform": math.log(32 / 5) / math.log(231 / 5)}[sampling]
    assert near == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize("name", ["needle", "mqar", "passkey", "text"])
def test_samples_come_from_the_generator_alone(name: Literal["needle", "mqar", "passkey", "text"]) -> None:
    task = build_task(TaskConfig(name=name, seq_len=128, haystack="text"))
    a = task.sample(4, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = task.sample(4, torch.Generator().manual_seed(7))
    c = task.sample(4, torch.Generator().manual_seed(8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_corpus_is_split_by_document() -> None:
    docs = corpus_documents()
    names = [d.name for d in docs]
    assert len(names) == len(set(names)) > 50
    assert any(n.startswith("pydoc:") for n in names) and any(n.startswith("stdlib:") for n in names)
    val = [d for d in docs if document_split(d.name, 0.1) == "val"]
    train = [d for d in docs if document_split(d.name, 0.1) == "train"]
    assert val and train and len(val) + len(train) == len(docs)
    val_bytes = bytes(corpus_stream("val", 0.1).tolist())
    train_bytes = bytes(corpus_stream("train", 0.1).tolist())
    assert all(d.data in val_bytes and d.data not in train_bytes for d in val if len(d.data) > 2000)
    assert all(d.data in train_bytes and d.data not in val_bytes for d in train if len(d.data) > 2000)
    assert len(train_bytes) > 1_000_000 and len(val_bytes) > 50_000


def test_text_task_windows() -> None:
    task = TextTask(TaskConfig(name="text", seq_len=32))
    batch = task.sample(4, torch.Generator().manual_seed(0), split="val")
    assert batch.inputs.shape == batch.targets.shape == (4, 32)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1]) and batch.inputs.max() < 256


def test_stdlib_corpus_is_every_distinct_source_split_by_document() -> None:
    """The large corpus holds the core one's documents and more; no text is in both splits, however many copies
    of a file the standard library ships."""
    core = {d.data for d in corpus_documents("core")}
    docs = corpus_documents("stdlib")
    assert core <= {d.data for d in docs} and len(docs) > 3 * len(core)
    assert len({d.data for d in docs}) == len(docs)
    val = bytes(corpus_stream("val", 0.1, "stdlib").tolist())
    train = bytes(corpus_stream("train", 0.1, "stdlib").tolist())
    assert len(train) > 10 * len(bytes(corpus_stream("train", 0.1).tolist()))
    held_out = [d for d in docs if document_split(d.name, 0.1) == "val" and len(d.data) > 2000]
    assert held_out and all(d.data in val and d.data not in train for d in held_out[:20])
    with pytest.raises(ValueError, match="corpus must be one of"):
        corpus_documents("web")
    with pytest.raises(ValueError, match="corpus"):
        TaskConfig(name="text", corpus="web")  # type: ignore[arg-type]
