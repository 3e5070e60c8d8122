"""bench.isolated: a sweep's items in child processes, past an item that hangs or kills its process."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from bench.isolated import isolated_rows


def squares(count: int, plan: dict[int, str], skip: int, put: Callable[[dict], None]) -> None:
    """A toy sweep: item i's row holds i * i and the process that made it; ``plan`` makes an item hang, kill its
    process, or end the process on purpose after its row."""
    for index in range(skip, count):
        action = plan.get(index)
        if action == "hang":
            time.sleep(600)
        if action == "crash":
            os._exit(3)
        put({"index": index, "square": index * index, "pid": os.getpid()})
        if action == "stop":
            return


def test_every_item_of_a_healthy_sweep_comes_from_one_process() -> None:
    rows = list(isolated_rows(squares, (4, {}), 4, timeout_s=60))
    assert [row["square"] for row in rows] == [0, 1, 4, 9]
    assert len({row["pid"] for row in rows}) == 1 and rows[0]["pid"] != os.getpid()


def test_a_hanging_item_gets_an_error_row_and_the_sweep_goes_on() -> None:
    started = time.monotonic()
    rows = list(isolated_rows(squares, (4, {1: "hang"}), 4, timeout_s=3))
    assert time.monotonic() - started < 60  # the hanging child was killed, not waited for
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    assert "no result within 3 s" in rows[1]["error"] and "square" not in rows[1]
    assert [rows[i]["square"] for i in (0, 2, 3)] == [0, 4, 9]
    assert rows[0]["pid"] != rows[2]["pid"] == rows[3]["pid"]  # a fresh process after the killed one


def test_an_item_that_kills_its_process_gets_an_error_row() -> None:
    rows = list(isolated_rows(squares, (3, {0: "crash", 2: "crash"}), 3, timeout_s=60))
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert all("exited with code 3" in rows[i]["error"] for i in (0, 2))
    assert rows[1]["square"] == 1


def test_a_process_that_stops_after_a_row_is_followed_by_a_fresh_one() -> None:
    """A target may end its process on purpose (the tile sweep does after an error row): no item is lost or
    marked failed."""
    rows = list(isolated_rows(squares, (3, {0: "stop"}), 3, timeout_s=60))
    assert [row["square"] for row in rows] == [0, 1, 4] and "error" not in str(rows)
    assert rows[0]["pid"] != rows[1]["pid"] == rows[2]["pid"]


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("inf"), float("nan")])
def test_a_timeout_must_be_positive(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s must be positive and finite"):
        next(isolated_rows(squares, (1, {}), 1, timeout_s=timeout_s))
