"""The main job end to end on the tiny config: four attentions trained by two worker processes, evaluated and
reported side by side; a second invocation resumes what was interrupted and keeps what finished."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import cli_refusal
from harness_tiny import TINY
from omegaconf import OmegaConf

from sal_harness import compare
from sal_harness.checkpoint import list_checkpoints
from sal_harness.config import RunConfig
from sal_harness.errors import HarnessError, RunFolderError
from sal_harness.train import train

KINDS = ("dense", "window", "nsa", "scope")
DENSE = [o for o in TINY if not o.startswith("attention.")]  # a scoped override of a kind not run is an error
COMMON = [*DENSE, "nsa:attention.num_selected=4"]


def dense_config(out: Path, *extra: str) -> RunConfig:
    (config,) = compare.run_configs(compare.parse_args(["--attentions", "dense", "--out-dir", str(out), *DENSE,
                                                        *extra]))
    return config


def fake_run(config: RunConfig, *steps: int, evaluated: int | None = None, sharded: bool = False) -> Path:
    """A run folder of ``config`` without training: config.yaml as train writes it, empty checkpoints of ``steps``
    (files, or FSDP2 folders when sharded) and an eval.json of step ``evaluated``."""
    run = Path(config.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config.model_dump(mode="json"))))
    for step in steps:
        name = f"ckpt-{step:08d}"
        (run / name).mkdir() if sharded else (run / f"{name}.pt").write_bytes(b"")
    if evaluated is not None:
        (run / "eval.json").write_text(json.dumps({"step": evaluated}))
    return run


def test_compare_reports_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare"
    # An interrupted run of the comparison: dense stopped at step 2.
    train(dense_config(out).model_copy(update={"stop_step": 2}))
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
    config = dense_config(tmp_path)
    run = fake_run(config, 4, 6, evaluated=6, sharded=sharded)
    assert compare.finished(config)
    (run / "eval.json").write_text(json.dumps({"step": 4}))
    assert not compare.finished(config)


def test_a_run_evaluated_before_max_steps_is_not_finished(tmp_path: Path) -> None:
    """sal-eval of an interrupted run (or one stopped by stop_step) leaves an eval.json of its newest checkpoint:
    the run is resumed, not kept; a stop at train.max_minutes is a finish (train evaluates it)."""
    config = dense_config(tmp_path)  # train.max_steps=6
    run = fake_run(config, 4, evaluated=4)
    assert not compare.finished(config)
    (run / "heartbeat.json").write_text(json.dumps({"status": "finished", "step": 4}))  # stop_step=4
    assert not compare.finished(config)
    (run / "heartbeat.json").write_text(json.dumps({"status": "time_budget", "step": 4}))
    assert compare.finished(config)


@pytest.mark.parametrize("content", ['{"step": 6', "[]", '{"task": "needle"}', '{"step": "6"}'])
def test_a_torn_or_odd_eval_json_names_the_file(tmp_path: Path, content: str) -> None:
    config = dense_config(tmp_path)
    (fake_run(config, 6) / "eval.json").write_text(content)
    with pytest.raises(RunFolderError, match=r"eval\.json .*rerun sal-eval"):
        compare.finished(config)


def test_a_run_folder_of_other_settings_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A finished run trained with other settings is not kept as this one's: the call names the keys that differ and
    changes nothing; settings a resume may change (threads, stop_step) do not count."""
    run = fake_run(dense_config(tmp_path, "train.lr=0.005", "eval.distances=[8]"), 6, evaluated=6)
    before = sorted(run.iterdir())
    assert compare.main(["--attentions", "dense", "--out-dir", str(tmp_path), "--jobs", "1", *DENSE]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.005 -> " in err and "eval.distances" in err and "another --out-dir" in err
    assert sorted(run.iterdir()) == before and not (tmp_path / "report").exists()
    assert dense_config(tmp_path, "train.lr=0.005", "eval.distances=[8]", "--threads", "2", "stop_step=6").resume


@pytest.mark.parametrize("option", ["--attentions", "--tasks"])
def test_a_repeated_or_empty_kind_or_task_is_refused(tmp_path: Path, option: str) -> None:
    repeated = "dense,dense" if option == "--attentions" else "needle,needle"
    for value, rule in ((repeated, "given more than once"), ("", "nothing given")):
        args = compare.parse_args(["--attentions", "dense", option, value, "--out-dir", str(tmp_path), *DENSE])
        with pytest.raises(HarnessError, match=f"{option}: .*{rule}"):
            compare.run_configs(args)


def test_two_runs_of_one_folder_are_refused(tmp_path: Path) -> None:
    config = dense_config(tmp_path)
    fake_run(config, 6, evaluated=6)
    with pytest.raises(HarnessError, match="share the run folder"):
        compare.run_all([config, config], jobs=1)


@pytest.mark.parametrize("arguments, message", [
    (["--attentions", "dense", "nsa:attention.num_selected=4"], "nsa is not in --attentions"),
    (["--attentions", "dense", "dense:out_dir=elsewhere"], "sal-compare sets out_dir"),
    (["--attentions", "dense", "--ddp-attentions", "dense,bogus"], "--ddp-attentions: unknown kind"),
])
def test_overrides_and_ddp_kinds_that_would_be_ignored_are_refused(tmp_path: Path, arguments: list[str],
                                                                     message: str,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative out_dir that slipped through would train here, not in the checkout
    assert compare.main([*arguments, "--out-dir", str(tmp_path / "out"), "--jobs", "1", *DENSE]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("jobs", ["0", "-3", "two"])
def test_jobs_must_be_at_least_one(jobs: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "argument --jobs: must be" in cli_refusal(compare.parse_args, capsys, ["--jobs", jobs])


@pytest.mark.parametrize("blocked", [".", "dense-needle", "report"])
def test_a_file_where_a_folder_goes_is_refused_before_any_work(tmp_path: Path, blocked: str) -> None:
    out = tmp_path / "out"
    if blocked != ".":
        out.mkdir()
    (out / blocked).write_text("a file")
    with pytest.raises(HarnessError, match=re.escape(f"--out-dir {out}: {out / blocked} is a file")):
        dense_config(out)


def test_stop_step_trains_part_way_and_skips_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A comparison in parts: the runs stop at stop_step and no report of unfinished runs is written. The out-dir
    holds characters hydra's override grammar would read (',', '${', quotes): it is passed as a path."""
    out = tmp_path / "a,b ${x} 'q\""
    assert compare.main(["--attentions", "dense", "--out-dir", str(out), "--jobs", "1", *DENSE, "stop_step=2"]) == 0
    assert "no report" in capsys.readouterr().out and not (out / "report").exists()
    config = dense_config(out)
    assert config.out_dir == str(out / "dense-needle") and config.resume and not compare.finished(config)
