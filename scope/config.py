"""SCOPE layer configuration: plain data, validated on construction; unknown keys are errors.

The math is ``../shared/spec/SCOPE.md``; the internal API is ``docs/SCOPE_CONTRACT.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsa.config import read_config_table, reject_unknown_keys
from nsa.dispatch import SCOPE_ATTENTION_BACKENDS
from nsa.validation import check_nonnegative_int, check_real
from scope.errors import ScopeConfigError, ScopeInputError

GATE_KINDS = ("none", "softplus", "relu")
REPRESENTATIVES = ("last", "mean")
BIAS_IMPLS = ("score_mod", "qk_aug", "none")
QK_ALIGNS = (16, 32)


@dataclass(frozen=True)
class ScopeConfig:
    """Hyper-parameters of one SCOPE attention layer.

    SCOPE.md symbols: M = num_pointers, K = num_freqs, frequencies w_k log-spaced in
    [2 pi / l_max, 2 pi / min_period] (l_max is the longest period, min_period the shortest, both in
    tokens). D*_m = delta_max * sigmoid(raw) is an absolute offset in tokens (never a fraction of
    the sequence length); ``delta_max_schedule = (start, end, steps)`` makes delta_max linear in the
    training step (see ``delta_max_at``). beta scales the whole bias; c = c_scale * tanh(.) is the
    optional slope (0 switches it off). Ramp ("trough"): - ramp_lambda * act((|D - D*_main| - W) / tau)
    with act from gate_kind ("none" = no ramp), W = ramp_width, tau = ramp_tau; sigma_min is the
    smallest width (in log w) of a pointer's log-normal spectrum. lambda_* weight the regularisers.
    Pointer mask: blocks of ``block`` tokens, ``budget`` extra blocks per query block.
    """

    hidden_size: int = 1024
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 64
    rope_theta: float = 10000.0
    # spectral bias
    num_pointers: int = 4
    num_freqs: int = 16
    l_max: float = 1e6
    min_period: float = 256.0
    delta_max: float = 65536.0
    delta_max_schedule: tuple[float, float, int] | None = None
    per_head_mlp: bool = True
    mlp_hidden: int = 64
    beta: float = 1.0
    c_scale: float = 0.0
    gate_kind: str = "none"
    ramp_lambda: float = 0.0
    ramp_width: float = 512.0
    ramp_tau: float = 64.0
    sigma_min: float = 0.05
    # regulariser lambdas
    lambda_hf: float = 0.0
    lambda_zero_mean: float = 0.0
    lambda_entropy: float = 0.0
    entropy_floor_frac: float = 0.5
    lambda_edge: float = 0.0
    # pointer mask
    block: int = 128
    budget: int = 32
    local_blocks: int = 4
    global_blocks: int = 1
    max_radius: int = 8
    budget_temp: float = 1.0
    gumbel_topk: int | None = None
    representative: str = "last"
    pointer_mask: bool = True
    # bias implementation
    bias_impl: str = "score_mod"
    qk_align: int = 16
    # prefill attention: "flex" (FlexAttention), "triton" (scope.block_sparse_attention: bias_impl qk_aug or
    # none, no documents), "torch" (dense, the CPU training path, short sequences), "auto" (triton where it is
    # the faster one, flex otherwise, torch for CPU gradients; nsa.dispatch.choose_scope_attention_backend
    # logs the reason)
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "mlp_hidden", "block"):
            _require_int(name, getattr(self, name), minimum=1)
        if self.head_dim % 2 != 0:  # as NSAConfig: the layer applies RoPE, which refuses an odd head dim at forward
            raise ScopeConfigError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        _require_int("num_pointers", self.num_pointers, minimum=1, symbol="M")
        _require_int("num_freqs", self.num_freqs, minimum=1, symbol="K")
        _require_int("budget", self.budget, minimum=0)
        _require_int("local_blocks", self.local_blocks, minimum=1)
        _require_int("global_blocks", self.global_blocks, minimum=0)
        _require_int("max_radius", self.max_radius, minimum=0)
        if self.num_heads % self.num_kv_heads != 0:
            raise ScopeConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        # floats: > 0
        for name in ("rope_theta", "min_period", "delta_max", "ramp_tau", "sigma_min", "budget_temp"):
            self._set_float(name, _require_real(name, getattr(self, name), positive=True))
        # floats: >= 0
        for name in ("c_scale", "ramp_lambda", "ramp_width", "lambda_hf", "lambda_zero_mean",
                     "lambda_entropy", "lambda_edge"):
            self._set_float(name, _require_real(name, getattr(self, name), nonnegative=True))
        self._set_float("beta", _require_real("beta", self.beta))
        self._set_float("l_max", _require_real("l_max", self.l_max, positive=True))
        if not self.l_max > self.min_period:
            raise ScopeConfigError(
                f"l_max={self.l_max} (longest period) must be > min_period={self.min_period} (shortest period)"
            )
        frac = _require_real("entropy_floor_frac", self.entropy_floor_frac, nonnegative=True)
        if frac > 1.0:
            raise ScopeConfigError(f"entropy_floor_frac must be in [0, 1], got {frac}")
        self._set_float("entropy_floor_frac", frac)
        if self.delta_max_schedule is not None:
            object.__setattr__(self, "delta_max_schedule", _check_schedule(self.delta_max_schedule))
        if self.gate_kind not in GATE_KINDS:
            raise ScopeConfigError(f"gate_kind={self.gate_kind!r} must be one of {GATE_KINDS}")
        if self.representative not in REPRESENTATIVES:
            raise ScopeConfigError(f"representative={self.representative!r} must be one of {REPRESENTATIVES}")
        if self.bias_impl not in BIAS_IMPLS:
            raise ScopeConfigError(f"bias_impl={self.bias_impl!r} must be one of {BIAS_IMPLS}")
        if self.backend not in SCOPE_ATTENTION_BACKENDS:
            raise ScopeConfigError(f"backend={self.backend!r} must be one of {SCOPE_ATTENTION_BACKENDS}")
        if self.backend == "triton" and self.bias_impl == "score_mod":
            raise ScopeConfigError(
                "backend='triton' runs the bias as qk_aug features (or no bias): set bias_impl='qk_aug' or "
                "'none', or use backend='flex' / 'auto' for score_mod"
            )
        # an int: 16.0 == 16 would pass the membership test and then be refused by scope_attention at forward
        if isinstance(self.qk_align, bool) or not isinstance(self.qk_align, int) or self.qk_align not in QK_ALIGNS:
            raise ScopeConfigError(f"qk_align={self.qk_align!r} must be one of {QK_ALIGNS}")
        for name in ("per_head_mlp", "pointer_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ScopeConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.gumbel_topk is not None:
            _require_int("gumbel_topk", self.gumbel_topk, minimum=1)
            if self.gumbel_topk > self.num_pointers:
                raise ScopeConfigError(
                    f"gumbel_topk={self.gumbel_topk} must be <= num_pointers (M)={self.num_pointers} or None"
                )
        if self.bias_impl == "qk_aug" and self.has_ramp:
            raise ScopeConfigError(
                f"bias_impl='qk_aug' cannot express the ramp (gate_kind={self.gate_kind!r}, "
                f"ramp_lambda={self.ramp_lambda}): a ramp is not a dot product; use bias_impl='score_mod' "
                "or set gate_kind='none' / ramp_lambda=0"
            )

    def _set_float(self, name: str, value: float) -> None:
        object.__setattr__(self, name, value)

    @property
    def has_ramp(self) -> bool:
        """True when the ramp term is active (gate_kind != "none" and ramp_lambda > 0)."""
        return self.gate_kind != "none" and self.ramp_lambda > 0

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def delta_max_at(self, step: int | None = None) -> float:
        """delta_max (tokens) at training step ``step``.

        Without a schedule: ``delta_max`` for every step. With ``delta_max_schedule = (start, end,
        steps)``: ``start + (end - start) * min(step, steps) / steps`` (linear, then held at ``end``);
        ``step=None`` (evaluation, decode) gives the schedule's final value ``end``.
        """
        check_step(step)
        if self.delta_max_schedule is None:
            return self.delta_max
        start, end, steps = self.delta_max_schedule
        if step is None:
            return end
        return start + (end - start) * (min(step, steps) / steps)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScopeConfig:
        """Build from plain data (e.g. a TOML table). Unknown keys raise ScopeConfigError."""
        reject_unknown_keys(cls, values, "ScopeConfig", ScopeConfigError)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_step(step: object, *, optional: bool = True) -> None:
    """ScopeInputError naming step unless it is an int >= 0 (not a bool), or None when optional."""
    if step is None and optional:
        return
    check_nonnegative_int("step", step, error=ScopeInputError)


def load_scope_config(path: str | Path) -> ScopeConfig:
    """Read a ScopeConfig from a TOML file holding the fields at top level or under [scope] (then nothing else:
    nsa.config.read_config_table)."""
    return ScopeConfig.from_dict(read_config_table(path, "scope", ScopeConfigError))


def _require_int(name: str, value: Any, *, minimum: int, symbol: str | None = None) -> None:
    label = f"{name} ({symbol})" if symbol else name
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScopeConfigError(f"{label} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ScopeConfigError(f"{label} must be >= {minimum}, got {value}")


def _require_real(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    """check_real (nsa.validation) with ScopeConfigError: finite, > 0 / >= 0 when asked, and finite in float32
    (still > 0 there when it must be > 0), since the layer computes in float32: a finite float64 such as
    beta=1e300 or rope_theta=1e-300 would otherwise turn every output into NaN."""
    return check_real(name, value, error=ScopeConfigError, above=0.0 if positive else None,
                      at_least=0.0 if nonnegative else None, float32=True)


def _check_schedule(schedule: Any) -> tuple[float, float, int]:
    if not isinstance(schedule, tuple | list) or len(schedule) != 3:
        raise ScopeConfigError(
            f"delta_max_schedule must be None or (start, end, steps), got {schedule!r}"
        )
    start = _require_real("delta_max_schedule start", schedule[0], positive=True)
    end = _require_real("delta_max_schedule end", schedule[1], positive=True)
    _require_int("delta_max_schedule steps", schedule[2], minimum=1)
    return (start, end, int(schedule[2]))
