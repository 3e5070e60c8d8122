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
    # 20 prefill kernels per head dim (the top-n's key loads both ways), the warp-specialised compression forward
    # and dk/dv at the power-of-two head dims, 6 decode, 2 row passes and the guard's 2
    assert result.stdout.count("REG:") == 4 * 20 + 3 * 2 + 6 + 4, result.stdout
    # Triton still splits their loops into warpgroups (4 warps launched: one loading, two computing)
    specialised = [line for line in result.stdout.splitlines()
                   if "_cmp_ws" in line and line.startswith(("d= 64", "d=128"))]
    assert len(specialised) == 4 and all("-> 12 in warpgroups" in line for line in specialised), specialised
