"""Run configuration for scripts/train.py: one TOML file with sections [model], [data], [train].

[model] (with an optional [model.nsa] table) is ``nsa.model.GPTConfig``; [data] is ``DataConfig``;
[train] is ``TrainConfig``. Validation is strict: an unknown section or key, a value of the wrong type
or out of range raises ``NSAConfigError`` naming it (e.g. ``[train] unknown key 'lr_max'``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from nsa import NSAConfigError
from nsa.config import reject_unknown_keys
from nsa.model import GPTConfig
from nsa.validation import check_real, parse_device
from scripts.data import VOCAB_SIZE, RetrievalTask

TASKS = ("retrieval", "text")
SECTIONS = ("model", "data", "train")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """[data]: which task feeds the model and how it is evaluated.

    task: "retrieval" (scripts.data.RetrievalTask) or "text" (byte LM on scripts.data.embedded_text()).
    seq_len: tokens per training sample (<= model.max_seq_len). key_len / value_len / value_vocab /
    min_distance / max_distance / distance_sampling: RetrievalTask parameters (None distance -> the
    whole range that fits).
    eval_distances: needle distances reported by the evaluation. eval_samples: samples per distance
    (text: validation windows). eval_batch_size: batch used while evaluating. seed: seed of the data
    generator (training batches); the evaluation draws from its own generator seeded with eval_seed.
    """

    task: str = "retrieval"
    seq_len: int = 512
    key_len: int = 2
    value_len: int = 2
    value_vocab: int = 16
    min_distance: int | None = None
    max_distance: int | None = None
    distance_sampling: str = "log_uniform"
    eval_distances: tuple[int, ...] = ()
    eval_samples: int = 64
    eval_batch_size: int = 32
    seed: int = 0
    eval_seed: int = 1234
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check_types(self, "data")
        if self.task not in TASKS:
            raise NSAConfigError(f"[data] task must be one of {TASKS}, got {self.task!r}")
        for name in ("seq_len", "key_len", "value_len", "value_vocab", "eval_samples", "eval_batch_size"):
            _check_min(self, "data", name, 1)
        check_real("[data] val_fraction", self.val_fraction, error=NSAConfigError, above=0.0, below=1.0)
        if self.task == "retrieval":
            try:
                task = self.retrieval_task()
                for d in self.eval_distances:
                    task.check_distance(d, "eval_distances entry")
            except ValueError as err:
                raise NSAConfigError(f"[data] {err}") from err

    def retrieval_task(self) -> RetrievalTask:
        return RetrievalTask(
            seq_len=self.seq_len, key_len=self.key_len, value_len=self.value_len, value_vocab=self.value_vocab,
            min_distance=self.min_distance, max_distance=self.max_distance,
            distance_sampling=self.distance_sampling,
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """[train]: optimisation and bookkeeping.

    AdamW(lr, betas=(beta1, beta2), weight_decay on matrices only); the learning rate warms up linearly
    over warmup_steps then follows a cosine to min_lr at max_steps (the config's value: the CLI
    ``--max-steps`` only moves the stopping point, so an interrupted run resumes on the same schedule).
    grad_clip: max global grad norm (0 disables). Intervals are in optimizer steps (0 disables
    periodic eval / checkpoint; the final step always evaluates and checkpoints). Every float must be
    finite. device: a torch device string, parsed here; whether this machine has it is checked where the
    run starts (a checkpoint's config stays loadable on a machine without its training device).
    """

    batch_size: int = 16
    max_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_interval: int = 10
    eval_interval: int = 100
    ckpt_interval: int = 100
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_types(self, "train")
        for name in ("batch_size", "max_steps", "log_interval"):
            _check_min(self, "train", name, 1)
        for name in ("warmup_steps", "eval_interval", "ckpt_interval"):
            _check_min(self, "train", name, 0)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            check_real(f"[train] {name}", getattr(self, name), error=NSAConfigError, at_least=0.0)
        for name in ("beta1", "beta2"):
            check_real(f"[train] {name}", getattr(self, name), error=NSAConfigError, at_least=0.0, below=1.0)
        parse_device("[train] device", self.device, error=NSAConfigError)
        if self.min_lr > self.lr:
            raise NSAConfigError(f"[train] min_lr={self.min_lr} must be <= lr={self.lr}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run: model, data and train sections."""

    model: GPTConfig
    data: DataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise NSAConfigError(
                f"[data] seq_len={self.data.seq_len} exceeds [model] max_seq_len={self.model.max_seq_len}"
            )
        if self.model.vocab_size < VOCAB_SIZE:
            raise NSAConfigError(
                f"[model] vocab_size={self.model.vocab_size} is smaller than the byte vocabulary ({VOCAB_SIZE})"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a parsed TOML document; unknown sections or keys raise NSAConfigError."""
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise NSAConfigError(f"unknown config section(s) {unknown}; valid sections: {list(SECTIONS)}")
        for section in SECTIONS:
            if not isinstance(d.get(section, {}), dict):
                raise NSAConfigError(f"[{section}] must be a table")
        try:
            model = GPTConfig.from_dict(d.get("model", {}))
        except NSAConfigError as err:
            raise NSAConfigError(f"[model] {err}") from err
        return cls(
            model=model,
            data=_section_from_dict(DataConfig, d.get("data", {}), "data"),
            train=_section_from_dict(TrainConfig, d.get("train", {}), "train"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what a checkpoint stores); ``from_dict`` gives the same config back."""
        data = dataclasses.asdict(self.data)
        data["eval_distances"] = list(self.data.eval_distances)
        return {"model": self.model.to_dict(), "data": data, "train": dataclasses.asdict(self.train)}


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run config."""
    with open(path, "rb") as handle:
        try:
            document = tomllib.load(handle)
        except tomllib.TOMLDecodeError as err:
            raise NSAConfigError(f"{path}: not valid TOML: {err}") from err
    return RunConfig.from_dict(document)


def _section_from_dict(cls: Any, values: dict[str, Any], section: str) -> Any:
    reject_unknown_keys(cls, values, f"[{section}]")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def _check_types(obj: Any, section: str) -> None:
    """Check every field against its annotation (int, float, str, X | None, tuple[int, ...])."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if not _matches(value, hints[field.name]):
            raise NSAConfigError(f"[{section}] {field.name} must be {_describe(hints[field.name])}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return "none" if hint is type(None) else f"a {hint.__name__}"


def _check_min(obj: Any, section: str, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    if value < minimum:
        raise NSAConfigError(f"[{section}] {name} must be >= {minimum}, got {value!r}")
