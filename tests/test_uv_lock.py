"""uv.lock, the lock behind the design card's `uv sync` + `uv run -q pytest -m long`, agrees with the pip install.

Without network and without uv: the lock is read as TOML. It must pin every package requirements.txt pins to the
same version (torch as its CPU build, 2.13.0+cpu, from the wheel in /opt/wheels, not PyPI's CUDA build), hold the
test tools in the dev dependency group, and be the lock of this pyproject.toml's dev group and constraints (what
`uv lock --check` verifies with uv; README "uv" says how to re-lock).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCH_WHEEL = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
TEST_TOOLS = {"pytest", "hypothesis", "ruff", "mypy", "triton"}
# The wheel test's installers (uv's venvs hold no pip): any recent version, as requirements.txt leaves them to the
# interpreter's own.
INSTALLERS = {"pip", "setuptools"}
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)$")


def normalized(name: str) -> str:
    """PEP 503 name: lower case, runs of -, _ and . as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(specs: list[str]) -> dict[str, str]:
    """name -> version of `name==version` requirement strings (anything else is an error: the pins must be exact)."""
    found = {}
    for spec in specs:
        match = PIN.match(spec)
        assert match, f"{spec!r} is not pinned exactly"
        found[normalized(match[1])] = match[2]
    return found


def requirement_pins() -> dict[str, str]:
    """The pins of requirements.txt (comments and `-e .` skipped)."""
    lines = (line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines())
    return pins([line for line in lines if line and not line.startswith("-")])


@pytest.fixture(scope="module")
def lock() -> dict[str, Any]:
    return tomllib.loads((REPO / "uv.lock").read_text())


@pytest.fixture(scope="module")
def locked(lock: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> the lock's [[package]] entry (one version per package: the lock covers one environment)."""
    packages: dict[str, dict[str, Any]] = {}
    for package in lock["package"]:
        name = normalized(package["name"])
        assert name not in packages, f"{name} is locked twice"
        packages[name] = package
    return packages


def test_lock_pins_what_requirements_pin(locked: dict[str, dict[str, Any]]) -> None:
    pinned = requirement_pins()
    assert {"torch", *TEST_TOOLS} <= set(pinned)
    for name, version in pinned.items():
        assert name in locked, f"requirements.txt pins {name} but uv.lock does not hold it"
        public_version = locked[name]["version"].split("+")[0]  # torch's local label: 2.13.0+cpu
        assert public_version == version, f"{name}: requirements.txt {version}, uv.lock {locked[name]['version']}"


def test_torch_is_the_cpu_build_from_the_local_wheel(locked: dict[str, dict[str, Any]]) -> None:
    torch = locked["torch"]
    assert torch["version"] == "2.13.0+cpu"
    assert torch["source"] == {"registry": "/opt/wheels"}
    assert [wheel["path"] for wheel in torch["wheels"]] == [TORCH_WHEEL]
    assert not any(name.startswith("nvidia-") for name in locked), "a CUDA package is locked"


def test_dev_group_holds_the_test_tools(lock: dict[str, Any], locked: dict[str, dict[str, Any]]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dev = pyproject["dependency-groups"]["dev"]
    installers = {normalized(re.split(r"[<>=~! ]", spec)[0]) for spec in dev} & INSTALLERS
    assert installers == INSTALLERS
    group = pins([spec for spec in dev if normalized(re.split(r"[<>=~! ]", spec)[0]) not in INSTALLERS])
    assert set(group) >= TEST_TOOLS
    required = requirement_pins()
    assert {name: required.get(name) for name in group} == group, "the dev group pins what requirements.txt pins"
    project = locked["sparse-attention-lab"]
    assert {normalized(dep["name"]) for dep in project["dev-dependencies"]["dev"]} == set(group) | INSTALLERS
    # The lock was made from this dev group and these constraints (else: `uv lock`).
    locked_group = {normalized(dep["name"]): dep["specifier"] for dep in project["metadata"]["requires-dev"]["dev"]}
    assert {name: spec for name, spec in locked_group.items() if name not in INSTALLERS} == \
        {name: f"=={version}" for name, version in group.items()}
    constraints = pins(pyproject["tool"]["uv"]["constraint-dependencies"])
    assert {normalized(dep["name"]): dep["specifier"] for dep in lock["manifest"]["constraints"]} == \
        {name: f"=={version}" for name, version in constraints.items()}
    for name, version in group.items():
        assert locked[name]["version"] == version
