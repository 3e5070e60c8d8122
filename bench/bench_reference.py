"""Time and peak memory of the NSA reference path (forward, and optionally forward+backward).

    python -m bench.bench_reference                     # CPU: T = 8k and 64k, forward, small config
    python -m bench.bench_reference --seq-lens 8192 --backward
    python -m bench.bench_reference --device cuda       # peak CUDA memory instead of RSS

Each length runs in fresh subprocesses so the peak belongs to that length alone. On CPU the time
comes from one run and the peak resident memory (ru_maxrss) from a second run with glibc's mmap
threshold pinned at 1 MiB: otherwise freed chunk tensors stay cached in malloc arenas and the peak
varies 1-6 GiB from run to run at 64k; pinned, every large tensor is returned to the OS on free
and the peak tracks live memory (that run is slower, so it is not timed). On CUDA both come from
one run (torch.cuda.max_memory_allocated). Results: bench/results/reference_<device>.jsonl and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from bench.env_info import RESULTS_DIR, Distinct, device_name, environment, markdown_table, positive_int
from nsa import NSAAttention, NSAConfig

# small heads; the paper's block sizes, NSAConfig's defaults: l=32, d=16, l'=64, n=16, w=512
SMALL_CONFIG = NSAConfig(hidden_size=256, num_heads=4, num_kv_heads=1, head_dim=64, head_dim_v=64)


def measure(seq_len: int, device: str, backward: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    layer = NSAAttention(SMALL_CONFIG).to(device)
    x = torch.randn(1, seq_len, SMALL_CONFIG.hidden_size, device=device, requires_grad=backward)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if backward:
        layer(x).float().square().mean().backward()
    else:
        with torch.inference_mode():
            layer(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    seconds = time.perf_counter() - start
    return {"seq_len": seq_len, "pass": "fwd+bwd" if backward else "fwd", "seconds": round(seconds, 2),
            "peak_mem_gib": round(peak_gb, 3), "config": SMALL_CONFIG.to_dict()}


def run_child(cmd: list[str], extra_env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **extra_env})
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=positive_int, nargs="+", action=Distinct, default=[8192, 65536])
    parser.add_argument("--device", type=device_name, default="cpu")
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    parser.add_argument("--child", type=positive_int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.device, args.backward)))
        return 0
    rows = []
    for seq_len in args.seq_lens:
        cmd = [sys.executable, "-m", "bench.bench_reference", "--child", str(seq_len), "--device", args.device]
        cmd += ["--backward"] if args.backward else []
        row = {**run_child(cmd, {}), **environment(args.device)}
        if not args.device.startswith("cuda"):
            row["peak_mem_gib"] = run_child(cmd, {"MALLOC_MMAP_THRESHOLD_": str(2**20)})["peak_mem_gib"]
        rows.append(row)
        print(f"T={seq_len}: {row['seconds']} s, peak {row['peak_mem_gib']} GiB", flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"reference_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    with open(stem.with_suffix(".jsonl"), "a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    table = markdown_table(rows, ["seq_len", "pass", "seconds", "peak_mem_gib", "device", "torch", "commit"])
    stem.with_suffix(".md").write_text(f"# NSA reference path, {rows[0]['device']}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
