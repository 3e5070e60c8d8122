"""The main job end to end on the tiny config: four attentions trained by two worker processes, evaluated and
reported side by side; a second invocation resumes what was interrupted and keeps what finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness_tiny import TINY

from sal_harness import compare
from sal_harness.checkpoint import list_checkpoints
from sal_harness.train import train

KINDS = ("dense", "window", "nsa", "scope")
COMMON = [o for o in TINY if not o.startswith("attention.")] + ["nsa:attention.num_selected=4"]


def test_compare_reports_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare"
    # An interrupted run of the comparison: dense stopped at step 2.
    (dense,) = compare.run_configs(compare.parse_args(["--attentions", "dense", "--out-dir", str(out), *COMMON]))
    train(dense.model_copy(update={"stop_step": 2}))
    assert compare.main(["--out-dir", str(out), "--jobs", "2", "--results", str(tmp_path / "rows"), *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "needle: exact-match accuracy by needle distance" in printed and "beyond the window's reach" in printed

    report = json.loads((out / "report" / "report.json").read_text())
    for kind in KINDS:
        assert set(report[kind]["needle"]) == {"8", "40"}
        assert all(0 <= a <= 1 for a in report[kind]["needle"].values())
        assert report["bpb"][kind] > 0
    assert set(report["recall"]) == {"nsa", "scope"}
    assert report["reach"]["window"] == 15 and report["chance"]["needle"] == pytest.approx(1 / 32)
    for name in ("loss_curves", "accuracy_by_distance", "accuracy_heatmap", "selection_map", "pointer_map"):
        assert (out / "report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert "num_selected: 4" in (out / "nsa-needle" / "config.yaml").read_text()

    # dense resumed from its step-2 checkpoint: one metrics record per logged step, no step run twice.
    steps = [r["step"] for r in map(json.loads, (out / "dense-needle" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [2, 4, 6]

    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2
    assert {"attention", "task", "train_seq_len", "distance", "accuracy", "chance", "selection_recall", "train_steps",
            "pointer_recall", "bpb", "train_minutes", "recipe", "gpu", "commit"} <= set(rows[0])
    configs = compare.run_configs(compare.parse_args(["--out-dir", str(out), *COMMON]))
    assert {r["attention"]: r["recipe"] for r in rows} == {c.attention.kind: c.recipe() for c in configs}
    assert "train.max_steps=6" in rows[0]["recipe"]
    markdown = (tmp_path / "rows.md").read_text()
    assert "| distance |" in markdown and "## recipes" in markdown
    kept = tmp_path / "rows_plots" / "dense-nsa-scope-window_needle_selection_map.png"
    assert kept.read_bytes()[:4] == b"\x89PNG" and f"(rows_plots/{kept.name})" in markdown

    before = {kind: list_checkpoints(out / f"{kind}-needle") for kind in KINDS}
    assert compare.main(["--out-dir", str(out), "--jobs", "1", *COMMON]) == 0
    assert "finished earlier, kept" in capsys.readouterr().out
    assert before == {kind: list_checkpoints(out / f"{kind}-needle") for kind in KINDS}


def test_compare_rejects_unknown_attentions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main(["--attentions", "dense,sparse", "--out-dir", str(tmp_path)]) == 2
    assert "sparse" in capsys.readouterr().err


@pytest.mark.parametrize("sharded", [False, True])
def test_a_run_is_finished_when_its_evaluation_is_of_its_newest_checkpoint(tmp_path: Path, sharded: bool) -> None:
    """compare keeps a run whose eval.json is of its newest checkpoint, a file (one process, DDP) or an FSDP2
    sharded folder alike, and redoes the evaluation of one that trained further."""
    (config,) = compare.run_configs(compare.parse_args(["--attentions", "dense", "--out-dir", str(tmp_path), *COMMON]))
    run = Path(config.out_dir)
    run.mkdir(parents=True)
    for step in (4, 6):
        name = f"ckpt-{step:08d}"
        (run / name).mkdir() if sharded else (run / f"{name}.pt").write_bytes(b"")
    (run / "eval.json").write_text(json.dumps({"step": 6}))
    assert compare.finished(config)
    (run / "eval.json").write_text(json.dumps({"step": 4}))
    assert not compare.finished(config)
