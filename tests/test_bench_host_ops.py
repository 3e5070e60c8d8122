"""bench/host_ops.py: the host work of one NSA layer's forward + backward on the kernel path, counted on the CPU.

It runs in a fresh process without TRITON_INTERPRET (the kernels must be Triton's JIT functions, whose launches it
replaces by a counter). The launch counts are the layer's structure on eager CUDA: one launch per kernel and
branch, the non-finite guard on its three-launch kernels (NSAAttention hands it strided key / value views, which
made it take its PyTorch form before), RoPE's kernel for q and the keys each way; the 4-layer GPT's step four
times the layer's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_refusal

from bench import host_ops

ROOT = Path(__file__).resolve().parent.parent
# one forward + backward: the range kernels run for the compression and the window; at G = 2 the selection runs
# over the blocks' token lists, its forward (parts, then their combination) and its dk/dv with the dq inside (the
# shares' reduction, delta from its own kernel): no query tiles, no union lists
PREFILL_LAUNCHES = {"_range_fwd_kernel": 2, "_topn_kernel": 1, "_sel_fwd_part_kernel": 1,
                    "_sel_fwd_combine_kernel": 1, "_range_dq_kernel": 2, "_row_delta_kernel": 1,
                    "_range_dkdv_kernel": 2, "_sel_dkdv_kernel": 1, "_sel_dq_reduce_kernel": 1, "_sel_reduce_kernel": 1}
QUERY_TILE_KERNELS = ("_sel_fwd_kernel", "_sel_dq_kernel", "_query_union_kernel")


def test_host_ops_counts_the_layers_launches_on_the_kernel_path() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # batch 2: the counts are the default batch 4's (checked 2026-12-07) in 20 s instead of 33 (the bf16 GPT
    # steps' CPU arithmetic); batch 1 would leave the batched paths untried
    result = subprocess.run([sys.executable, "-m", "bench.host_ops", "--seq-len", "128", "--repeats", "1", "--gpt",
                             "--batch", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["what"]: row for row in map(json.loads, result.stdout.splitlines())}
    module, op = rows["nsa_module"], rows["nsa_prefill_op"]
    assert {name: op["launches"][name] for name in PREFILL_LAUNCHES} == PREFILL_LAUNCHES
    assert not set(QUERY_TILE_KERNELS) & set(op["launches"]), op["launches"]
    assert op["tensor_ops"] == op["fused_op_tensor_ops"] > 0 and op["launching_ops"] > 0
    launches = module["launches"]
    assert {name: launches[name] for name in PREFILL_LAUNCHES} == PREFILL_LAUNCHES
    assert launches["_pair_flags_kernel"] == launches["_guard_rows_kernel"] == 1
    assert launches["_rope_kernel"] == 6  # q, the selection and window keys, the compressed keys; each way
    assert module["tensor_ops"] > module["fused_op_tensor_ops"] > 0 and module["host_ms"] > 0
    # the GPT's four layers are the module's shape: four times its launches; the dense GPT launches RoPE's only
    assert rows["gpt_nsa"]["launches"] == {name: 4 * count for name, count in launches.items()}
    assert rows["gpt_dense"]["launches"] == {"_rope_kernel": 16}


@pytest.mark.parametrize(("flags", "message"), [
    (["--kv-heads", "0"], "--kv-heads: must be >= 1"),  # ZeroDivisionError
    (["--kv-heads", "-1"], "--kv-heads: must be >= 1"),  # passed the divisibility check (4 % -1 == 0)
    (["--heads", "0"], "--heads: must be >= 1"),  # NSAConfigError "hidden_size" traceback
    (["--head-dim", "-8"], "--head-dim: must be >= 1"),
    (["--heads", "3"], "--heads 3 must be a multiple of --kv-heads 2"),
    (["--seq-len", "63"], "--seq-len must be >= 64"),
    (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--results-dir", "{tmp}/afile"], "afile is a file, not a folder"),  # FileExistsError after the first row
    (["--results-dir", ""], "--results-dir: an empty path"),  # appended to ./host_ops_cpu.jsonl
])
def test_bad_arguments_are_refused_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   flags: list[str], message: str) -> None:
    (tmp_path / "afile").write_text("x")
    assert message in cli_refusal(host_ops.main, capsys, [flag.format(tmp=tmp_path) for flag in flags])
