"""Measurements in a child process that a hanging or crashing candidate cannot take down.

A tile sweep tries launch settings that Triton compiles and the interpreter accepts, but that may deadlock or fault
on the GPU (the warp-specialised candidates of docs/PERF_NOTES.md, twenty-ninth session, hung the whole device call
and faulted the CUDA context). ``isolated_rows`` runs the items of a sweep in a spawned child. When an item yields
no row within the timeout, or the child dies, that item gets an error row, and a fresh child carries on from the
next item.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from typing import Any

# target(*args, skip, put): measures items skip, skip + 1, ... in order and calls put(row) once per item; it may
# return early (e.g. after an error that leaves the CUDA context unusable), and a fresh child takes the next item.
Target = Callable[..., None]


def isolated_rows(target: Target, args: tuple, count: int, timeout_s: float) -> Iterator[dict[str, Any]]:
    """The rows of ``target`` for items 0 .. count - 1, each from a spawned child process (CUDA cannot be forked).
    An item with no row after ``timeout_s`` seconds (the child is killed) or whose child died gets the row
    {"index": i, "error": ...} instead. The timeout covers whatever the child does before the item's row,
    including the set-up of a fresh child."""
    if not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be positive and finite, got {timeout_s}")
    context = multiprocessing.get_context("spawn")
    index = 0
    while index < count:
        # A pipe, not a queue: a row is written before put returns, so a child that dies right after still
        # delivers it (a queue's feeder thread would lose it).
        reader, writer = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=(target, args, index, writer), daemon=True)
        child.start()
        writer.close()  # the child holds the only writer: its end shows as end-of-file here
        received, failure = 0, None
        deadline = time.monotonic() + timeout_s
        while index + received < count and failure is None:
            if reader.poll(0.2):
                try:
                    row = reader.recv()
                except EOFError:  # the child is gone
                    child.join()
                    if child.exitcode == 0 and received:  # stopped on purpose: a fresh child takes the next item
                        break
                    failure = f"the child process exited with code {child.exitcode} before its result"
                    continue
                received += 1
                deadline = time.monotonic() + timeout_s
                yield row
            elif time.monotonic() > deadline:
                failure = f"no result within {timeout_s:g} s: the child was killed"
        if child.is_alive():
            child.kill()
        child.join()
        reader.close()
        index += received
        if failure is not None:
            yield {"index": index, "error": failure}
            index += 1


def _child(target: Target, args: tuple, skip: int, writer: Any) -> None:
    target(*args, skip, writer.send)
