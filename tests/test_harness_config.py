"""sal_harness.config: hydra composition of the shipped groups, key=value overrides, and pydantic validation
that names the key of every unknown, non-finite, out-of-range or inconsistent value."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from sal_harness.config import CONF_DIR, RECIPE_KEYS, SCOPE_RECIPE_KEYS, compose, load_run_config, validate_run_config
from sal_harness.errors import HarnessConfigError

GROUPS = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
          for group in ("model", "attention", "task", "train", "eval", "experiment")}


def test_every_shipped_group_option_composes_and_validates(tmp_path: Path) -> None:
    assert GROUPS["attention"] == sorted(f"{kind}{variant}" for kind in ("dense", "nsa", "scope", "window")
                                         for variant in ("", "_16k"))
    assert GROUPS["task"] == ["mqar", "needle", "passkey", "text"]
    gpu = {"model": "gpu_small", "train": "gpu", "eval": "gpu", "experiment": "cuda_16k"}  # the experiment's own
    for group, options in GROUPS.items():
        for option in options:
            context = ["experiment=cuda_16k"] if gpu.get(group) == option else [f"{group}={option}"]
            config = load_run_config([*context, f"out_dir={tmp_path}"])
            if group in ("attention", "task"):
                kind = getattr(config, group).model_dump()["kind" if group == "attention" else "name"]
                assert option.startswith(kind)


def test_defaults_and_overrides() -> None:
    config = load_run_config([])
    assert (config.attention.kind, config.task.name, config.out_dir) == ("nsa", "needle", "runs/nsa-needle")
    config = load_run_config(["attention=window", "attention.window_size=9", "train.lr=0.02", "task.seq_len=96"])
    assert config.attention.model_dump()["window_size"] == 9 and config.train.lr == 0.02
    assert config.out_dir == "runs/window-needle" and config.task.seq_len == 96


@pytest.mark.parametrize(
    ("override", "message"),
    [
        *[(f"train.{key}={value}", f"train.{key}: Input should be a finite number")
          for key in ("lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2", "heartbeat_s") for value in
          ("nan", "inf", "-inf")],
        ("task.val_fraction=nan", "task.val_fraction: Input should be a finite number"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.beta1=1.0", "train.beta1: Input should be less than 1"),
        ("train.grad_clip=-1.0", "train.grad_clip: Input should be greater than or equal to 0"),
        ("task.val_fraction=1.0", "task.val_fraction: Input should be less than 1"),
        ("train.batch_size=0", "train.batch_size: Input should be greater than or equal to 1"),
        ("train.batch_size=true", "train.batch_size: Input should be a valid integer"),
        ("train.batch_size='4'", "train.batch_size: Input should be a valid integer"),
        ("train.device=cuad", "train.device"),
        ("train.min_lr=1.0", "min_lr=1.0 must be <= lr"),
        ("train.grad_accum=3", "batch_size=32 must be a multiple of grad_accum=3"),
        ("attention.num_selected=2", "attention.nsa.num_selected: Input should be greater than or equal to 3"),
        ("attention.cmp_stride=3", "cmp_stride=3 must divide"),
        ("model.num_kv_heads=3", "num_heads=4 must be a multiple of num_kv_heads=3"),
        ("task.seq_len=512", "task.seq_len=512 exceeds model.max_seq_len=256"),
        ("model.vocab_size=256", "model.vocab_size=256 is smaller than the"),
        ("eval.distances=[500]", "eval.distances entry=500 does not fit"),
        ("eval.depths=[1.0]", "depths entry 1.0 must be in [0, 1)"),
        ("train.warmup_steps=300", "warmup_steps=300 must be <= max_steps=250"),
        ("train.weight_decay=1000", "lr x weight_decay = 10 must be < 1"),
        ("train.curriculum_start=16", "curriculum_start=16 and curriculum_steps=0 must be set together"),
        ("train.curriculum_steps=10", "curriculum_start=None and curriculum_steps=10 must be set together"),
        ("train.seed=18446744073709551616", "train.seed: Input should be less than or equal to 18446744073709551615"),
        ("eval.seed=18446744073709551616", "eval.seed: Input should be less than or equal to"),
        ("train.device=meta", "'meta': the harness runs on cpu or cuda[:index]"),
        ("eval.depths=[]", "depths must hold at least one depth"),
        ("eval.distances=[8,8]", "distances=[8, 8] repeats an entry"),
        ("+train.bogus=1", "train.bogus: Extra inputs are not permitted"),
        ("+model.nsa.window=4", "model.nsa: Extra inputs are not permitted"),
    ],
)
def test_bad_values_are_named(override: str, message: str) -> None:
    with pytest.raises(HarnessConfigError) as err:
        load_run_config([override])
    assert message in str(err.value)


def test_the_curriculum_ends_within_the_run() -> None:
    with pytest.raises(HarnessConfigError, match="curriculum_steps=300 must be <= max_steps=250"):
        load_run_config(["train.curriculum_start=16", "train.curriculum_steps=300"])


def test_scope_teacher_and_attention_keys_are_checked_per_kind() -> None:
    with pytest.raises(HarnessConfigError, match=r"Could not override 'attention\.window_size'"):
        compose(["attention=dense", "attention.window_size=4"])  # dense has no window: hydra's struct mode
    with pytest.raises(HarnessConfigError, match=r"attention\.scope\.budget: Input should be greater than or equal"):
        load_run_config(["attention=scope", "attention.budget=-1"])
    assert math.isclose(load_run_config(["attention=scope"]).train.scope_teacher_weight, 1.0)


def test_torch_only_import_of_the_attention_packages() -> None:
    """nsa and scope import with torch alone: hydra, omegaconf, pydantic, matplotlib and tqdm are blocked."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'hydra', 'omegaconf', 'pydantic', 'matplotlib', 'tqdm', 'sal_harness'}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import nsa, scope\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_recipe_reruns_a_run_like_for_like() -> None:
    """A results row's recipe, given back as overrides with the run's experiment, attention and task, recomposes
    every setting it names, whatever the run changed (float, null, string and integer values among them)."""
    changed = ["experiment=cuda_16k", "attention=scope_16k", "task=text", "out_dir=/tmp/a", "train.batch_size=2",
               "train.lr=0.00123", "train.curriculum_batch=fixed", "train.max_minutes=null", "model.n_layer=3",
               "model.init_std=0.05"]
    original = validate_run_config(compose(changed))
    recipe = original.recipe()
    assert "train.curriculum_batch=fixed" in recipe and "train.max_minutes=null" in recipe
    again = validate_run_config(compose(["experiment=cuda_16k", "attention=scope_16k", "task=text", "out_dir=/tmp/b",
                                         *recipe.split()]))
    assert again.recipe() == recipe
    for key in RECIPE_KEYS + SCOPE_RECIPE_KEYS:
        group, name = key.split(".")
        assert getattr(getattr(again, group), name) == getattr(getattr(original, group), name), key


def test_only_a_scope_recipe_names_scope_settings() -> None:
    """The teacher's weight trains SCOPE only: a SCOPE run's recipe names it (rerunning it needs it), a dense
    run's does not (it would read as a difference from SCOPE's where the two trained the same way)."""
    def recipe(attention: str) -> str:
        return validate_run_config(compose(["experiment=cuda_16k", f"attention={attention}", "task=text",
                                            "out_dir=/tmp/a", "train.scope_teacher_weight=0.25"])).recipe()
    scope = recipe("scope_16k")
    assert "train.scope_teacher_weight=0.25" in scope and "train.scope_teacher_len=" in scope
    assert "scope_teacher" not in recipe("dense_16k")
    assert recipe("dense_16k") in scope
