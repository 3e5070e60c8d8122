"""Run configuration: hydra-core composes it, pydantic validates it.

Config groups (YAML under the checkout's top-level ``configs/``, installed as ``sal_harness/conf``): ``model``
(the decoder's size), ``attention`` (dense, window, nsa, scope), ``task`` (needle, mqar, passkey, text), ``train``
(optimisation and bookkeeping), ``eval`` (what is measured), and ``experiment`` (presets that set
several groups at once, e.g. ``experiment=cuda_16k``). The primary config is ``train.yaml``::

    python -m scripts.train attention=window task=passkey train.lr=1e-3      # key=value overrides
    python -m scripts.train --multirun attention=dense,nsa train.seed=0,1    # sweeps

Hydra rejects an override of a key that does not exist (its configs are in struct mode); pydantic
(``RunConfig``) then checks every value: unknown keys (``+train.bogus=1``), wrong types, non-finite
or out-of-range numbers and inconsistent combinations raise ``HarnessConfigError`` naming each key
(``train.lr: Input should be greater than 0 (got -1.0)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from sal_harness.data import RetrievalTask, TaskConfig, build_task
from sal_harness.distributed import check_device_present
from sal_harness.errors import HarnessConfigError
from sal_harness.model import AttentionConfig, GPTConfig, ModelConfig, ScopeAttentionConfig
from sal_harness.schema import StrictModel


def config_dir() -> Path:
    """The config groups: ``sal_harness/conf`` where a wheel installed them (pyproject.toml maps the checkout's
    ``configs/`` there, keeping a generic top-level name out of site-packages), else the checkout's ``configs/``."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if installed.is_dir() else package.parent / "configs"


CONF_DIR = config_dir()
MAX_SEED = 2**64 - 1  # torch's generators take seeds in [0, 2^64)


