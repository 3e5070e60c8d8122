"""bench/bench_scope.py on the CPU: the smoke run writes its tables, its correctness check can fail, its
window mask and FLOP count are right; ScopeAttention is one dynamo graph with one flex_attention."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cli_refusal
from test_scope_spectral import ref_bias

from bench import bench_scope
from bench.bench_scope import (
    check_scope,
    scope_attention_step,
    score_elements,
    sliding_window_mask,
    spectral_bias_float32,
    spectral_bias_float64,
)
from scope import ScopeConfig
from scope.block_sparse_attention import block_visibility
from scope.scope_attention import ScopeAttention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SMOKE_ARGS = ["--seq-lens", "512", "--check-len", "512", "--block", "64", "--heads", "2", "--kv-heads", "1",
              "--head-dim", "32"]


def small_layer(**overrides) -> ScopeAttention:
    values: dict[str, Any] = dict(hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32, block=64, budget=2,
                                  local_blocks=2, global_blocks=0, num_pointers=4, num_freqs=8, delta_max=512.0,
                                  min_period=32.0, c_scale=0.2)
    values.update(overrides)
    return bench_scope.make_layer(ScopeConfig(**values), "cpu", torch.float32)


def test_cpu_smoke_run_writes_tables_to_the_results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default CPU run (eager, forward only) at a tiny size; the results dir comes from the environment."""
    monkeypatch.setenv(bench_scope.RESULTS_ENV, str(tmp_path))
    assert bench_scope.main(SMOKE_ARGS) == 0
    records = [json.loads(line) for line in (tmp_path / "scope_cpu.jsonl").read_text().splitlines()]
    assert [r["table"] for r in records] == ["check", "timing", "run"]
    check, timing = records[0], records[1]
    assert check["ok"] and check["out_rel_err"] <= bench_scope.CHECK_FACTOR * check["out_rel_own"]
    assert check["list_rows_differing"] == 0
    for key in ("dense_fwd_ms", "window_fwd_ms", "scope_fwd_ms", "mask_fwd_ms", "module_fwd_ms"):
        assert isinstance(timing[key], float) and timing[key] > 0, key
    assert timing["scope_fb_ms"] == bench_scope.NA  # FlexAttention has no CPU backward
    assert "errors" not in timing
    assert {"device", "torch", "commit"} <= set(timing)
    table = (tmp_path / "scope_cpu.md").read_text()
    assert "## Correctness" in table and "## Attention" in table and "| 512 | 1 | score_mod |" in table


