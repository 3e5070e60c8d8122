"""The side-by-side report of several runs: report.json, report.md, plots, and the printed table.

``report.json`` maps each attention to ``{task: {distance: accuracy}}`` (exact match, depths drawn uniformly
from what fits, held-out samples) and holds beside them::

    "bpb": {attention: held-out bits per byte (of the text run when there is one, else of the retrieval run)},
    "bpb_task": {attention: the task of the run the bpb comes from ("text": trained on text; otherwise the model
    saw text only as haystack, if at all, and its bpb says little)},
    "recall": {attention: {task: {distance: selection_recall (nsa) | pointer_recall (scope)}}},
    "chance": {task: exact-match accuracy of guessing}, "reach": {attention: tokens its attention can reach back
    (window: n_layer x (w - 1)) or null}, "runs": {"<attention>-<task>": run folder}

Plots: loss_curves.png (train loss per run), accuracy_by_distance.png, accuracy_heatmap.png (distance x depth
per attention, blank where a cell does not fit the context), selection_map.png (NSA: the blocks one layer
selected for every query position of one held-out example) and pointer_map.png (SCOPE: the key blocks each
query block read), each with the needle's block and the answering position marked.

    sal-report RUN_DIR [RUN_DIR ...] --out runs/compare/report
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sal_harness.checkpoint import METRICS_NAME, MetricsLog, atomic_json, atomic_write
from sal_harness.errors import RunFolderError
from sal_harness.evaluate import EVAL_NAME
from sal_harness.model import ATTENTION_KINDS

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's eval.json plus its train records."""
    path = run_dir / EVAL_NAME
    if not path.exists():
        raise RunFolderError(f"{path} is missing: the run has not finished (resume it with out_dir={run_dir} "
                             "resume=true) or evaluate its last checkpoint with sal-eval")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}): rerun sal-eval {run_dir}") from None
    result["train_records"] = [r for r in MetricsLog(run_dir / METRICS_NAME).read() if r["kind"] == "train"]
    result["run_dir"] = str(run_dir)
    return result


def ordered(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {kind: i for i, kind in enumerate(ATTENTION_KINDS)}
    return sorted(runs, key=lambda r: (r["task"], rank.get(r["attention"], 99)))


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """report.json's content (module docstring)."""
    report: dict[str, Any] = {"bpb": {}, "bpb_task": {}, "recall": {}, "chance": {}, "reach": {}, "runs": {}}
    for run in ordered(runs):
        kind, task = run["attention"], run["task"]
        report["runs"][f"{kind}-{task}"] = run["run_dir"]
        report["reach"][kind] = run.get("receptive_field") or (run.get("window") if kind == "window" else None)
        if "bpb" in run and (task == "text" or kind not in report["bpb"]):
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
    """The printed table: one block per task, a row per distance, a column per attention."""
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
            accuracies = "".join(f"{report[k].get(task, {}).get(str(d), float('nan')):>9.2f}" for k in kinds)
            recalls = [f"{k} {report['recall'][k][task][str(d)]:.2f}" for k in kinds
                       if report["recall"].get(k, {}).get(task, {}).get(str(d)) is not None]
            note = "  beyond the window's reach" if reach is not None and d > reach else ""
            lines.append(f"{d:>9}{accuracies}   {', '.join(recalls)}{note}")
    if report["bpb"]:
        untrained = sorted({t for t in report["bpb_task"].values() if t != "text"})
        note = f" (models trained on {', '.join(untrained)}, not on text)" if untrained else ""
        lines.append(f"held-out text, bits per byte{note}: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in report["bpb"].items()))
    return "\n".join(lines)


def write_report(run_dirs: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Read the runs, write report.json / report.md / the plots into out_dir; returns the report."""
    runs = [read_run(Path(d)) for d in run_dirs]
    report = summarise(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_json(out_dir / REPORT_JSON, report)
    table = side_by_side(report)
    markdown = f"# Side-by-side report\n\n```\n{table}\n```\n\n" + "".join(
        f"![{name}]({name}.png)\n" for name in plot_all(runs, out_dir))
    atomic_write(out_dir / REPORT_MD, lambda handle: handle.write(markdown.encode()))
    return report


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
    ax.axhline(runs[0]["chance"]["accuracy"], color="black", ls=":", label="chance")
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
    layer = int(np.argmax(cell.get(key) or [0.0]))  # the layer with the best recall at the example's distance
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
    """Replace the rows of these runs' (attention, task) in PREFIX.jsonl, keep the report's plots (plots_from) as
    PREFIX_plots/ATTENTIONS_TASKS_NAME.png, then rewrite PREFIX.md from all rows and all kept plots."""
    gpu, commit = environment_names()
    plots = prefix.parent / f"{prefix.name}_plots"
    if plots_from is not None:
        label = "_".join("-".join(sorted({str(r[k]) for r in runs})) for k in ("attention", "task"))
        plots.mkdir(parents=True, exist_ok=True)
        for plot in sorted(plots_from.glob("*.png")):
            shutil.copyfile(plot, plots / f"{label}_{plot.name}")
    path = prefix.with_suffix(".jsonl")
    done = {(r["attention"], r["task"]) for r in runs}
    old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in old if (r["attention"], r["task"]) not in done]
    rows += [row for run in runs for row in result_rows(run, gpu, commit)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda handle: handle.write(text.encode()))
    kept = sorted(plots.glob("*.png")) if plots.is_dir() else []
    markdown = results_markdown(rows, [f"{plots.name}/{p.name}" for p in kept])
    atomic_write(prefix.with_suffix(".md"), lambda handle: handle.write(markdown.encode()))


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


def main(argv: Sequence[str] | None = None) -> int:
    """sal-report: the side-by-side report of finished run folders."""
    parser = argparse.ArgumentParser(prog="sal-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders written by sal-train / sal-compare")
    parser.add_argument("--out", type=Path, default=Path("runs/report"), help="report folder (default runs/report)")
    args = parser.parse_args(argv)
    report = write_report(args.run_dirs, args.out)
    print(side_by_side(report))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
