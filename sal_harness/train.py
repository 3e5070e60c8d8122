"""Train one model: ``python -m scripts.train [key=value ...]`` (hydra; ``--multirun`` sweeps).

    python -m scripts.train                                    # nsa on the needle task -> runs/nsa-needle
    python -m scripts.train attention=window out_dir=runs/w stop_step=100   # stop early ...
    python -m scripts.train attention=window out_dir=runs/w resume=true     # ... and continue exactly
    torchrun --nproc-per-node 2 -m scripts.train train.distributed=fsdp     # several processes (DDP / FSDP2)

The run folder (out_dir) holds: config.yaml (the resolved config), metrics.jsonl (JSON lines: "train" records
{step, loss, lr, grad_norm, tokens_per_s, seq_len, elapsed_s} every log_interval steps, "eval" records every
eval_interval steps, "skip" records for steps whose loss or gradient was not finite), heartbeat.json (status,
step, time; rewritten every heartbeat_s seconds), checkpoints (the newest train.keep_checkpoints kept): the file
ckpt-<step>.pt from one process or DDP, the sharded folder ckpt-<step>/ (torch.distributed.checkpoint) from
several FSDP2 processes, either of which resumes on any number of processes; eval.json (the final evaluation,
read by the report).

Nothing is lost: a step whose loss or gradient norm is NaN / inf is not applied (train.nonfinite=skip; after
max_consecutive_skips such steps in a row, or at once with nonfinite=stop, the run stops with exit status 3
and the last good checkpoint); a checkpoint is never written with a non-finite weight; SIGINT / SIGTERM
finish the current step, write a checkpoint and exit with 128 + the signal number; resume=true continues the
newest checkpoint bitwise exactly on as many processes as wrote it (stop_step moves the stop, never the schedule:
k steps + resume to N is the same run as N steps straight, its metrics records included but for their clock
fields), and within rounding on another number; resuming a finished run evaluates nothing again; a damaged run
folder (a checkpoint that does not load or fails its CRC-32s) raises RunFolderError naming the file and the fix.
heartbeat.json ends at "finished", "interrupted", "time_budget", "stopped" (non-finite) or "failed" (any other
error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F

from sal_harness.checkpoint import (
    HEARTBEAT_NAME,
    METRICS_NAME,
    NONFINITE_ADVICE,
    MetricsLog,
    atomic_json,
    atomic_write,
    damaged_message,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    read_sharded_info,
    restore_rng_state,
    rng_state,
    save_sharded_checkpoint,
    save_whole_checkpoint,
)
from sal_harness.config import RunConfig, TrainConfig, differing_keys, validate_run_config
from sal_harness.data import IGNORE_INDEX, Batch, Task, TaskConfig, build_task
from sal_harness.distributed import (
    barrier,
    close_world,
    gradient_sync,
    init_world,
    load_full_state,
    sum_over_ranks,
    unwrap,
    wrap,
)
from sal_harness.errors import HarnessConfigError, HarnessError, NonFiniteTrainingError, RunFolderError
from sal_harness.evaluate import EVAL_NAME, final_evaluation, format_table, periodic_evaluation
from sal_harness.model import GPT
from sal_harness.precision import autocast
from scope import ScopeAttention, layer_teacher_loss

EXIT_NONFINITE = 3
CONFIG_NAME = "config.yaml"
# Settings a resumed run may change: they do not touch the math of the run.
RUNTIME_KEYS: dict[str, Any] = {"resume": True, "stop_step": True, "out_dir": True,
                                "train": {"threads", "progress", "heartbeat_s"}}


def changed_settings(stored: RunConfig, requested: RunConfig) -> list[str]:
    """'key: stored -> requested' for every setting that differs, beyond those a resume may change (RUNTIME_KEYS)."""
    return differing_keys(stored.model_dump(exclude=RUNTIME_KEYS), requested.model_dump(exclude=RUNTIME_KEYS))


def read_run_config(run_dir: Path, fix: str) -> RunConfig:
    """The config a run folder trains with: config.yaml, written by every start of a run (fresh, or resumed once the
    resume has checked it against the checkpoint's) before its first checkpoint. RunFolderError naming the file and
    ``fix`` when it is missing, unreadable or not valid for this version."""
    from omegaconf import OmegaConf  # read as _write_config writes it
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError  # omegaconf's parser

    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: {run_dir} is not a run folder sal-train wrote (it writes "
                             f"{CONFIG_NAME} when a run starts): {fix}")
    try:
        values: Any = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, ValueError, YAMLError, OmegaConfBaseException) as err:  # ValueError: bytes that are not UTF-8
        raise RunFolderError(f"{path} cannot be read ({type(err).__name__}): {fix}") from None
    try:
        return validate_run_config(values if isinstance(values, dict) else {})
    except HarnessConfigError as err:
        raise RunFolderError(f"{path} is not a valid config for this version of sal_harness ({err}): {fix}") \
            from None


# ----------------------------------------------------------------------------------------------
# Pieces of the loop


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then a cosine from lr to min_lr at max_steps, then min_lr."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if step >= train.max_steps:
        return train.min_lr
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def seq_len_at(step: int, train: TrainConfig, seq_len: int) -> int:
    """The length curriculum: curriculum_start -> seq_len over curriculum_steps (linearly, or geometrically: the
    same number of steps per doubling), rounded up to a multiple of curriculum_multiple (never past seq_len)."""
    start = train.curriculum_start
    if start is None or step >= train.curriculum_steps:
        return seq_len
    fraction = step / train.curriculum_steps
    if train.curriculum_shape == "geometric":
        length = start * (seq_len / start) ** fraction
    else:
        length = start + (seq_len - start) * fraction
    return min(seq_len, train.curriculum_multiple * math.ceil(length / train.curriculum_multiple))


def batch_at_length(train: TrainConfig, length: int, seq_len: int) -> int:
    """Sequences per step at a curriculum length: batch_size, or with curriculum_batch "tokens" batch_size x
    (seq_len // length), the tokens of a full-length step (a multiple of batch_size, so grad_accum and the
    processes still divide it)."""
    return train.batch_size * (seq_len // length if train.curriculum_batch == "tokens" else 1)


def task_at_length(config: TaskConfig, seq_len: int) -> TaskConfig:
    """The task at a curriculum length: distance bounds that no longer fit fall back to all that fit."""
    if seq_len == config.seq_len:
        return config
    values = {**config.model_dump(), "seq_len": seq_len, "min_distance": None, "max_distance": None}
    shorter = TaskConfig.model_validate(values)
    task = build_task(shorter)
    largest = getattr(task, "largest_distance", None)
    bounds = {k: getattr(config, k) for k in ("min_distance", "max_distance")}
    if largest is not None:
        bounds = {k: (v if v is not None and v <= largest else None) for k, v in bounds.items()}
        if bounds["min_distance"] is not None and bounds["max_distance"] is None:
            bounds["min_distance"] = None
    return TaskConfig.model_validate({**values, **bounds})


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, not on norms, gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))


def scored_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over the scored targets (float32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


class StopSignals:
    """Turns SIGINT / SIGTERM into a request to checkpoint and exit after the current step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Heartbeat:
    """heartbeat.json: rewritten (atomically) at most every ``every_s`` seconds, and on every status change."""

    path: Path
    every_s: float
    last: float = 0.0

    def beat(self, status: str, step: int, force: bool = False, **fields: Any) -> None:
        now = time.time()
        if force or now - self.last >= self.every_s:
            atomic_json(self.path, {"status": status, "step": step, "time": now, "pid": os.getpid(), **fields})
            self.last = now


# ----------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """One run (see the module docstring). ``run()`` returns a summary dict; all ranks call it under torchrun."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        tc = config.train
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        self.world = init_world(tc.device, tc.distributed)
        if tc.batch_size % (tc.grad_accum * self.world.size):
            raise HarnessError(f"train.batch_size={tc.batch_size} must be a multiple of train.grad_accum x processes "
                               f"= {tc.grad_accum * self.world.size}")
        self.out_dir = Path(config.out_dir)
        self.metrics = MetricsLog(self.out_dir / METRICS_NAME)
        self.heartbeat = Heartbeat(self.out_dir / HEARTBEAT_NAME, tc.heartbeat_s)
        torch.manual_seed(tc.seed)  # the initial weights
        self.model = GPT(config.gpt).to(self.world.device)
        self.wrapped = wrap(self.model, self.world)
        self.optimizer = make_optimizer(self.model, tc)  # after wrap: FSDP2 replaces the parameters by DTensors
        self.forward = torch.compile(self.wrapped) if tc.compile else self.wrapped
        self.data_generator = torch.Generator().manual_seed(tc.data_seed)
        self.step = 0
        self.skipped = 0
        self.consecutive_skips = 0
        # steps applied since the last "train" record: a checkpoint carries them, so a stop between two
        # log_interval multiples changes no record of the run
        self.window: list[dict[str, Any]] = []
        self.earlier_s = 0.0  # training seconds of the invocations before this one (a checkpoint carries them)
        self._started = time.perf_counter()
        self._tasks: dict[int, Task] = {}

    # -- run folder ------------------------------------------------------------------------------

    def prepare_folder(self) -> None:
        """Fresh run: refuse a folder that already holds checkpoints. Resume: load the newest checkpoint and cut
        the metrics back to its step. Then drop temporary files a killed process left and write the resolved
        config."""
        if self.config.resume:
            self._restore(latest_checkpoint(self.out_dir))
        elif list_checkpoints(self.out_dir):
            raise RunFolderError(f"{self.out_dir} already holds checkpoints: pass resume=true to continue it, or "
                                 "choose another out_dir")
        if self.world.is_main:
            if self.config.resume:
                self.metrics.truncate_after(self.step)
            else:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.metrics.start_fresh()
                (self.out_dir / EVAL_NAME).unlink(missing_ok=True)  # a crashed earlier run's: not this run's
            for leftover in self.out_dir.glob(".*.tmp"):  # atomic_write's files of a process killed mid-write
                if leftover.is_file():
                    leftover.unlink()
            self._write_config()
        barrier(self.world)

    def _restore(self, path: Path) -> None:
        sharded = path.is_dir()  # a checkpoint folder of several processes (DCP reshards it to this many)
        checkpoint = read_sharded_info(path) if sharded else load_checkpoint(path, map_location=self.world.device)
        try:
            saved = validate_run_config(checkpoint["config"])
        except HarnessConfigError as err:
            raise RunFolderError(f"resume: the config stored in {path} is not valid for this version of sal_harness "
                                 f"({err}): start another out_dir") from None
        changed = changed_settings(saved, self.config)
        if changed:
            raise RunFolderError(f"resume: the config differs from the one stored in {path} ({'; '.join(changed)}): "
                                 "resume with the same overrides (only stop_step, out_dir, threads, progress and "
                                 "heartbeat may change), or start another out_dir")
        if sharded:
            load_sharded_checkpoint(path, self.wrapped, self.optimizer, self.data_generator, self.world)
        else:
            try:
                load_full_state(self.wrapped, self.optimizer, checkpoint["model"], checkpoint["optimizer"],
                                self.world)
            except (RuntimeError, KeyError, ValueError) as err:  # weights or optimizer state unlike the model's
                raise RunFolderError(damaged_message(path, f"does not fit the model ({type(err).__name__}: "
                                                           f"{str(err).splitlines()[0][:160]})")) from None
            restore_rng_state(checkpoint["rng"], self.data_generator)
        self.step = checkpoint["step"]
        trainer = checkpoint["trainer"]
        self.skipped, self.consecutive_skips = trainer["skipped"], trainer["consecutive_skips"]
        # checkpoints written before 2026-12-07 lack these two (metrics only: no weight depends on them)
        self.window = list(trainer.get("window", []))
        self.earlier_s = float(trainer.get("train_s", 0.0))

    def _write_config(self) -> None:
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(self.config.model_dump(mode="json")))
        atomic_write(self.out_dir / CONFIG_NAME, lambda handle: handle.write(text.encode()))

    def save(self) -> Path:
        """Write a checkpoint of the current step (every rank calls): a sharded folder under FSDP2 (each rank writes
        its shards), else a file (rank 0: one process, or DDP's replicated state)."""
        info = {"step": self.step, "config": self.config.model_dump(mode="json"),
                "trainer": {"skipped": self.skipped, "consecutive_skips": self.consecutive_skips,
                            "window": self.window, "train_s": self.train_seconds()}}
        keep = self.config.train.keep_checkpoints
        if self.world.kind == "fsdp":
            return save_sharded_checkpoint(self.out_dir, info, self.wrapped, self.optimizer, self.data_generator,
                                           keep, self.world)
        return save_whole_checkpoint(self.out_dir, {**info, "model": self.model.state_dict(),
                                                    "optimizer": self.optimizer.state_dict(),
                                                    "rng": rng_state(self.data_generator)}, keep, self.world)

    def train_seconds(self) -> float:
        """Training time of the run so far, over every invocation (what max_minutes budgets)."""
        return self.earlier_s + (time.perf_counter() - self._started)

    # -- one step --------------------------------------------------------------------------------

    def task(self, seq_len: int) -> Task:
        if seq_len not in self._tasks:
            self._tasks[seq_len] = build_task(task_at_length(self.config.task, seq_len))
        return self._tasks[seq_len]

    def micro_batches(self, batch: Batch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the global batch, in grad_accum micro-batches (inputs, targets)."""
        share = len(batch) // self.world.size
        rows = slice(self.world.rank * share, (self.world.rank + 1) * share)
        inputs, targets = batch.inputs[rows], batch.targets[rows]
        size = share // self.config.train.grad_accum
        for start in range(0, share, size):
            yield (inputs[start:start + size].to(self.world.device), targets[start:start + size].to(self.world.device))

    def teacher_inputs(self) -> contextlib.AbstractContextManager[list[tuple[ScopeAttention, torch.Tensor]]]:
        """Collects (layer, input) of every ScopeAttention during a forward, when the teacher loss is on."""
        return capture_scope_inputs(self.model, self.config.train.scope_teacher_weight > 0)

    def teacher_loss(self, captured: list[tuple[ScopeAttention, torch.Tensor]], seq_len: int) -> torch.Tensor | None:
        """Mean over SCOPE layers of the teacher loss of the last scope_teacher_len query rows of the batch (a block
        multiple) against their whole prefix. The layer's input is cut back to seq_len (dropping
        sal_harness.model.scope_padded's zeros) and its first seq_len % block rows (a block multiple remains)."""
        if not captured:
            return None
        losses = []
        for layer, x in captured:
            block = layer.config.block
            queries = max(block, min(seq_len, self.config.train.scope_teacher_len) // block * block)
            whole_blocks = x[:, seq_len % block:seq_len].detach()
            losses.append(layer_teacher_loss(layer, whole_blocks, queries=queries, step=self.step).total)
        return torch.stack(losses).mean()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on one global batch; returns its loss, grad norm and whether it was applied."""
        tc = self.config.train
        seq_len = seq_len_at(self.step, tc, self.config.task.seq_len)
        batch_size = batch_at_length(tc, seq_len, self.config.task.seq_len)
        batch = self.task(seq_len).sample(batch_size, self.data_generator)
        scored = int((batch.targets != IGNORE_INDEX).sum())  # the global count: every rank drew the same batch
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.world.device)
        teacher_sum = torch.zeros((), device=self.world.device)
        parts = list(self.micro_batches(batch))
        for i, (inputs, targets) in enumerate(parts):
            with gradient_sync(self.wrapped, self.world, i == len(parts) - 1), autocast(self.world.device,
                                                                                         tc.precision):
                with self.teacher_inputs() as captured:
                    logits = self.forward(inputs, step=self.step).logits
                part = scored_loss_sum(logits, targets)
                objective = part * (self.world.size / scored)
                teacher = self.teacher_loss(captured, inputs.shape[1])
                if teacher is not None:  # a per-rank mean: the gradient averaging makes it the global mean
                    objective = objective + tc.scope_teacher_weight * teacher / len(parts)
                    teacher_sum += teacher.detach() / len(parts)
            objective.backward()
            loss_sum += part.detach()
        loss = float(sum_over_ranks(loss_sum, self.world)) / scored
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
            self.consecutive_skips = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive_skips += 1
        self.step += 1
        result = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "seq_len": seq_len, "applied": applied,
                  "tokens": batch_size * seq_len}
        if self.config.attention.kind == "scope" and tc.scope_teacher_weight > 0:
            result["teacher_loss"] = float(sum_over_ranks(teacher_sum, self.world)) / self.world.size
        return result

    def check_skips(self, result: dict[str, Any]) -> None:
        """Log a skipped step; stop (NonFiniteTrainingError) when the policy says so."""
        tc = self.config.train
        what = f"loss {result['loss']}, gradient norm {result['grad_norm']}"
        if self.world.is_main:
            self.metrics.append({"kind": "skip", "step": self.step, "reason": what})
            print(f"step {self.step}: {what} is not finite: update skipped", file=sys.stderr)
        if tc.nonfinite == "stop" or self.consecutive_skips > tc.max_consecutive_skips:
            raise NonFiniteTrainingError(
                f"stopped at step {self.step}: {self.consecutive_skips} step(s) in a row had a non-finite loss or "
                f"gradient ({what}); no such update reached the weights. The last good checkpoint is in "
                f"{self.out_dir}; {NONFINITE_ADVICE}"
            )

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        tc = self.config.train
        stop_step = min(self.config.stop_step or tc.max_steps, tc.max_steps)
        self.prepare_folder()
        first_step = self.step
        main = self.world.is_main
        if main:
            print(f"{self.config.attention.kind} GPT, {self.model.num_parameters():,} parameters, "
                  f"{self.world.size} process(es) on {self.world.device}, steps {self.step} -> {stop_step}, "
                  f"out {self.out_dir}")
        from tqdm import tqdm

        progress = tqdm(total=stop_step, initial=self.step, desc=self.config.attention.kind, unit="step",
                        dynamic_ncols=True, disable=None if tc.progress and main else True)
        self._started = time.perf_counter()
        status = "finished"
        budget_s = math.inf if tc.max_minutes is None else tc.max_minutes * 60
        try:
            with StopSignals() as signals:
                while self.step < stop_step:
                    if self._over_budget(self.train_seconds(), budget_s):
                        status = "time_budget"
                        break
                    step_start = time.perf_counter()
                    result = self.train_step()
                    result["seconds"] = time.perf_counter() - step_start
                    if not result["applied"]:
                        self.check_skips(result)
                    else:
                        self.window.append(result)
                    progress.update(1)
                    progress.set_postfix(loss=f"{result['loss']:.3f}", lr=f"{result['lr']:.1e}")
                    if main:
                        loss = result["loss"] if math.isfinite(result["loss"]) else None  # heartbeat.json is JSON
                        self.heartbeat.beat("running", self.step, loss=loss)
                    if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                        self._log_train()
                    if tc.eval_interval and self.step % tc.eval_interval == 0 and self.step < tc.max_steps:
                        self._log_eval()
                    if tc.ckpt_interval and self.step % tc.ckpt_interval == 0:
                        self.save()
                    if self._stop_requested(signals):
                        status = "interrupted"
                        break
                if status == "time_budget":
                    self._log_train()  # the run ends here: its last steps' record
                self.save()
        except NonFiniteTrainingError:
            status = "stopped"
            raise
        except BaseException:
            status = "failed"
            raise
        finally:
            progress.close()
            if main:
                self.heartbeat.beat(status, self.step, force=True)
        train_s = self.train_seconds()
        summary: dict[str, Any] = {"status": status, "step": self.step, "elapsed_s": train_s,
                                   "skipped": self.skipped, "out_dir": str(self.out_dir),
                                   "signal": signals.received if status == "interrupted" else None}
        if status == "time_budget" or (status == "finished" and self.step == tc.max_steps):
            summary["eval"] = self._final_eval(train_s / 60, no_step_ran=self.step == first_step)
        return summary

    def _over_budget(self, seconds: float, budget_s: float) -> bool:
        """The training-time budget is spent (rank 0's clock decides for every rank)."""
        flag = torch.tensor(float(self.world.is_main and seconds > budget_s), device=self.world.device)
        return bool(sum_over_ranks(flag, self.world) > 0)

    def _stop_requested(self, signals: StopSignals) -> bool:
        """A signal on any rank stops every rank at the same step."""
        flag = torch.tensor(float(signals.received is not None), device=self.world.device)
        return bool(sum_over_ranks(flag, self.world) > 0)

    def _log_train(self) -> None:
        """The "train" record of the steps applied since the last one (none: no record)."""
        window, self.window = self.window, []
        if not window or not self.world.is_main:
            return
        last = window[-1]
        self.metrics.append({
            "kind": "train", "step": self.step, "loss": sum(r["loss"] for r in window) / len(window),
            "lr": last["lr"], "grad_norm": last["grad_norm"], "seq_len": last["seq_len"],
            "tokens_per_s": sum(r["tokens"] for r in window) / max(sum(r["seconds"] for r in window), 1e-9),
            "elapsed_s": self.train_seconds(),
            **({"teacher_loss": sum(r["teacher_loss"] for r in window) / len(window)} if "teacher_loss" in last
               else {}),
        })

    def _log_eval(self) -> None:
        record = periodic_evaluation(unwrap(self.wrapped), self.config, self.world.device)  # type: ignore[arg-type]
        if self.world.is_main:
            self.metrics.append({"kind": "eval", "step": self.step, **record})

    def _final_eval(self, train_minutes: float, no_step_ran: bool) -> dict[str, Any] | None:
        """The final evaluation (eval.json, an "eval" record). When no step ran in this invocation, an eval.json of
        this very step is the result already (read back, nothing written again)."""
        done = self.out_dir / EVAL_NAME
        if no_step_ran and done.exists():
            saved = json.loads(done.read_text())
            if saved.get("step") == self.step:
                return saved if self.world.is_main else None
        result = final_evaluation(unwrap(self.wrapped), self.config, self.step, self.world.device,  # type: ignore[arg-type]
                                  progress=self.config.train.progress and self.world.is_main)
        if not self.world.is_main:
            return None
        result["train_minutes"] = train_minutes
        self.metrics.append({"kind": "eval", "step": self.step,
                             **{k: result[k] for k in ("by_distance", "val_loss", "bpb", "n") if k in result}})
        atomic_json(self.out_dir / EVAL_NAME, result)
        print(format_table(result))
        return result


@contextlib.contextmanager
def capture_scope_inputs(model: torch.nn.Module, enabled: bool) -> Iterator[list[tuple[ScopeAttention, torch.Tensor]]]:
    """Forward pre-hooks on the model's ScopeAttention layers that record (layer, x) for the teacher loss."""
    captured: list[tuple[ScopeAttention, torch.Tensor]] = []
    handles = []
    if enabled:
        for module in model.modules():
            if isinstance(module, ScopeAttention):
                def record(layer: torch.nn.Module, args: tuple[Any, ...]) -> None:
                    assert isinstance(layer, ScopeAttention)
                    captured.append((layer, args[0]))

                handles.append(module.register_forward_pre_hook(record))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def train(config: RunConfig) -> dict[str, Any]:
    """Run one training (every rank under torchrun); returns the summary (status, step, eval, ...)."""
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        close_world(trainer.world)


def run_and_exit(config: RunConfig) -> int:
    """train() with the exit status the module docstring promises and a one-paragraph message on failure."""
    try:
        summary = train(config)
    except NonFiniteTrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["status"] == "interrupted":
        print(f"interrupted by signal {summary['signal']} at step {summary['step']}: checkpoint written; "
              f"continue with out_dir={summary['out_dir']} resume=true", file=sys.stderr)
        return 128 + int(summary["signal"])
    print(f"done: step {summary['step']}, {summary['elapsed_s']:.1f} s, outputs in {summary['out_dir']}")
    return 0


def main() -> None:
    """Console script ``sal-train`` / ``python -m scripts.train``: hydra parses the command line."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from sal_harness.config import CONF_DIR, plain

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def hydra_main(cfg: DictConfig) -> None:
        try:
            config = validate_run_config(plain(cfg, OmegaConf))
        except HarnessError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        status = run_and_exit(config)
        if status:
            raise SystemExit(status)

    hydra_main()


if __name__ == "__main__":
    main()
