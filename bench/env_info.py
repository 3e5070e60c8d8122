"""Environment facts every benchmark records beside its numbers (device, versions, commit)."""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import math
import os
import platform
import pstats
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
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


def profile_step(step: Callable[[], object], device: str) -> str:
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


# ----------------------------------------------------------------------------------------------
# command-line checks the benchmarks share: argparse types and actions (argparse names the flag in the error and
# exits with status 2 before any work, so a refused call writes nothing)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A length, batch, head count or repeat count: 0 or fewer would time nothing, or fail deep inside a kernel
    after the results folder was made."""
    return _whole_number(text, 1)


def nonnegative_int(text: str) -> int:
    """A count that may be zero (a budget of extra blocks, global blocks)."""
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, a period, a distance): nan compares false with everything (a nan time budget
    never stops a run) and inf is no setting (leave the flag out for none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def device_name(text: str) -> str:
    """cpu, or cuda / cuda:N on a machine whose torch sees that GPU. The benchmarks take anything not "cuda..." for
    the CPU's settings, and a GPU that is not there fails deep inside torch (an AssertionError from its lazy init)."""
    if text == "cpu":
        return text
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch sees no CUDA device (torch.cuda.is_available() is "
                                         "False)")
    index, count = int(text.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), numbered from 0")
    return text


def _blocked_by_a_file(path: Path) -> Path | None:
    """The nearest existing path at or above ``path`` when it is not a folder (mkdir would fail there)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def results_folder(text: str) -> Path:
    """A folder for results (made when the rows are written): named (Path("") is the current folder, where the
    rows would land unnoticed) and not under an existing file (found only after the timing otherwise)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a folder")
    path = Path(text)
    blocker = _blocked_by_a_file(path)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{blocker} is a file, not a folder")
    return path


def output_file(text: str) -> str:
    """A file to write or append to: named, not a folder, in a folder that exists (checked before the run, not
    after the GPU time is spent)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a file")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: name a file")
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its folder {path.parent} does not exist")
    return text


def file_stem(text: str) -> str:
    """The stem of result files inside --results-dir: a plain name (a path separator would write elsewhere, or
    fail after the timing; an empty one used to fall back to the default name silently)."""
    if not text.strip() or text in (".", "..") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"must be a plain file name (no folder, not empty), got {text!r}")
    return text


class Distinct(argparse.Action):
    """Stores a list option whose entries are each given once: a repeated length, shape or impl would time and
    record the same row twice."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        entries: Sequence[Any] = values
        repeated = list(dict.fromkeys(v for v in entries if entries.count(v) > 1))
        if repeated:
            raise argparse.ArgumentError(self, f"{', '.join(map(str, repeated))} given more than once: name each once")
        setattr(namespace, self.dest, list(entries))
