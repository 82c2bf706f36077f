"""Packaging of husarnet_ros: what colcon, rosdep and `ros2 run` rely on, checked without ROS installed.

A packaging mistake only shows on a user's ROS machine (a missing rosdep key, a console script that
points at a module that does not exist, executables installed where `ros2 run` does not look), so the
metadata is checked here, and setup.py is really run into a scratch prefix.
"""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from husarnet_ros.testing.ci import require

PKG_DIR = Path(__file__).resolve().parents[2]  # husarnet_ros/ (the ament package)
PKG_NAME = "husarnet_ros"
SRC_DIR = PKG_DIR / PKG_NAME  # husarnet_ros/husarnet_ros (the Python package)

EXPECTED_SCRIPTS = {
    "husarnet_node": "husarnet_ros.node:main",
    "husarnet-ros": "husarnet_ros.cli:main",
    "husarnet-base": "husarnet_ros.base.server:main",
}
EXPECTED_EXEC_DEPENDS = {
    "rclpy",
    "lifecycle_msgs",
    "std_msgs",
    "diagnostic_msgs",
    "husarnet_msgs",
    "launch_ros",
    "python3-nacl",
    "python3-pyroute2",
    "python3-cryptography",
    "python3-yaml",
}
EXPECTED_TEST_DEPENDS = {
    "ament_flake8",
    "ament_pep257",
    "python3-pytest",
    "python3-hypothesis",
    "python3-noiseprotocol-pip",
}

# Third-party import name -> rosdep key, where they differ. ROS packages import under their own name.
IMPORT_TO_ROSDEP = {
    "nacl": "python3-nacl",
    "pyroute2": "python3-pyroute2",
    "cryptography": "python3-cryptography",
    "yaml": "python3-yaml",
    "numpy": "python3-numpy",
    "pytest": "python3-pytest",
    "hypothesis": "python3-hypothesis",
}
# Keys missing from rosdep's default sources, which rosdep.yaml next to package.xml must define.
KEYS_DEFINED_LOCALLY = {"python3-nacl", "python3-pyroute2"}


def _package_xml() -> ET.Element:
    return ET.parse(PKG_DIR / "package.xml").getroot()


def _deps(root: ET.Element, *tags: str) -> set[str]:
    return {(el.text or "").strip() for tag in tags for el in root.findall(tag)}


def _setup_call() -> ast.Call:
    tree = ast.parse((PKG_DIR / "setup.py").read_text(), filename="setup.py")
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setup"
    ]
    assert len(calls) == 1, "setup.py must call setup() exactly once"
    return calls[0]


def _setup_kw(name: str) -> ast.expr:
    for kw in _setup_call().keywords:
        if kw.arg == name:
            return kw.value
    raise AssertionError(f"setup() has no {name}= argument")


def _console_scripts() -> dict[str, str]:
    entry_points = ast.literal_eval(_setup_kw("entry_points"))
    scripts = {}
    for spec in entry_points["console_scripts"]:
        name, _, target = (part.strip() for part in spec.partition("="))
        scripts[name] = target
    return scripts


