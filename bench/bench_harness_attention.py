"""The harness's own attention paths on the 16k comparison's shapes, each beside the computation it replaced.

    python -m bench.bench_harness_attention --device cuda    # H200: the 16k shapes (seconds)
    python -m bench.bench_harness_attention                  # CPU smoke run: tiny shapes

- window: ``sal_harness.model.banded_window_attention`` (SDPA over pairs of window-long chunks) beside SDPA
  with the [T, T] band mask and dense causal SDPA, forward+backward, bf16 on CUDA (8 x 16k tokens, 6 query
  heads on 2 kv heads of 64, w = 512);
- teacher: ``scope.teacher.teacher_block_targets`` (one SDPA over block-indicator values) beside the
  materialised [Tq, T] float32 softmax it replaced, at the curriculum's 32 x 4k tokens (6 heads on 2 kv
  heads of 96, blocks of 128) and at 8 x 16k with the last 4096 query rows.

Parity first, in the same run: banded against the band mask (outputs and gradients, float32, on the first
sequence of the timed batch) and the fused
teacher against the materialised one, at every timed shape. Rows (one JSON object per measurement: part, impl,
shape, ms, peak_gib, the environment) go to bench/results/harness_attention_{device}.jsonl with a markdown table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.bench_scope import median_ms, sync
from bench.env_info import RESULTS_DIR, device_name, environment, markdown_table, results_folder
from sal_harness.model import banded_window_attention
from scope.teacher import outside_local_band, teacher_block_targets

Tensor = torch.Tensor


def band_mask(seq_len: int, window: int, device: str) -> Tensor:
    i = torch.arange(seq_len, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)


def window_impls(window: int, mask: Tensor) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    return {
        "banded": lambda q, k, v: banded_window_attention(q, k, v, window),
        "band_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "dense_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }


def materialised_teacher(q: Tensor, k: Tensor, *, block: int, local_blocks: int, scale: float) -> Tensor:
    """The [Tq, T] float32 softmax summed per key block (the teacher before the fused one), for the last Tq rows."""
    queries, seq_len = q.shape[2], k.shape[2]
    with torch.no_grad():
        keys = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q.float() @ keys.transpose(-1, -2)) * scale
        rows = torch.arange(seq_len - queries, seq_len, device=q.device)[:, None]
        probs = scores.masked_fill(torch.arange(seq_len, device=q.device)[None, :] > rows, float("-inf")).softmax(-1)
        blocks = seq_len // block
        mass = probs.unflatten(3, (blocks, block)).sum(-1).unflatten(2, (queries // block, block)).mean(3)
        mass = mass * outside_local_band(torch.arange(blocks - queries // block, blocks, device=q.device), blocks,
                                         local_blocks)
        total = mass.sum(-1, keepdim=True)
        return torch.where(total > 0, mass / total.clamp_min(1e-30), 0.0)


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """(median ms, peak GiB above what was allocated before) of fn."""
    fn()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ms = median_ms(fn, device)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.startswith("cuda") else float("nan")
    return ms, peak


def window_rows(args: argparse.Namespace, generator: torch.Generator) -> list[dict[str, Any]]:
    batch, seq_len, window = args.window_batch, args.window_len, args.window
    shape = f"{batch}x{seq_len} w={window}"
    mask = band_mask(seq_len, window, args.device)
    impls = window_impls(window, mask)
    inputs = [torch.randn(batch, h, seq_len, args.head_dim, generator=generator).to(args.device) for h in (6, 2, 2)]
    weights = torch.randn(batch, 6, seq_len, args.head_dim, generator=generator).to(args.device)

    def outputs(name: str, dtype: torch.dtype) -> list[Tensor]:
        # One sequence: float32 SDPA with a [T, T] mask takes the math path, whose scores and their gradient at
        # 8 x 16k would need 96 GiB; the per-sequence math is the same for every batch entry.
        leaves = [t[:1].to(dtype).requires_grad_() for t in inputs]
        out = impls[name](*leaves)
        return [out.float(), *(g.float() for g in torch.autograd.grad((out.float() * weights[:1]).sum(), leaves))]

    for got, want, what in zip(outputs("banded", torch.float32), outputs("band_mask", torch.float32),
                               ("o", "dq", "dk", "dv"), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4, msg=f"banded window {what} at {shape}")
    rows = []
    for name, fn in impls.items():
        leaves = [t.to(args.dtype).requires_grad_() for t in inputs]

        def step(fn: Callable[[Tensor, Tensor, Tensor], Tensor] = fn, leaves: list[Tensor] = leaves) -> None:
            fn(*leaves).sum().backward()

        ms, peak = timed(step, args.device)
        rows.append({"part": "window", "impl": name, "shape": shape, "pass": "fwd+bwd", "ms": round(ms, 3),
                     "peak_gib": round(peak, 3)})
    return rows


def teacher_rows(args: argparse.Namespace, generator: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    sizes = {"block": args.block, "local_blocks": 4, "scale": args.teacher_dim**-0.5}
    for batch, seq_len, queries in args.teacher_shapes:
        shape = f"{batch}x{seq_len} last {queries}"
        q = torch.randn(batch, 6, queries, args.teacher_dim, generator=generator).to(args.device, args.dtype)
        k = torch.randn(batch, 2, seq_len, args.teacher_dim, generator=generator).to(args.device, args.dtype)
        impls = {"fused": lambda q=q, k=k: teacher_block_targets(q, k, **sizes),
                 "materialised": lambda q=q, k=k: materialised_teacher(q, k, **sizes)}
        torch.testing.assert_close(impls["fused"](), impls["materialised"](), rtol=1e-4, atol=1e-5,
                                   msg=f"teacher targets at {shape}")
        for name, fn in impls.items():
            ms, peak = timed(fn, args.device)
            rows.append({"part": "teacher", "impl": name, "shape": shape, "pass": "targets", "ms": round(ms, 3),
                         "peak_gib": round(peak, 3)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_name, default="cpu")
    parser.add_argument("--results-dir", type=results_folder, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.window_batch, args.window_len, args.window, args.head_dim = (8, 16384, 512, 64) if cuda else (2, 96, 16, 8)
    args.block, args.teacher_dim = (128, 96) if cuda else (8, 12)
    args.teacher_shapes = [(32, 4096, 4096), (8, 16384, 4096)] if cuda else [(2, 64, 64), (2, 96, 32)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    rows = window_rows(args, generator) + teacher_rows(args, generator)
    env = environment(args.device)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"harness_attention_{device}.jsonl"
    path.write_text("".join(json.dumps({**row, **env}) + "\n" for row in rows))
    table = markdown_table(rows, ["part", "impl", "shape", "pass", "ms", "peak_gib"])
    path.with_suffix(".md").write_text(f"# Harness attention paths ({env['device']}, torch {env['torch']}, "
                                       f"commit {env['commit']})\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
