"""bench/bench_prefill.py's tile sweep (the ``tiles`` part), on the CPU through Triton's interpreter at a tiny
shape and small blocks: each candidate is checked against the default tiles' forward and backward before it
is timed, only the kernels its field governs are timed, and a candidate that changes the result is refused."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import pytest
import torch
from conftest import cli_refusal

from bench import bench_prefill
from nsa.kernels.range_attention import RangeTiles
from nsa.kernels.selected import SelectedTiles
from nsa.kernels.topn import TopnTiles
from sal_harness.model import GPT

TINY = bench_prefill.Shape(heads=4, kv_heads=2, dk=16, dv=16)
SMALL_BLOCKS: dict[str, Any] = {"block_size": 8, "block_stride": 4, "sel_block_size": 8, "num_selected": 3,
                                "window_size": 8}
INTERPRETER_RANGE = RangeTiles(16, 16, 16, 16, 16, 16, 4, 1, 1, 2, dkv_num_stages=1)  # nsa.prefill's CPU tiles
INTERPRETER_SELECTED = SelectedTiles(num_warps=4, num_stages=1, dq_num_stages=1, dkv_rows=16, chunk=8,
                                     dkv_num_warps=4, dkv_num_stages=1, short_chunk=4, short_tokens=64,
                                     short_rows=32, short_tile_num_stages=1, short_query_rows=256)


@pytest.fixture(autouse=True)
def small_and_untimed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks, and each timing a single call (the interpreter is slow; the times are not under test)."""
    monkeypatch.setattr(bench_prefill, "BLOCKS", SMALL_BLOCKS)
    monkeypatch.setattr(bench_prefill, "timed", lambda fn, device, **budgets: (fn(), 1.0)[1])


def test_tile_sweep_times_the_kernels_of_each_candidate() -> None:
    """Each candidate checked, then its field's kernels timed: the selection's dq, or where its dq comes with the
    dk/dv (SelectedTiles.dq_in_dkdv: its shares, or the dS it stores) its delta."""
    selected = INTERPRETER_SELECTED._replace(dkv_rows=32, short_chunk=2, tma=False, fused_dq_max_group=0)
    variants: dict[str, list[Any]] = {
        "cmp_tiles": [INTERPRETER_RANGE._replace(dkv_n=32, max_splits=3)],
        "win_tiles": [INTERPRETER_RANGE._replace(tma=True)],
        "sel_tiles": [selected, selected._replace(fused_dq_max_group=64),
                      selected._replace(ds_dq=True)]}
    rows = bench_prefill.tile_rows(TINY, 28, "cpu", torch.float32, variants)
    assert [row["field"] for row in rows] == ["cmp_tiles", "win_tiles", "sel_tiles", "sel_tiles", "sel_tiles"]
    for row in rows:
        assert "error" not in row, row
        assert row["indices_equal"] and row["max_rel_err"] < 1e-5
        timed = {key for key in row if key in bench_prefill.KERNEL_NAMES}
        in_dkdv = "fused_dq_max_group=64," in row["tiles"] or "ds_dq=True," in row["tiles"]
        not_run = {"sel_tiles": "dq_sel" if in_dkdv else "delta_sel"}.get(row["field"])
        assert timed == set(bench_prefill.TILE_KERNELS[row["field"]]) - {not_run}