class TrainConfig(StrictModel):
    """The ``train`` group.

    max_minutes: a training-time budget (None: none) over every invocation of the run (a checkpoint carries the
    time spent): the run stops there, checkpoints and evaluates as if it had reached max_steps (the schedule still
    follows max_steps). batch_size: samples per optimizer step,
    over all processes and accumulation micro-steps
    (batch_size % (grad_accum x world size) must be 0). AdamW(lr, (beta1, beta2), weight_decay on matrices
    only); the learning rate warms up linearly over warmup_steps, then follows a cosine to min_lr at max_steps.
    grad_clip: max global gradient norm (0: off). precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere),
    "fp32" or "bf16". compile: torch.compile the model. distributed: "ddp" or "fsdp" (FSDP2 fully_shard) when
    launched by torchrun with more than one process. Intervals are in optimizer steps (0: only at the end).
    keep_checkpoints: how many checkpoints stay in the run folder. nonfinite: on a NaN / inf loss or gradient
    "skip" the update (and stop after max_consecutive_skips in a row) or "stop" at once. Length curriculum:
    the training length grows from curriculum_start tokens to task.seq_len over curriculum_steps steps, linearly or
    geometrically (curriculum_shape; geometric spends as many steps on each doubling, so most of them at the short,
    cheap lengths where retrieval is learnt first), rounded up to a multiple of curriculum_multiple (None: off);
    curriculum_batch "tokens" keeps the tokens per step: batch_size x (task.seq_len // length) sequences at a
    shorter length (more scored answers per step for the same work), "fixed" batch_size sequences at every length.
    threads: torch CPU threads (None: torch's choice). heartbeat_s: seconds between heartbeat.json updates.
    scope_teacher_weight: weight of SCOPE's teacher loss (scope.teacher.layer_teacher_loss, the signal that moves
    the pointers: the mask itself has no gradient), averaged over the SCOPE layers, on the last scope_teacher_len
    query rows of each layer's input against their whole prefix (its dense teacher is O(len x T)); 0: off.
    """

    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(300, ge=1)
    max_minutes: float | None = Field(None, gt=0.0)
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    min_lr: float = Field(3e-4, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    data_seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = "cpu"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"
    log_interval: int = Field(10, ge=1)
    eval_interval: int = Field(100, ge=0)
    ckpt_interval: int = Field(100, ge=0)
    keep_checkpoints: int = Field(3, ge=1)
    nonfinite: Literal["skip", "stop"] = "skip"
    max_consecutive_skips: int = Field(10, ge=0)
    curriculum_start: int | None = Field(None, ge=1)
    curriculum_steps: int = Field(0, ge=0)
    curriculum_multiple: int = Field(16, ge=1)
    curriculum_shape: Literal["linear", "geometric"] = "linear"
    curriculum_batch: Literal["fixed", "tokens"] = "fixed"
    threads: int | None = Field(None, ge=1)
    heartbeat_s: float = Field(30.0, gt=0.0)
    scope_teacher_weight: float = Field(1.0, ge=0.0)
    scope_teacher_len: int = Field(2048, ge=1)
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= lr={self.lr}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= max_steps={self.max_steps} (the learning "
                             "rate would never reach lr)")
        if self.lr * self.weight_decay >= 1.0:  # AdamW scales every weight by 1 - lr * weight_decay per step
            raise ValueError(f"lr x weight_decay = {self.lr * self.weight_decay:g} must be < 1 (AdamW multiplies "
                             "the weights by 1 - lr x weight_decay each step)")
        if (self.curriculum_start is None) != (self.curriculum_steps == 0):
            raise ValueError(f"curriculum_start={self.curriculum_start} and curriculum_steps={self.curriculum_steps} "
                             "must be set together (both for a length curriculum, neither without one)")
        if self.curriculum_steps > self.max_steps:
            raise ValueError(f"curriculum_steps={self.curriculum_steps} must be <= max_steps={self.max_steps} (the "
                             "run would end before reaching task.seq_len, where it is evaluated)")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        """check_device_kind (whether this machine has it is checked when the run starts:
        sal_harness.distributed.init_world)."""
        check_device_kind(device)
        return device


def check_device_kind(device: str) -> torch.device:
    """The torch device of a string of type cpu or cuda[:index] (the only devices the harness runs on; a cpu index
    would be recorded as plain cpu); ValueError otherwise."""
    try:
        place = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{device!r} is not a torch device ({str(err).split(':')[-1].strip()})") from None
    if place.type not in ("cpu", "cuda") or (place.type == "cpu" and place.index is not None):
        raise ValueError(f"{device!r}: the harness runs on cpu or cuda[:index]")
    return place


def usable_device(device: str, name: str) -> torch.device:
    """check_device_kind, then that this machine has that device (distributed.check_device_present); a problem is a
    HarnessError naming the argument ``name``."""
    try:
        place = check_device_kind(device)
    except ValueError as err:
        raise HarnessConfigError(f"{name}: {err}") from None
    check_device_present(place, name)
    return place


class EvalConfig(StrictModel):
    """The ``eval`` group. distances: needle distances reported (each at depths drawn uniformly from what fits;
    a distance that does not fit the task is an error; empty: num_distances log-spaced ones that fit);
    depths: the depth axis of the final distance x depth grid; samples: samples per cell; text_samples:
    held-out text windows for the bits per byte (0: none); seed: the evaluation's own generator seed."""

    distances: list[int] = Field(default_factory=list)
    num_distances: int = Field(6, ge=1)
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    samples: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    text_samples: int = Field(32, ge=0)
    seed: int = Field(1234, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.depths:
            raise ValueError("depths must hold at least one depth (the final grid's depth axis)")
        for name, values in (("distances", self.distances), ("depths", self.depths)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name}={values} repeats an entry")
        for depth in self.depths:
            if not 0.0 <= depth < 1.0:
                raise ValueError(f"depths entry {depth} must be in [0, 1)")
        return self


# What decides what a run learns, beyond its attention and task. A SCOPE text rerun that differed from the
# recorded one in train.curriculum_batch alone read 1.787 bits per byte against 1.316
# (bench/results/retrieval_calibration_cuda.md, entry 16); the CPU main job's models stayed at chance or learnt
# by init std alone (README "Training and evaluation"): results rows carry these (RunConfig.recipe).
RECIPE_KEYS = ("model.n_layer", "model.hidden_size", "model.init_std", "task.corpus", "task.seq_len",
               "train.batch_size", "train.grad_accum", "train.max_steps", "train.max_minutes", "train.lr",
               "train.min_lr", "train.warmup_steps", "train.curriculum_start", "train.curriculum_steps",
               "train.curriculum_shape", "train.curriculum_batch")
# Settings that only change SCOPE's training: in a SCOPE run's recipe, not in the others' (a dense row would
# otherwise carry a teacher weight it never used, and the two would read as trained differently).
SCOPE_RECIPE_KEYS = ("train.scope_teacher_weight", "train.scope_teacher_len")


class RunConfig(StrictModel):
    """One training run: the groups plus where it writes (out_dir), whether it continues the run folder's last
    checkpoint (resume) and where this invocation stops (stop_step; the schedule follows train.max_steps)."""

    model: ModelConfig
    attention: AttentionConfig
    task: TaskConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    out_dir: str
    resume: bool = False
    stop_step: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        GPTConfig(model=self.model, attention=self.attention)  # NSA's / SCOPE's own rules
        if self.task.seq_len > self.model.max_seq_len:
            raise ValueError(f"task.seq_len={self.task.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.task.vocab_needed > self.model.vocab_size:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than the {self.task.vocab_needed} "
                             f"ids task {self.task.name!r} emits")
        task = build_task(self.task)
        if isinstance(task, RetrievalTask):
            for distance in self.eval.distances:
                try:
                    task.check_distance(distance, "eval.distances entry")
                except ValueError as err:
                    raise ValueError(f"{err}; set eval.distances to distances that fit, or [] for "
                                     f"eval.num_distances log-spaced ones") from None
        start = self.train.curriculum_start
        if start is not None and start > self.task.seq_len:
            raise ValueError(f"train.curriculum_start={start} exceeds task.seq_len={self.task.seq_len}")
        if isinstance(self.attention, ScopeAttentionConfig):
            shortest = self.task.seq_len if start is None else min(start, self.task.seq_len)
            if shortest < self.attention.block:
                raise ValueError(f"training sequences of {shortest} tokens (task.seq_len / train.curriculum_start) are "
                                 f"shorter than one SCOPE block (attention.block={self.attention.block})")
        return self

    @property
    def gpt(self) -> GPTConfig:
        return GPTConfig(model=self.model, attention=self.attention)

    def recipe(self) -> str:
        """RECIPE_KEYS (and SCOPE_RECIPE_KEYS for a SCOPE run) as space-separated 'key=value' overrides: with its
        experiment, attention and task they rerun this run like for like, and two runs' results compare only where
        the settings both recipes name agree."""
        values = self.model_dump(mode="json")
        keys = RECIPE_KEYS + (SCOPE_RECIPE_KEYS if self.attention.kind == "scope" else ())
        settings = {key: values[group][name] for key in keys for group, name in [key.split(".")]}
        return " ".join(f"{key}={'null' if value is None else value}" for key, value in settings.items())


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem: the dotted key, pydantic's message and the value given."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "config"
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        shown = "" if isinstance(given, dict) or problem["type"] == "missing" else f" (got {given!r})"
        lines.append(f"{key}: {message}{shown}")
    return "\n".join(lines)


def differing_keys(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: ours -> theirs' for every dotted key of two configs' data whose values differ."""
    found = []
    for key in sorted(set(ours) | set(theirs)):
        mine, other = ours.get(key), theirs.get(key)
        if isinstance(mine, dict) and isinstance(other, dict):
            found += differing_keys(mine, other, f"{prefix}{key}.")
        elif mine != other:
            found.append(f"{prefix}{key}: {mine!r} -> {other!r}")
    return found


def validate_run_config(values: dict[str, Any]) -> RunConfig:
    """RunConfig from plain data; every problem becomes one line of a HarnessConfigError naming its key."""
    try:
        return RunConfig.model_validate(values)
    except ValidationError as err:
        raise HarnessConfigError("invalid run config:\n" + describe_validation_error(err)) from None


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> dict[str, Any]:
    """The composed config (hydra defaults + overrides) as plain, resolved data, without hydra's own section."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="sal_harness"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        return plain(cfg, OmegaConf)
    except (HydraException, OmegaConfBaseException) as err:
        raise HarnessConfigError(f"cannot compose the config with overrides {list(overrides)}: {err}") from None


def plain(cfg: Any, omegaconf: Any) -> dict[str, Any]:
    """A hydra DictConfig as resolved plain data, hydra's own section dropped."""
    values = omegaconf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    values.pop("hydra", None)
    return values


def load_run_config(overrides: Sequence[str] = ()) -> RunConfig:
    """compose + validate: what ``python -m scripts.train <overrides>`` runs."""
    return validate_run_config(compose(overrides))
