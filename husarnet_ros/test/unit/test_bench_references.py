"""``make bench`` is not run in CI (it takes minutes and measures): at least every name it uses must exist.

The benchmark scripts call into ``bench/common.py`` and the package's testing helpers; a helper renamed
or removed there once broke the connectivity part of ``make bench`` with an AttributeError after the
throughput tables had run.  This imports each script's project modules and checks every ``module.name``
the script reads, and every name it imports from them.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def _project_modules(tree: ast.Module) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(alias -> module for project modules imported whole, [(module, name)] imported from them)."""
    aliases: dict[str, str] = {}
    names: list[tuple[str, str]] = []
    local = {p.stem for p in SCRIPTS}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in local or a.name.startswith("husarnet_ros"):
                    aliases[a.asname or a.name] = a.name
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and (node.module.startswith("husarnet_ros") or node.module in local)
        ):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                try:
                    importlib.import_module(sub)
                except ImportError:
                    names.append((node.module, a.name))
                else:
                    aliases[a.asname or a.name] = sub
    return aliases, names


def _missing(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    aliases, names = _project_modules(tree)
    missing = [f"{mod}.{name}" for mod, name in names if not hasattr(importlib.import_module(mod), name)]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and not hasattr(importlib.import_module(aliases[node.value.id]), node.attr)
        ):
            missing.append(f"{aliases[node.value.id]}.{node.attr} (line {node.lineno})")
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_project_name_a_bench_script_uses_exists(script: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    missing = _missing(script.read_text(), str(script))
    assert not missing, f"{script.name} uses names that do not exist: {missing}"


def test_the_check_finds_a_stale_reference(monkeypatch) -> None:
    """The check itself can fail: a removed helper, or a name imported from a module that lacks it."""
    monkeypatch.syspath_prepend(str(BENCH))
    source = "from husarnet_ros.testing import e2e\nfrom common import no_such_helper\ne2e.daemon_available()\n"
    assert _missing(source, "stale.py") == [
        "common.no_such_helper",
        "husarnet_ros.testing.e2e.daemon_available (line 3)",
    ]