def test_tile_sweep_refuses_a_candidate_whose_result_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate that changes the math (here: a run whose softmax scale is off) is reported, never timed."""
    make = bench_prefill.prefill_run
    runs: list[Any] = []

    def scale_off_after_the_reference(*args: Any) -> Any:
        run = make(*args)
        runs.append(run)
        if len(runs) > 1:
            run.scale *= 1.5
        return run

    monkeypatch.setattr(bench_prefill, "prefill_run", scale_off_after_the_reference)
    (row,) = bench_prefill.tile_rows(TINY, 24, "cpu", torch.float32, {"cmp_tiles": [INTERPRETER_RANGE]})
    assert row["error"] == "differs from the default tiles' result"
    assert not set(row) & set(bench_prefill.KERNEL_NAMES)


def test_tile_agreement_compares_the_rows_whose_selection_agrees() -> None:
    """One (token, kv head) row picks another block: its query heads' out / dq / dgates and the selection's dk / dv
    leave the comparison, everything else is still compared, and the mismatch is that row's share."""
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, kv_heads, group, dim, n = 1, 8, 2, 3, 4, 2

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    per_query = rand(batch, seq_len, kv_heads * group, dim)
    reference = [per_query, torch.arange(n).expand(batch, seq_len, kv_heads, n).contiguous(), rand(*per_query.shape),
                 *(rand(batch, 3, kv_heads, dim) for _ in range(2)), *(rand(batch, seq_len, kv_heads, dim)
                                                                        for _ in range(4)),
                 rand(batch, seq_len, kv_heads * group, 3)]
    got = [t.clone() for t in reference]
    got[1][0, 5, 1] = torch.tensor([0, 7])  # token 5, kv head 1: query heads 3..5
    for i in bench_prefill.PER_QUERY_OUTPUTS:
        got[i][0, 5, 3:6] += 100.0
    for i in bench_prefill.SELECTED_KV_GRADS:
        got[i] += 100.0
    agreement = bench_prefill.tile_agreement(got, reference, group)
    assert agreement == {"indices_equal": False, "selection_mismatch": round(1 / 16, 6), "max_rel_err": 0.0}
    got[3][0, 0, 0, 0] += 1.0  # a compression gradient: compared whole
    assert bench_prefill.tile_agreement(got, reference, group)["max_rel_err"] > 0.0
    got[1][0, 5, 1] = torch.tensor([1, 0])  # the same set in another order: agrees, but not bitwise
    got[3] = reference[3]
    assert bench_prefill.tile_agreement(got, reference, group)["selection_mismatch"] == 0.0
    assert bench_prefill.tile_agreement(got, reference, group)["max_rel_err"] > 1.0  # every row compared again


@pytest.mark.parametrize(("field", "mismatch", "accepted"),
                         [("cmp_tiles", bench_prefill.SELECTION_MISMATCH / 2, True),
                          ("topn_tiles", bench_prefill.SELECTION_MISMATCH / 2, False), ("topn_tiles", 0.0, False)])
def test_tile_sweep_lets_only_range_candidates_flip_near_ties(monkeypatch: pytest.MonkeyPatch, field: str,
                                                              mismatch: float, accepted: bool) -> None:
    """A selection differing in a few rows (under SELECTION_MISMATCH) is the range kernels' rounding reaching the
    top-n through the lse; a top-n candidate must select bitwise as the defaults do (the same sets in another
    order, mismatch 0, are refused too)."""
    agreement = {"indices_equal": False, "selection_mismatch": mismatch, "max_rel_err": 0.0}
    monkeypatch.setattr(bench_prefill, "tile_agreement", lambda got, reference, group: agreement)
    # nsa.prefill's CPU tiles, the top-n's on pointer loads
    tiles = INTERPRETER_RANGE if field == "cmp_tiles" else TopnTiles(32, 4, 1, tma=False)
    (row,) = bench_prefill.tile_rows(TINY, 24, "cpu", torch.float32, {field: [tiles]})
    assert ("error" not in row) is accepted, row


def test_tile_sweep_resumes_at_a_candidate_and_stops_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fresh child process of an isolated sweep does: start at candidate ``skip`` (the reference still
    computed), and with stop_on_error end after the first error row (a CUDA fault poisons the process)."""
    make = bench_prefill.prefill_run
    runs: list[Any] = []

    def scale_off_in_the_second_candidate(*args: Any) -> Any:
        run = make(*args)
        runs.append(run)
        if len(runs) == 3:  # the reference, the first measured candidate, then this one
            run.scale *= 1.5
        return run

    monkeypatch.setattr(bench_prefill, "prefill_run", scale_off_in_the_second_candidate)
    variants = {"cmp_tiles": [INTERPRETER_RANGE, INTERPRETER_RANGE._replace(dkv_n=32)],
                "win_tiles": [INTERPRETER_RANGE, INTERPRETER_RANGE._replace(tma=True)]}
    rows = bench_prefill.tile_rows(TINY, 24, "cpu", torch.float32, variants, skip=1, stop_on_error=True)
    assert [(row["field"], row["tiles"]) for row in rows] == [("cmp_tiles", repr(variants["cmp_tiles"][1])),
                                                             ("win_tiles", repr(variants["win_tiles"][0]))]
    assert "error" not in rows[0] and rows[1]["error"] == "differs from the default tiles' result"


def test_isolated_tile_sweep_reports_a_lost_candidate_as_its_tile_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate whose child process hung or died comes back as an error row naming its field and tiles."""
    import bench.isolated

    variants = {"cmp_tiles": [INTERPRETER_RANGE], "win_tiles": [INTERPRETER_RANGE._replace(tma=True)]}
    measured = {**bench_prefill.tile_row(TINY, 24, "cmp_tiles", INTERPRETER_RANGE, 0.5), "fwd_cmp": 1.0}

    def fake_isolated_rows(target: Any, args: tuple, count: int, timeout_s: float) -> Any:
        assert target is bench_prefill.tile_rows_in_child and count == 2 and timeout_s == 9.0
        yield measured
        yield {"index": 1, "error": "no result within 9 s: the child was killed"}

    monkeypatch.setattr(bench.isolated, "isolated_rows", fake_isolated_rows)
    monkeypatch.setitem(bench_prefill.SHAPES, "tiny", TINY)
    rows: list[dict[str, Any]] = []
    bench_prefill.isolated_tile_rows("tiny", 24, "cpu", torch.float32, variants, 0.5, 9.0, on_row=rows.append)
    assert rows[0] == measured
    assert rows[1] == {**bench_prefill.tile_row(TINY, 24, "win_tiles", variants["win_tiles"][0], 0.5),
                       "error": "no result within 9 s: the child was killed"}