def test_batched_smoke_run_records_its_batch_and_leaves_the_target_to_one_sequence(tmp_path: Path) -> None:
    """--batch 2: the check, the timings and the module run on two sequences and say so; a 128k verdict is read
    from one-sequence rows only."""
    assert bench_scope.main([*SMOKE_ARGS, "--batch", "2", "--results-dir", str(tmp_path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "scope_cpu.jsonl").read_text().splitlines()]
    check, timing = records[0], records[1]
    assert check["ok"] and check["batch"] == 2 and timing["batch"] == 2
    assert isinstance(timing["module_fwd_ms"], float) and "errors" not in timing
    assert "| 512 | 2 | score_mod |" in (tmp_path / "scope_cpu.md").read_text()
    at_target = {"T": bench_scope.TARGET_SEQ_LEN, "bias_impl": "qk_aug", "backend": "triton", "dense/scope_fb": 9.0,
                 "mask_frac_fb": 0.01}
    assert bench_scope.target_lines([{**at_target, "batch": 2}]) == []
    assert bench_scope.target_lines([at_target])[0].endswith(": met")


def test_results_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(bench_scope.RESULTS_ENV, raising=False)
    assert bench_scope.results_dir(None) == bench_scope.RESULTS_DIR
    monkeypatch.setenv(bench_scope.RESULTS_ENV, str(tmp_path / "env"))
    assert bench_scope.results_dir(None) == tmp_path / "env"
    assert bench_scope.results_dir(str(tmp_path / "arg")) == tmp_path / "arg"


@pytest.mark.parametrize("batch", [1, 2])
def test_check_fails_when_the_step_reads_other_blocks_than_it_reports(batch: int) -> None:
    """The correctness check must be able to fail: a step whose reported lists omit each row's first
    listed block (it still reads it) is caught, while the true step passes; on one sequence and on two."""
    layer = small_layer()

    def lying_step(layer: ScopeAttention, q, k, v, qc):
        out, kv_idx, kv_num = scope_attention_step(layer, q, k, v, qc)
        dropped = torch.cat([kv_idx[..., 1:], torch.full_like(kv_idx[..., :1], -1)], dim=-1)
        keep = kv_num > 1  # rows with one block keep it (the diagonal)
        return out, torch.where(keep[..., None], dropped, kv_idx), torch.where(keep, kv_num - 1, kv_num)

    good = check_scope(layer, scope_attention_step, 512, "cpu", torch.float32, backward=False, batch=batch)
    assert good["ok"] and good["batch"] == batch, good
    bad = check_scope(layer, lying_step, 512, "cpu", torch.float32, backward=False, batch=batch)
    assert not bad["ok"] and "max" in bad["failed"]


def test_reference_bias_matches_the_spectral_reference() -> None:
    """The benchmark's float64 (product form) and float32 (score_mod form) biases equal SCOPE.md's bias written out
    in tests/test_scope_spectral.py (``ref_bias``: spectral + slope terms, from the pointer parameters, without the
    shift theorem)."""
    layer = small_layer().double()
    seq_len = 256
    qc = torch.randn(1, 2, seq_len, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        coeffs = layer.spectral.coefficients(qc)
        pos = torch.arange(seq_len)
        want = ref_bias(coeffs.params, layer.spectral.pointer_head.gain, layer.spectral.config,
                        (pos[:, None] - pos[None, :]).double()[None, None])[0]
        b64 = spectral_bias_float64(coeffs.A[0], coeffs.B[0], coeffs.c[0], layer.spectral.freqs, seq_len)
        b32 = spectral_bias_float32(coeffs.A[0], coeffs.B[0], coeffs.c[0], layer.spectral.freqs, seq_len)
    assert coeffs.A.abs().max() > 1e-2  # the bias is on
    torch.testing.assert_close(b64, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b32.double(), want, rtol=0, atol=1e-4)  # fp32 phases up to w_K * T = 50 rad


def test_reference_bias_of_a_batch_is_each_sequence_s_bias() -> None:
    """The reference helpers take coefficients with a leading batch dim: each sequence's bias is its own."""
    layer = small_layer().double()
    seq_len = 128
    qc = torch.randn(2, 2, seq_len, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        coeffs = layer.spectral.coefficients(qc)
    # float64's bias is one matmul, whose [B * H * T] and [H * T] row counts a BLAS may block differently: rounding
    # of ~1e-17 on |bias| <= 0.2 here, while another sequence's coefficients would be off by ~0.1. float32's bias is
    # elementwise, the same operations either way: exact
    tolerances: dict[Callable[..., torch.Tensor], dict[str, Any]] = {
        spectral_bias_float64: {"rtol": 0, "atol": 1e-12}, spectral_bias_float32: {"rtol": 0, "atol": 0}}
    for helper, tolerance in tolerances.items():
        both = helper(coeffs.A, coeffs.B, coeffs.c, layer.spectral.freqs, seq_len)
        for b in range(2):
            alone = helper(coeffs.A[b], coeffs.B[b], coeffs.c[b], layer.spectral.freqs, seq_len)
            torch.testing.assert_close(both[b], alone, **tolerance)


def test_sliding_window_mask_lists_and_mask_mod() -> None:
    seq_len, block, window = 1024, 64, 3
    bm = sliding_window_mask(seq_len, block, window, "cpu")
    assert bm.full_kv_num_blocks is not None and bm.full_kv_indices is not None
    num_blocks = seq_len // block
    lists = torch.cat([bm.kv_indices, bm.full_kv_indices], dim=-1)
    counts = bm.kv_num_blocks + bm.full_kv_num_blocks
    # both lists padded with slots past their counts: rebuild the allowed set from each
    partial = block_visibility(bm.kv_num_blocks, bm.kv_indices, num_blocks)
    full = block_visibility(bm.full_kv_num_blocks, bm.full_kv_indices, num_blocks)
    qb, kb = torch.arange(num_blocks)[:, None], torch.arange(num_blocks)[None, :]
    assert torch.equal(partial[0, 0], qb == kb)
    assert torch.equal(full[0, 0], (kb < qb) & (kb > qb - window))
    assert lists.shape[-1] == 2 * num_blocks and int(counts.max()) == window
    pos = torch.arange(seq_len)
    token = bm.mask_mod(torch.tensor(0), torch.tensor(0), pos[:, None], pos[None, :])
    expect = (pos[:, None] >= pos[None, :]) & (pos[:, None] // block - pos[None, :] // block < window)
    assert torch.equal(token, expect)


def test_score_flop_ratio_of_the_target_window() -> None:
    """The issue's target: 36 blocks of 128 at 128k, about 14x fewer scores than dense causal. By hand:
    query block qb has min(qb + 1, 36) - 1 full tiles, sum over 1024 blocks = (0 + ... + 34) + 989 * 35
    = 35210, plus 1024 half diagonal tiles of 128 * 129 / 2 scores."""
    seq_len, block, window = 131072, 128, 36
    counts = torch.arange(1, seq_len // block + 1).clamp(max=window)
    scores = score_elements(counts, block)
    assert scores == 35210 * 128 * 128 + 1024 * 128 * 129 / 2
    assert 14 < seq_len * (seq_len + 1) / 2 / scores < 15
    # full causal as a block list: exactly the dense causal count
    assert score_elements(torch.arange(1, 9), 16) == 128 * 129 / 2


@pytest.mark.parametrize("training", [False, True])
def test_layer_traces_as_one_graph_with_one_flex_attention(training: bool) -> None:
    """torch.compile(fullgraph=True) of the whole layer: one dynamo graph (a graph break would raise)
    holding exactly one flex_attention; training builds the q side too. Dynamo only (a counting
    backend that runs the graph eagerly), so no kernel is compiled; no_grad because FlexAttention has
    no CPU backward."""
    torch._dynamo.reset()
    layer = small_layer(global_blocks=1).train(training)
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(sum(node.target is torch.ops.higher_order.flex_attention for node in gm.graph.nodes))
        return gm.forward

    x = torch.randn(1, 512, 64)
    with torch.no_grad():
        torch.compile(layer, backend=counting_backend, fullgraph=True, dynamic=False)(x)
    assert graphs == [1]


REFUSED_SCOPE_ARGS = [
    (["--local-blocks", "0"], "--local-blocks: must be >= 1"),  # 0 fell back to the default 2: other math
    (["--heads", "0"], "--heads: must be >= 1"),  # fell back to 4
    (["--check-len", "0"], "--check-len: must be >= 1"),  # fell back to 1024
    (["--seq-lens", "0"], "--seq-lens: must be >= 1"),  # ZeroDivisionError
    (["--budget", "-1"], "--budget: must be >= 0"),  # ScopeConfigError traceback
    (["--max-seconds", "nan"], "--max-seconds: must be a finite number > 0, got nan"),  # never stopped the run
    (["--max-seconds", "-5"], "--max-seconds: must be a finite number > 0"),
    (["--delta-max", "inf"], "--delta-max: must be a finite number > 0, got inf"),
    (["--seq-lens", "500"], "--seq-lens [500] are not multiples of --block 64"),
    (["--check-len", "100"], "--check-len 100 is not a multiple of --block 64"),
    (["--seq-lens", "512", "512"], "--seq-lens: 512 given more than once"),  # timed twice
    (["--bias-impls", "score_mod", "score_mod"], "--bias-impls: score_mod given more than once"),
    (["--module-seq-lens", "1024"], "--module-seq-lens [1024] are not among the timed lengths [512]"),
    (["--backends", "triton"], "--backends triton runs the block-sparse Triton kernels on CUDA tensors"),
    (["--heads", "3", "--kv-heads", "2"], "num_heads=3 must be a multiple of num_kv_heads=2"),
    (["--device", "cuda:99"], "--device: cuda:99"),
    (["--results-dir", ""], "--results-dir: an empty path"),  # wrote to bench/results
    (["--name", "a/b"], "--name: must be a plain file name"),  # FileNotFoundError after the timing
]


@pytest.mark.parametrize(("flags", "message"), REFUSED_SCOPE_ARGS, ids=[" ".join(f) for f, _ in REFUSED_SCOPE_ARGS])
def test_bad_arguments_are_refused_naming_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], flags: list[str],
                                                   message: str) -> None:
    monkeypatch.setenv(bench_scope.RESULTS_ENV, str(tmp_path / "results"))
    assert message in cli_refusal(bench_scope.main, capsys, [*SMOKE_ARGS, *flags])
    assert not (tmp_path / "results").exists()


def test_a_results_folder_from_the_environment_is_checked_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """$SCOPE_BENCH_RESULTS naming a file is refused as --results-dir would be (it failed after the timing)."""
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    monkeypatch.setenv(bench_scope.RESULTS_ENV, str(a_file / "results"))
    assert f"${bench_scope.RESULTS_ENV} (the results folder" in cli_refusal(bench_scope.main, capsys, SMOKE_ARGS)
    assert a_file.read_text() == "x"


def test_score_mod_with_only_the_triton_backend_is_refused() -> None:
    """On CUDA (settings built by hand: no GPU here) score_mod alone with --backends triton times nothing; it used
    to write empty tables."""
    args = bench_scope.build_parser().parse_args(["--bias-impls", "score_mod", "--backends", "triton"])
    args.device = "cuda"
    bench_scope.fill_defaults(args)
    assert "nothing would be timed" in str(bench_scope.refused_settings(args))


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "0"], "--steps: must be >= 1"),  # a division by zero in the kernel table
    (["--top", "-3"], "--top: must be >= 1"),
    (["--out", "{tmp}/no_folder/x.jsonl"], "its folder"),  # found only after the profile
    (["--results-dir", "{tmp}"], "--results-dir set bench_scope's own run"),  # silently ignored
    (["--check-len", "1024"], "--check-len set bench_scope's own run"),
    ([], "pass --device cuda"),
])
def test_profile_scope_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                             message: str) -> None:
    from bench import profile_scope

    assert message in cli_refusal(profile_scope.main, capsys, [flag.format(tmp=tmp_path) for flag in flags])


