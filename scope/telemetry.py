"""SCOPE telemetry as JSON lines: one RUN_CFG record, then SCOPE_STATS every `every` steps.

SCOPE_STATS fields (SCOPE.md section 4): the pointer fields of ``scope.pointer_mask.pointer_stats``
(kv_unique_blocks, ptr_outside_local_frac, ptr_center_docstart_frac with genuine pointers and
clamped overshoots apart, ptr_center_block0_frac, ptr_radius_hist, budget_configured and the
truthful budget_used, pi entropy, D* histograms in tokens and blocks), each regulariser of
``SpectralBias.regularisers`` (raw and weighted), and the teacher fields when a teacher loss is
given (teacher_coverage, teacher_budget, teacher_target_inclusion). Stats read tensors on the host:
they are computed only on logging steps, never inside the forward.

Every line is strict JSON (json.dumps(..., allow_nan=False)): a non-finite number (a NaN or infinite
regulariser, say) is written as null; the record ``log`` returns keeps the float.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from nsa.validation import check_positive_int
from scope.config import ScopeConfig, check_step
from scope.errors import ScopeInputError
from scope.pointer_mask import pointer_stats
from scope.scope_attention import ScopeAux, representative_rows
from scope.teacher import TeacherLoss


def scope_stats(aux: ScopeAux, config: ScopeConfig, regularisers: dict[str, Tensor] | None = None,
                teacher: TeacherLoss | None = None) -> dict[str, Any]:
    """The SCOPE_STATS fields of one forward (see the module docstring). config must be the config of the layer
    that made aux (ScopeInputError naming the mismatch otherwise: a wrong block would regroup the rows silently)."""
    if not isinstance(aux, ScopeAux) or not isinstance(config, ScopeConfig):
        raise ScopeInputError(f"aux must be a ScopeAux and config a ScopeConfig, got {type(aux).__name__} / "
                              f"{type(config).__name__}")
    if regularisers is not None and not (isinstance(regularisers, dict) and all(
            isinstance(name, str) and isinstance(value, Tensor) and value.numel() == 1
            for name, value in regularisers.items())):
        raise ScopeInputError("regularisers must map names to one-element tensors (SpectralBias.regularisers)")
    if teacher is not None and not isinstance(teacher, TeacherLoss):
        raise ScopeInputError(f"teacher must be a TeacherLoss or None, got {type(teacher).__name__}")
    _check_aux_matches(aux, config)
    num_blocks = aux.block_d_star.shape[2]
    pi_blocks = representative_rows(aux.coeffs.params.pi, num_blocks, config.block, config.representative)
    stats: dict[str, Any] = pointer_stats(
        aux.pointer_mask, aux.block_d_star, pi_blocks, config.block, budget=config.budget,
        local_blocks=config.local_blocks, global_blocks=config.global_blocks, max_radius=config.max_radius,
    ) if config.pointer_mask else {"budget_configured": 0}
    for name, value in (regularisers or {}).items():
        stats[f"reg_{name}"] = float(value.detach())
    if teacher is not None:
        stats["teacher_coverage"] = float(teacher.coverage.detach())
        stats["teacher_budget"] = float(teacher.budget.detach())
        stats["teacher_target_inclusion"] = float(teacher.target_inclusion)
    return stats


def _check_aux_matches(aux: ScopeAux, config: ScopeConfig) -> None:
    """ScopeInputError unless aux's shapes fit config: heads, pointers, T = QB * block, and the mask lists' width
    (local, global and budget blocks; max_radius leaves no trace in the shapes)."""
    _, heads, num_blocks, pointers = aux.block_d_star.shape
    seq_len = aux.coeffs.params.pi.shape[2]
    for name, value, fits in (("num_heads", config.num_heads, heads == config.num_heads),
                              ("num_pointers", config.num_pointers, pointers == config.num_pointers),
                              ("block", config.block, seq_len == num_blocks * config.block)):
        if not fits:
            raise ScopeInputError(
                f"config.{name}={value} does not match aux ({heads} heads, {pointers} pointers, {seq_len} tokens "
                f"in {num_blocks} blocks): pass the config of the layer that made aux"
            )
    # the builders' list width: local + global + budget + M with pointers, the local band without
    width = (config.local_blocks + config.global_blocks + config.budget + config.num_pointers
             if config.pointer_mask else config.local_blocks)
    if aux.pointer_mask.kv_indices.shape[-1] != width:
        raise ScopeInputError(
            f"config's local_blocks + global_blocks + budget{' + num_pointers' if config.pointer_mask else ''} = "
            f"{width} does not match aux's mask lists of width {aux.pointer_mask.kv_indices.shape[-1]}: pass the "
            "config of the layer that made aux"
        )


def _json_line(record: dict[str, Any]) -> str:
    """record as one strict JSON line, its non-finite floats written as null."""
    return json.dumps(_finite_or_null(record), allow_nan=False) + "\n"


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


class ScopeTelemetry:
    """Append-only JSON-lines writer: RUN_CFG on creation, SCOPE_STATS on every `every`-th step.

    every: an int >= 1 (not a bool); steps: ints >= 0. ScopeInputError naming the argument otherwise."""

    def __init__(self, path: str | Path, config: ScopeConfig, every: int = 100) -> None:
        check_positive_int("every", every, error=ScopeInputError)
        self.path, self.config, self.every = Path(path), config, every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"event": "RUN_CFG", "config": config.to_dict()})

    def should_log(self, step: int) -> bool:
        check_step(step, optional=False)
        return step % self.every == 0

    def log(self, step: int, aux: ScopeAux, regularisers: dict[str, Tensor] | None = None,
            teacher: TeacherLoss | None = None) -> dict[str, Any] | None:
        if not self.should_log(step):
            return None
        record = {"event": "SCOPE_STATS", "step": step, **scope_stats(aux, self.config, regularisers, teacher)}
        self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:  # one line per write: nothing lost on a crash
            handle.write(_json_line(record))
