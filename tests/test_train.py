"""The trainer end to end on the tiny config: run folder, metrics, checkpoints (last k), exact resume,
non-finite steps, signals, damaged run folders, gradient accumulation, the hydra CLI (overrides, --multirun).

The `long` test runs the README's main job (sal_harness.compare with the shipped CPU recipe) and checks item 6:
dense, NSA and SCOPE retrieve beyond the window baseline's reach, the window baseline does not.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from harness_tiny import tiny_config, tiny_overrides
from omegaconf import OmegaConf

from sal_harness import train as train_module
from sal_harness.checkpoint import list_checkpoints, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from sal_harness.config import validate_run_config
from sal_harness.errors import HarnessError, NonFiniteTrainingError, RunFolderError
from sal_harness.train import lr_at, run_and_exit, seq_len_at, task_at_length, train

REPO = Path(__file__).resolve().parent.parent


def records(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir)[-1])["model"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("smoke") / "run"
    return out_dir, train(tiny_config(out_dir))


def test_run_folder(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    out_dir, summary = smoke_run
    assert summary["status"] == "finished" and summary["step"] == 6 and summary["skipped"] == 0
    assert [p.name for p in list_checkpoints(out_dir)] == ["ckpt-00000004.pt", "ckpt-00000006.pt"]  # keep 2
    assert not list(out_dir.glob(".*.tmp"))
    heartbeat = json.loads((out_dir / "heartbeat.json").read_text())
    assert heartbeat["status"] == "finished" and heartbeat["step"] == 6
    saved: Any = OmegaConf.to_container(OmegaConf.load(out_dir / "config.yaml"))
    assert validate_run_config(saved) == tiny_config(out_dir)  # the resolved config, complete
    result = json.loads((out_dir / "eval.json").read_text())
    assert result["attention"] == "nsa" and result["step"] == 6 and result["bpb"] > 0
    assert [c["distance"] for c in result["by_distance"]] == [8, 40]
    # (40, 0.5) does not fit 64 tokens: 40 after the needle's start would need 36 before it.
    assert {(c["distance"], c["depth"]) for c in result["grid"]} == {(8, 0.0), (8, 0.5), (40, 0.0)}
    for cell in result["by_distance"]:
        assert 0 <= cell["accuracy"] <= cell["token_accuracy"] <= 1 and cell["n"] == 4
        assert 0 <= cell["selection_recall"] <= 1 and len(cell["selection_recall_by_layer"]) == 1
        assert set(cell["gate_means_by_layer"][0]) == {"cmp", "sel", "win"}
    assert result["example"]["kind"] == "nsa_selection" and len(result["example"]["layers"][0]) == 64


def test_metrics_schema(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    out_dir, _ = smoke_run
    trains = records(out_dir, "train")
    assert [r["step"] for r in trains] == [2, 4, 6]
    for r in trains:
        assert set(r) == {"kind", "step", "loss", "lr", "grad_norm", "seq_len", "tokens_per_s", "elapsed_s"}
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["tokens_per_s"] > 0 and r["seq_len"] == 64
    evals = records(out_dir, "eval")
    assert [r["step"] for r in evals] == [4, 6]
    assert all({"by_distance", "bpb", "val_loss"} <= set(r) for r in evals)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config(out_dir, "eval.text_samples=0"))
    return out_dir


TIMINGS = ("tokens_per_s", "elapsed_s")  # the only fields of a record that depend on the clock


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_is_bitwise_exact(straight_run: Path, tmp_path: Path, stop: int) -> None:
    """6 steps straight == `stop` steps, stop, resume to 6: identical weights, optimizer state, RNG, and metrics
    records (the clock's fields aside). Step 3 falls between two train records (log_interval 2), step 4 is a
    periodic evaluation's."""
    straight, split = straight_run, tmp_path / "split"
    assert train(tiny_config(split, "eval.text_samples=0", f"stop_step={stop}"))["step"] == stop
    assert train(tiny_config(split, "eval.text_samples=0", "resume=true"))["step"] == 6
    a, b = (load_checkpoint(list_checkpoints(d)[-1]) for d in (straight, split))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])
    untimed = [[{k: v for k, v in r.items() if k not in TIMINGS} for r in records(d)] for d in (straight, split)]
    assert untimed[0] == untimed[1] and [r["kind"] for r in untimed[0]].count("eval") == 2