def test_markdown_states_each_target_from_the_rows(tmp_path: Any) -> None:
    """The targets table of prefill_cuda.md: ratios from the rows, met / missed / not measured, the GPT (eager, and
    compiled where measured) and per-head targets and the 512k fit; every tile-sweep row is listed in run order."""
    rows = [
        {"impl": "nsa", "shape": "public", "T": 65536, "fwd_ms": 20.0, "fwdbwd_ms": 64.0, "peak_gib": 10.0},
        {"impl": "dense", "shape": "public", "T": 65536, "fwd_ms": 100.0, "fwdbwd_ms": 400.0, "peak_gib": 8.0},
        {"impl": "nsa", "shape": "g4", "T": 65536, "fwdbwd_ms": 32.0},  # 2 ms per head against 1 ms: missed
        {"impl": "nsa", "shape": "g12", "T": 65536, "fwdbwd_ms": 60.0},  # 1.25 ms per head: met
        {"impl": "gpt_nsa", "shape": "gpt", "T": 16384, "tokens_per_s": 600},
        {"impl": "gpt_dense", "shape": "gpt", "T": 16384, "tokens_per_s": 1000},
        {"impl": "gpt_nsa", "shape": "gpt_compiled", "T": 16384, "tokens_per_s": 400},
        {"impl": "gpt_dense", "shape": "gpt_compiled", "T": 16384, "tokens_per_s": 1000},
        {"impl": "nsa", "shape": "public", "T": 524288, "error": "out of memory", "gpu": "NVIDIA H200"},
        {"impl": "tiles", "shape": "public", "T": 65536, "tiles": "A", "dq_cmp": 2.0},
        {"impl": "tiles", "shape": "public", "T": 65536, "tiles": "B", "dq_cmp": 1.0},
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    markdown = tmp_path / "rows.md"
    bench_prefill.write_markdown(markdown, jsonl)
    lines = markdown.read_text().splitlines()

    def status(target: str) -> list[str]:
        (line,) = [line for line in lines if line.startswith(f"| {target} |")]
        return [cell.strip() for cell in line.split("|")[2:5]]

    assert status("64k forward+backward vs dense") == ["0.2", "0.16", "met"]
    assert status("64k forward vs dense") == ["0.2", "0.2", "met"]
    assert status("64k forward vs fla") == ["0.4", "", "not measured"]
    assert status("g4 time per head vs G=16 at 64k") == ["1.3", "2.0", "missed (1.54x the bound)"]
    assert status("g12 time per head vs G=16 at 64k") == ["1.3", "1.25", "met"]
    assert status("GPT tokens/s at 16k vs dense (at least)") == ["0.5", "0.6", "met"]
    assert status("GPT tokens/s at 64k vs dense (at least)") == ["1.0", "", "not measured"]
    assert status("GPT tokens/s at 16k vs dense (at least), both compiled") == ["0.5", "0.4", "missed (1.25x short)"]
    assert not [line for line in lines if line.startswith("| GPT tokens/s at 64k vs dense (at least), both")]
    assert status("512k forward+backward fits") == ["fits (H200)", "out of memory", "missed"]
    rows[-3]["gpu"] = "NVIDIA H100 80GB HBM3"  # a smaller card running out decides nothing about the H200's bound
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    bench_prefill.write_markdown(markdown, jsonl)
    lines = markdown.read_text().splitlines()
    assert status("512k forward+backward fits")[2] == "not decided on NVIDIA H100 80GB HBM3"
    assert status("64k peak memory vs dense") == ["1.5", "1.25", "met"]
    tile_lines = [line for line in lines if line.startswith("| public | 65536 |")]
    assert [line.split("|")[4].strip() for line in tile_lines] == ["A", "B"]


def test_query_locality_correlates_neighbouring_queries_only() -> None:
    """nsa_inputs(locality=0.9): queries of one 64-token span share 90% of their variance, other queries none."""
    shape = bench_prefill.Shape(heads=2, kv_heads=1, dk=64, dv=16)
    q = bench_prefill.nsa_inputs(shape, 256, torch.float32, "cpu", False, locality=0.9)[0][0]

    def correlation(a: int, b: int) -> float:
        return float(torch.corrcoef(torch.stack((q[a].flatten(), q[b].flatten())))[0, 1])

    assert correlation(0, 63) > 0.75 and correlation(64, 100) > 0.75
    assert abs(correlation(0, 64)) < 0.3 and abs(correlation(10, 200)) < 0.3
    assert 0.7 < float(q.var()) < 1.3


def test_gpt_rows_compile_both_models_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """--gpt-compile: the NSA and the dense GPT both go through torch.compile and their rows say so (shape
    gpt_compiled); without it neither does. (torch.compile itself is replaced: the plumbing is what is tested.)
    --gpt-profile: one operator table per model and one split of its host time."""
    compiled: list[str] = []

    def record_compile(model: GPT) -> GPT:
        compiled.append(type(model.blocks[0].attn).__name__)
        return model

    monkeypatch.setattr(bench_prefill, "GPT_TOKENS_PER_STEP", 64)
    monkeypatch.setattr(torch, "compile", record_compile)
    eager = bench_prefill.gpt_rows(64, "cpu", profile_dir=tmp_path)
    assert compiled == [] and [row["shape"] for row in eager] == ["gpt", "gpt"]
    tables = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert sorted(tables) == ["profile_gpt_dense_gpt_64.txt", "profile_gpt_dense_gpt_64_host.txt",
                              "profile_gpt_nsa_gpt_64.txt", "profile_gpt_nsa_gpt_64_host.txt"]
    for name, table in tables.items():
        if name.endswith("_host.txt"):  # the CPU's GPT runs the torch path: no Triton launch
            assert "none (this step launches no Triton kernel)" in table and "function calls" in table
        else:
            assert "aten::" in table and "Self CPU time total" in table
    rows = bench_prefill.gpt_rows(64, "cpu", compiled=True)
    assert [(row["impl"], row["shape"]) for row in rows] == [("gpt_nsa", "gpt_compiled"), ("gpt_dense", "gpt_compiled")]
    assert all(row["tokens_per_s"] > 0 and "error" not in row for row in rows)
    assert compiled == ["NSAAttention", "SDPAAttention"]
    assert all("graph_breaks" in row for row in rows) and not any("graph_breaks" in row for row in eager)


def test_host_breakdown_times_each_triton_launch() -> None:
    """The host split counts each kernel's launches per step and times them (here through the interpreter), then
    ranks the Python functions; Triton's launchers are back in place afterwards."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from nsa.kernels.rows import nonfinite_rows_triton

    runs = (JITFunction.run, InterpretedFunction.run)
    x = torch.randn(8, 2, 16)
    x[3, 1, 5] = float("nan")

    def step() -> None:
        assert nonfinite_rows_triton(x).nonzero().tolist() == [[3, 1]]
        nonfinite_rows_triton(x[:4].contiguous())

    table = bench_prefill.host_breakdown(step, steps=2)
    assert re.search(r"_nonfinite_rows_kernel +2\.0 x +[0-9.]+ us", table), table
    assert "all: 2.0 launches" in table and "function calls" in table
    assert (JITFunction.run, InterpretedFunction.run) == runs


def test_module_rows_time_both_modules_and_write_their_profiles(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Any) -> None:
    """The module part on the CPU at a small width: an NSA module row and a dense module row, each with forward and
    forward+backward times, and with --module-profile two operator tables per module (forward+backward, forward)."""
    monkeypatch.setattr(bench_prefill, "MODULE_HIDDEN", 64)
    monkeypatch.setitem(bench_prefill.SHAPES, "public", bench_prefill.Shape(4, 2, 16, 16))
    rows = bench_prefill.module_rows("public", 128, "cpu", torch.float32, profile_dir=tmp_path)
    assert [row["impl"] for row in rows] == ["nsa_module", "dense_module"]
    assert all(row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and "error" not in row for row in rows)
    tables = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert sorted(tables) == ["profile_dense_module_public_128.txt", "profile_dense_module_public_128_fwd.txt",
                              "profile_nsa_module_public_128.txt", "profile_nsa_module_public_128_fwd.txt"]
    assert all("aten::" in table and "Self CPU time total" in table for table in tables.values())


def test_compile_counts_show_frames_and_graph_breaks() -> None:
    """The dynamo counters a compiled GPT row records: a function with a graph break adds a frame and a break."""
    def broken(x: torch.Tensor) -> torch.Tensor:
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    before = bench_prefill.compile_counts()
    torch.compile(broken, backend="eager")(torch.ones(3))
    after = bench_prefill.compile_counts()
    assert after["frames"] > before["frames"] and after["graphs"] > before["graphs"]
    assert after["graph_breaks"] == before["graph_breaks"] + 1


def test_plot_is_written_from_the_public_rows_only_when_nsa_was_measured(tmp_path: Any) -> None:
    rows = [{"impl": impl, "shape": "public", "T": t, "fwdbwd_ms": ms * t / 8192, "commit": "abc"}
            for impl, ms in (("nsa", 14.0), ("dense", 7.5), ("fla", 21.0)) for t in (8192, 65536)]
    rows.append({"impl": "nsa", "shape": "public", "T": 524288, "error": "out of memory"})  # no time: not drawn
    jsonl, png = tmp_path / "rows.jsonl", tmp_path / "rows.png"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows[2:]))  # dense and fla only
    bench_prefill.write_plot(png, jsonl)
    assert not png.exists()
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    bench_prefill.write_plot(png, jsonl)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_measured_rows_is_refused(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--parts report on a results directory without the rows' .jsonl fails naming the file, and writes nothing
    (it used to write empty tables)."""
    monkeypatch.setattr(sys, "argv", ["bench_prefill", "--parts", "report", "--results-dir", str(tmp_path)])
    assert "prefill_cpu.jsonl does not exist" in cli_refusal(bench_prefill.main, capsys)
    assert not list(tmp_path.iterdir())


def test_gpt_rows_in_processes_time_each_gpt_in_fresh_processes_and_take_the_median() -> None:
    """--gpt-processes: each process (spawned: a fresh interpreter, as CUDA needs) times both GPTs; the row keeps
    every process's step time in order and the median, with tokens/s from the median."""
    rows = bench_prefill.gpt_rows_in_processes(32, "cpu", 2, tokens_per_step=64)
    assert [(row["impl"], row["processes"], row["batch"]) for row in rows] == [("gpt_nsa", 2, 2), ("gpt_dense", 2, 2)]
    for row in rows:
        times = row["process_step_ms"]
        assert len(times) == 2 and all(t > 0 for t in times) and "error" not in row
        assert row["step_ms"] == round((times[0] + times[1]) / 2, 2)
        assert row["tokens_per_s"] == round(2 * 32 / ((times[0] + times[1]) / 2) * 1e3)


def test_combined_process_rows_take_the_median_and_keep_the_first_error() -> None:
    def process(nsa: float | str, dense: float) -> list[dict[str, Any]]:
        first = {"impl": "gpt_nsa", "shape": "gpt", "T": 1024, "batch": 4}
        first.update({"error": nsa} if isinstance(nsa, str) else {"step_ms": nsa, "tokens_per_s": 1})
        return [first, {"impl": "gpt_dense", "shape": "gpt", "T": 1024, "batch": 4, "step_ms": dense,
                        "tokens_per_s": 1}]

    nsa, dense = bench_prefill.combined_process_rows([process(77.06, 29.2), process(51.27, 28.8),
                                                      process(60.7, 29.0)])
    assert nsa == {"impl": "gpt_nsa", "shape": "gpt", "T": 1024, "batch": 4, "step_ms": 60.7,
                   "tokens_per_s": 67479, "process_step_ms": [77.06, 51.27, 60.7],  # 4096 tokens in 60.7 ms
                   "processes": 3}
    assert dense["step_ms"] == 29.0 and dense["process_step_ms"] == [29.2, 28.8, 29.0]
    failed, _ = bench_prefill.combined_process_rows([process(50.0, 29.0), process("out of memory", 29.0)])
    assert failed["error"] == "out of memory" and "step_ms" not in failed and failed["processes"] == 2


@pytest.mark.parametrize("flags", [["--gpt-processes", "0"], ["--gpt-processes", "2", "--gpt-profile"]])
def test_gpt_processes_flag_is_validated(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, flags: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_prefill", "--parts", "gpt", "--results-dir", str(tmp_path), *flags])
    with pytest.raises(SystemExit) as raised:
        bench_prefill.main()
    assert raised.value.code == 2 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("seq_len", [5, 24, 61])
def test_kernel_traffic_counts_the_blocks_the_selection_actually_picks(seq_len: int) -> None:
    """The selection's gathered traffic rests on selected_blocks: every (token, group) selects all its visible
    blocks while they are at most n, then n. Checked against the slots a real selection (nsa_attention, torch path)
    fills, and the fwd_sel traffic moves with exactly those whole blocks of K and V."""
    from nsa import nsa_attention

    inputs = bench_prefill.nsa_inputs(TINY, seq_len, torch.float32, "cpu", False)
    _, indices = nsa_attention(*inputs, **SMALL_BLOCKS, backend="torch")
    used = int((indices >= 0).sum())
    assert bench_prefill.selected_blocks(seq_len) * TINY.kv_heads == used
    wider = TINY._replace(dv=TINY.dv + 8)  # 8 more value dims: 8 * 2 bytes more per loaded value row ...
    extra = bench_prefill.kernel_traffic("fwd_sel", wider, seq_len) - bench_prefill.kernel_traffic("fwd_sel", TINY,
                                                                                                   seq_len)
    rows = seq_len * TINY.heads  # ... and per output row read, written and stored (out twice, the branch once)
    assert extra == used * SMALL_BLOCKS["sel_block_size"] * 8 * 2 + rows * 8 * 2 * 3


def test_report_derives_the_kernel_rows_tb_per_s_from_their_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """3.1e9 bytes (the traffic model's figure, stood in for here) in 0.5 ms: 6.2 TB/s."""
    monkeypatch.setattr(bench_prefill, "kernel_traffic", lambda kernel, shape, seq_len: 3.1e9)
    row = {"impl": "kernel", "kernel": "guard_sanitize", "shape": "public", "T": 1024, "ms": 0.5, "tflops": 0.0}
    assert bench_prefill.with_traffic(row)["tbps"] == 6.2
    assert bench_prefill.with_traffic({**row, "tbps": 3.0})["tbps"] == 3.0


def test_tile_match_keeps_the_defaults_and_the_candidates_it_names_less_those_it_skips():
    """bench_prefill --tile-match / --tile-skip on the public shape's selection candidates: the defaults always
    first; a candidate kept when its repr holds one of the match texts and none of the skip texts."""
    from bench.bench_prefill import matching, tile_variants

    candidates = tile_variants("public")["sel_tiles"]
    assert matching(candidates, None) == candidates
    several = matching(candidates, [", rows=64,", ", rows=128,"])
    assert several[0] == candidates[0]
    assert sorted((t.rows, t.tile_num_warps, t.tile_num_stages) for t in several[1:]) == [(64, 4, 2), (64, 4, 3),
                                                                                          (128, 8, 3)]
    assert [t.tile_num_stages for t in matching(candidates, [", rows=64,"], [", tile_num_stages=2,"])[1:]] == [3]
    assert all(t.tile_num_stages != 2 for t in matching(candidates, None, [", tile_num_stages=2,"])[1:])


def test_batched_layer_rows_are_tabled_beside_dense_at_their_batch_and_leave_the_targets_alone(tmp_path: Any) -> None:
    """--batch rows (a later run) neither replace the batch-1 rows the targets read nor borrow their dense time."""
    rows = [
        {"impl": "nsa", "shape": "public", "T": 8192, "fwd_ms": 1.0, "fwdbwd_ms": 9.0},
        {"impl": "dense", "shape": "public", "T": 8192, "fwd_ms": 2.0, "fwdbwd_ms": 10.0},
        {"impl": "nsa", "shape": "public", "T": 8192, "batch": 8, "fwd_ms": 4.0, "fwdbwd_ms": 60.0},
        {"impl": "dense", "shape": "public", "T": 8192, "batch": 8, "fwd_ms": 16.0, "fwdbwd_ms": 80.0},
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    markdown = tmp_path / "rows.md"
    bench_prefill.write_markdown(markdown, jsonl)
    lines = markdown.read_text().splitlines()
    (target,) = [line for line in lines if line.startswith("| 8k forward+backward vs dense |")]
    assert [cell.strip() for cell in target.split("|")[2:5]] == ["1.0", "0.9", "met"]
    header = next(line for line in lines if line.startswith("| impl | shape | T | batch |"))
    columns = [cell.strip() for cell in header.split("|")[1:-1]]
    table = [dict(zip(columns, [cell.strip() for cell in line.split("|")[1:-1]], strict=True))
             for line in lines if line.startswith("| nsa | public | 8192 |")]
    assert [(row["batch"], row["fwdbwd_vs_dense"], row["fwd_vs_dense"]) for row in table] == [
        ("", "0.9", "0.5"), ("8", "0.75", "0.25")]


def test_a_length_measured_only_under_batch_leaves_the_peak_memory_targets_alone(tmp_path: Any) -> None:
    """The peak-memory targets read batch-1 rows: a length with only --batch rows writes no peak target for it (and
    the report is written)."""
    rows = [
        {"impl": "nsa", "shape": "public", "T": 8192, "fwd_ms": 1.0, "fwdbwd_ms": 9.0, "peak_gib": 1.5},
        {"impl": "dense", "shape": "public", "T": 8192, "fwd_ms": 2.0, "fwdbwd_ms": 10.0, "peak_gib": 1.0},
        {"impl": "nsa", "shape": "public", "T": 4096, "batch": 8, "fwd_ms": 4.0, "fwdbwd_ms": 60.0, "peak_gib": 3.0},
        {"impl": "dense", "shape": "public", "T": 4096, "batch": 8, "fwd_ms": 16.0, "fwdbwd_ms": 80.0, "peak_gib": 1.0},
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    markdown = tmp_path / "rows.md"
    bench_prefill.write_markdown(markdown, jsonl)
    peaks = [line for line in markdown.read_text().splitlines() if "peak memory vs dense" in line]
    assert [[cell.strip() for cell in line.split("|")[1:5]] for line in peaks] == [
        ["8k peak memory vs dense", "1.5", "1.5", "met"]]


def test_layer_rows_run_a_batch_of_sequences() -> None:
    """The CPU smoke run of --batch 2: each impl's inputs hold two sequences, and the rows say so."""
    rows = bench_prefill.layer_rows("gpt", 128, "cpu", torch.float32, ["nsa", "dense"], batch=2)
    assert [(row["impl"], row["batch"]) for row in rows] == [("nsa", 2), ("dense", 2)]
    assert all(isinstance(row.get("fwdbwd_ms"), float) and "error" not in row for row in rows)
    shape = bench_prefill.SHAPES["gpt"]
    assert bench_prefill.nsa_inputs(shape, 128, torch.float32, "cpu", False, batch=2)[0].shape == (2, 128, 4, 64)
    assert bench_prefill.dense_inputs(shape, 128, torch.float32, "cpu", False, 2)[0].shape == (2, 4, 128, 64)


def test_check_of_a_batch_compares_each_sequence_with_its_own_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check part at --batch 2 (the kernels in the interpreter): the reference runs one sequence at a time and
    the row still compares all of the batch (a reference misaligned across sequences would fail it)."""
    monkeypatch.setitem(bench_prefill.SHAPES, "tiny", TINY)
    row = bench_prefill.check("tiny", 96, "cpu", torch.float32, batch=2)  # two selection blocks of 64 tokens
    assert row["passed"] and row["determinism"] and row["selection_mismatch"] == 0, row
    assert row["out_rel_err"] < 1e-4 and row["dq_rel_err"] < 1e-4, row


# the command line: a bad value or a contradiction is refused by argparse (status 2), naming the flag, before any
# folder is made or row written; "cuda:99" is refused on any machine (no GPU here, fewer than 100 on a GPU host)
REFUSED_PREFILL_ARGS = [
    (["--seq-lens", "0"], "--seq-lens: must be >= 1"),
    (["--seq-lens", "-5"], "--seq-lens: must be >= 1"),
    (["--seq-lens", "128", "128"], "--seq-lens: 128 given more than once"),
    (["--shapes", "public", "public"], "--shapes: public given more than once"),
    (["--parts", "layer", "layer"], "--parts: layer given more than once"),
    (["--impls", "bogus"], "--impls: invalid choice: 'bogus'"),
    (["--max-seconds", "nan"], "--max-seconds: must be a finite number > 0, got nan"),
    (["--max-seconds", "-1"], "--max-seconds: must be a finite number > 0"),
    (["--tile-timeout", "inf"], "--tile-timeout: must be a finite number > 0, got inf"),
    (["--check-len", "0"], "--check-len: must be >= 1"),
    (["--gpt-lens", "0"], "--gpt-lens: must be >= 1"),
    (["--device", "cuda:99"], "--device: cuda:99"),
    (["--device", "bogus"], "--device: must be cpu, cuda or cuda:N"),
    (["--name", ""], "--name: must be a plain file name"),
    (["--name", "sub/x"], "--name: must be a plain file name"),
    (["--seq-lens", "1024", "--other-shape-lens", "4096"], "--other-shape-lens [4096] are not among"),
    (["--tile-match", "tma=False", ""], "--tile-match texts must not be empty"),  # "" matched every candidate
    (["--tile-skip", ""], "--tile-skip texts must not be empty"),  # skipped every candidate
]


@pytest.mark.parametrize(("flags", "message"), REFUSED_PREFILL_ARGS, ids=[" ".join(f) for f, _ in REFUSED_PREFILL_ARGS])
def test_bad_arguments_are_refused_naming_the_flag_before_any_folder_is_made(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str], flags: list[str],
        message: str) -> None:
    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["bench_prefill", "--parts", "layer", "--results-dir", str(results), *flags])
    assert message in cli_refusal(bench_prefill.main, capsys)
    assert not results.exists()


def test_a_results_dir_that_is_a_file_is_refused_before_the_timing(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """It used to fail at mkdir (FileExistsError traceback); under a file it would fail the same way."""
    (tmp_path / "afile").write_text("x")
    for folder in (tmp_path / "afile", tmp_path / "afile" / "below"):
        monkeypatch.setattr(sys, "argv", ["bench_prefill", "--parts", "layer", "--results-dir", str(folder)])
        assert "--results-dir: " in cli_refusal(bench_prefill.main, capsys)


def test_report_without_measured_rows_makes_no_results_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The refusal comes before mkdir (it used to leave the folder behind)."""
    results = tmp_path / "new"
    monkeypatch.setattr(sys, "argv", ["bench_prefill", "--parts", "report", "--results-dir", str(results)])
    with pytest.raises(SystemExit):
        bench_prefill.main()
    assert not results.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--arch", "0"], "--arch: invalid choice: 0"),  # it aborted LLVM without a message
    (["--arch", "69"], "--arch: invalid choice: 69"),
    (["--head-dims", "0"], "--head-dims: must be >= 1"),  # "negative shift count" from deep inside
    (["--head-dims", "128", "128"], "--head-dims: 128 given more than once"),
    (["--candidates", "bogus"], "--candidates: invalid choice: 'bogus'"),  # a KeyError traceback
    (["--candidates", "public", "--head-dims", "64"], "--head-dims would do nothing"),
])
def test_compile_kernels_refuses_bad_arguments(capsys: pytest.CaptureFixture[str], flags: list[str],
                                               message: str) -> None:
    from bench import compile_kernels

    assert message in cli_refusal(compile_kernels.main, capsys, flags)


@pytest.mark.parametrize(("flags", "message"), [
    (["--seq-lens", "0"], "--seq-lens: must be >= 1"),  # it appended a T=0 row to bench/results
    (["--seq-lens", "64", "64"], "--seq-lens: 64 given more than once"),
    (["--device", "cuda:99"], "--device: cuda:99"),  # a CalledProcessError from the child
])
def test_reference_bench_refuses_bad_arguments_before_any_child_runs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    from bench import bench_reference

    monkeypatch.setattr(bench_reference, "run_child", lambda *args: pytest.fail("a child ran"))
    assert message in cli_refusal(bench_reference.main, capsys, flags)
