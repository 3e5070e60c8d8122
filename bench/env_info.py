"""Environment facts every benchmark records beside its numbers (device, versions, commit)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """$BENCH_COMMIT when set (the device machine runs a copy of the working tree whose .git may lag
    behind: its own answer would be stale), else git's short HEAD, "-dirty" with uncommitted changes."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def cpu_median_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median wall-clock milliseconds of `repeats` calls of fn after one warm-up call (CPU timing)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def profile_step(step: Callable[[], None], device: str) -> str:
    """Operator table of one call of ``step`` (the 25 largest by self time): where the time goes (launches vs
    kernels, kernels vs elementwise work). On CUDA a second table ranks the same operators by their host time (a
    host-bound step: which calls the GPU waits on)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    averages = prof.key_averages()
    if not device.startswith("cuda"):
        return str(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    return (f"{averages.table(sort_by='self_cuda_time_total', row_limit=25)}\n\nBy host time:\n"
            f"{averages.table(sort_by='cpu_time_total', row_limit=40)}")


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