def test_resuming_a_finished_run_keeps_its_records_and_training_time(straight_run: Path, tmp_path: Path) -> None:
    """No step left: nothing is evaluated or written again, and the run's training time is the saved one (every
    invocation's, carried by the checkpoint), not this invocation's."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    metrics, result = (run / "metrics.jsonl").read_bytes(), (run / "eval.json").read_bytes()
    saved_s = load_checkpoint(list_checkpoints(run)[-1])["trainer"]["train_s"]
    summary = train(tiny_config(run, "eval.text_samples=0", "resume=true"))
    assert summary["step"] == 6 and summary["eval"] == json.loads(result)
    assert summary["elapsed_s"] >= saved_s > 0
    assert (run / "metrics.jsonl").read_bytes() == metrics and (run / "eval.json").read_bytes() == result


def test_a_moved_run_folder_resumes(tmp_path: Path) -> None:
    train(tiny_config(tmp_path / "here", "eval.text_samples=0", "stop_step=2"))
    (tmp_path / "here").rename(tmp_path / "there")
    leftover = tmp_path / "there" / ".ckpt-00000004.pt.x1y2.tmp"  # a process killed mid-write left it
    leftover.write_bytes(b"the first bytes")
    assert train(tiny_config(tmp_path / "there", "eval.text_samples=0", "resume=true"))["step"] == 6
    assert not leftover.exists()


def test_a_fresh_run_drops_an_earlier_runs_result(tmp_path: Path) -> None:
    """A folder without checkpoints (a run that crashed before its first) starts over: its metrics and its
    eval.json are not the new run's."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 50, "loss": 1.0}\n')
    (out_dir / "eval.json").write_text('{"step": 50}\n')
    train(tiny_config(out_dir, "eval.text_samples=0", "stop_step=2"))
    assert not (out_dir / "eval.json").exists() and [r["step"] for r in records(out_dir)] == [2]


