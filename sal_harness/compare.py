"""The main job: train one small model per attention on the same task and recipe, then report side by side.

    python -m scripts.compare                                  # CPU: dense, window, nsa, scope on the needle task
    python -m scripts.compare experiment=cuda_16k --attention-variant 16k --jobs 1 --threads 8   # GPU, 16k
    python -m scripts.compare --attentions dense,nsa train.max_steps=100 nsa:attention.num_selected=6

Every run is ``sal_harness.train`` on the composed config ``train.yaml`` + the overrides given here +
``attention=<kind> task=<task> out_dir=<out>/<kind>-<task>``; an override prefixed ``<kind>:`` applies to
that attention only. The runs of ``--ddp-attentions`` (default nsa and scope: on a CPU their training steps cost
~13 and ~4 dense ones) are trained first, each by all ``--jobs`` processes together (DDP: the same steps as one process,
up to rounding); the others then go to ``--jobs`` worker processes, one run each (``--threads`` torch threads
per process). A run folder that already holds checkpoints is resumed (exactly), a finished one (its eval.json
made at its newest checkpoint) is kept as it is, so the same command continues an interrupted comparison.
The report (``sal_harness.report``) goes to ``<out>/report`` and its table is printed.
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

from sal_harness.checkpoint import CHECKPOINT_PATTERN, list_checkpoints
from sal_harness.config import RunConfig, compose, validate_run_config
from sal_harness.errors import HarnessError
from sal_harness.evaluate import EVAL_NAME
from sal_harness.model import ATTENTION_KINDS
from sal_harness.report import read_run, side_by_side, write_report, write_results

# Slowest first, so that the longest run starts at once when runs share the workers.
COST_ORDER = ("nsa", "scope", "window", "dense")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sal-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="hydra key=value overrides of train.yaml ('<kind>:key=value' "
                        "for one attention only)")
    parser.add_argument("--attentions", default=",".join(ATTENTION_KINDS), help="comma-separated attention kinds")
    parser.add_argument("--attention-variant", default="", help="use the attention group's <kind>_<variant> options "
                        "(e.g. 16k: window_16k, nsa_16k, scope_16k, dense_16k)")
    parser.add_argument("--tasks", default="needle", help="comma-separated tasks (needle, mqar, passkey, text)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/compare"), help="parent of the run folders")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once (default 2)")
    parser.add_argument("--ddp-attentions", default="nsa,scope",
                        help="comma-separated kinds trained first, one at a time, by all --jobs processes together "
                        "(DDP over gloo / NCCL; default nsa,scope, the slowest on a CPU); the others share the "
                        "processes one run each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--results", type=Path, help="also write PREFIX.jsonl / PREFIX.md result rows (one per "
                        "attention, task and distance; rows of the same attention and task are replaced)")
    return parser.parse_intermixed_args(argv)  # overrides may come before, between or after the options


def run_configs(args: argparse.Namespace) -> list[RunConfig]:
    """Every (attention, task) run, validated before anything starts."""
    kinds = [k for k in args.attentions.split(",") if k]
    unknown = sorted(set(kinds) - set(ATTENTION_KINDS))
    if unknown:
        raise HarnessError(f"--attentions: unknown kind(s) {unknown}; known: {list(ATTENTION_KINDS)}")
    common = [o for o in args.overrides if not is_scoped(o)]
    configs = []
    for task in [t for t in args.tasks.split(",") if t]:
        for kind in sorted(kinds, key=COST_ORDER.index):
            scoped = [o.split(":", 1)[1] for o in args.overrides if is_scoped(o) and o.split(":", 1)[0] == kind]
            out_dir = args.out_dir / f"{kind}-{task}"
            option = f"{kind}_{args.attention_variant}" if args.attention_variant else kind
            values = compose([*common, f"attention={option}", f"task={task}", f"out_dir={out_dir}",
                              f"train.threads={args.threads}", *scoped])
            values["resume"] = bool(list_checkpoints(out_dir))
            configs.append(validate_run_config(values))
    return configs


def is_scoped(override: str) -> bool:
    head = override.split("=", 1)[0]
    return ":" in head and head.split(":", 1)[0] in ATTENTION_KINDS


def finished(config: RunConfig) -> bool:
    """The run folder holds its final evaluation, made at its newest checkpoint."""
    out_dir = Path(config.out_dir)
    last = list_checkpoints(out_dir)
    if not (out_dir / EVAL_NAME).exists() or not last:
        return False
    newest = CHECKPOINT_PATTERN.fullmatch(last[-1].name)  # a file (one process, DDP) or a folder (FSDP2)
    return newest is not None and int(newest.group(1)) == json.loads((out_dir / EVAL_NAME).read_text())["step"]


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        configs = run_configs(args)
        statuses = run_all(configs, args.jobs, [k for k in args.ddp_attentions.split(",") if k])
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [(out, status) for out, status in statuses if status]
    if failed:
        for out, status in failed:
            print(f"{out}: training ended with status {status} (see its messages above)", file=sys.stderr)
        return max(status for _, status in failed)
    report_dir = args.out_dir / "report"
    report = write_report([Path(c.out_dir) for c in configs], report_dir)
    print(side_by_side(report))
    if args.results is not None:
        write_results([read_run(Path(c.out_dir)) for c in configs], args.results, plots_from=report_dir)
        print(f"results: {args.results}.jsonl, {args.results}.md")
    print(f"report: {report_dir} ({time.perf_counter() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
