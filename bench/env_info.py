"""Environment facts every benchmark records beside its numbers (device, versions, commit)."""

from __future__ import annotations

import collections
import contextlib
import cProfile
import io
import os
import platform
import pstats
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
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


def host_breakdown(step: Callable[[], None], steps: int = 3) -> str:
    """Where the host time of ``steps`` calls of a host-bound ``step`` goes: each Triton kernel's launches per step
    and the median host microseconds one spends inside Triton's launcher (argument binding, specialisation, the
    descriptors' encoding, the launch itself), then the Python functions ranked by their own time (cProfile). The
    two are taken over separate calls, so the launch times carry no profiler overhead. The torch profiler's tables
    (``profile_step``) attribute this time to operators; this splits it between Triton and the rest."""
    spent: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
    with _timed_triton_launches(spent):
        for _ in range(steps):
            step()
    lines = ["Triton launches per step (host microseconds in the launcher, median):"]
    for name, times in sorted(spent.items(), key=lambda item: -sum(item[1])):
        lines.append(f"  {name:32s} {len(times) / steps:6.1f} x {statistics.median(times) * 1e6:8.1f} us")
    total = sum(sum(times) for times in spent.values()) / steps * 1e3
    lines.append(f"  all: {sum(map(len, spent.values())) / steps:.1f} launches, {total:.3f} ms per step"
                 if spent else "  none (this step launches no Triton kernel)")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    table = io.StringIO()
    pstats.Stats(profiler, stream=table).sort_stats("tottime").print_stats(40)
    return "\n".join(lines) + f"\n\nPython functions by own time over {steps} steps (cProfile):\n{table.getvalue()}"


@contextlib.contextmanager
def _timed_triton_launches(spent: dict[str, list[float]]) -> Iterator[None]:
    """Times each Triton launch into spent[kernel name], compiled (JITFunction) or interpreted alike."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: nothing launches
        yield
        return
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def timed(original: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                spent[self.fn.__name__].append(time.perf_counter() - started)
        return run

    try:
        for cls, original in originals.items():
            cls.run = timed(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.run = original


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