@pytest.mark.parametrize(("flags", "message"), [
    (["--tiles", "a,b"], "--tiles: 'a,b': each of its comma-separated entries must be a whole number"),  # ValueError
    (["--tiles", "1,2"], "--tiles: '1,2' has 2 entries"),  # Tiles filled the rest from its defaults
    (["--tiles", "128,64,128,64,64,128,8,0"], "must be >= 1"),
    (["--seq-len", "1000"], "--seq-len must be a multiple of the mask block 128"),
    (["--qk-dims", "0"], "--qk-dims: must be >= 1"),
    (["--out", "{tmp}/no_folder/x.jsonl"], "--out: "),
])
def test_block_sparse_bench_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  flags: list[str], message: str) -> None:
    from bench import bench_block_sparse

    assert message in cli_refusal(bench_block_sparse.main, capsys, [flag.format(tmp=tmp_path) for flag in flags])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
def test_block_sparse_bench_needs_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    """It used to fail inside torch (AssertionError: Torch not compiled with CUDA enabled)."""
    from bench import bench_block_sparse

    err = cli_refusal(bench_block_sparse.main, capsys, ["--seq-len", "1024"])
    assert "bench_block_sparse times CUDA kernels" in err


@pytest.mark.parametrize("steps", ["-1", "0"])
def test_pointer_toy_refuses_a_step_count_below_one_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    steps: str) -> None:
    """-1 used to truncate the recorded table and then fail (IndexError); 0 overwrote it with the untrained row."""
    from bench import scope_pointer_toy

    monkeypatch.setattr(scope_pointer_toy, "RESULTS_DIR", tmp_path)
    assert "--steps: must be >= 1" in cli_refusal(scope_pointer_toy.main, capsys, ["--steps", steps])
    assert not list(tmp_path.iterdir())
