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
    # 26 prefill kernels per head dim (the top-n's key loads both ways; the selection's dq inside its dk/dv, with
    # its reduction, its delta and the dk/dv reduction adding across token ranges; its forward over the blocks'
    # lists and their combination), 6 decode, 2 row passes and the guard's 2, the selection's query-tile unions at
    # 2 tile sizes
    assert result.stdout.count("REG:") == 4 * 26 + 6 + 4 + 2, result.stdout


def test_tile_sweep_candidates_compile_for_sm90():
    """Every range and selection tile candidate of bench_prefill's sweep at the public shape compiles (a candidate
    that Triton rejects would cost a device call)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.compile_kernels", "--candidates", "public"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from bench.bench_prefill import tile_variants

    variants = tile_variants("public")
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * (len(variants["cmp_tiles"]) + len(variants["win_tiles"]) + len(variants["sel_tiles"]))
    assert all("REG:" in line for line in lines), result.stdout


def test_loop_spills_counts_local_memory_inside_loops_with_matmuls():
    """bench.compile_kernels.loop_spills on hand-written SASS: a loop with a matmul and its spills (an inner loop's
    counted in the outer one too), a loop without a matmul (not reported), spills outside every loop (not counted)."""
    from bench.compile_kernels import loop_spills

    lines = [
        "        /*0000*/                   STL [R1+0x8], R2 ;",  # before any loop
        ".L_x_0:",
        "        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;",
        "        /*0020*/                   LDL R3, [R1+0x8] ;",
        ".L_x_1:",
        "        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;",
        "        /*0040*/                   STL [R1+0xc], R5 ;",
        "        /*0050*/              @P0 BRA `(.L_x_1) ;",
        "        /*0060*/              @P1 BRA `(.L_x_0) ;",
        ".L_x_2:",
        "        /*0070*/                   LDL R6, [R1+0x10] ;",
        "        /*0080*/              @P2 BRA `(.L_x_2) ;",
        "        /*0090*/                   STL [R1+0x14], R7 ;",
        "        /*00a0*/                   BRA `(.L_x_3) ;",
        ".L_x_3:",
    ]
    assert loop_spills(lines) == [2, 1]