def test_a_checkpoint_cut_short_leaves_the_complete_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint write that fails half way (a full disk: some bytes written, then OSError) leaves no partial
    file behind, the complete checkpoints as they were, and a folder that resumes to the same weights as a run
    that never failed."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(tiny_config(straight, "eval.text_samples=0"))
    real_save = torch.save

    def disk_full_at_step_4(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("step") == 4:
            handle.write(b"the first bytes of a checkpoint")
            raise OSError(28, "No space left on device")
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_config(cut, "eval.text_samples=0"))
    assert [p.name for p in list_checkpoints(cut)] == ["ckpt-00000002.pt"]
    assert json.loads((cut / "heartbeat.json").read_text())["status"] == "failed"
    assert not [p.name for p in cut.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    assert train(tiny_config(cut, "eval.text_samples=0", "resume=true"))["step"] == 6
    a, b = (weights(d) for d in (straight, cut))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    """atomic_write in a process that dies half way through (os._exit after some bytes, as a SIGKILL or a power
    cut would): the file keeps its old, complete content; the partial write is only a hidden temporary file."""
    path = tmp_path / "ckpt-00000002.pt"
    path.write_bytes(b"old and complete")
    code = ("import os\nfrom sal_harness.checkpoint import atomic_write\n"
            f"atomic_write({str(path)!r}, lambda h: (h.write(b'new but partial'), h.flush(), os._exit(9)))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 9
    assert path.read_bytes() == b"old and complete"
    assert list_checkpoints(tmp_path) == [path]


def test_a_missing_gpu_is_named_before_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HarnessError, match=r"train.device=cuda but this machine has 0 CUDA device"):
        train(tiny_config(tmp_path / "run", "train.device=cuda"))
    assert not (tmp_path / "run").exists()


def test_rng_state_round_trip_restores_the_data_and_global_generators() -> None:
    """What a checkpoint keeps of the random state: restored, both the data generator and torch's global one
    draw what they drew after the save (a model drawing from the global generator, e.g. dropout, resumes exactly)."""
    data = torch.Generator().manual_seed(3)
    torch.rand(5, generator=data), torch.rand(5)
    saved = rng_state(data)
    after = torch.rand(4, generator=data), torch.rand(4)
    torch.rand(7, generator=data), torch.rand(7)  # the run goes on, then resumes from the checkpoint
    restore_rng_state(saved, data)
    again = torch.rand(4, generator=data), torch.rand(4)
    assert all(torch.equal(x, y) for x, y in zip(after, again, strict=True))


def test_resume_refusals(smoke_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out_dir, _ = smoke_run
    with pytest.raises(RunFolderError, match="already holds checkpoints"):
        train(tiny_config(out_dir))
    with pytest.raises(RunFolderError, match="config differs"):
        train(tiny_config(out_dir, "resume=true", "train.lr=0.02"))
    with pytest.raises(RunFolderError, match="no checkpoint"):
        train(tiny_config(tmp_path / "empty", "resume=true"))


def test_damaged_run_folder_names_the_file(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    train(tiny_config(out_dir, "stop_step=4", "eval.text_samples=0"))
    metrics = out_dir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"kind": "train", "st')  # a write cut off mid-line
    with pytest.raises(RunFolderError, match=r"metrics.jsonl line \d+ is torn.*sed -i"):
        train(tiny_config(out_dir, "resume=true", "eval.text_samples=0"))
    metrics.write_text(good)
    newest = list_checkpoints(out_dir)[-1]
    blob = newest.read_bytes()
    for damaged in (blob[: len(blob) // 2], b"garbage, not a checkpoint", flip_a_weight_byte(newest, blob)):
        newest.write_bytes(damaged)
        with pytest.raises(RunFolderError, match=f"{newest.name}.*delete it to resume from the previous checkpoint "
                                                 r"\(ckpt-00000002.pt\)"):
            train(tiny_config(out_dir, "resume=true", "eval.text_samples=0"))
    newest.write_bytes(flip_a_weight_byte(newest, blob))
    with pytest.raises(RunFolderError, match="fails its checksum"):
        train(tiny_config(out_dir, "resume=true", "eval.text_samples=0"))
    good = torch.load(io.BytesIO(blob), weights_only=True)
    for edit, words in ((lambda c: c.pop("trainer"), "is not a format-2 sal_harness checkpoint"),
                        (lambda c: c["model"].pop("lm_head.weight"), "does not fit the model"),
                        (lambda c: c["config"]["train"].update(lr=-1.0), "not valid for this version")):
        checkpoint = copy.deepcopy(good)
        edit(checkpoint)
        torch.save(checkpoint, newest)
        with pytest.raises(RunFolderError, match=words):
            train(tiny_config(out_dir, "resume=true", "eval.text_samples=0"))


def flip_a_weight_byte(path: Path, blob: bytes) -> bytes:
    """blob (the checkpoint file at path) with one byte inside its largest tensor's data flipped: still a
    loadable zip, one whose entry no longer matches its CRC-32."""
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    header = entry.header_offset
    name_len, extra_len = int.from_bytes(blob[header + 26:header + 28], "little"), \
        int.from_bytes(blob[header + 28:header + 30], "little")
    at = header + 30 + name_len + extra_len + entry.file_size // 2
    return blob[:at] + bytes([blob[at] ^ 0x40]) + blob[at + 1:]


class _NaNGradient(torch.autograd.Function):
    """The identity whose backward returns NaN: a finite loss with a non-finite gradient (an overflow in a
    backward kernel looks like this)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def nan_at(steps: set[int], monkeypatch: pytest.MonkeyPatch, where: str = "loss") -> None:
    """Make the loss (``where="gradient"``: only its gradient) of the given (0-based) optimizer steps NaN."""
    real = train_module.scored_loss_sum
    counter = {"calls": 0}

    def poisoned(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        step = counter["calls"]
        counter["calls"] += 1
        loss = real(logits, targets)
        if step not in steps:
            return loss
        return loss * float("nan") if where == "loss" else _NaNGradient.apply(loss)

    monkeypatch.setattr(train_module, "scored_loss_sum", poisoned)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Step 3's NaN loss, or its finite loss with a NaN gradient, changes no weight: the run equals one whose step
    3 never updated anything."""
    nan_at({2}, monkeypatch, where)
    beats: list[dict[str, Any]] = []
    real_beat = train_module.Heartbeat.beat

    def recorded(self: Any, status: str, step: int, force: bool = False, **fields: Any) -> None:
        beats.append(fields)
        real_beat(self, status, step, force, **fields)

    monkeypatch.setattr(train_module.Heartbeat, "beat", recorded)
    out_dir = tmp_path / "run"
    summary = train(tiny_config(out_dir, "eval.text_samples=0", "train.ckpt_interval=1", "train.keep_checkpoints=6"))
    assert summary["status"] == "finished" and summary["skipped"] == 1
    skips = records(out_dir, "skip")
    assert [r["step"] for r in skips] == [3] and "nan" in skips[0]["reason"]
    if where == "gradient":
        assert "gradient norm nan" in skips[0]["reason"] and "loss nan" not in skips[0]["reason"]
    before, after = (load_checkpoint(out_dir / f"ckpt-{s:08d}.pt")["model"] for s in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(t).all() for t in weights(out_dir).values() if t.is_floating_point())
    json.dumps(beats, allow_nan=False)  # heartbeat.json stays strict JSON at the skipped step
    assert {"loss": None} in beats or where == "gradient"


def test_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    nan_at({3, 4, 5}, monkeypatch)
    out_dir = tmp_path / "run"
    config = tiny_config(out_dir, "eval.text_samples=0", "train.max_consecutive_skips=1")
    assert run_and_exit(config) == 3
    err = capsys.readouterr().err
    assert "2 step(s) in a row" in err and "start another out_dir" in err  # a resume keeps the config
    # Step 4 was skipped (one in a row is allowed), so checkpoint 4 holds step 3's weights; step 5 stopped the run.
    assert [p.name for p in list_checkpoints(out_dir)] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert all(torch.isfinite(t).all() for t in weights(out_dir).values() if t.is_floating_point())
    assert json.loads((out_dir / "heartbeat.json").read_text())["status"] == "stopped"
    with pytest.raises(NonFiniteTrainingError, match="at step 1"):
        nan_at({0}, monkeypatch)
        train(tiny_config(tmp_path / "other", "train.nonfinite=stop"))


def test_checkpoint_refuses_nonfinite_weights(tmp_path: Path) -> None:
    state = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NonFiniteTrainingError, match="'w' is not finite"):
        save_checkpoint(tmp_path, {"step": 1, "model": state}, keep=2)
    assert list(tmp_path.iterdir()) == []


def test_signal_checkpoints_and_exits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = train_module.Trainer.train_step

    def step_then_signal(self: train_module.Trainer) -> dict[str, Any]:
        result = real(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train_module.Trainer, "train_step", step_then_signal)
    out_dir = tmp_path / "run"
    assert run_and_exit(tiny_config(out_dir, "eval.text_samples=0")) == 128 + signal.SIGTERM
    assert list_checkpoints(out_dir)[-1].name == "ckpt-00000003.pt"
    assert json.loads((out_dir / "heartbeat.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_sigint_to_the_cli(tmp_path: Path) -> None:
    """A real process: Ctrl-C after the first steps writes a checkpoint and exits with 130."""
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "scripts.train", *tiny_overrides(out_dir, "train.max_steps=100000",
                                                                   "train.ckpt_interval=0", "train.eval_interval=0")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    heartbeat = out_dir / "heartbeat.json"
    deadline = time.monotonic() + 120
    while not (heartbeat.exists() and json.loads(heartbeat.read_text())["step"] >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume=true" in err and list_checkpoints(out_dir)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_the_optimizer_sees_gradients_clipped_to_grad_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          clip: float) -> None:
    """train.grad_clip bounds the global gradient norm that reaches AdamW.step (0: no bound; the tiny run's norms
    then exceed 1e-3, so the bound is what keeps them under it)."""
    seen: list[float] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(tiny_config(tmp_path / "run", "eval.text_samples=0", f"train.grad_clip={clip}"))
    assert len(seen) == 6
    if clip:
        assert max(seen) <= clip * (1 + 1e-5)
    else:
        assert min(seen) > 1e-3


def test_bits_per_byte_is_the_held_out_loss_in_bits() -> None:
    """evaluate_text: a model that spreads its bets evenly over the 256 bytes scores ln 256 nats per byte, which is
    8 bits per byte."""
    from sal_harness.evaluate import evaluate_text

    class Uniform(torch.nn.Module):
        def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
            logits = torch.zeros(*inputs.shape, 256)
            return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))

    task = tiny_config(Path("x"), "task=text").task
    result = evaluate_text(cast(Any, Uniform()), task, samples=3, batch_size=2, seed=0, device="cpu")
    assert result["val_loss"] == pytest.approx(math.log(256)) and result["n"] == 3
    assert result["bpb"] == pytest.approx(8.0)


def test_gradient_accumulation_takes_the_same_step(tmp_path: Path) -> None:
    a = tiny_config(tmp_path / "a", "eval.text_samples=0", "train.max_steps=2")
    b = tiny_config(tmp_path / "b", "eval.text_samples=0", "train.max_steps=2", "train.grad_accum=2")
    train(a), train(b)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


def test_schedule_and_curriculum() -> None:
    tc = tiny_config(Path("x"), "train.max_steps=20", "train.warmup_steps=4").train
    lrs = [lr_at(s, tc) for s in range(22)]
    assert lrs[3] == pytest.approx(tc.lr) and lrs[0] < lrs[3] and lrs[20] == lrs[21] == tc.min_lr
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(lrs[3:]))  # warm-up end == cosine start
    # a cosine from lr at the warm-up's end (step 4) to min_lr at max_steps: half way (step 12) the mean of the two,
    # a quarter of the way (step 8) min_lr + (1 + cos(pi / 4)) / 2 of the span
    assert lrs[12] == pytest.approx((tc.lr + tc.min_lr) / 2)
    assert lrs[8] == pytest.approx(tc.min_lr + (1 + math.cos(math.pi / 4)) / 2 * (tc.lr - tc.min_lr))
    tc = tiny_config(Path("x"), "train.curriculum_start=16", "train.curriculum_steps=4").train
    assert [seq_len_at(s, tc, 64) for s in range(6)] == [16, 32, 48, 64, 64, 64]
    # geometric: 16 * 4^(s/4) = 16, 22.6, 32, 45.3, 64 before rounding up to multiples of 8
    tc = tiny_config(Path("x"), "train.curriculum_start=16", "train.curriculum_steps=4",
                     "train.curriculum_multiple=8", "train.curriculum_shape=geometric").train
    assert [seq_len_at(s, tc, 64) for s in range(6)] == [16, 24, 32, 48, 64, 64]
    task = tiny_config(Path("x"), "task.max_distance=50").task
    assert task_at_length(task, 32).max_distance is None and task_at_length(task, 64).max_distance == 50


def test_token_batches_keep_the_tokens_of_a_full_length_step(tmp_path: Path, monkeypatch) -> None:
    """curriculum_batch=tokens: batch_size x (seq_len // length) sequences at each curriculum length (lengths 16,
    32, 48, 64 of a 64-token task with batch 4: 16, 8, 4, 4 sequences), and the run trains on them."""
    drawn = []
    build = train_module.build_task

    def spying_build(config):
        task: Any = build(config)
        sample = task.sample

        def spy(batch_size, generator, **kwargs):
            batch = sample(batch_size, generator, **kwargs)
            drawn.append(tuple(batch.inputs.shape))
            return batch

        task.sample = spy
        return task

    monkeypatch.setattr(train_module, "build_task", spying_build)
    summary = train(tiny_config(tmp_path, "task=text", "task.seq_len=64", "train.curriculum_start=16",
                                "train.curriculum_steps=4", "train.curriculum_batch=tokens", "train.max_steps=5",
                                attention="dense"))
    assert drawn[:5] == [(16, 16), (8, 32), (4, 48), (4, 64), (4, 64)]
    assert math.isfinite(summary["eval"]["bpb"])


def test_text_task_run_and_curriculum(tmp_path: Path) -> None:
    summary = train(tiny_config(tmp_path, "task=text", "task.seq_len=64", "train.curriculum_start=16",
                                "train.curriculum_steps=4", attention="dense"))
    assert summary["eval"]["bpb"] > 0 and "by_distance" not in summary["eval"]
    assert [r["seq_len"] for r in records(tmp_path, "train")] == [32, 64, 64]


def test_cli_overrides_errors_and_multirun(tmp_path: Path) -> None:
    common = [sys.executable, "-m", "scripts.train"]
    bad = subprocess.run([*common, *tiny_overrides(tmp_path / "x", "train.lr=-1")], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "train.lr: Input should be greater than 0" in bad.stderr
    unknown = subprocess.run([*common, "train.bogus=1"], cwd=REPO, capture_output=True, text=True)
    assert unknown.returncode != 0 and "bogus" in unknown.stderr
    sweep = [*common, "--multirun", *tiny_overrides(tmp_path, "train.max_steps=2", attention="dense"),
             "attention=dense,window", f"out_dir={tmp_path}/${{attention.kind}}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(sweep, cwd=tmp_path, capture_output=True, text=True, env=env)  # the sweep's own file: here
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / kind / "eval.json").exists() for kind in ("dense", "window"))
    assert list((tmp_path / "runs" / "multirun").glob("*/multirun.yaml"))


@pytest.mark.parametrize(("precision", "expected"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_evaluation_runs_in_the_training_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   precision: str, expected: torch.dtype) -> None:
    """The final evaluation's attention sees the dtype training used (an fp32 evaluation of a bf16-trained model
    measured other numbers and, on the GPU, fell back to SDPA's math kernel: 48 GiB of scores at 16k)."""
    from sal_harness.evaluate import final_evaluation
    from sal_harness.model import GPT

    config = tiny_config(tmp_path, f"train.precision={precision}", attention="dense")
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    final_evaluation(GPT(config.gpt), config, 0, "cpu")
    assert seen and set(seen) == {expected}