def _module_file(module: str) -> Path | None:
    base = PKG_DIR.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defines_top_level(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
        if isinstance(node, ast.ImportFrom | ast.Import) and any(
            (alias.asname or alias.name) == name for alias in node.names
        ):
            return True
    return False


def _top_level_imports(path: Path) -> set[str]:
    """Absolute imports of a file, as top-level package names (relative imports are ours)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


# --- package.xml -----------------------------------------------------------------------------------


def test_package_xml_is_format_3_ament_python() -> None:
    root = _package_xml()
    assert root.tag == "package"
    assert root.get("format") == "3"
    assert root.findtext("name") == PKG_NAME
    assert root.findtext("export/build_type") == "ament_python"
    for required in ("version", "description", "maintainer", "license"):
        assert (root.findtext(required) or "").strip(), f"package.xml needs <{required}>"
    assert root.find("maintainer").get("email"), "<maintainer> needs an email attribute"


def test_package_xml_passes_catkin_pkg_validation() -> None:
    """catkin_pkg is what colcon-ros and rosdep use to read package.xml; it validates the schema rules."""
    package_module = require("catkin_pkg.package", "catkin_pkg (a dependency of the pinned colcon-ros)")
    package = package_module.parse_package(str(PKG_DIR / "package.xml"))
    package.validate()
    assert package.name == PKG_NAME
    assert package.package_format == 3


def test_package_xml_declares_runtime_and_test_dependencies() -> None:
    root = _package_xml()
    exec_deps = _deps(root, "exec_depend", "depend")
    test_deps = _deps(root, "test_depend", "depend")
    assert exec_deps >= EXPECTED_EXEC_DEPENDS, f"missing exec_depend: {sorted(EXPECTED_EXEC_DEPENDS - exec_deps)}"
    assert test_deps >= EXPECTED_TEST_DEPENDS, f"missing test_depend: {sorted(EXPECTED_TEST_DEPENDS - test_deps)}"
    assert "" not in exec_deps | test_deps, "empty dependency tag"


def test_version_matches_setup_py() -> None:
    assert _package_xml().findtext("version") == ast.literal_eval(_setup_kw("version"))


def test_every_third_party_import_has_a_rosdep_key() -> None:
    """Code that imports a library package.xml does not declare works here and breaks after rosdep."""
    root = _package_xml()
    runtime = _deps(root, "exec_depend", "depend")
    test_only = runtime | _deps(root, "test_depend")
    files = sorted(SRC_DIR.rglob("*.py")) + sorted((PKG_DIR / "launch").glob("*.py"))
    assert files, "no Python files found in the package"
    missing = []
    for path in files:
        # The shared test helpers (husarnet_ros/testing) may use test dependencies; nothing else may.
        allowed = test_only if "testing" in path.relative_to(PKG_DIR).parts else runtime
        for name in _top_level_imports(path):
            if name in sys.stdlib_module_names or name in {PKG_NAME, "__future__"}:
                continue
            key = IMPORT_TO_ROSDEP.get(name, name)
            if key not in allowed:
                missing.append(f"{path.relative_to(PKG_DIR)} imports {name!r}: add <exec_depend>{key}</exec_depend>")
    assert not missing, "\n".join(missing)


def test_locally_defined_rosdep_keys() -> None:
    """rosdep.yaml maps the keys rosdep's default sources lack to Debian/Ubuntu packages."""
    rules = yaml.safe_load((PKG_DIR / "rosdep.yaml").read_text())
    declared = _deps(_package_xml(), "exec_depend", "depend", "test_depend")
    assert declared >= KEYS_DEFINED_LOCALLY
    for key in KEYS_DEFINED_LOCALLY:
        assert rules[key]["debian"] == [key], key
        assert rules[key]["ubuntu"] == [key], key
    # Test-only packages Debian lacks come from pip (rosdep's pip installer), pinned in requirements-dev.txt.
    pip_key = "python3-noiseprotocol-pip"
    assert pip_key in declared
    for os_name in ("debian", "ubuntu"):
        assert rules[pip_key][os_name] == {"pip": {"packages": ["noiseprotocol"]}}


# --- setup.py / setup.cfg ---------------------------------------------------------------------------


def test_console_scripts_are_the_documented_commands() -> None:
    assert _console_scripts() == EXPECTED_SCRIPTS


@pytest.mark.parametrize("script", sorted(EXPECTED_SCRIPTS))
def test_console_script_target_exists(script: str) -> None:
    module, _, func = EXPECTED_SCRIPTS[script].partition(":")
    path = _module_file(module)
    assert path is not None, f"entry point {script} names {module}, which does not exist: `ros2 run` would fail"
    assert _defines_top_level(path, func), f"{path.relative_to(PKG_DIR)} has no top-level {func}() for {script}"


def test_setup_cfg_installs_scripts_where_ros2_run_looks() -> None:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(PKG_DIR / "setup.cfg")
    assert cfg.get("develop", "script_dir") == f"$base/lib/{PKG_NAME}"
    assert cfg.get("install", "install_scripts") == f"$base/lib/{PKG_NAME}"


def test_resource_marker_exists() -> None:
    assert (PKG_DIR / "resource" / PKG_NAME).is_file()


def test_setup_py_installs_an_ament_package(tmp_path: Path) -> None:
    """Run setup.py as colcon does for ament_python and look at what lands in the prefix."""
    src = tmp_path / "src"
    shutil.copytree(PKG_DIR, src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info"))
    prefix = tmp_path / "prefix"
    env = dict(os.environ, PYTHONPATH="", SETUPTOOLS_USE_DISTUTILS="local", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "--quiet",
            "egg_info",
            "--egg-base",
            str(tmp_path),
            "install",
            f"--prefix={prefix}",
            "--single-version-externally-managed",
            f"--record={tmp_path / 'installed.txt'}",
        ],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    share = prefix / "share"
    assert (share / "ament_index" / "resource_index" / "packages" / PKG_NAME).is_file()
    assert (share / PKG_NAME / "package.xml").read_bytes() == (PKG_DIR / "package.xml").read_bytes()
    for pattern, subdir in (("launch/*.py", "launch"), ("config/*.yaml", "config")):
        for data_file in PKG_DIR.glob(pattern):
            assert (share / PKG_NAME / subdir / data_file.name).is_file(), f"{data_file.name} not installed"

    for script in EXPECTED_SCRIPTS:
        installed = prefix / "lib" / PKG_NAME / script
        assert installed.is_file(), f"{script} not in lib/{PKG_NAME} (where `ros2 run` looks)"
        assert os.access(installed, os.X_OK)
        assert not (prefix / "bin" / script).exists()

    site = next(prefix.glob("lib/python3*/site-packages"))
    assert (site / PKG_NAME / "core" / "identity.py").is_file()
    assert not (site / "test").exists(), "the test folder must not be installed as a package"
