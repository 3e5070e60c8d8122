"""sal-report on run folders built by hand (the files sal-train writes: config.yaml, metrics.jsonl, heartbeat.json,
eval.json), no training: every run and the report folder checked before anything is written, typed errors, no
NaN in the outputs, no plots of an earlier report left behind or copied into the result rows."""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_refusal
from harness_tiny import tiny_config

from sal_harness import report
from sal_harness.errors import HarnessError, RunFolderError

RECALL = {"nsa": "selection_recall", "scope": "pointer_recall"}
EXAMPLE_MAPS = {"nsa": {"kind": "nsa_selection", "block": 8, "layers": [[[0, 3, 7]] * 64]},
                "scope": {"kind": "scope_pointer", "block": 16, "layers": [[[0, 1]] * 4]}}


@functools.cache
def tiny_values() -> dict[str, Any]:
    return tiny_config(Path("unused")).model_dump(mode="json")


def eval_result(attention: str = "nsa", task: str = "needle", step: int = 6, distances: tuple[int, ...] = (8, 40),
                recall_by_layer: tuple[float, ...] = (0.5,)) -> dict[str, Any]:
    """An eval.json as final_evaluation writes it (the fields the report reads, and a few it does not)."""
    result: dict[str, Any] = {
        "attention": attention, "task": task, "step": step, "train_seq_len": 64,
        "window": 16 if attention in ("window", "nsa") else None,
        "receptive_field": 15 if attention == "window" else None, "num_parameters": 8240,
        "recipe": "model.n_layer=1 train.max_steps=6", "val_loss": 5.7, "bpb": 8.2, "n": 4, "train_minutes": 0.01}
    if task == "text":
        return result
    recall = RECALL.get(attention)
    extra = {recall: max(recall_by_layer), f"{recall}_by_layer": list(recall_by_layer)} if recall else {}
    cells = [{"distance": d, "accuracy": 0.25, "token_accuracy": 0.25, "n": 4, **extra} for d in distances]
    return {**result, "by_distance": cells, "chance": {"accuracy": 1 / 32, "token_accuracy": 1 / 32},
            "grid": [{**c, "depth": depth} for c in cells for depth in (0.0, 0.5)],
            "example": {"distance": distances[-1], "source": 24, "query": 63, "seq_len": 64,
                        **EXAMPLE_MAPS.get(attention, {})}}


