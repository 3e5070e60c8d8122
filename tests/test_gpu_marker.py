"""`pytest -m gpu` on a machine without CUDA skips every GPU test with its reason (tests/conftest.py) instead of
failing inside torch: run the GPU files in a subprocess and read the outcome."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU tests run instead")
def test_gpu_tests_skip_with_a_reason_without_cuda() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py",
         "tests/test_nsa_prefill_gpu.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert "needs a CUDA GPU" in result.stdout
