"""scope imports from nsa only its public modules (nsa.PUBLIC_MODULES, or names in nsa.__all__) and never a
private name: parsed from the sources with ast, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import nsa

SCOPE_DIR = Path(__file__).resolve().parents[1] / "scope"


def private_nsa_uses(source: str) -> list[str]:
    """What ``source`` takes from nsa that is not public: an import from a module outside PUBLIC_MODULES (the
    package root allows the names of nsa.__all__), an imported name or a module attribute starting with "_"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "nsa":
            module = node.module or ""
            for alias in node.names:
                public = alias.name in nsa.__all__ if module == "nsa" else module in nsa.PUBLIC_MODULES
                if not public or alias.name.startswith("_"):
                    found.append(f"from {module} import {alias.name}")
        elif isinstance(node, ast.Import):
            found += [f"import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] == "nsa" and alias.name not in nsa.PUBLIC_MODULES]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and _dotted(node.value).startswith("nsa"):
            found.append(f"{_dotted(node.value)}.{node.attr}")
    return found


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return f"{_dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else ""


def test_scope_uses_only_public_nsa() -> None:
    sources = sorted(SCOPE_DIR.rglob("*.py"))
    assert len(sources) > 5
    found = {str(path.relative_to(SCOPE_DIR)): private_nsa_uses(path.read_text()) for path in sources}
    assert not {path: uses for path, uses in found.items() if uses}


def test_the_check_catches_private_uses() -> None:
    bad = """
from nsa.attention_core import accumulation_dtype
from nsa.dispatch import _logged
from nsa import NSAConfig, apply_rope, PUBLIC_MODULES_TYPO
import nsa.kv_cache
import nsa.dispatch
def f():
    from nsa.rope import apply_rope
    return nsa.dispatch._logged_choice
"""
    assert private_nsa_uses(bad) == [
        "from nsa.attention_core import accumulation_dtype", "from nsa.dispatch import _logged",
        "from nsa import PUBLIC_MODULES_TYPO", "import nsa.kv_cache", "nsa.dispatch._logged_choice",
    ]


def test_public_modules_exist() -> None:
    import importlib

    for name in nsa.PUBLIC_MODULES:
        importlib.import_module(name)


def test_public_names_are_not_shadowed_by_submodules() -> None:
    """A submodule named like a public function (scope.scope_attention, nsa.nsa_attention) rebinds the package's
    attribute to the module when it is imported; every name the packages export must still be what they document."""
    import types

    import scope
    import scope.functional

    for package in (nsa, scope):
        modules = [name for name in package.__all__ if isinstance(getattr(package, name), types.ModuleType)]
        assert not modules, f"{package.__name__} exports modules in place of its objects: {modules}"
    assert scope.scope_attention is scope.functional.scope_attention
    assert nsa.nsa_attention is nsa.functional.nsa_attention
