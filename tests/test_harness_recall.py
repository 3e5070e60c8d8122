"""What the sparse layers read about the needle: the evaluation's recall probes on hand-built selections and
pointer masks (the expected rates counted by hand in each test's comment)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from nsa import NSAAux
from sal_harness import evaluate
from sal_harness.data import Batch
from sal_harness.evaluate import RecallSums, nsa_probe, scope_probe
from sal_harness.report import results_markdown

EMPTY = torch.empty(0)


def batch(answer_position: int, sources: list[int]) -> Batch:
    """Samples of 16 tokens with one answer at answer_position copying the token at sources[b]."""
    size = len(sources)
    tokens = torch.zeros(size, 16, dtype=torch.long)
    return Batch(tokens, tokens, EMPTY, EMPTY, torch.tensor([answer_position]), torch.tensor(sources)[:, None])


def nsa_layer(chosen: list[list[list[int]]], answer_position: int) -> NSAAux:
    """block_indices with chosen[b][h] (n = 2, -1 padded) at the answer position, -1 elsewhere; HQ = 2 Hkv."""
    size, kv_heads = len(chosen), len(chosen[0])
    indices = torch.full((size, 16, kv_heads, 2), -1, dtype=torch.int32)
    indices[:, answer_position] = torch.tensor(chosen, dtype=torch.int32)
    return NSAAux(indices, torch.full((size, 16, 2 * kv_heads, 3), 0.5))


def test_selection_recall_counts_a_hit_of_any_kv_head_and_reports_each_head() -> None:
    # Blocks of 4 tokens; the answer at 12 copies token 2 (block 0) in sample 0 and token 9 (block 2) in sample 1.
    data = batch(12, [2, 9])
    layers = [
        # layer 0: kv head 0 holds sample 0's block, kv head 1 sample 1's: any head 2/2, heads 1/2 and 1/2
        [[[0, 3], [1, -1]], [[0, 1], [2, -1]]],
        # layer 1: only kv head 1, in sample 0 (block 0; block 2 is sample 1's, not sample 0's): 1/2, heads 0 and 1/2
        [[[1, 3], [0, 2]], [[3, -1], [1, 0]]],
        # layer 2: nothing (block 2 in sample 0, blocks 0 and 1 in sample 1): 0
        [[[2, -1], [2, 3]], [[0, 1], [1, 3]]],
    ]
    sums = RecallSums()
    for _ in range(2):  # two evaluation batches add up to the same rates
        sums.add([nsa_probe(nsa_layer(chosen, 12), data, sel_block_size=4) for chosen in layers])
    fields = sums.fields()
    assert fields["selection_recall_by_layer"] == [1.0, 0.5, 0.0]
    assert fields["selection_recall_by_layer_head"] == [[0.5, 0.5], [0.0, 0.5], [0.0, 0.0]]
    assert fields["selection_recall"] == 1.0
    assert fields["selection_recall_head_mean"] == 0.5
    assert fields["gate_means_by_layer"][0] == {"cmp": 0.5, "sel": 0.5, "win": 0.5}
    assert fields["selection_recall_any_layer"] == 1.0


def test_selection_recall_over_layers_counts_an_answer_once_whichever_layer_selects_it() -> None:
    # Blocks of 4; sources in blocks 0, 2, 1 of samples 0-2. Layer 0 selects sample 0's block, layer 1 samples 0's
    # and 1's: the best layer 2/3. Layer 2 selecting none of them leaves the any-layer rate at 2/3; selecting
    # sample 2's block raises it to 3/3 while the best layer stays at 2/3.
    data = batch(12, [2, 9, 5])
    layer0 = [[[0, -1]], [[1, -1]], [[3, -1]]]
    layer1 = [[[0, 1]], [[2, -1]], [[0, 2]]]
    for layer2, any_layer in (([[[2, -1]], [[3, -1]], [[2, 3]]], 2 / 3), ([[[2, -1]], [[3, -1]], [[1, 3]]], 1.0)):
        sums = RecallSums()
        sums.add([nsa_probe(nsa_layer(chosen, 12), data, sel_block_size=4) for chosen in (layer0, layer1, layer2)])
        fields = sums.fields()
        assert fields["selection_recall"] == pytest.approx(2 / 3)
        assert fields["selection_recall_any_layer"] == pytest.approx(any_layer)


def pointer_layer(centres: list[list[list[int]]], alloc: int, listed: list[list[list[int]]]) -> Any:
    """A stand-in for ScopeAux: centres [B, H, 1 query block, M] of windows of ``alloc`` blocks, kv_indices
    [B, H, 1, K]; the probe reads only these fields."""
    centre = torch.tensor(centres)[:, :, None, :]
    mask = SimpleNamespace(centres=centre, alloc=torch.full_like(centre, alloc),
                           kv_indices=torch.tensor(listed)[:, :, None, :])
    return SimpleNamespace(pointer_mask=mask)


def test_pointer_recall_counts_a_window_of_any_head_and_reports_each_head() -> None:
    # Key blocks of 4 tokens, one query block (the answer at 3 is in block 0); sources in blocks 5 and 1.
    data = batch(3, [21, 6])
    # Windows of 3 blocks (centre - 1 .. centre + 1). Head 0 points at 4 (covers 5) in sample 0 and at 7 in sample
    # 1 (misses 1); head 1 at 0 (misses 5) and at 2 (covers 1): any head 2/2, heads 1/2 and 1/2. Listed keys:
    # head 0 reads block 5 in sample 0 only, head 1 nothing of the sources: any 1/2, heads 1/2 and 0.
    aux = pointer_layer(centres=[[[4], [0]], [[7], [2]]], alloc=3, listed=[[[5, 0], [0, 2]], [[3, 0], [0, 2]]])
    sums = RecallSums()
    sums.add([scope_probe(cast(Any, aux), data, block=4)])
    fields = sums.fields()
    assert fields["pointer_recall_any_layer"] == fields["pointer_recall"] == 1.0
    assert fields["pointer_recall_by_layer_head"] == [[0.5, 0.5]]
    assert fields["pointer_recall_head_mean"] == 0.5
    assert fields["listed_recall"] == 0.5 and fields["listed_recall_by_layer_head"] == [[0.5, 0.0]]


@pytest.mark.parametrize("alloc", [0, 1])
def test_a_pointer_without_blocks_covers_nothing(alloc: int) -> None:
    # alloc 0: no window at all; alloc 1: the centre block alone (5), not the source's block 4.
    aux = pointer_layer(centres=[[[5]]], alloc=alloc, listed=[[[0]]])
    sums = RecallSums()
    sums.add([scope_probe(cast(Any, aux), batch(3, [17]), block=4)])
    assert sums.fields()["pointer_recall"] == 0.0


def test_results_table_shows_the_recall_each_row_holds() -> None:
    common = {"task": "needle", "train_seq_len": 64, "distance": 40, "accuracy": 1.0, "chance": 0.03,
              "train_minutes": 1.0, "train_steps": 6, "gpu": "cpu", "commit": "0" * 40}
    rows = [{**common, "attention": "dense"},
            {**common, "attention": "nsa", "selection_recall": 0.98, "selection_recall_head_mean": 0.52,
             "selection_recall_any_layer": 1.0},
            {**common, "attention": "scope", "pointer_recall": None, "pointer_recall_head_mean": 0.5}]
    table = results_markdown(rows, ["rows_plots/nsa_needle_selection_map.png"])
    assert "| 40 | 1.000 | 1.000 (0.98; head mean 0.52; any layer 1.00) | 1.000 (head mean 0.50) |" in table
    assert "- [nsa_needle_selection_map](rows_plots/nsa_needle_selection_map.png)" in table


def test_results_table_shows_text_bpb_against_dense_and_unlike_recipes() -> None:
    recipe = "train.batch_size=2 train.curriculum_batch=tokens"
    common = {"task": "text", "train_seq_len": 64, "distance": None, "accuracy": None, "chance": None,
              "train_minutes": 1.0, "train_steps": 6, "gpu": "cpu", "commit": "0" * 40}
    rows = [{**common, "attention": "dense", "bpb": 1.25, "recipe": recipe},
            {**common, "attention": "nsa", "bpb": 1.275, "recipe": recipe + " train.scope_teacher_weight=0.5"},
            {**common, "attention": "scope", "bpb": 1.5, "recipe": recipe.replace("tokens", "fixed")},
            {**common, "attention": "window", "bpb": 1.2}]
    table = results_markdown(rows)
    assert "| nsa | text | 64 | 1.0 | 6 | 1.275 | +2.0% | cpu |" in table  # a setting dense's recipe lacks: alike
    assert "| scope | text | 64 | 1.0 | 6 | 1.500 | +20.0%, recipe differs | cpu |" in table
    assert "| window | text | 64 | 1.0 | 6 | 1.200 | -4.0% | cpu |" in table  # a row without a recipe: no check
    assert "| dense | text | 64 | 1.0 | 6 | 1.250 |  | cpu |" in table
    assert "- scope / text: `train.batch_size=2 train.curriculum_batch=fixed`" in table


@pytest.mark.parametrize(("alloc", "centre", "covered"), [(2, 5, (5, 6)), (4, 5, (4, 7))])
def test_an_even_pointer_window_reaches_one_block_further_after_its_centre(alloc: int, centre: int,
                                                                           covered: tuple[int, int]) -> None:
    # A peak of n blocks covers centre - (n - 1) // 2 .. centre + n // 2 (scope.pointer_mask's slots): n = 2 at 5
    # covers 5..6, n = 4 covers 4..7. Sources one block outside each edge, and on each edge, in blocks of 4 tokens.
    low, high = covered
    recalls = []
    for source_block in (low - 1, low, high, high + 1):
        sums = RecallSums()
        aux = pointer_layer(centres=[[[centre]]], alloc=alloc, listed=[[[0]]])
        sums.add([scope_probe(cast(Any, aux), batch(3, [4 * source_block + 1]), block=4)])
        recalls.append(sums.fields()["pointer_recall"])
    assert recalls == [0.0, 1.0, 1.0, 0.0]  # the two edge blocks, not the two outside


def test_an_answer_counts_as_exact_only_when_all_its_tokens_are_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate_cell's accuracy is exact match over an answer's tokens, token_accuracy their share: two samples of
    one two-token answer, one with its second token wrong -> accuracy 1/2, token accuracy 3/4."""
    hits = torch.tensor([[[True, False]], [[True, True]]])
    monkeypatch.setattr(evaluate, "answer_hits", lambda logits, data, answer_len: hits[: len(logits)])

    class Samples:
        config = SimpleNamespace(answer_len=2)

        def sample(self, size: int, generator: torch.Generator, **where: Any) -> Any:
            return _Sized(torch.zeros(size, 8, dtype=torch.long))

    def model(inputs: torch.Tensor, return_aux: bool) -> Any:
        return SimpleNamespace(logits=torch.zeros(inputs.shape[0], 8, 4), aux=None)

    model.config = SimpleNamespace(attention=None)  # type: ignore[attr-defined]
    cell = evaluate.evaluate_cell(cast(Any, model), cast(Any, Samples()), distance=4, depth=None, samples=2,
                                  batch_size=2, generator=torch.Generator(), device="cpu")
    assert (cell["accuracy"], cell["token_accuracy"], cell["n"]) == (0.5, 0.75, 2)


class _Sized:
    """A batch stand-in: inputs, and len() = its samples."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return self.inputs.shape[0]
