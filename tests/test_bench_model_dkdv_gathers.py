"""bench.model_dkdv_gathers: the cache model of the selection dk/dv's gathers runs on the schedule the code builds."""

from __future__ import annotations

from bench import model_dkdv_gathers as model


def test_programs_gather_every_selected_token_once_per_block() -> None:
    indices = model.random_selection(1500, seed=3)
    for windows in (1, 5):
        programs = model.program_tokens(indices, windows, chunk=64)
        assert sum(len(tokens) for tokens in programs) == int((indices >= 0).sum())
        assert all(tokens == sorted(tokens) and 0 < len(tokens) <= 64 for tokens in programs)


def test_the_selection_has_the_forced_blocks_and_distinct_candidates() -> None:
    indices = model.random_selection(700, seed=1)[:, 0]
    for t, row in enumerate(indices.tolist()):
        chosen = [b for b in row if b >= 0]
        current = t // model.SEL_BLOCK
        assert len(set(chosen)) == len(chosen) == min(model.NUM_SELECTED, current + 1)
        assert {0, current, max(current - 1, 0)} <= set(chosen) and max(chosen) == current


def test_window_by_window_programs_hit_a_small_cache_more_often() -> None:
    """With more rows than the cache holds, the programs of one window share their rows (the schedule's point)."""
    programs = {windows: model.program_tokens(model.random_selection(4096, seed=0), windows, chunk=1024)
                for windows in (1, 8)}
    rates = {windows: model.hit_rate(tokens, slots=24, capacity=256) for windows, tokens in programs.items()}
    assert rates[8] > rates[1] + 0.1, rates


def test_hit_rate_counts_repeats_within_the_cache() -> None:
    assert model.hit_rate([[1, 2, 1, 2]], slots=1, capacity=2) == 0.5
    assert model.hit_rate([[1, 2, 3, 1]], slots=1, capacity=2) == 0.0
