"""Training under torchrun on the CPU with the gloo backend: 1, 2 and 3 processes (FSDP2, and DDP) take the same
steps; the sharded checkpoints of FSDP2 (torch.distributed.checkpoint) resume bitwise on as many processes, within
rounding on another number (2 -> 3, 2 -> 1, and a one-process file onto 2; DDP's file 2 -> 3), and name the file
when damaged; a non-finite weight on one rank is never checkpointed (FSDP2 and DDP).

One module fixture makes every run, the multi-process ones in a single launch of 3 worker processes (starting a
process costs seconds on 2 cores) that run a list of jobs one after the other, each on the first 1, 2 or 3 ranks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.multiprocessing as mp
from harness_tiny import tiny_config
from torch.distributed.tensor import DTensor

from sal_harness import train as train_module
from sal_harness.checkpoint import list_checkpoints, load_checkpoint
from sal_harness.config import RunConfig
from sal_harness.distributed import close_world
from sal_harness.errors import HarnessError, RunFolderError
from sal_harness.evaluate import load_run_model
from sal_harness.train import Trainer, train

LR = 1e-3
# 12 samples a step in 2 accumulation micro-steps: a multiple of 2 x 1, 2 x 2 and 2 x 3 processes. Checkpoints at
# steps 2 and 4.
STEPS = ["train.max_steps=4", "train.ckpt_interval=2", "train.eval_interval=0", "eval.text_samples=0",
         "train.log_interval=1", f"train.lr={LR}", f"train.min_lr={LR / 10}", "train.batch_size=12",
         "train.grad_accum=2", "train.distributed=fsdp"]
K = 2  # the step a split run stops at and resumes from
# Tolerances between process counts. The global batch, the loss normalisation and the schedule are the same: only
# the order of the float32 sums differs (the loss over ranks, the gradient reduction). Losses: one float32 rounding
# of the loss sum (measured: 1.1e-7 relative); allowed 1e-5. Weights: AdamW divides each gradient entry by its
# running RMS, so the rounding of an entry whose gradient nearly cancels over the batch moves its update by a
# fraction of lr (measured: up to 2e-3 x lr after 4 steps, 3 processes against 1); allowed 1e-2 x lr, against the
# ~0.1-1 x lr a wrong state (a lost AdamW step count, a shard out of place) moves a weight by.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-2 * LR


class Job(NamedTuple):
    """One run on the first ``world`` ranks of a launch: its run folder, its overrides after STEPS, what runs it
    (train, or another module-level function of the config), a file of the run folder that rank 0 deletes first
    (None: none), and whether it must fail with a HarnessError (each rank then writes the message to
    ``out_dir/error.rank<r>``)."""

    world: int
    out_dir: Path
    extra: tuple[str, ...] = ()
    run: Callable[[RunConfig], object] = train
    delete: str | None = None
    fails: bool = False


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free now (held open together, then released), below Linux's ephemeral range
    (32768-60999 by default): the connections the earlier jobs open (gloo's) never take one as their own port
    before its job's rendezvous binds it."""
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        for port in random.Random(os.getpid()).sample(range(20000, 32000), 4 * count):
            sock = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):
                sock.bind(("127.0.0.1", port))
                ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"fewer than {count} free ports in 20000-32000")


def worker(rank: int, ports: list[int], jobs: list[Job]) -> None:
    """One torchrun-like process: for each job it takes part in, the environment torchrun would set, then the
    ordinary train() (whose process-group rendezvous waits for the job's other ranks)."""
    torch.set_num_threads(1)
    for port, job in zip(ports, jobs, strict=True):
        if rank >= job.world:
            continue
        if rank == 0 and job.delete is not None:
            (job.out_dir / job.delete).unlink()
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job.world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        try:
            job.run(tiny_config(job.out_dir, *STEPS, *job.extra))
        except HarnessError as err:
            if not job.fails:
                raise
            (job.out_dir / f"error.rank{rank}").write_text(f"{type(err).__name__}: {err}")


def save_with_an_inf_on_the_last_rank(config: RunConfig) -> None:
    """A trainer of several processes checkpoints after an inf entered the last rank's shard (FSDP2) or copy
    (DDP) of tok_emb.weight; rank 0's is finite."""
    trainer = Trainer(config)
    try:
        trainer.prepare_folder()
        weight = trainer.model.tok_emb.weight
        if trainer.world.rank == trainer.world.size - 1:
            with torch.no_grad():
                (weight.to_local() if isinstance(weight, DTensor) else weight)[-1, 0] = math.inf
        trainer.save()
    finally:
        close_world(trainer.world)


