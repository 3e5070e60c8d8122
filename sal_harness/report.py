"""The side-by-side report of several runs: report.json, report.md, plots, and the printed table.

``report.json`` maps each attention to ``{task: {distance: accuracy}}`` (exact match, depths drawn uniformly
from what fits, held-out samples) and holds beside them::

    "bpb": {attention: held-out bits per byte (of the text run when there is one, else of the retrieval run)},
    "bpb_task": {attention: the task of the run the bpb comes from ("text": trained on text; otherwise the model
    saw text only as haystack, if at all, and its bpb says little)},
    "recall": {attention: {task: {distance: selection_recall (nsa) | pointer_recall (scope)}}},
    "chance": {task: exact-match accuracy of guessing}, "reach": {attention: tokens its attention can reach back
    (window: n_layer x (w - 1)) or null}, "runs": {"<attention>-<task>": run folder},
    "notes": [what the reader must know: a run evaluated before its train.max_steps (sal-eval of an unfinished
    run), a run without train records], "plots": [the plots this report wrote, without .png]

Plots: loss_curves.png (train loss per run), accuracy_by_distance.png, accuracy_heatmap.png (distance x depth
per attention, blank where a cell does not fit the context), selection_map.png (NSA: the blocks one layer
selected for every query position of one held-out example) and pointer_map.png (SCOPE: the key blocks each
query block read), each with the needle's block and the answering position marked.

Every run is read and checked before anything is written: eval.json's fields must have the shapes the report
reads and hold finite numbers, one run per (attention, task), and the runs of one task trained on the same
task config. The plots are drawn into a temporary folder and moved into place, plots of an earlier report that
this one did not draw are removed, and report.json comes last; a rejected call changes nothing.

    sal-report RUN_DIR [RUN_DIR ...] --out runs/compare/report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from sal_harness.checkpoint import (
    METRICS_NAME,
    MetricsLog,
    atomic_json,
    atomic_write,
    file_in_the_way,
    nonfinite_entry,
    stopped_by_time_budget,
)
from sal_harness.config import describe_validation_error, differing_keys
from sal_harness.errors import HarnessError, RunFolderError
from sal_harness.evaluate import EVAL_NAME
from sal_harness.model import ATTENTION_KINDS
from sal_harness.train import read_run_config

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_NAMES = ("loss_curves", "accuracy_by_distance", "accuracy_heatmap", "selection_map", "pointer_map")


# ----------------------------------------------------------------------------------------------
# Reading a run folder


class ReadModel(BaseModel):
    """The fields of a file that the report reads, checked; the file's other fields pass through."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class Cell(ReadModel):
    distance: int = Field(ge=1)
    accuracy: float = Field(ge=0.0, le=1.0)
    selection_recall: float | None = None
    pointer_recall: float | None = None
    selection_recall_by_layer: list[float] | None = None
    pointer_recall_by_layer: list[float] | None = None


class GridCell(Cell):
    depth: float


class Chance(ReadModel):
    accuracy: float = Field(ge=0.0, le=1.0)


class Example(ReadModel):
    distance: int
    source: int = Field(ge=0)
    query: int = Field(ge=0)
    seq_len: int = Field(ge=1)
    kind: Literal["nsa_selection", "scope_pointer"] | None = None
    block: int | None = Field(None, ge=1)
    layers: list[list[list[int]]] | None = None

    @model_validator(mode="after")
    def _maps_given(self) -> Example:
        if self.kind is not None and (self.block is None or not self.layers):
            raise ValueError(f"a {self.kind} example needs block and a non-empty layers list")
        return self


