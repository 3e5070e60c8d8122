"""sal-eval and the evaluate API (sal_harness.evaluate): argument checks, the cell seeds, what loading a run
folder refuses, and the printed table. A run folder here is one step-6 checkpoint of the tiny model, untrained."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from harness_tiny import tiny_config

from sal_harness import evaluate
from sal_harness.checkpoint import atomic_json, load_checkpoint, rng_state, save_checkpoint
from sal_harness.config import MAX_SEED, RunConfig
from sal_harness.errors import HarnessConfigError, HarnessError, RunFolderError
from sal_harness.evaluate import (
    EVAL_NAME,
    cell_generator,
    evaluate_retrieval,
    evaluate_text,
    format_table,
    load_run_model,
)
from sal_harness.model import GPT

NO_SUCH_GPU = "cuda:99"  # an index no machine here has, with or without CUDA


def save_run(run_dir: Path, attention: str = "nsa", edit: Any = None) -> Path:
    """A run folder holding one step-6 checkpoint; ``edit(checkpoint)`` changes it before it is written, past
    save_checkpoint's own checks (as a file changed on disk would be)."""
    config = tiny_config(run_dir, attention=attention)
    torch.manual_seed(0)
    model = GPT(config.gpt)
    checkpoint = {"step": 6, "config": config.model_dump(mode="json"), "model": model.state_dict(),
                  "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                  "rng": rng_state(torch.Generator()), "trainer": {"skipped": 0, "consecutive_skips": 0}}
    path = save_checkpoint(run_dir, checkpoint, keep=1)
    if edit is not None:
        saved = torch.load(path, weights_only=True)
        edit(saved)
        torch.save(saved, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    run_dir = tmp_path_factory.mktemp("eval") / "nsa"
    save_run(run_dir)
    return run_dir, tiny_config(run_dir)


def test_sal_eval_writes_eval_json_and_prints_the_table(run: tuple[Path, RunConfig],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = run
    assert evaluate.main([str(run_dir)]) == 0
    result = json.loads((run_dir / EVAL_NAME).read_text())
    assert result["step"] == 6 and [c["distance"] for c in result["by_distance"]] == [8, 40]
    assert "nsa on needle (step 6)" in capsys.readouterr().out


def test_cell_seeds_cover_the_whole_eval_seed_range() -> None:
    """eval.seed takes [0, 2**64): the largest works (it overflowed the generator's seed before), and a small one
    draws what it always drew (recorded results stay reproducible)."""
    old_mix = (1234 * 1_000_003 + 40) * 101 + 2
    assert cell_generator(1234, 40, 2).initial_seed() == old_mix
    assert cell_generator(MAX_SEED, 40, 2).initial_seed() == ((MAX_SEED * 1_000_003 + 40) * 101 + 2) % 2**64


def test_the_largest_eval_seed_evaluates(run: tuple[Path, RunConfig]) -> None:
    _, config = run
    cells = evaluate_retrieval(GPT(config.gpt), config.task, [8], samples=2, batch_size=2, seed=MAX_SEED,
                               device="cpu")
    assert len(cells) == 1 and cells[0]["n"] == 2


@pytest.mark.parametrize(("arguments", "named"), [
    ({"samples": 0}, "samples"), ({"samples": -3}, "samples"), ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -1}, "batch_size"), ({"seed": -1}, "seed"), ({"seed": MAX_SEED + 1}, "seed"),
    ({"depths": [float("nan")]}, "depths"), ({"depths": [1.0]}, "depths"), ({"depths": [-0.5]}, "depths"),
    ({"depths": []}, "depths"), ({"distances": [8.5]}, "distances"),
])
def test_bad_retrieval_arguments_name_the_argument(run: tuple[Path, RunConfig], arguments: dict[str, Any],
                                                   named: str) -> None:
    """batch_size 0 looped forever, samples 0 divided by zero, bad depths emptied the grid silently."""
    _, config = run
    given = {"distances": [8], "samples": 2, "batch_size": 2, "seed": 0, "device": "cpu", **arguments}
    distances = given.pop("distances")
    with pytest.raises(HarnessConfigError, match=named):
        evaluate_retrieval(GPT(config.gpt), config.task, distances, **given)


def test_a_distance_that_does_not_fit_is_an_error_with_depths_too(run: tuple[Path, RunConfig]) -> None:
    _, config = run
    with pytest.raises(ValueError, match=r"distances entry=500 does not fit"):
        evaluate_retrieval(GPT(config.gpt), config.task, [500], samples=2, batch_size=2, seed=0, device="cpu",
                           depths=[0.0])


@pytest.mark.parametrize(("arguments", "named"), [({"samples": 0}, "samples"), ({"batch_size": 0}, "batch_size"),
                                                  ({"seed": -1}, "seed")])
def test_bad_text_arguments_name_the_argument(arguments: dict[str, Any], named: str) -> None:
    config = tiny_config(Path("x"), "task=text", attention="dense")
    given = {"samples": 2, "batch_size": 2, "seed": 0, "device": "cpu", **arguments}
    with pytest.raises(HarnessConfigError, match=named):
        evaluate_text(GPT(config.gpt), config.task, **given)


@pytest.mark.parametrize("device", ["mps", "meta", "cpu:1", "banana", NO_SUCH_GPU])
def test_an_unusable_device_is_named(run: tuple[Path, RunConfig], device: str) -> None:
    _, config = run
    with pytest.raises(HarnessError, match="device"):
        evaluate_retrieval(GPT(config.gpt), config.task, [8], samples=2, batch_size=2, seed=0, device=device)


def test_progress_shows_a_bar_over_the_cells_on_a_terminal(run: tuple[Path, RunConfig],
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _, config = run
    model = GPT(config.gpt)
    arguments: dict[str, Any] = {"samples": 1, "batch_size": 1, "seed": 0, "device": "cpu", "depths": [0.0, 0.5]}
    evaluate_retrieval(model, config.task, [8, 40], progress=True, **arguments)
    assert capsys.readouterr().err == ""  # not a terminal: off, as training's bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    evaluate_retrieval(model, config.task, [8, 40], progress=True, **arguments)
    assert "eval:   0%|          | 0/4 [" in capsys.readouterr().err  # later refreshes depend on the time taken
    evaluate_retrieval(model, config.task, [8, 40], **arguments)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("kind", "noted"), [("window", True), ("nsa", False), ("dense", False)])
def test_only_a_window_model_is_beyond_its_reach(kind: str, noted: bool, tmp_path: Path) -> None:
    """NSA's compressed and selected branches reach the whole context: no note for it, past its window."""
    config = tiny_config(tmp_path, attention=kind)
    result = {"attention": kind, "task": "needle", "step": 6,
              "window": 16, "receptive_field": evaluate.receptive_field(config.gpt),
              "by_distance": [{"distance": 2000, "accuracy": 0.0, "token_accuracy": 0.0}]}
    assert ("beyond the window's reach" in format_table(result)) is noted


def sal_eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """(exit status, stderr) of sal-eval, whether it returns or exits through argparse."""
    try:
        status = evaluate.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code  # type: ignore[assignment]
    return status, capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", NO_SUCH_GPU, "mps", "meta", "cpu:1", "banana"])
def test_sal_eval_checks_the_device_before_loading(run: tuple[Path, RunConfig], device: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A device this machine cannot use read as a damaged checkpoint ("delete it")."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir, _ = run
    status, err = sal_eval(capsys, str(run_dir), "--device", device)
    assert status == 2 and "--device" in err
    assert "damaged" not in err and "Traceback" not in err


def test_load_checkpoint_does_not_call_a_device_problem_damage(run: tuple[Path, RunConfig]) -> None:
    run_dir, _ = run
    with pytest.raises(HarnessError, match="map_location") as caught:
        load_checkpoint(run_dir / "ckpt-00000006.pt", map_location=NO_SUCH_GPU)
    assert not isinstance(caught.value, RunFolderError) and "delete" not in str(caught.value)


def test_sal_eval_names_a_bad_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "nope", "no such run folder"), (a_file, "is a file, not a run folder"),
                          (tmp_path / "empty", "evaluate: no checkpoint")):
        status, err = sal_eval(capsys, str(path))
        assert status == 2 and message in err, err
        assert "resume=true" not in err and "Traceback" not in err


