"""NSA layer configuration: plain data, validated on construction; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsa.dispatch import BACKENDS
from nsa.errors import NSAConfigError
from nsa.validation import check_positive_int, check_real

COMPRESSION_KINDS = ("mlp", "mean")
GATE_KINDS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class NSAConfig:
    """Hyper-parameters of one NSA layer. Defaults are the paper's (section 4.1).

    Paper symbols: l = cmp_block_size, d = cmp_stride, l' = sel_block_size, n = num_selected
    (including the three forced blocks), w = window_size, HQ = num_heads, H_kv = num_kv_heads,
    d_k = head_dim, d_v = head_dim_v. Requires d | l and d | l'. Checked on construction (NSAConfigError
    naming the field): ints positive, float settings (rope_theta, scale) > 0 and finite, also once rounded to
    float32 (nonzero and not inf there: the layer computes them in float32).
    """

    hidden_size: int = 2560
    num_heads: int = 64
    num_kv_heads: int = 4
    head_dim: int = 192
    head_dim_v: int = 128
    cmp_block_size: int = 32
    cmp_stride: int = 16
    sel_block_size: int = 64
    num_selected: int = 16
    window_size: int = 512
    compression: str = "mlp"
    compression_hidden: int | None = None  # hidden width of the phi MLP; None -> 2 * head_dim
    shared_kv: bool = False
    gate: str = "sigmoid"
    rope_theta: float = 10000.0
    scale: float | None = None  # attention scale; None -> 1/sqrt(head_dim)
    query_chunk_size: int | None = None  # reference path chunking; None -> chosen from a memory budget
    # prefill, training and decode: "auto" | "torch" | "triton" (nsa.dispatch; NSA_BACKEND overrides)
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "head_dim_v",
                     "cmp_block_size", "cmp_stride", "sel_block_size", "num_selected", "window_size"):
            check_positive_int(name, getattr(self, name), error=NSAConfigError)
        for name in ("compression_hidden", "query_chunk_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name), error=NSAConfigError)
        if self.num_heads % self.num_kv_heads != 0:
            raise NSAConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise NSAConfigError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.cmp_block_size % self.cmp_stride != 0:
            raise NSAConfigError(
                f"cmp_stride={self.cmp_stride} must divide cmp_block_size={self.cmp_block_size} (d | l)"
            )
        if self.sel_block_size % self.cmp_stride != 0:
            raise NSAConfigError(
                f"cmp_stride={self.cmp_stride} must divide sel_block_size={self.sel_block_size} (d | l')"
            )
        if self.num_selected < 3:
            raise NSAConfigError(
                f"num_selected={self.num_selected} must be >= 3 (it includes the three forced blocks)"
            )
        if self.compression not in COMPRESSION_KINDS:
            raise NSAConfigError(f"compression={self.compression!r} must be one of {COMPRESSION_KINDS}")
        if self.gate not in GATE_KINDS:
            raise NSAConfigError(f"gate={self.gate!r} must be one of {GATE_KINDS}")
        if self.backend not in BACKENDS:
            raise NSAConfigError(f"backend={self.backend!r} must be one of {BACKENDS}")
        if not isinstance(self.shared_kv, bool):
            raise NSAConfigError(f"shared_kv must be a bool, got {self.shared_kv!r}")
        check_real("rope_theta", self.rope_theta, error=NSAConfigError, above=0.0, float32=True)
        if self.scale is not None:
            check_real("scale", self.scale, error=NSAConfigError, above=0.0, float32=True)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attention_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim**-0.5

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NSAConfig:
        """Build from plain data (e.g. a TOML table). Unknown keys raise NSAConfigError."""
        reject_unknown_keys(cls, values, "NSAConfig")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reject_unknown_keys(cls: Any, values: Mapping[str, Any], where: str,
                        error: type[Exception] = NSAConfigError) -> None:
    """Raise `error` naming every key of `values` that is not a field of the dataclass `cls` (configs are
    data validated at load: a misspelt key must never be ignored)."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise error(f"unknown {where} key(s) {unknown}; valid keys: {known}")


def load_nsa_config(path: str | Path) -> NSAConfig:
    """Read an NSAConfig from a TOML file holding the fields at top level or under [nsa] (read_config_table)."""
    return NSAConfig.from_dict(read_config_table(path, "nsa", NSAConfigError))


def read_config_table(path: str | Path, table: str, error: type[Exception]) -> dict[str, Any]:
    """The fields of a TOML config file: at top level, or under [table] and then nothing else (keys beside the
    table would otherwise be ignored without a word); `error` naming the stray keys, or a `table` key that is
    not a table."""
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    if table not in data:
        return data
    fields = data[table]
    if not isinstance(fields, dict):
        raise error(f"{path}: {table} must be a table ([{table}]) of fields, got {type(fields).__name__} {fields!r}")
    stray = sorted(set(data) - {table})
    if stray:
        raise error(f"{path}: top-level key(s) {stray} beside the [{table}] table; put every field in one place")
    return fields