class EvalResult(ReadModel):
    attention: str
    task: str = Field(min_length=1)
    step: int = Field(ge=0)
    train_seq_len: int = Field(ge=1)
    window: int | None = None
    receptive_field: int | None = None
    bpb: float | None = None
    by_distance: list[Cell] | None = Field(None, min_length=1)
    chance: Chance | None = Field(None, validate_default=True)
    grid: list[GridCell] | None = Field(None, min_length=1, validate_default=True)
    example: Example | None = None

    @field_validator("attention")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind, known: {list(ATTENTION_KINDS)}")
        return kind

    @field_validator("chance", "grid")
    @classmethod
    def _given_with_by_distance(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("by_distance") is not None:
            raise ValueError("required in a retrieval result (one with by_distance)")
        return value


class TrainRecord(ReadModel):
    step: int = Field(ge=0)
    loss: float


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's eval.json (checked) plus its train records ("train_records"), its folder ("run_dir"), its
    task config ("task_config") and what the report must say about it ("notes")."""
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "does not exist"
        raise RunFolderError(f"{run_dir} {what}: give the folder sal-train / sal-compare wrote (it holds eval.json)")
    stored = read_run_config(run_dir, fix="give the run's own folder, or restore its config from a checkpoint")
    result = read_eval(run_dir)
    records = read_train_records(run_dir / METRICS_NAME)
    result.update(train_records=records, run_dir=str(run_dir), task_config=stored.task.model_dump(mode="json"),
                  notes=run_notes(run_dir, result["step"], stored.train.max_steps, records))
    return result


def read_eval(run_dir: Path) -> dict[str, Any]:
    path = run_dir / EVAL_NAME
    if not path.exists():
        raise RunFolderError(f"{path} is missing: the run has not finished: resume it with out_dir={run_dir} "
                             f"resume=true, or evaluate its newest checkpoint with sal-eval {run_dir} (the report "
                             "then marks it as evaluated before its train.max_steps)")
    fix = f"rerun sal-eval {run_dir}"
    try:
        result = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise RunFolderError(f"{path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(result, dict):
        raise RunFolderError(f"{path} holds {type(result).__name__}, not a JSON object: {fix}")
    bad = nonfinite_entry(result)
    if bad is not None:
        raise RunFolderError(f"{path}: {bad} is not a finite number: {fix}")
    try:
        EvalResult.model_validate(result)
    except ValidationError as err:
        raise RunFolderError(f"{path} is not an evaluation the report can read:\n{describe_validation_error(err)}\n"
                             f"{fix}") from None
    return result


def read_train_records(path: Path) -> list[dict[str, Any]]:
    """The "train" records of metrics.jsonl, each with a step and a finite loss; a record that is not is damage
    (training logs only finite losses: a non-finite step is skipped, not logged)."""
    records = []
    for number, record in enumerate(MetricsLog(path).read(), start=1):
        kind = record.get("kind")
        if not isinstance(kind, str):
            raise RunFolderError(f"{path} record {number} has no \"kind\": the file is damaged: delete that record")
        if kind != "train":
            continue
        try:
            TrainRecord.model_validate(record)
        except ValidationError as err:
            raise RunFolderError(f"{path} record {number} is not a train record the report can plot "
                                 f"({describe_validation_error(err)}): the file is damaged: delete that record"
                                 ) from None
        records.append(record)
    return records


def run_notes(run_dir: Path, step: int, max_steps: int, records: Sequence[dict[str, Any]]) -> list[str]:
    """What the report must say about a run besides its numbers."""
    notes = []
    # A run that spent its train.max_minutes ends early by design, with its final evaluation.
    if step < max_steps and not stopped_by_time_budget(run_dir, step):
        notes.append(f"{run_dir}: evaluated at step {step} of train.max_steps={max_steps}, before its training "
                     f"finished (resume it with out_dir={run_dir} resume=true to report the finished model)")
    if not records:
        notes.append(f"{run_dir}: {METRICS_NAME} holds no train records: no loss curve")
    return notes


# ----------------------------------------------------------------------------------------------
# The report


def ordered(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {kind: i for i, kind in enumerate(ATTENTION_KINDS)}
    return sorted(runs, key=lambda r: (r["task"], rank.get(r["attention"], 99)))


def check_comparable(runs: Sequence[dict[str, Any]]) -> None:
    """One run per (attention, task) (the same folder twice is one run), and the runs of a task trained on the
    same task config: else a column would mix two runs, or a row compare different tasks under one chance."""
    by_cell: dict[tuple[str, str], dict[str, Any]] = {}
    by_task: dict[str, dict[str, Any]] = {}
    for run in runs:
        kind, task = run["attention"], run["task"]
        first = by_cell.setdefault((kind, task), run)
        if Path(first["run_dir"]).resolve() != Path(run["run_dir"]).resolve():
            raise HarnessError(f"runs {first['run_dir']} and {run['run_dir']} are both {kind} on {task}: give one "
                               "run per attention and task")
        reference = by_task.setdefault(task, run)
        differing = differing_keys(reference["task_config"], run["task_config"], "task.")
        if differing:
            raise HarnessError(f"runs {reference['run_dir']} and {run['run_dir']} trained on different {task} tasks "
                               f"({'; '.join(differing)}): report runs of one task config together")


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """report.json's content (module docstring), "plots" aside."""
    check_comparable(runs)
    report: dict[str, Any] = {"bpb": {}, "bpb_task": {}, "recall": {}, "chance": {}, "reach": {}, "runs": {},
                              "notes": []}
    for run in ordered(runs):
        kind, task = run["attention"], run["task"]
        report["runs"][f"{kind}-{task}"] = run["run_dir"]
        report["notes"] += run["notes"]
        report["reach"][kind] = run.get("receptive_field") or (run.get("window") if kind == "window" else None)
        if run.get("bpb") is not None and (task == "text" or kind not in report["bpb"]):
            report["bpb"][kind] = run["bpb"]
            report["bpb_task"][kind] = task
        if "by_distance" not in run:
            continue
        report.setdefault(kind, {})[task] = {str(c["distance"]): c["accuracy"] for c in run["by_distance"]}
        report["chance"][task] = run["chance"]["accuracy"]
        recall = {str(c["distance"]): c.get("selection_recall", c.get("pointer_recall")) for c in run["by_distance"]}
        if any(v is not None for v in recall.values()):
            report["recall"].setdefault(kind, {})[task] = recall
    return report


def side_by_side(report: dict[str, Any]) -> str:
    """The printed table: one block per task, a row per distance, a column per attention ("-": no value), then
    the bpb and the notes."""
    kinds = [k for k in ATTENTION_KINDS if k in report]
    tasks = sorted({task for kind in kinds for task in report[kind]})
    reach = report["reach"].get("window")
    lines = []
    for task in tasks:
        distances = sorted({int(d) for kind in kinds for d in report[kind].get(task, {})})
        lines.append(f"{task}: exact-match accuracy by needle distance (chance {report['chance'][task]:.3g}"
                     + (f"; the window model reaches {reach} tokens back)" if reach else ")"))
        lines.append(f"{'distance':>9}" + "".join(f"{k:>9}" for k in kinds) + "   recall (nsa sel / scope ptr)")
        for d in distances:
            accuracies = "".join(f"{shown(report[k].get(task, {}).get(str(d))):>9}" for k in kinds)
            recalls = [f"{k} {report['recall'][k][task][str(d)]:.2f}" for k in kinds
                       if report["recall"].get(k, {}).get(task, {}).get(str(d)) is not None]
            note = "  beyond the window's reach" if reach is not None and d > reach else ""
            lines.append(f"{d:>9}{accuracies}   {', '.join(recalls)}{note}")
    if report["bpb"]:
        untrained = sorted({t for t in report["bpb_task"].values() if t != "text"})
        note = f" (models trained on {', '.join(untrained)}, not on text)" if untrained else ""
        lines.append(f"held-out text, bits per byte{note}: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in report["bpb"].items()))
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def shown(accuracy: float | None) -> str:
    return "-" if accuracy is None else f"{accuracy:.2f}"


def write_report(run_dirs: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Read and check the runs, then write the plots, report.md and report.json (last) into out_dir; returns the
    report. Nothing is written when a run or out_dir is rejected."""
    if not run_dirs:
        raise HarnessError("no run folder given: the report needs at least one")
    check_report_folder(out_dir)
    runs = [read_run(d) for d in distinct_folders(run_dirs)]
    report = summarise(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".plots-") as staging:
        report["plots"] = plot_all(runs, Path(staging))
        for name in report["plots"]:
            os.replace(Path(staging) / f"{name}.png", out_dir / f"{name}.png")
    for name in sorted(set(PLOT_NAMES) - set(report["plots"])):  # an earlier report's: not of these runs
        (out_dir / f"{name}.png").unlink(missing_ok=True)
    markdown = f"# Side-by-side report\n\n```\n{side_by_side(report)}\n```\n\n" + "".join(
        f"![{name}]({name}.png)\n" for name in report["plots"])
    atomic_write(out_dir / REPORT_MD, lambda handle: handle.write(markdown.encode()))
    atomic_json(out_dir / REPORT_JSON, report)  # last: it lists the plots, which are in place by now
    return report


def check_report_folder(out_dir: Path) -> None:
    """out_dir is a folder, or can become one: neither it nor a folder above it is a file."""
    blocking = file_in_the_way(out_dir)
    if blocking is not None:
        where = "is a file" if blocking == out_dir else f"lies under the file {blocking}"
        raise HarnessError(f"report folder {out_dir} {where}: choose another report folder (sal-report --out)")


def distinct_folders(run_dirs: Sequence[Path]) -> list[Path]:
    """run_dirs without repeats of one folder (however spelt), in their order."""
    seen: dict[Path, Path] = {}
    for run_dir in map(Path, run_dirs):
        seen.setdefault(run_dir.resolve(), run_dir)
    return list(seen.values())


# ----------------------------------------------------------------------------------------------
# Plots


def plot_all(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[str]:
    """Every plot this set of runs allows; returns the names written (without .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [plot_losses(plt, runs, out_dir)]
    retrieval = [r for r in ordered(runs) if "by_distance" in r]
    if retrieval:
        written += [plot_accuracy(plt, retrieval, out_dir), plot_heatmaps(plt, retrieval, out_dir)]
    for run in retrieval:
        example = run.get("example", {})
        if example.get("kind") == "nsa_selection" and "selection_map" not in written:
            written.append(plot_example(plt, run, example, out_dir, "selection_map"))
        if example.get("kind") == "scope_pointer" and "pointer_map" not in written:
            written.append(plot_example(plt, run, example, out_dir, "pointer_map"))
    return written


def plot_losses(plt: Any, runs: Sequence[dict[str, Any]], out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in ordered(runs):
        records = run["train_records"]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=f"{run['attention']} ({run['task']})")
    ax.set(xlabel="step", ylabel="train loss (nats per scored token)", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    return save(plt, fig, out_dir, "loss_curves")


def plot_accuracy(plt: Any, runs: Sequence[dict[str, Any]], out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        cells = run["by_distance"]
        ax.plot([c["distance"] for c in cells], [c["accuracy"] for c in cells], "o-",
                label=f"{run['attention']} ({run['task']})")
    reach = next((r["receptive_field"] for r in runs if r.get("receptive_field")), None)
    if reach:
        ax.axvline(reach, color="gray", ls="--", label=f"window reach ({reach})")
    chances = {r["task"]: r["chance"]["accuracy"] for r in runs}  # one per task: summarise checked their configs
    for task, chance in sorted(chances.items()):
        ax.axhline(chance, color="black", ls=":", lw=1)
        ax.text(0.99, chance, f"chance ({task})", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize=7)
    ax.set(xlabel="needle distance (tokens)", ylabel="exact-match accuracy", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(plt, fig, out_dir, "accuracy_by_distance")


def plot_heatmaps(plt: Any, runs: Sequence[dict[str, Any]], out_dir: Path) -> str:
    import numpy as np

    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        distances = sorted({c["distance"] for c in run["grid"]})
        depths = sorted({c["depth"] for c in run["grid"]})
        grid = np.full((len(depths), len(distances)), np.nan)
        for c in run["grid"]:
            grid[depths.index(c["depth"]), distances.index(c["distance"])] = c["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(distances)), [str(d) for d in distances], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set(title=f"{run['attention']} ({run['task']})", xlabel="distance")
    axes[0][0].set_ylabel("depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact-match accuracy")
    return save(plt, fig, out_dir, "accuracy_heatmap", tight=False)


def plot_example(plt: Any, run: dict[str, Any], example: dict[str, Any], out_dir: Path, name: str) -> str:
    """NSA: rows = query positions, columns = selection blocks. SCOPE: rows = query blocks, columns = key blocks."""
    import numpy as np

    key = "selection_recall_by_layer" if name == "selection_map" else "pointer_recall_by_layer"
    cell: dict[str, Any] = next((c for c in run["by_distance"] if c["distance"] == example["distance"]), {})
    # The layer with the best recall at the example's distance, among the layers the example holds.
    layer = int(np.argmax((cell.get(key) or [0.0])[:len(example["layers"])]))
    lists = example["layers"][layer]
    block = example["block"]
    num_blocks = -(-example["seq_len"] // block)
    matrix = np.zeros((len(lists), num_blocks))
    for row, listed in enumerate(lists):
        for b in listed:
            if 0 <= b < num_blocks:
                matrix[row, b] = 1.0
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(matrix, cmap="Greys", aspect="auto", interpolation="nearest")
    source_block = example["source"] // block
    query_row = example["query"] if name == "selection_map" else example["query"] // block
    ax.axvline(source_block, color="tab:red", lw=1, label=f"needle block {source_block}")
    ax.axhline(query_row, color="tab:blue", lw=1, label="answering query")
    what = "NSA selected blocks" if name == "selection_map" else "SCOPE key blocks read"
    ax.set(title=f"{what} (layer {layer}, distance {example['distance']})",
           xlabel=f"key block ({block} tokens)", ylabel="query position" if name == "selection_map" else "query block")
    ax.legend(fontsize=8, loc="lower left")
    return save(plt, fig, out_dir, name)


def save(plt: Any, fig: Any, out_dir: Path, name: str, tight: bool = True) -> str:
    if tight:
        fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=100)
    plt.close(fig)
    return name


# ----------------------------------------------------------------------------------------------
# Result rows (bench/results/retrieval_cuda.{jsonl,md})


def result_rows(run: dict[str, Any], gpu: str, commit: str) -> list[dict[str, Any]]:
    """One row per (attention, task, distance) of a retrieval run, one row (distance None) for a text run."""
    common = {"attention": run["attention"], "task": run["task"], "train_seq_len": run["train_seq_len"],
              "train_minutes": run.get("train_minutes"), "train_steps": run.get("step"), "recipe": run.get("recipe"),
              "gpu": gpu, "commit": commit}
    if "by_distance" not in run:
        return [{**common, "distance": None, "accuracy": None, "chance": None, "bpb": run.get("bpb")}]
    return [{**common, "distance": c["distance"], "accuracy": c["accuracy"], "chance": run["chance"]["accuracy"],
             "selection_recall": c.get("selection_recall"), "pointer_recall": c.get("pointer_recall"),
             **{f"{kind}_recall_{suffix}": c.get(f"{kind}_recall_{suffix}")
                for suffix in ("head_mean", "any_layer") for kind in ("selection", "pointer")},
             "bpb": run.get("bpb")} for c in run["by_distance"]]


def environment_names() -> tuple[str, str]:
    """(GPU name or "cpu", commit: $BENCH_COMMIT, else git's HEAD, else "unknown")."""
    import os
    import subprocess

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    commit = os.environ.get("BENCH_COMMIT")
    if not commit:
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
            commit = head.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return gpu, commit


def write_results(runs: Sequence[dict[str, Any]], prefix: Path, plots_from: Path | None = None) -> None:
    """Replace the rows of these runs' (attention, task) in PREFIX.jsonl, keep the plots of the report of these
    runs in plots_from as PREFIX_plots/ATTENTIONS_TASKS_NAME.png, then rewrite PREFIX.md from all rows and all kept
    plots. PREFIX.jsonl and the report are checked before anything is written."""
    gpu, commit = environment_names()
    path = prefix.with_suffix(".jsonl")
    old = read_result_rows(path)
    plots = prefix.parent / f"{prefix.name}_plots"
    if plots_from is not None:
        label = "_".join("-".join(sorted({str(r[k]) for r in runs})) for k in ("attention", "task"))
        for name in report_plots(plots_from, runs):
            copy_atomically(plots_from / f"{name}.png", plots / f"{label}_{name}.png")
    done = {(r["attention"], r["task"]) for r in runs}
    rows = [r for r in old if (r["attention"], r["task"]) not in done]
    rows += [row for run in runs for row in result_rows(run, gpu, commit)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda handle: handle.write(text.encode()))
    kept = sorted(plots.glob("*.png")) if plots.is_dir() else []
    markdown = results_markdown(rows, [f"{plots.name}/{p.name}" for p in kept])
    atomic_write(prefix.with_suffix(".md"), lambda handle: handle.write(markdown.encode()))


class ResultRow(ReadModel):
    """The fields of a PREFIX.jsonl row that results_markdown reads."""

    attention: str
    task: str
    distance: int | None
    accuracy: float | None
    train_seq_len: int
    gpu: str
    commit: str

    @model_validator(mode="after")
    def _retrieval_accuracy(self) -> ResultRow:
        if self.distance is not None and self.accuracy is None:
            raise ValueError("a row with a distance needs its accuracy")
        return self


def read_result_rows(path: Path) -> list[dict[str, Any]]:
    """PREFIX.jsonl's rows, each checked; [] when there is no such file yet."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = result_row_problem(row)
        except json.JSONDecodeError as err:
            problem = str(err)
        if problem is not None:
            raise HarnessError(f"{path} line {number} is not a result row ({problem}): fix or delete that line")
        rows.append(row)
    return rows


def result_row_problem(row: Any) -> str | None:
    bad = nonfinite_entry(row)
    if bad is not None:
        return f"{bad} is not a finite number"
    try:
        ResultRow.model_validate(row)
    except ValidationError as err:
        return describe_validation_error(err)
    return None


def report_plots(report_dir: Path, runs: Sequence[dict[str, Any]]) -> list[str]:
    """The plots that the report in report_dir drew, once checked to be the report of these very runs."""
    path = report_dir / REPORT_JSON
    fix = f"write the report of these runs there first (sal-report RUN_DIR ... --out {report_dir})"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HarnessError(f"{path} cannot be read ({err}): {fix}") from None
    if not isinstance(report, dict) or not isinstance(report.get("runs"), dict) or not isinstance(
            report.get("plots"), list) or not set(report["plots"]) <= set(PLOT_NAMES):
        raise HarnessError(f"{path} is not a report with its list of plots (an older report?): {fix}")
    reported = {Path(folder).resolve() for folder in report["runs"].values()}
    if reported != {Path(r["run_dir"]).resolve() for r in runs}:
        raise HarnessError(f"{path} reports the runs {sorted(report['runs'].values())}, not the runs given "
                           f"({sorted(r['run_dir'] for r in runs)}): {fix}")
    return list(report["plots"])


def copy_atomically(source: Path, target: Path) -> None:
    """A copy that is whole or absent under its name (atomic_write), never torn by a kill."""
    atomic_write(target, lambda handle: handle.write(source.read_bytes()))


def recall_note(row: dict[str, Any]) -> str:
    """A table cell's recall suffix, ' (0.98; head mean 0.52; any layer 1.00)': the row's best-layer any-head
    recall, its head mean and its rate over all layers (NSA's selection or SCOPE's pointers), those it holds;
    '' for none."""
    suffixes = ("", "_head_mean", "_any_layer")
    selection = any(row.get(f"selection_recall{suffix}") is not None for suffix in suffixes)
    kind = "selection" if selection else "pointer"
    labels = ("", "head mean ", "any layer ")
    parts = [f"{label}{row[f'{kind}_recall{suffix}']:.2f}" for suffix, label in zip(suffixes, labels, strict=True)
             if row.get(f"{kind}_recall{suffix}") is not None]
    return f" ({'; '.join(parts)})" if parts else ""


def bpb_against_dense(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """A text run's bits per byte relative to dense attention's on the same task, '+4.6%', with ', recipe differs'
    when both rows hold recipes that disagree on a setting both name (issue 12's bar compares models trained the
    same way; a SCOPE recipe also names SCOPE's own teacher settings, which dense has none of); '' for
    retrieval rows, dense itself, or no dense row."""
    dense = next((r for r in rows if (r["attention"], r["task"]) == ("dense", row["task"])), None)
    if row["task"] != "text" or row["attention"] == "dense" or dense is None:
        return ""
    if row.get("bpb") is None or dense.get("bpb") is None:
        return ""
    differs = ", recipe differs" if recipes_disagree(row.get("recipe"), dense.get("recipe")) else ""
    return f"{100 * (row['bpb'] / dense['bpb'] - 1):+.1f}%{differs}"


def recipes_disagree(first: str | None, second: str | None) -> bool:
    """Whether two recipes ('key=value ...') give a setting they both name different values; False when either
    row has no recipe (rows written before recipes were recorded)."""
    if first is None or second is None:
        return False
    settings = [dict(item.split("=", 1) for item in recipe.split()) for recipe in (first, second)]
    return any(settings[1][key] != value for key, value in settings[0].items() if key in settings[1])


def results_markdown(rows: Sequence[dict[str, Any]], plots: Sequence[str] = ()) -> str:
    """A table per task: accuracy (recall: NSA's selection, SCOPE's pointers, any head and head mean) per distance
    and attention, then bpb and training minutes, then links to the plots (paths relative to the markdown file)."""
    lines = ["# Retrieval comparison", ""]
    kinds = [k for k in ATTENTION_KINDS if any(r["attention"] == k for r in rows)]
    for task in sorted({r["task"] for r in rows if r["distance"] is not None}):
        lines += [f"## {task}", "", "| distance | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        for d in sorted({r["distance"] for r in rows if r["task"] == task}):
            cells = []
            for k in kinds:
                row = next((r for r in rows if (r["attention"], r["task"], r["distance"]) == (k, task, d)), None)
                cells.append("" if row is None else f"{row['accuracy']:.3f}{recall_note(row)}")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    header = "| attention | task | train_seq_len | train_minutes | train_steps | bpb | bpb vs dense | gpu | commit |"
    lines += ["## runs", "", header, "|---" * 9 + "|"]
    seen = set()
    for r in rows:
        key = (r["attention"], r["task"])
        if key not in seen:
            seen.add(key)
            bpb = "" if r.get("bpb") is None else f"{r['bpb']:.3f}"
            minutes = "" if r.get("train_minutes") is None else f"{r['train_minutes']:.1f}"
            steps = r.get("train_steps") or ""
            lines.append(f"| {r['attention']} | {r['task']} | {r['train_seq_len']} | {minutes} | {steps} | {bpb} | "
                         f"{bpb_against_dense(r, rows)} | {r['gpu']} | {r['commit'][:10]} |")
    recipes = {(r["attention"], r["task"]): r["recipe"] for r in rows if r.get("recipe")}
    if recipes:
        lines += ["", "## recipes", "", "Each run's learning settings, as overrides that rerun it like for like:", ""]
        lines += [f"- {kind} / {task}: `{text}`" for (kind, task), text in recipes.items()]
    if plots:
        lines += ["", "## plots", ""] + [f"- [{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def named_path(text: str) -> Path:
    """An argparse type: a path that names something (Path("") would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a folder")
    return Path(text)


def main(argv: Sequence[str] | None = None) -> int:
    """sal-report: the side-by-side report of finished run folders."""
    parser = argparse.ArgumentParser(prog="sal-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=named_path, help="run folders written by sal-train / sal-compare")
    parser.add_argument("--out", type=named_path, default=Path("runs/report"),
                        help="report folder (default runs/report)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dirs, args.out)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(side_by_side(report))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