def test_a_nonfinite_weight_is_refused_and_nothing_is_written(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """It wrote NaN accuracies and gate means into eval.json, exit status 0."""
    def poison(checkpoint: dict[str, Any]) -> None:
        checkpoint["model"]["lm_head.weight"].fill_(float("nan"))

    save_run(tmp_path / "run", edit=poison)
    with pytest.raises(RunFolderError, match="NaN / inf in weight"):
        load_run_model(tmp_path / "run")
    status, err = sal_eval(capsys, str(tmp_path / "run"))
    assert status == 2 and err.startswith("error: checkpoint") and "NaN / inf" in err
    assert not (tmp_path / "run" / EVAL_NAME).exists()


def test_weights_that_do_not_fit_their_config_name_the_first_mismatch(tmp_path: Path) -> None:
    def widen(checkpoint: dict[str, Any]) -> None:
        checkpoint["config"]["model"]["hidden_size"] = 32

    save_run(tmp_path / "run", edit=widen)
    with pytest.raises(RunFolderError, match=r"do not match its config \(first mismatch: tok_emb.weight is "
                                             r"\[320, 16\], the config makes it \[320, 32\]\)"):
        load_run_model(tmp_path / "run")


def test_atomic_json_refuses_nan_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / EVAL_NAME
    atomic_json(path, {"accuracy": 0.5})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(HarnessError, match=rf"{EVAL_NAME} not written: its entry \['grid'\]\[1\]\['accuracy'\] "
                                               rf"= {bad}"):
            atomic_json(path, {"grid": [{"accuracy": 0.1}, {"accuracy": bad}]})
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
