"""``make bench`` is not run in CI (it takes minutes and measures): at least every name it uses must exist.

The benchmark scripts call into ``bench/common.py`` and the package's testing helpers; a helper renamed
or removed there once broke the connectivity part of ``make bench`` with an AttributeError after the
throughput tables had run.  This imports each script's project modules and checks every ``module.name``
the script reads, and every name it imports from them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
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


# Objects of the package's classes that a script holds in a variable: their methods must exist too.  The
# fastpath prototype once read the TUN with a ``read_many`` that TunDevice no longer had, and the whole
# prototype column was "skipped: no ping" without an error.
INSTANCES = {"fastpath_proto.py": {"dev": "husarnet_ros.core.tun.TunDevice", "sock": "husarnet_ros.core.udp.UdpSocket"}}


def _attributes(cls: type) -> set[str]:
    """What an instance of ``cls`` has: class attributes, annotated fields, and every ``self.x = ...``."""
    names = set(dir(cls))
    for klass in cls.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
    for node in ast.walk(ast.parse(inspect.getsource(cls))):
        is_self = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
        if is_self and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def _missing_methods(source: str, filename: str, instances: dict[str, str]) -> list[str]:
    classes = {}
    for var, path in instances.items():
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        classes[var] = (cls.__name__, _attributes(cls))
    missing = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in classes:
            name, attrs = classes[node.value.id]
            if node.attr not in attrs:
                missing.append(f"{name}.{node.attr} (line {node.lineno})")
    return missing


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_methods_a_bench_script_calls_on_package_objects_exist(name: str) -> None:
    script = BENCH / name
    missing = _missing_methods(script.read_text(), str(script), INSTANCES[name])
    assert not missing, f"{name} calls methods that do not exist: {missing}"


def test_the_method_check_finds_a_stale_call() -> None:
    source = "dev.read_ready(4)\ndev.read_many(4, timeout=0.5)\nsock.recv_batch()\nsock.gro\n"
    assert _missing_methods(source, "stale.py", INSTANCES["fastpath_proto.py"]) == ["TunDevice.read_many (line 2)"]
