"""The README's main job (issue 12 item 6), with the shipped CPU recipe: dense, NSA and SCOPE retrieve needles
beyond the window baseline's reach, the window baseline does not (chance there), and it retrieves inside one window.

Slow (minutes on 2 cores): `python -m pytest -m long tests/test_harness_main_job.py`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sal_harness import compare
from sal_harness.config import load_run_config


@pytest.mark.slow
def test_main_job(tmp_path: Path) -> None:
    start = time.perf_counter()
    assert compare.main(["--out-dir", str(tmp_path)]) == 0
    print(f"main job: {time.perf_counter() - start:.0f} s")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    reach, chance = report["reach"]["window"], report["chance"]["needle"]

    def accuracies(kind: str, beyond: bool) -> list[float]:
        return [a for d, a in report[kind]["needle"].items() if (int(d) > reach) == beyond]

    # 64 samples per distance: chance (1/32) is ~0.03 +- 0.02, so chance + 0.12 is ~6 standard deviations above it.
    # The recipe's outcomes vary with the seed and the rounding (README "Training and evaluation": NSA 0.19-0.31
    # beyond the reach at the shipped seed, 0.84-0.91 before a change of rounding): the bar is retrieval, one
    # line for all four models, not how much.
    for kind in ("dense", "nsa", "scope"):
        far = accuracies(kind, beyond=True)
        assert len(far) >= 3 and min(far) > chance + 0.12, (kind, far)
    assert max(accuracies("window", beyond=True)) < chance + 0.12
    # Inside one window (16 tokens) the window model reads the needle directly; between one window and the two
    # layers' reach (30) it needs two hops, which 200 steps do not teach (0.08 at distance 24).
    window = load_run_config(["attention=window"]).attention.window_size
    inside = [a for d, a in report["window"]["needle"].items() if int(d) < window]
    assert len(inside) >= 2 and min(inside) > 0.25, inside
