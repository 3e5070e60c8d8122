"""A clean install: the wheel holds nsa, scope, sal_harness and sal_hf only (no generic top-level names), every module
of theirs, the hydra configs of the checkout's configs/ as sal_harness/conf, and its console scripts run from a fresh
virtual environment.

The venv is created with --system-site-packages so that torch & co come from this machine instead of a
download; the wheel itself is installed with --no-deps --no-index, so nothing of the checkout is on the path
(the test runs from a temporary directory and checks where sal_harness was imported from).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from harness_tiny import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("nsa", "scope", "sal_harness", "sal_hf")
SOURCES = ("pyproject.toml", "README.md", *PACKAGES, "configs", "bench", "cli", "scripts")
CONSOLE_SCRIPTS = ("sal-train", "sal-compare", "sal-eval", "sal-report", "sal-demo")


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done


def test_wheel_install_and_console_scripts(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name in SOURCES:
        target = source / name
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, target)
    run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist")], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert {"nsa", "scope", "sal_harness"} <= top_level
    assert not top_level & {"bench", "cli", "scripts", "tests", "configs"}  # no generic names in site-packages
    # the checkout's configs/ installs as sal_harness/conf; pyproject.toml lists the packages by hand, so every
    # package of the checkout must be in the wheel, and every config group file
    configs = {f"sal_harness/conf/{p.relative_to(REPO / 'configs').as_posix()}"
               for p in (REPO / "configs").rglob("*.yaml")}
    modules = {p.relative_to(REPO).as_posix() for package in PACKAGES for p in (REPO / package).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert {"sal_harness/conf/train.yaml", "sal_harness/conf/attention/scope.yaml"} <= configs
    assert configs | modules | {"sal_harness/py.typed"} <= set(names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)
    where = run([str(venv / "bin" / "python"), "-c", "import sal_harness; print(sal_harness.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(str(venv))
    for script in CONSOLE_SCRIPTS:
        assert run([str(venv / "bin" / script), "--help"], tmp_path).stdout
    out_dir = tmp_path / "run"
    run([str(venv / "bin" / "sal-train"), *tiny_overrides(out_dir, "train.max_steps=2")], tmp_path)
    assert json.loads((out_dir / "eval.json").read_text())["step"] == 2
