"""The inference demo CLI (sal_harness.demo, `python -m cli.demo_infer` / `sal-demo`): outputs, measured reads,
flag errors.

Expectations are computed here from the definitions in shared/spec/NSA.md (plain Python loops over
positions), not with the library's or the CLI's helpers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cli_refusal
from harness_tiny import tiny_overrides

from sal_harness import demo as demo_infer
from sal_harness.checkpoint import rng_state, save_checkpoint
from sal_harness.config import load_run_config
from sal_harness.model import GPT, GPTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_demo(*argv: str) -> demo_infer.DemoResult:
    parser = demo_infer.build_parser()
    return demo_infer.run(parser.parse_args(list(argv)), parser)


def expected_cmp(t: int, l: int, d: int) -> int:
    """Compressed blocks i with i*d + l - 1 <= t."""
    return sum(1 for i in range(t + 1) if i * d + l - 1 <= t)


def block_tokens(j: int, t: int, lp: int) -> int:
    """Tokens of selection block j at positions <= t."""
    return len(range(j * lp, min((j + 1) * lp, t + 1)))


def forced_tokens(t: int, lp: int) -> int:
    forced = {0, t // lp} | ({t // lp - 1} if t // lp >= 1 else set())
    return sum(block_tokens(j, t, lp) for j in forced)


def check_reads(result: demo_infer.DemoResult, nsa: dict, seq_len: int) -> None:
    l, d, lp, n, w = (nsa[k] for k in ("cmp_block_size", "cmp_stride", "sel_block_size", "num_selected",
                                        "window_size"))
    cmp = [expected_cmp(t, l, d) for t in range(seq_len)]
    win = [min(w, t + 1) for t in range(seq_len)]
    assert result.cmp.tolist() == cmp
    assert result.win.tolist() == win
    assert result.dense.tolist() == list(range(1, seq_len + 1))
    reads = result.summary["reads"]
    assert reads["cmp"]["mean"] == pytest.approx(sum(cmp) / seq_len)
    assert reads["cmp"]["last"] == cmp[-1]
    assert reads["win"]["mean"] == pytest.approx(sum(win) / seq_len)
    assert reads["win"]["last"] == win[-1]
    assert reads["dense"]["mean"] == pytest.approx((seq_len + 1) / 2)

    for layer, (bi, sel) in enumerate(zip(result.block_indices, result.sel, strict=True)):
        batch, seq, groups, slots = bi.shape
        assert (batch, seq, slots) == (1, seq_len, n)
        recount = []
        for t in range(seq_len):
            for g in range(groups):
                blocks = [j for j in bi[0, t, g].tolist() if j != -1]
                tokens = sum(block_tokens(j, t, lp) for j in blocks)
                assert int(sel[0, t, g]) == tokens, (layer, t, g)
                assert forced_tokens(t, lp) <= tokens <= min(n * lp, t + 1), (layer, t, g)
                recount.append(tokens)
        layer_reads = reads["layers"][layer]
        mean_sel = sum(recount) / len(recount)
        assert layer_reads["sel"]["mean"] == pytest.approx(mean_sel)
        total = sum(cmp) / seq_len + mean_sel + sum(win) / seq_len
        assert layer_reads["ratio_dense_over_sparse"]["mean"] == pytest.approx((seq_len + 1) / 2 / total)


def read_summary(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "summary.jsonl").read_text().splitlines()]


def test_default_model_outputs_and_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo" / "sel.png"
    result = run_demo("--seq-len", "1024", "--out", str(out), "--layer", "1", "--group", "1")
    assert out.read_bytes()[:8] == PNG_MAGIC
    (summary,) = read_summary(out.parent)
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["seq_len"] == 1024
    assert summary["heatmap"] == {"path": str(out), "layer": 1, "group": 1, "row_bin": 2}
    assert [set(g) for g in summary["gate_means"]] == [{"layer", "cmp", "sel", "win"}] * 2
    assert all(0.0 < g[k] < 1.0 for g in summary["gate_means"] for k in ("cmp", "sel", "win"))
    check_reads(result, summary["model"]["attention"], 1024)
    printed = capsys.readouterr().out
    assert "NSA GPT: 2 layers" in printed
    assert "gate means (cmp / sel / win)" in printed
    assert "dense / sparse" in printed


def _save_small_checkpoint(run_dir: Path, attention: str = "nsa") -> tuple[Path, GPTConfig]:
    """A step-7 checkpoint of a 1-layer model (NSA: l=8, d=4, l'=8, n=4, w=16) trained on nothing."""
    overrides = [*tiny_overrides(run_dir, attention=attention), "model.n_layer=1", "model.hidden_size=32",
                 "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8", "model.max_seq_len=128",
                 "task=text", "task.seq_len=128"]
    if attention == "nsa":
        overrides += ["attention.cmp_block_size=8", "attention.cmp_stride=4", "attention.sel_block_size=8",
                      "attention.num_selected=4", "attention.window_size=16"]
    config = load_run_config(overrides)
    torch.manual_seed(123)
    model = GPT(config.gpt)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(run_dir, {"step": 7, "config": config.model_dump(mode="json"), "model": model.state_dict(),
                                     "optimizer": optimizer.state_dict(), "rng": rng_state(torch.Generator()),
                                     "trainer": {"skipped": 0, "consecutive_skips": 0}}, keep=1)
    return path, config.gpt


def test_checkpoint_model_is_sparse(tmp_path: Path) -> None:
    """A checkpoint with small blocks (l'=8, n=4): selection is a strict subset; run past max_seq_len."""
    ckpt, config = _save_small_checkpoint(tmp_path / "run")
    out = tmp_path / "out" / "sel.png"
    result = run_demo("--checkpoint", str(ckpt), "--seq-len", "300", "--out", str(out), "--group", "1")
    assert out.read_bytes()[:8] == PNG_MAGIC
    (summary,) = read_summary(out.parent)
    assert "step 7" in summary["weights"] and "max_seq_len=128" in summary["weights"]
    assert summary["model"]["attention"] == config.attention.model_dump()
    check_reads(result, summary["model"]["attention"], 300)
    # t=299: blocks 0 and 36 full, block 37 holds 296..299, plus one more complete block (n=4).
    sel_last = 8 + 8 + 4 + 8
    assert summary["reads"]["layers"][0]["sel"]["last"] == sel_last
    sparse_last = expected_cmp(299, 8, 4) + sel_last + 16
    assert summary["reads"]["layers"][0]["ratio_dense_over_sparse"]["last"] == pytest.approx(300 / sparse_last)


def test_main_appends_summary(tmp_path: Path) -> None:
    out = tmp_path / "sel.png"
    for seq_len in ("1", "77"):
        assert demo_infer.main(["--seq-len", seq_len, "--out", str(out)]) == 0
    assert [s["seq_len"] for s in read_summary(tmp_path)] == [1, 77]
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_generate_decodes_through_the_caches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--generate N prefills the text into the decode caches and appends N greedy bytes; the reads of
    the last step (context 700 + 5) follow NSA.md with the demo's paper block sizes."""
    assert demo_infer.main(["--seq-len", "700", "--generate", "5", "--out", str(tmp_path / "g.png")]) == 0
    generation = read_summary(tmp_path)[-1]["generation"]
    context = 705
    assert generation["tokens"] == 5 and generation["context"] == context
    # l=32, d=16 -> (705-32)//16+1 compressed; 705 tokens fit in n*l' = 1024 -> all read; w=512.
    assert generation["last_step_reads"] == {"cmp": (context - 32) // 16 + 1, "sel": context, "win": 512,
                                             "dense": context}
    assert "generated 5 bytes" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--seq-len", "0"], "--seq-len"),
        (["--seq-len", "-3"], "--seq-len"),
        (["--seq-len", "10000000"], "--seq-len"),
        (["--seq-len", "abc"], "--seq-len"),
        (["--layer", "2"], "--layer"),
        (["--layer", "-1"], "--layer"),
        (["--group", "2"], "--group"),
        (["--checkpoint", "no/such/ckpt.pt"], "--checkpoint"),
        (["--device", "nonsense"], "--device"),
        # Raw errors from torch (mps, meta), or accepted and recorded as "cpu" (cpu:1).
        (["--device", "mps"], "--device"),
        (["--device", "meta"], "--device"),
        (["--device", "cpu:1"], "--device"),
        (["--device", "cuda:99"], "--device"),
        # Checked after the forward and the PNG (-1), or an allocation of 256 TB (1e12).
        (["--generate", "-1"], "--generate"),
        (["--generate", str(demo_infer.MAX_GENERATE + 1)], "--generate"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
    ],
)
def test_bad_flags(argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo_infer.main([*argv, "--out", str(tmp_path / "x.png")] + ([] if "--seq-len" in argv else
                                                                        ["--seq-len", "8"]))
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_out_paths_are_refused_before_the_forward(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder, "" (the current folder) and a path under a file failed in PIL or mkdir after the forward."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.chdir(tmp_path)
    for out, message in ((str(tmp_path), "is a folder"), ("", "is a folder"), (str(a_file / "x.png"), "is a file")):
        err = cli_refusal(demo_infer.main, capsys, ["--seq-len", "8", "--out", out])
        assert "--out" in err and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def edited_checkpoint(run_dir: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """_save_small_checkpoint's file changed by ``edit`` past save_checkpoint's checks (a file changed on disk)."""
    path, _ = _save_small_checkpoint(run_dir)
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    return path


def nan_head(checkpoint: dict[str, Any]) -> None:
    checkpoint["model"]["lm_head.weight"].fill_(float("nan"))


def wider_config(checkpoint: dict[str, Any]) -> None:
    checkpoint["config"]["model"]["hidden_size"] = 64


@pytest.mark.parametrize(("edit", "message"), [(nan_head, "NaN / inf in weight"),
                                               (wider_config, "do not match its config (first mismatch: ")])
def test_damaged_checkpoints_are_refused_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                edit: Callable[[dict[str, Any]], None],
                                                                message: str) -> None:
    """NaN weights wrote "cmp": NaN into summary.jsonl; a config that does not fit the weights gave a raw
    load_state_dict error."""
    ckpt = edited_checkpoint(tmp_path / "run", edit)
    out = tmp_path / "out" / "x.png"
    err = cli_refusal(demo_infer.main, capsys, ["--checkpoint", str(ckpt), "--seq-len", "8", "--out", str(out)])
    assert "--checkpoint" in err and message in err
    assert not out.parent.exists()


def test_a_run_folder_as_checkpoint_names_its_newest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It read as a damaged FSDP checkpoint folder ("no meta.json")."""
    ckpt, _ = _save_small_checkpoint(tmp_path / "run")
    with pytest.raises(SystemExit):
        demo_infer.main(["--checkpoint", str(ckpt.parent), "--seq-len", "8", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert "is a run folder" in err and str(ckpt) in err and "damaged" not in err


def test_a_device_this_machine_lacks_is_no_damaged_checkpoint(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _ = _save_small_checkpoint(tmp_path / "run")
    with pytest.raises(SystemExit):
        demo_infer.main(["--checkpoint", str(ckpt), "--device", "cuda:99", "--seq-len", "8",
                         "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert "--device" in err and "damaged" not in err


def test_a_summary_that_is_not_finite_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose outputs overflow: an error, neither the PNG nor a NaN line in summary.jsonl."""
    monkeypatch.setattr(demo_infer, "reads_summary", lambda *_: {"cmp": {"mean": float("nan")}})
    out = tmp_path / "out" / "x.png"
    assert demo_infer.main(["--seq-len", "8", "--out", str(out)]) == 2
    assert "['reads']['cmp']['mean'] = nan" in capsys.readouterr().err
    assert not out.parent.exists()


def test_bad_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, _ = _save_small_checkpoint(tmp_path / "dense", attention="dense")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for path, message in ((dense, "attention='dense'"), (garbage, "cannot read")):
        with pytest.raises(SystemExit):
            demo_infer.main(["--checkpoint", str(path), "--seq-len", "8", "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert "--checkpoint" in err and message in err


def test_failed_heatmap_write_keeps_the_previous_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNG goes through a temporary file: a write that fails half-way leaves the last complete heatmap."""
    import matplotlib.figure

    out = tmp_path / "sel.png"
    assert demo_infer.main(["--seq-len", "64", "--out", str(out)]) == 0
    before = out.read_bytes()

    def fail_half_way(self: Any, handle: Any, **kwargs: Any) -> None:
        handle.write(PNG_MAGIC)
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        run_demo("--seq-len", "64", "--out", str(out))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sel.png", "summary.jsonl"]  # no temporary file left
