"""Every NSA prefill and decode kernel compiles for sm_90 (H100 / H200) on this machine, without a GPU.

The interpreter tests (tests/test_nsa_prefill.py) run the kernels' math but not Triton's compiler, which
rejects constructs the interpreter accepts (a global that is not a tl.constexpr, a layout its passes cannot
lower): this test catches those in CI. It runs bench/compile_kernels.py in a fresh process, because the
test session's TRITON_INTERPRET=1 turns every kernel into an interpreted function that cannot be compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_prefill_and_decode_kernels_compile_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.compile_kernels", "--arch", "90", "--head-dims", "64", "128",
                             "192", "256"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # 21 prefill kernels per head dim (the top-n's key loads both ways, the selection dk/dv adding in list order too),
    # 6 decode, 2 row passes and the guard's 2
    assert result.stdout.count("REG:") == 4 * 21 + 6 + 4, result.stdout


def test_tile_sweep_candidates_compile_for_sm90():
    """Every range tile candidate of bench_prefill's sweep at the public shape compiles, with the selection dk/dv
    under each selection candidate (a candidate that Triton rejects would cost a device call)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.compile_kernels", "--candidates", "public"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from bench.bench_prefill import tile_variants

    variants = tile_variants("public")
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * (len(variants["cmp_tiles"]) + len(variants["win_tiles"])) + len(variants["sel_tiles"])
    assert all("REG:" in line for line in lines), result.stdout
