"""The tiny harness config the harness tests share: every group at its smallest, a few steps.

Imported by the tests as ``from harness_tiny import ...`` (tests/ is on sys.path, see conftest.py).
"""

from __future__ import annotations

from pathlib import Path

from sal_harness.config import RunConfig, load_run_config

# 1 layer of width 16 (2 query heads, 1 kv head of 8), 64-token needle samples, NSA blocks of 8, 6 steps.
TINY = [
    "model.n_layer=1", "model.hidden_size=16", "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=8",
    "model.max_seq_len=64", "task.seq_len=64", "task.value_len=1", "attention.num_selected=4",
    "train.batch_size=4", "train.max_steps=6", "train.warmup_steps=2", "train.log_interval=2",
    "train.eval_interval=4", "train.ckpt_interval=2", "train.keep_checkpoints=2", "train.progress=false",
    "train.heartbeat_s=0.01", "eval.distances=[8,40]", "eval.depths=[0.0,0.5]", "eval.samples=4",
    "eval.batch_size=4", "eval.text_samples=4",
]


def tiny_overrides(out_dir: Path, *extra: str, attention: str = "nsa") -> list[str]:
    """TINY for one attention kind (its own group's keys only), writing to out_dir, then ``extra``."""
    kept = [o for o in TINY if attention == "nsa" or not o.startswith("attention.")]
    return [f"attention={attention}", *kept, f"out_dir={out_dir}", *extra]


def tiny_config(out_dir: Path, *extra: str, attention: str = "nsa") -> RunConfig:
    return load_run_config(tiny_overrides(out_dir, *extra, attention=attention))