def train_skipping_the_first_step(config: RunConfig) -> None:
    """train() with a NaN loss on the first step of a fresh run: the step is skipped, so the optimizer takes its
    first step at step 2 (a checkpoint at step 1 holds no optimizer state)."""
    real = train_module.scored_loss_sum
    calls = itertools.count()

    def poisoned(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = real(logits, targets)
        return loss * math.nan if next(calls) < config.train.grad_accum and not config.resume else loss

    train_module.scored_loss_sum = poisoned
    try:
        train(config)
    finally:
        train_module.scored_loss_sum = real


def launch(jobs: list[Job]) -> None:
    mp.start_processes(worker, args=(free_ports(len(jobs)), jobs), nprocs=max(job.world for job in jobs),
                       start_method="spawn")


def train_here(job: Job) -> None:
    """A one-process run in this process, on one thread as the workers (the thread count is put back)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        job.run(tiny_config(job.out_dir, *STEPS, *job.extra))
    finally:
        torch.set_num_threads(threads)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def final_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint read whole in this process (a sharded folder too)."""
    return load_checkpoint(list_checkpoints(run_dir)[-1])


def assert_weights_close(a: Path, b: Path) -> None:
    wa, wb = final_checkpoint(a)["model"], final_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=WEIGHT_ATOL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every run of the module, by name: "1", "2", "3" (processes, straight to step 4), "ddp2"; "1to2", "2to2",
    "2to3", "ddp2to3" (K steps on the first count, resumed on the second); "damaged" (2 processes, then its step-4
    folder loses a shard and 3 processes try to resume it); "nonfinite", "nonfinite_ddp" (2 processes checkpoint
    an inf weight); "skip1", "skip2", "skip2to3", "skip1to2" (a first step skipped and a checkpoint every step: 1
    process, 2, 2 stopped at step 1 then resumed on 3, 1 stopped at step 1 then resumed on 2)."""
    root = tmp_path_factory.mktemp("dist")
    stop, resume, skip = (f"stop_step={K}",), ("resume=true",), train_skipping_the_first_step
    every_step, ddp = "train.ckpt_interval=1", "train.distributed=ddp"
    train_here(Job(1, root / "1"))
    train_here(Job(1, root / "1to2", stop))
    train_here(Job(1, root / "skip1", (every_step,), run=skip))
    train_here(Job(1, root / "skip1to2", (every_step, "stop_step=1"), run=skip))
    launch([Job(2, root / "2"), Job(2, root / "ddp2", (ddp,)), Job(2, root / "1to2", resume),
            Job(2, root / "2to2", stop), Job(2, root / "2to2", resume), Job(2, root / "2to3", stop),
            Job(2, root / "damaged"), Job(3, root / "3"), Job(3, root / "2to3", resume),
            Job(3, root / "damaged", resume, delete="ckpt-00000004/__1_0.distcp", fails=True),
            Job(2, root / "nonfinite", run=save_with_an_inf_on_the_last_rank, fails=True),
            Job(2, root / "nonfinite_ddp", (ddp,), run=save_with_an_inf_on_the_last_rank, fails=True),
            Job(2, root / "ddp2to3", (ddp, *stop)), Job(3, root / "ddp2to3", (ddp, *resume)),
            Job(2, root / "skip2", (every_step,), run=skip),
            Job(2, root / "skip2to3", (every_step, "stop_step=1"), run=skip),
            Job(3, root / "skip2to3", (every_step, *resume)), Job(2, root / "skip1to2", (every_step, *resume))])
    return root


def test_one_two_three_processes_take_the_same_steps(runs: Path) -> None:
    """FSDP2 on 1, 2 and 3 processes, and DDP on 2: the same loss curve and weights within rounding."""
    for other in ("2", "3", "ddp2"):
        assert losses(runs / other) == pytest.approx(losses(runs / "1"), rel=LOSS_RTOL), other
        assert_weights_close(runs / "1", runs / other)
    for run, suffix in (("2", ""), ("3", ""), ("ddp2", ".pt")):  # FSDP2: folders; DDP: files; the last k kept
        assert [p.name for p in list_checkpoints(runs / run)] == [f"ckpt-00000002{suffix}", f"ckpt-00000004{suffix}"]
        assert not list((runs / run).glob(".*"))  # no staging left over
    shards = sorted(p.name for p in (runs / "3" / "ckpt-00000004").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "meta.json"]
    assert json.loads((runs / "3" / "eval.json").read_text())["step"] == 4
    model, _, step = load_run_model(runs / "3")  # sal-eval reads a sharded folder in one process
    assert step == 4 and all(torch.equal(t, final_checkpoint(runs / "3")["model"][k])
                             for k, t in model.state_dict().items())


def test_resume_on_another_number_of_processes(runs: Path) -> None:
    """2 -> 3 FSDP2 processes (sharded folder), 1 -> 2 (checkpoint file) and 2 -> 3 DDP processes (file): the
    resumed steps equal an uninterrupted run within rounding."""
    for split, straight in (("2to3", "3"), ("1to2", "2"), ("ddp2to3", "1")):
        assert len(losses(runs / split)) == 4
        assert losses(runs / split)[K:] == pytest.approx(losses(runs / straight)[K:], rel=LOSS_RTOL), split
        assert_weights_close(runs / straight, runs / split)
    assert final_checkpoint(runs / "2to3")["processes"] == 3


def test_resume_on_as_many_processes_is_bitwise(runs: Path) -> None:
    """2 processes, K steps, stop, resume on 2 to step 4 == 2 processes straight: losses, weights, optimizer
    state and RNG identical."""
    assert losses(runs / "2to2") == losses(runs / "2")
    a, b = final_checkpoint(runs / "2"), final_checkpoint(runs / "2to2")
    for part in ("model", "rng"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[p][k], sb[p][k]) for p in sa for k in sa[p])


def test_damaged_sharded_checkpoint_names_the_file(runs: Path) -> None:
    """A missing shard (every one of 3 ranks raises, none hangs), a truncated or changed one, a garbage meta.json:
    RunFolderError naming the file and the way out; following it (delete the folder) resumes from the previous
    checkpoint, written by 2 processes, on 1 process."""
    run = runs / "damaged"
    newest = run / "ckpt-00000004"
    advice = r"delete it to resume from the previous checkpoint \(ckpt-00000002\)"
    for rank in range(3):
        message = (run / f"error.rank{rank}").read_text()
        assert message.startswith("RunFolderError") and f"{newest / '__1_0.distcp'} is missing" in message
        assert "ckpt-00000002)" in message
    shard, meta = newest / "__0_0.distcp", newest / "meta.json"
    blob = shard.read_bytes()
    damages = [(shard, blob[: len(blob) // 2], "holds .* bytes, not the .* written"),
               (shard, bytes(len(blob)), "does not match the checksum"),
               (meta, b"garbage, not JSON", "cannot be read")]
    for path, damaged, problem in damages:
        original = path.read_bytes()
        path.write_bytes(damaged)
        with pytest.raises(RunFolderError, match=f"{re.escape(str(path))} {problem}.*{advice}"):
            train_here(Job(1, run, ("resume=true",)))
        with pytest.raises(RunFolderError, match=problem):
            load_checkpoint(newest)
        path.write_bytes(original)
    shutil.rmtree(newest)
    train_here(Job(1, run, ("resume=true",)))
    assert losses(run)[K:] == pytest.approx(losses(runs / "1")[K:], rel=LOSS_RTOL)


def test_nonfinite_weight_on_one_rank_is_never_checkpointed(runs: Path) -> None:
    """An inf in the last rank's shard (FSDP2) or copy (DDP) only: every rank refuses (the check is reduced over
    the ranks: none waits for another), and nothing is written, not even a staging folder or file."""
    for run in (runs / "nonfinite", runs / "nonfinite_ddp"):
        for rank in range(2):
            message = (run / f"error.rank{rank}").read_text()
            assert message.startswith("NonFiniteTrainingError: weight 'tok_emb.weight' is not finite at step 0")
        assert list_checkpoints(run) == [] and not list(run.glob(".*"))


def test_checkpoint_before_the_first_update_changes_nothing(runs: Path) -> None:
    """Step 1 skipped (NaN loss), checkpoints at every step: the step-1 checkpoint holds no optimizer state, and
    neither writing it nor resuming from it on another number of processes gives AdamW a state (its step count
    would change the first update): the same steps as one process."""
    for run in ("skip2", "skip2to3", "skip1to2"):
        assert [r["step"] for r in map(json.loads, (runs / run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "skip"] == [1]
        assert losses(runs / run) == pytest.approx(losses(runs / "skip1"), rel=LOSS_RTOL), run
        assert_weights_close(runs / "skip1", runs / run)
