"""bench/bench_decode.py, the design card's token-read check: it runs as a file from a plain checkout, and its exit
status is 1 when the reads measured from a real decode step differ from NSA.md's formula at any length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_refusal

from bench import bench_decode

SCRIPT = Path(bench_decode.__file__).resolve()
CHECK_ARGS = ["--skip-latency", "--read-lengths", "1024", "2048"]


def test_runs_as_a_file_from_any_directory(tmp_path: Path) -> None:
    """`python bench/bench_decode.py` (no -m, cwd outside the checkout) imports bench and passes the check."""
    result = subprocess.run([sys.executable, str(SCRIPT), *CHECK_ARGS, "--results-dir", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "decode_cpu.jsonl").read_text().splitlines()]
    assert [(row["S"], row["measured"], row["formula"]) for row in rows] == [(1024, 1599, 1599), (2048, 1663, 1663)]


def test_clean_check_exits_zero(tmp_path: Path) -> None:
    assert bench_decode.main([*CHECK_ARGS, "--results-dir", str(tmp_path)]) == 0


@pytest.mark.parametrize("planted", [(0, 1, 0), (1, -1, 0), (0, 0, -1)],
                         ids=["sel_off_by_one", "same_sum_other_branches", "win_off_by_one"])
def test_planted_mismatch_exits_nonzero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str], planted: tuple[int, int, int]) -> None:
    """A formula that disagrees with the measured reads at one length (in the total, or only in how the total
    splits over the branches) fails the run, and stderr names that length; the table is still written."""
    true_formula = bench_decode.formula_reads

    def planted_formula(seq_len: int, config: bench_decode.NSAConfig) -> tuple[int, int, int]:
        reads = true_formula(seq_len, config)
        if seq_len != 2048:
            return reads
        return reads[0] + planted[0], reads[1] + planted[1], reads[2] + planted[2]

    monkeypatch.setattr(bench_decode, "formula_reads", planted_formula)
    assert bench_decode.main([*CHECK_ARGS, "--results-dir", str(tmp_path)]) == 1
    errors = capsys.readouterr().err
    assert "S=2048" in errors and "S=1024" not in errors
    assert (tmp_path / "decode_cpu.md").exists()


def test_tile_sweep_needs_a_gpu_and_starts_from_the_defaults(tmp_path: Path) -> None:
    """--tiles times CUDA graphs: on the CPU it is refused with a usage error naming the flag, before any work;
    its candidates are distinct and start with the current defaults (timed in the same run)."""
    from nsa.kernels.decode import DecodeTiles

    with pytest.raises(SystemExit) as refused:
        bench_decode.main(["--tiles", "--results-dir", str(tmp_path)])
    assert refused.value.code == 2 and not any(tmp_path.iterdir())
    candidates = bench_decode.tile_candidates()
    assert candidates[0] == DecodeTiles() and len(set(candidates)) == len(candidates)


def test_paged_rows_hold_less_memory_for_mixed_lengths(tmp_path: Path) -> None:
    """--paged: a batch of sequences of lengths S/B .. S on a paged cache holds only the pages it reaches (less
    selection memory than per-sequence buffers of capacity S), and both layouts' rows are recorded."""
    code = bench_decode.main(["--skip-reads", "--seq-lens", "1024", "--batches", "4", "--paged",
                              "--results-dir", str(tmp_path)])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "decode_cpu.jsonl").read_text().splitlines()]
    (paged,) = [row for row in rows if row["table"] == "paged"]
    assert paged["lengths"] == "256..1024" and paged["paged_ms"] > 0 and paged["contiguous_ms"] > 0
    assert paged["paged_sel_gib"] < paged["contiguous_sel_gib"]
    assert "## Paged KV" in (tmp_path / "decode_cpu.md").read_text()


REFUSED_DECODE_ARGS = [
    (["--skip-reads", "--seq-lens", "0"], "--seq-lens: must be >= 1"),  # NSAInputError "capacity" traceback
    (["--skip-reads", "--seq-lens", "1024", "--batches", "-2"], "--batches: must be >= 1"),
    (["--skip-latency", "--read-lengths", "0"], "--read-lengths: must be >= 1"),
    (["--skip-latency", "--read-lengths", "1024", "1024"], "--read-lengths: 1024 given more than once"),
    (["--skip-reads", "--seq-lens", "1024", "--batches", "1", "1"], "--batches: 1 given more than once"),
    (["--device", "cuda:99"], "--device: cuda:99"),  # an AssertionError from torch's lazy CUDA init
    (["--device", "bogus"], "--device: must be cpu, cuda or cuda:N"),  # ran the CPU tables under "bogus"
    (["--skip-latency", "--skip-reads"], "measures nothing"),  # wrote empty tables
    (["--skip-latency", "--tiles"], "measures nothing"),
    (["--skip-latency", "--paged"], "--paged would do nothing"),
    (["--skip-latency", "--seq-lens", "1024"], "--seq-lens would do nothing"),
    (["--tiles", "--profile"], "--tiles replaces the tables"),
    (["--skip-reads", "--read-lengths", "1024"], "--read-lengths would do nothing"),  # was ignored
]


@pytest.mark.parametrize(("flags", "message"), REFUSED_DECODE_ARGS, ids=[" ".join(f) for f, _ in REFUSED_DECODE_ARGS])
def test_bad_arguments_are_refused_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   flags: list[str], message: str) -> None:
    results = tmp_path / "results"
    assert message in cli_refusal(bench_decode.main, capsys, [*flags, "--results-dir", str(results)])
    assert not results.exists()


def test_a_results_dir_that_is_a_file_is_refused_before_the_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """It used to measure first, then fail at mkdir (FileExistsError traceback)."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(bench_decode, "reads_table", lambda lengths: pytest.fail("measured before refusing"))
    argv = [*CHECK_ARGS, "--results-dir", str(tmp_path / "afile")]
    assert "--results-dir: " in cli_refusal(bench_decode.main, capsys, argv)
