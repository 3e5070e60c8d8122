"""The README's main job (issue 12 item 6), with the shipped CPU recipe: dense, NSA and SCOPE retrieve needles
beyond the window baseline's reach, the window baseline does not (chance there), and it retrieves within that reach.

Slow (minutes on 2 cores): `python -m pytest -m slow tests/test_harness_main_job.py`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sal_harness import compare


@pytest.mark.slow
def test_main_job(tmp_path: Path) -> None:
    start = time.perf_counter()
    assert compare.main(["--out-dir", str(tmp_path)]) == 0
    print(f"main job: {time.perf_counter() - start:.0f} s")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    reach, chance = report["reach"]["window"], report["chance"]["needle"]

    def accuracies(kind: str, beyond: bool) -> list[float]:
        return [a for d, a in report[kind]["needle"].items() if (int(d) > reach) == beyond]

    # 64 samples per distance: chance (1/32) is ~0.03 +- 0.02. The recipe was calibrated over seeds 1-3 (README
    # "Training and evaluation": dense and SCOPE 0.68-1.00 beyond the reach after 200 steps, NSA 0.75-0.90 at seeds
    # 2-3 and at chance at seed 1, which the shipped 250 steps take to 0.99), so 0.5 (16x chance) is retrieval with
    # room for another seed's draw.
    for kind in ("dense", "nsa", "scope"):
        far = accuracies(kind, beyond=True)
        assert len(far) >= 3 and min(far) > 0.5, (kind, far)
    assert max(accuracies("window", beyond=True)) < chance + 0.12
    # Within its two layers' reach (30 tokens: one hop inside a 16-token window, two beyond it) the window model
    # retrieves: it is the reach, not the training, that stops it.
    inside = accuracies("window", beyond=False)
    assert len(inside) >= 2 and min(inside) > 0.5, inside
