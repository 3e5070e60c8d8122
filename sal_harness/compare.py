"""The main job: train one small model per attention on the same task and recipe, then report side by side.

    python -m scripts.compare                                  # CPU: dense, window, nsa, scope on the needle task
    python -m scripts.compare experiment=cuda_16k --attention-variant 16k --jobs 1 --threads 8   # GPU, 16k
    python -m scripts.compare --attentions dense,nsa train.max_steps=100 nsa:attention.num_selected=6

Every run is ``sal_harness.train`` on the composed config ``train.yaml`` + the overrides given here +
``attention=<kind> task=<task> out_dir=<out>/<kind>-<task>``; an override prefixed ``<kind>:`` applies to that
attention only (a kind of --attentions; out_dir and resume are sal-compare's, not overrides'). The runs of
``--ddp-attentions`` (default nsa and scope: on a CPU their training steps cost ~13 and ~4 dense ones) are trained
first, each by all ``--jobs`` processes together (DDP: the same steps as one process, up to rounding); the others
then go to ``--jobs`` worker processes, one run each (``--threads`` torch threads per process). A run folder that
already holds checkpoints is resumed (exactly), a finished one (its eval.json made at its newest checkpoint, that of
train.max_steps or of the stop at train.max_minutes) is kept as it is, so the same command continues an interrupted
comparison; a run folder whose config.yaml differs from the requested config (beyond the settings a resume may
change: stop_step, threads, progress, heartbeat) is an error naming the keys. The report (``sal_harness.report``)
goes to ``<out>/report`` and its table is printed. With stop_step=N (a comparison in parts) the runs stop at step N
and the report is skipped (exit status 0): the same command without stop_step finishes them and writes it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sal_harness.checkpoint import CHECKPOINT_PATTERN, file_in_the_way, list_checkpoints, stopped_by_time_budget
from sal_harness.config import RunConfig, compose, validate_run_config
from sal_harness.errors import HarnessError, RunFolderError
from sal_harness.evaluate import EVAL_NAME
from sal_harness.model import ATTENTION_KINDS
from sal_harness.report import read_run, side_by_side, write_report, write_results
from sal_harness.train import CONFIG_NAME, changed_settings, read_run_config

# Slowest first, so that the longest run starts at once when runs share the workers.
COST_ORDER = ("nsa", "scope", "window", "dense")
# Keys sal-compare sets for every run itself: an override of them would be overwritten.
SET_BY_COMPARE = ("out_dir", "resume")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sal-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="hydra key=value overrides of train.yaml ('<kind>:key=value' "
                        "for one attention only, a kind of --attentions)")
    parser.add_argument("--attentions", default=",".join(ATTENTION_KINDS), help="comma-separated attention kinds")
    parser.add_argument("--attention-variant", default="", help="use the attention group's <kind>_<variant> options "
                        "(e.g. 16k: window_16k, nsa_16k, scope_16k, dense_16k)")
    parser.add_argument("--tasks", default="needle", help="comma-separated tasks (needle, mqar, passkey, text)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/compare"), help="parent of the run folders")
    parser.add_argument("--jobs", type=at_least_one, default=2, help="training processes at once (default 2)")
    parser.add_argument("--ddp-attentions", default="nsa,scope",
                        help="comma-separated kinds trained first, one at a time, by all --jobs processes together "
                        "(DDP over gloo / NCCL; default nsa,scope, the slowest on a CPU); the others share the "
                        "processes one run each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--results", type=Path, help="also write PREFIX.jsonl / PREFIX.md result rows (one per "
                        "attention, task and distance; rows of the same attention and task are replaced)")
    return parser.parse_intermixed_args(argv)  # overrides may come before, between or after the options


def at_least_one(text: str) -> int:
    """argparse type of --jobs (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def listed(value: str, option: str, known: Sequence[str] | None = None, allow_empty: bool = False) -> list[str]:
    """The entries of a comma-separated option: at least one (unless allow_empty), each once (a repeated kind or
    task would train twice at once in one run folder) and, where ``known`` is given, each one of those."""
    entries = [e for e in value.split(",") if e]
    if not entries and not allow_empty:
        raise HarnessError(f"{option}: nothing given; name at least one entry (comma-separated)")
    repeated = sorted({e for e in entries if entries.count(e) > 1})
    if repeated:
        raise HarnessError(f"{option}: {repeated} given more than once; name each once")
    unknown = sorted(set(entries) - set(known)) if known is not None else []
    if unknown:
        raise HarnessError(f"{option}: unknown kind(s) {unknown}; known: {list(known or ())}")
    return entries


def ddp_kinds(args: argparse.Namespace) -> list[str]:
    return listed(args.ddp_attentions, "--ddp-attentions", ATTENTION_KINDS, allow_empty=True)


def run_configs(args: argparse.Namespace) -> list[RunConfig]:
    """Every (attention, task) run, validated, with its run folder, before anything starts."""
    kinds = listed(args.attentions, "--attentions", ATTENTION_KINDS)
    tasks = listed(args.tasks, "--tasks")
    check_overrides(args.overrides, kinds)
    check_no_file_in_the_way(args.out_dir / "report", args.out_dir)
    common = [o for o in args.overrides if not is_scoped(o)]
    configs = []
    for task in tasks:
        for kind in sorted(kinds, key=COST_ORDER.index):
            scoped = [o.split(":", 1)[1] for o in args.overrides if is_scoped(o) and o.split(":", 1)[0] == kind]
            out_dir = args.out_dir / f"{kind}-{task}"
            option = f"{kind}_{args.attention_variant}" if args.attention_variant else kind
            values = compose([*common, f"attention={option}", f"task={task}", f"train.threads={args.threads}",
                              *scoped])
            # Set here, not as an override: hydra's grammar gives ',', quotes or '${' in a path a meaning.
            values.update(out_dir=str(out_dir), resume=bool(list_checkpoints(out_dir)))
            configs.append(validate_run_config(values))
    for config in configs:
        check_no_file_in_the_way(Path(config.out_dir), args.out_dir)
        check_stored_config(config)
    return configs


def is_scoped(override: str) -> bool:
    head = override.split("=", 1)[0]
    return ":" in head and head.split(":", 1)[0] in ATTENTION_KINDS


def check_overrides(overrides: Sequence[str], kinds: Sequence[str]) -> None:
    """A scoped override of a kind not run (a typo'd prefix, a dropped kind) or of a key set by sal-compare would be
    dropped without a word: refuse it."""
    for override in overrides:
        head = override.split("=", 1)[0]
        kind = head.split(":", 1)[0]
        if is_scoped(override) and kind not in kinds:
            raise HarnessError(f"{override}: {kind} is not in --attentions {list(kinds)}; add it there or drop the "
                               "override")
        if head.rsplit(":", 1)[-1].lstrip("+~") in SET_BY_COMPARE:
            raise HarnessError(f"{override}: sal-compare sets {', '.join(SET_BY_COMPARE)} itself (out_dir from "
                               "--out-dir); drop the override")


def check_no_file_in_the_way(folder: Path, out_dir: Path) -> None:
    """``folder`` (below --out-dir) can be a folder: neither it nor a parent is an existing file."""
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise HarnessError(f"--out-dir {out_dir}: {blocking} is a file, not a folder; pass another --out-dir or "
                           "move the file")


def check_stored_config(config: RunConfig) -> None:
    """A run folder holding checkpoints holds a run of this config, up to what a resume may change (train's
    RUNTIME_KEYS): otherwise a finished run of other settings would be reported as this one, or the resume would
    fail after other runs have started."""
    if not config.resume:
        return
    run_dir = Path(config.out_dir)
    differing = changed_settings(read_run_config(run_dir, fix="pass another --out-dir, or delete the run folder"),
                                 config)
    if differing:
        raise HarnessError(f"{run_dir} holds a run of other settings (its {CONFIG_NAME} -> this call: "
                           f"{'; '.join(differing)}): rerun with its settings, pass another --out-dir, or delete the "
                           "run folder")


def finished(config: RunConfig) -> bool:
    """The run reached its end (train.max_steps, or the stop at train.max_minutes) and its folder holds the final
    evaluation, made at its newest checkpoint. An eval.json of an earlier stop (sal-eval of an interrupted run)
    does not count: that run is resumed."""
    out_dir = Path(config.out_dir)
    last = list_checkpoints(out_dir)
    if not (out_dir / EVAL_NAME).exists() or not last:
        return False
    newest = CHECKPOINT_PATTERN.fullmatch(last[-1].name)  # a file (one process, DDP) or a folder (FSDP2)
    step = evaluated_step(out_dir)
    return (newest is not None and int(newest.group(1)) == step
            and (step == config.train.max_steps or stopped_by_time_budget(out_dir, step)))


def evaluated_step(run_dir: Path) -> int:
    """eval.json's step; RunFolderError naming the file when it is torn or holds none (as report.read_run)."""
    path = run_dir / EVAL_NAME
    result = read_json(path, fix=f"rerun sal-eval {run_dir}")
    step = result.get("step") if isinstance(result, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise RunFolderError(f"{path} holds no integer \"step\": rerun sal-eval {run_dir}")
    return step


def read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise RunFolderError(f"{path} cannot be read as JSON ({err}): {fix}") from None


def train_in_worker(values: dict[str, Any]) -> tuple[str, int]:
    """Worker process: one training run; returns (out_dir, exit status of sal_harness.train.run_and_exit)."""
    from sal_harness.train import run_and_exit

    config = validate_run_config(values)
    return config.out_dir, run_and_exit(config)


def ddp_rank(rank: int, world: int, port: int, values: dict[str, Any]) -> None:
    """One process of a multi-process run: torchrun's environment, then the run; a failure exits non-zero."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _, status = train_in_worker(values)
    if status:
        sys.exit(status)


def train_ddp(config: RunConfig, processes: int) -> tuple[str, int]:
    """One run by ``processes`` processes (DDP); (out_dir, the first non-zero exit status or 0)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.start_processes(ddp_rank, args=(processes, port, config.model_dump(mode="json")), nprocs=processes,
                           start_method="spawn")
    except mp.ProcessExitedException as err:
        return config.out_dir, err.exit_code or 1
    return config.out_dir, 0


def run_all(configs: Sequence[RunConfig], jobs: int, ddp_kinds: Sequence[str] = ()) -> list[tuple[str, int]]:
    """Runs not finished earlier: those of ddp_kinds by all jobs processes together, one after another, then the
    rest on jobs worker processes (in this process when jobs is 1)."""
    check_one_run_per_folder(configs)
    todo = [c for c in configs if not finished(c)]
    for config in configs:
        if config not in todo:
            print(f"{config.out_dir}: finished earlier, kept")
    together = [c for c in todo if jobs > 1 and c.attention.kind in ddp_kinds]
    statuses = [train_ddp(c, jobs) for c in together]
    rest = [c for c in todo if c not in together]
    if jobs <= 1:
        return statuses + [train_in_worker(c.model_dump(mode="json")) for c in rest]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(train_in_worker, c.model_dump(mode="json")) for c in rest]
        return statuses + [f.result() for f in futures]


def check_one_run_per_folder(configs: Sequence[RunConfig]) -> None:
    """Two runs of one folder would train at once into the same checkpoints, metrics and eval.json."""
    folders = [c.out_dir for c in configs]
    shared = sorted({f for f in folders if folders.count(f) > 1})
    if shared:
        raise HarnessError(f"several runs share the run folder(s) {shared}: give each attention and task once")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        configs = run_configs(args)
        statuses = run_all(configs, args.jobs, ddp_kinds(args))
        failed = [(out, status) for out, status in statuses if status]
        for out, status in failed:
            print(f"{out}: training ended with status {status} (see its messages above)", file=sys.stderr)
        if failed:
            return max(status for _, status in failed)
        report(args, configs, start)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def report(args: argparse.Namespace, configs: Sequence[RunConfig], start: float) -> None:
    """The report of the runs, once every one is finished; runs stopped early by stop_step get a note instead."""
    unfinished = [c.out_dir for c in configs if not finished(c)]
    if unfinished:
        print(f"no report: {', '.join(unfinished)} stopped before train.max_steps (stop_step); the same command "
              "without stop_step finishes them and writes the report")
        return
    report_dir = args.out_dir / "report"
    summary = write_report([Path(c.out_dir) for c in configs], report_dir)
    print(side_by_side(summary))
    if args.results is not None:
        write_results([read_run(Path(c.out_dir)) for c in configs], args.results, plots_from=report_dir)
        print(f"results: {args.results}.jsonl, {args.results}.md")
    print(f"report: {report_dir} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    raise SystemExit(main())