def make_run(folder: Path, result: dict[str, Any] | None = None, *, task: dict[str, Any] | None = None,
             evaluation: dict[str, Any] | None = None, status: str = "finished",
             losses: tuple[float, ...] | None = (5.8, 5.6, 5.5)) -> Path:
    """A run folder as sal-train leaves it (losses None: no metrics.jsonl; task / evaluation: settings of the
    stored config.yaml changed from the tiny config's)."""
    from omegaconf import OmegaConf

    result = eval_result() if result is None else result
    values = copy.deepcopy(tiny_values())
    values["task"].update(task or {})
    values["eval"].update(evaluation or {})
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(values)))
    step = result.get("step", 6) if isinstance(result, dict) else 6
    (folder / "heartbeat.json").write_text(json.dumps({"status": status, "step": step}))
    (folder / "eval.json").write_text(json.dumps(result))
    if losses is not None:
        records = [{"kind": "train", "step": 2 * (i + 1), "loss": loss, "lr": 0.01} for i, loss in enumerate(losses)]
        records.insert(2, {"kind": "eval", "step": 4, "by_distance": []})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def strict_json(path: Path) -> Any:
    def reject(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture
def four_runs(tmp_path: Path) -> list[Path]:
    return [make_run(tmp_path / f"{kind}-needle", eval_result(kind)) for kind in ("dense", "window", "nsa", "scope")]


def test_report_of_four_runs(tmp_path: Path, four_runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert report.main([*map(str, four_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chance 0.0312" in printed and "note:" not in printed
    saved = strict_json(out / "report.json")
    assert saved["plots"] == list(report.PLOT_NAMES) and saved["notes"] == []
    assert saved["nsa"]["needle"] == {"8": 0.25, "40": 0.25} and saved["recall"]["scope"]["needle"]["40"] == 0.5
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", *(f"{n}.png" for n in report.PLOT_NAMES)}


def test_example_map_of_fewer_layers_than_recalls(tmp_path: Path) -> None:
    """The example holds one layer, the recall lists two: the map shows the best layer among those it holds."""
    for kind in ("nsa", "scope"):
        make_run(tmp_path / kind, eval_result(kind, recall_by_layer=(0.2, 0.9)))
    plots = report.write_report([tmp_path / "nsa", tmp_path / "scope"], tmp_path / "out")["plots"]
    assert {"selection_map", "pointer_map"} <= set(plots)


DROP = object()


def edited(*path: str | int, to: Any = DROP) -> Callable[[dict[str, Any]], Any]:
    """An edit of eval_result(): the entry at ``path`` set to ``to`` (DROP: removed)."""

    def edit(result: dict[str, Any]) -> dict[str, Any]:
        parent: Any = result
        for key in path[:-1]:
            parent = parent[key]
        if to is DROP:
            del parent[path[-1]]
        else:
            parent[path[-1]] = to
        return result

    return edit


BAD_EVALS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {  # case: (edit, what the error says)
    "a list": (lambda result: [], "holds list, not a JSON object"),
    "null": (lambda result: None, "holds NoneType, not a JSON object"),
    "empty": (lambda result: {}, "attention: Field required"),
    "nan accuracy": (edited("by_distance", 0, "accuracy", to=math.nan),
                     "['by_distance'][0]['accuracy'] = nan is not a finite"),
    "inf bpb": (edited("bpb", to=math.inf), "['bpb'] = inf is not a finite number"),
    "nan chance": (edited("chance", "accuracy", to=math.nan),
                   "['chance']['accuracy'] = nan is not a finite number"),
    "unknown kind": (edited("attention", to="bogus"), "attention: unknown attention kind"),
    "no chance": (edited("chance"), "chance: required in a retrieval result"),
    "no grid": (edited("grid"), "grid: required in a retrieval result"),
    "string accuracy": (edited("by_distance", 0, "accuracy", to="high"),
                        "by_distance.0.accuracy: Input should be a valid number"),
    "no example layers": (edited("example", "layers", to=[]), "example: a nsa_selection example needs"),
}


@pytest.mark.parametrize("case", BAD_EVALS)
def test_bad_eval_json_is_a_run_folder_error_and_writes_nothing(tmp_path: Path, case: str) -> None:
    edit, message = BAD_EVALS[case]
    run = make_run(tmp_path / "run")
    (run / "eval.json").write_text(json.dumps(edit(eval_result())))
    with pytest.raises(RunFolderError, match=rf"(?s)eval\.json.*{re.escape(message)}.*rerun sal-eval"):
        report.write_report([run], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("record", "named"), [({"step": 2, "loss": 5.0}, 'no "kind"'),
                                               ({"kind": "train", "step": 2}, "loss"),
                                               ({"kind": "train", "step": 2, "loss": float("nan")}, "loss"),
                                               ({"kind": "train", "step": 2, "loss": float("inf")}, "loss")])
def test_bad_train_record_is_a_run_folder_error(tmp_path: Path, record: dict[str, Any], named: str) -> None:
    run = make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    with pytest.raises(RunFolderError, match=rf"metrics\.jsonl record 5 .*{named}"):
        report.read_run(run)


@pytest.mark.parametrize("losses", [None, ()])
def test_run_without_train_records_gets_a_note(tmp_path: Path, losses: tuple[float, ...] | None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", losses=losses)
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert f"note: {run}: metrics.jsonl holds no train records" in capsys.readouterr().out
    assert strict_json(tmp_path / "out" / "report.json")["notes"] == [f"{run}: metrics.jsonl holds no train records: "
                                                                       "no loss curve"]


def test_two_runs_of_one_attention_and_task_are_refused(tmp_path: Path) -> None:
    first, second = make_run(tmp_path / "nsa"), make_run(tmp_path / "nsa-seed1")
    with pytest.raises(HarnessError, match=f"runs {first} and {second} are both nsa on needle"):
        report.write_report([first, second], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_same_folder_twice_is_one_run(tmp_path: Path) -> None:
    run = make_run(tmp_path / "nsa")
    saved = report.write_report([run, tmp_path / "." / "nsa" / ".." / "nsa"], tmp_path / "out")
    assert saved["runs"] == {"nsa-needle": str(run)}


def test_runs_of_one_task_with_different_task_configs_are_refused(tmp_path: Path) -> None:
    dense = make_run(tmp_path / "dense", eval_result("dense"))
    nsa = make_run(tmp_path / "nsa", task={"value_vocab": 16})
    with pytest.raises(HarnessError, match=r"different needle tasks \(task\.value_vocab: 32 -> 16\)"):
        report.write_report([dense, nsa], tmp_path / "out")


def test_a_missing_cell_prints_as_a_dash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = make_run(tmp_path / "dense", eval_result("dense", distances=(8, 24)))
    nsa = make_run(tmp_path / "nsa")
    assert report.main([str(dense), str(nsa), "--out", str(tmp_path / "out")]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0].isdigit()}
    assert rows == {"8": ["0.25", "0.25"], "24": ["0.25", "-"], "40": ["-", "0.25"]}
    assert "nan" not in (tmp_path / "out" / "report.md").read_text()


def test_accuracy_plot_draws_each_tasks_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needle = report.read_run(make_run(tmp_path / "needle"))
    mqar = report.read_run(make_run(tmp_path / "mqar", {**eval_result(task="mqar"), "chance": {"accuracy": 0.125}},
                                    task={"name": "mqar"}, evaluation={"distances": [32]}))
    figures = []

    def keep(plt: Any, fig: Any, out_dir: Path, name: str, tight: bool = True) -> str:
        figures.append(fig)
        return name

    monkeypatch.setattr(report, "save", keep)
    report.plot_accuracy(plt, [needle, mqar], tmp_path)
    levels = {line.get_ydata()[0] for line in figures[0].axes[0].lines if line.get_linestyle() == ":"}
    plt.close(figures[0])
    assert levels == {1 / 32, 0.125}


def test_rejected_report_leaves_the_folder_as_it_was(tmp_path: Path, four_runs: list[Path]) -> None:
    out = tmp_path / "report"
    report.write_report(four_runs, out)
    before = folder_state(out)
    damaged = make_run(tmp_path / "damaged", eval_result("dense"))
    (damaged / "metrics.jsonl").write_text('{"kind": "train", "step": 2}\n')
    with pytest.raises(RunFolderError):
        report.write_report([damaged], out)
    assert folder_state(out) == before


def test_a_failing_plot_leaves_the_folder_as_it_was(tmp_path: Path, four_runs: list[Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report"
    report.write_report(four_runs, out)
    before = folder_state(out)

    def broken(*args: Any) -> str:
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_heatmaps", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        report.write_report(four_runs[:1], out)
    assert folder_state(out) == before  # no plot replaced in place, no staging folder left


def test_plots_of_an_earlier_report_are_removed_and_never_copied(tmp_path: Path, four_runs: list[Path]) -> None:
    out = tmp_path / "report"
    report.write_report(four_runs, out)
    (out / "mine.png").write_bytes(b"not the report's")
    text = make_run(tmp_path / "dense-text", eval_result("dense", task="text"))
    plots = report.write_report([text], out).get("plots")
    assert {p.name for p in out.glob("*.png")} == {"loss_curves.png", "mine.png"} and plots == ["loss_curves"]

    report.write_results([report.read_run(text)], tmp_path / "rows", plots_from=out)
    assert [p.name for p in (tmp_path / "rows_plots").iterdir()] == ["dense_text_loss_curves.png"]
    with pytest.raises(HarnessError, match="not the runs given"):
        report.write_results([report.read_run(four_runs[0])], tmp_path / "rows", plots_from=out)


@pytest.mark.parametrize(("line", "problem"), [("{not json", "line 2 is not a result row"),
                                               ('{"task": "needle", "distance": 8}', "line 2 .*attention"),
                                               ('{"attention": "dense", "task": "needle", "distance": 8, '
                                                '"accuracy": NaN, "train_seq_len": 64, "gpu": "cpu", "commit": "x"}',
                                                "line 2 .*accuracy.* = nan is not a finite number")])
def test_bad_result_rows_are_refused_before_any_copy(tmp_path: Path, four_runs: list[Path], line: str,
                                                     problem: str) -> None:
    out = tmp_path / "report"
    report.write_report(four_runs, out)
    runs = [report.read_run(run) for run in four_runs]
    report.write_results(runs[:1], tmp_path / "rows")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(rows.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(HarnessError, match=rf"rows\.jsonl {problem}"):
        report.write_results(runs, tmp_path / "rows", plots_from=out)
    assert not (tmp_path / "rows_plots").exists()


def test_unfinished_run_evaluated_with_sal_eval_is_marked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    interrupted = make_run(tmp_path / "nsa", eval_result(step=4), status="interrupted")
    budget = make_run(tmp_path / "dense", eval_result("dense", step=4), status="time_budget")
    saved = report.write_report([interrupted, budget], tmp_path / "out")
    assert saved["notes"] == [f"{interrupted}: evaluated at step 4 of train.max_steps=6, before its training finished "
                              f"(resume it with out_dir={interrupted} resume=true to report the finished model)"]
    assert report.side_by_side(saved).endswith(f"note: {saved['notes'][0]}")

    (interrupted / "eval.json").unlink()
    with pytest.raises(RunFolderError, match=r"sal-eval .* \(the report then marks it as evaluated before"):
        report.read_run(interrupted)


def test_no_runs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no run folder given"):
        report.write_report([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("given", "message"), [("nope", "nope does not exist"),
                                                ("afile", "afile is a file, not a run folder"),
                                                ("empty", "empty/config.yaml is missing")])
def test_sal_report_bad_run_folder_is_an_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    given: str, message: str) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / given), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/{message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_sal_report_out_that_is_or_is_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   out: str) -> None:
    run = make_run(tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    assert report.main([str(run), "--out", str(tmp_path / out)]) == 2
    message = "is a file" if out == "afile" else "lies under the file"
    assert f"error: report folder {tmp_path / out} {message}" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"


def test_sal_report_empty_out_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # where Path("") would put the report
    assert "argument --out: an empty path" in cli_refusal(report.main, capsys, [str(run), "--out", ""])
    assert not (tmp_path / "report.json").exists()
