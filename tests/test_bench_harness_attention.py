"""bench/bench_harness_attention.py on the CPU: the smoke run writes its rows and table, and its parity checks
fail on a wrong window or a wrong teacher before anything is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_refusal

from bench import bench_harness_attention as bench
from sal_harness.model import banded_window_attention


def test_smoke_run_writes_rows_and_table(tmp_path: Path) -> None:
    assert bench.main(["--results-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "harness_attention_cpu.jsonl").read_text().splitlines()]
    assert {(r["part"], r["impl"]) for r in rows} == {
        ("window", "banded"), ("window", "band_mask"), ("window", "dense_causal"),
        ("teacher", "fused"), ("teacher", "materialised")}
    assert len([r for r in rows if r["part"] == "teacher"]) == 4  # two shapes, the second a query tail
    assert all(r["ms"] > 0 and "torch" in r and "commit" in r for r in rows)
    assert "| window | banded |" in (tmp_path / "harness_attention_cpu.md").read_text()


def test_parity_checks_fail_on_a_wrong_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "banded_window_attention",
                        lambda q, k, v, window: banded_window_attention(q, k, v, window + 1))
    with pytest.raises(AssertionError, match="banded window o"):
        bench.main(["--results-dir", str(tmp_path)])
    monkeypatch.undo()
    monkeypatch.setattr(bench, "teacher_block_targets",
                        lambda q, k, **sizes: bench.materialised_teacher(q, k, **sizes).roll(1, dims=-1))
    with pytest.raises(AssertionError, match="teacher targets"):
        bench.main(["--results-dir", str(tmp_path)])
    assert not list(tmp_path.glob("*.jsonl"))  # nothing written by a failed run


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "cuda:99"], "--device: cuda:99"),  # an AssertionError from torch after the CPU work
    (["--device", "bogus"], "--device: must be cpu, cuda or cuda:N"),
    (["--results-dir", ""], "--results-dir: an empty path"),  # wrote the rows into the current folder
    (["--results-dir", "{tmp}/afile"], "afile is a file, not a folder"),  # FileExistsError after the timing
])
def test_bad_arguments_are_refused_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   flags: list[str], message: str) -> None:
    (tmp_path / "afile").write_text("x")
    assert message in cli_refusal(bench.main, capsys, [flag.format(tmp=tmp_path) for flag in flags])
    assert [path.name for path in tmp_path.iterdir()] == ["afile"]
