"""The launch file and the parameters file, checked without ROS 2's launch (not installable here).

The launch file is read as a syntax tree: the node, its arguments, and the two event handlers
that configure and then activate it on every distribution. When launch_ros is importable the
description is also built for real.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

from husarnet_ros.core.constants import DEFAULT_MTU

PKG = Path(__file__).resolve().parents[2]
LAUNCH = PKG / "launch" / "husarnet.launch.py"
CONFIG = PKG / "config" / "husarnet.yaml"
NODE = PKG / "husarnet_ros" / "node.py"


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            f = n.func
            if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                out.append(n)
    return out


def kwarg(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def literal(node: ast.AST | None) -> object:
    return ast.literal_eval(node) if node is not None else None


def attr_names(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def test_declares_the_documented_arguments(tree: ast.Module) -> None:
    names = {literal(c.args[0]) for c in calls(tree, "DeclareLaunchArgument")}
    assert names == {"config_file", "namespace", "hostname", "base_servers", "log_level"}
    for c in calls(tree, "DeclareLaunchArgument"):
        assert kwarg(c, "default_value") is not None, literal(c.args[0])
        assert literal(kwarg(c, "description")), literal(c.args[0])


def test_lifecycle_node_of_this_package(tree: ast.Module) -> None:
    [node] = calls(tree, "LifecycleNode")
    assert literal(kwarg(node, "package")) == "husarnet_ros"
    assert literal(kwarg(node, "executable")) == "husarnet_node"
    assert isinstance(kwarg(node, "name"), ast.Name)  # NODE_NAME
    assert 'NODE_NAME = "husarnet"' in LAUNCH.read_text()
    # Humble's LifecycleNode requires a namespace; 'autostart' exists only from Jazzy on.
    assert kwarg(node, "namespace") is not None
    assert kwarg(node, "autostart") is None
    log_args = kwarg(node, "arguments")
    assert "--log-level" in ast.unparse(log_args)


def test_configure_on_process_start_then_activate_on_inactive(tree: ast.Module) -> None:
    handlers = calls(tree, "RegisterEventHandler")
    assert len(handlers) == 2
    [on_start] = calls(tree, "OnProcessStart")
    assert isinstance(kwarg(on_start, "target_action"), ast.Name)
    assert "TRANSITION_CONFIGURE" in attr_names(kwarg(on_start, "on_start"))
    assert calls(kwarg(on_start, "on_start"), "ChangeState")
    [on_state] = calls(tree, "OnStateTransition")
    assert literal(kwarg(on_state, "goal_state")) == "inactive"
    # Activate after configure only, never again after an operator's deactivate (active -> inactive).
    assert literal(kwarg(on_state, "start_state")) == "configuring"
    assert "TRANSITION_ACTIVATE" in attr_names(kwarg(on_state, "entities"))
    for change in calls(tree, "ChangeState"):
        matcher = kwarg(change, "lifecycle_node_matcher")
        assert matcher is not None and calls(matcher, "matches_action")
    # The handlers are returned before the node so they listen before it can emit anything.
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_launch_node")
    ret = [n for n in ast.walk(fn) if isinstance(n, ast.Return)][-1]
    assert [e.id for e in ret.value.elts] == ["configure", "activate", "node"]


def test_launch_forces_autostart_off(tree: ast.Module) -> None:
    forced = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign)
        and isinstance(n.targets[0], ast.Subscript)
        and isinstance(n.targets[0].slice, ast.Constant)
        and n.targets[0].slice.value == "autostart"
    ]
    assert len(forced) == 1
    assert literal(forced[0].value) is False


def _helpers(tree: ast.Module) -> dict:
    """The launch file's pure helpers, compiled alone (their module imports launch)."""
    names = ("_file_parameters", "_flatten", "_parse_list")
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    ns: dict = {"yaml": yaml, "os": __import__("os"), "NODE_NAME": "husarnet"}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(LAUNCH), "exec"), ns)
    return ns


def test_launch_helpers(tree: ast.Module, tmp_path: Path) -> None:
    h = _helpers(tree)
    assert h["_parse_list"]("['a:443', 'b:1:2']") == ["a:443", "b:1:2"]
    assert h["_parse_list"]("a:443, b:443") == ["a:443", "b:443"]
    params = h["_file_parameters"](str(CONFIG))
    assert params["interface_name"] == "hnet0"
    assert params["websetup.enabled"] is True and params["websetup.whitelist"] == []
    assert sorted(params) == sorted(node_parameter_names())
    other = tmp_path / "p.yaml"
    other.write_text("/**/husarnet:\n  ros__parameters:\n    hostname: robot7\n")
    assert h["_file_parameters"](str(other)) == {"hostname": "robot7"}
    assert h["_file_parameters"]("") == {}


def node_parameter_names() -> list[str]:
    tree = ast.parse(NODE.read_text())
    return [literal(c.args[0]) for c in calls(tree, "ParamSpec") if c.args]


def test_config_file_lists_every_parameter(tree: ast.Module) -> None:
    doc = yaml.safe_load(CONFIG.read_text())
    flatten = _helpers(tree)["_flatten"]  # the launch file's own: nested sections -> dotted names
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    params = flatten(doc["husarnet"]["ros__parameters"])
    names = node_parameter_names()
    assert len(names) >= 17
    assert sorted(params) == sorted(names)
    assert params["autostart"] is False
    assert params["udp_port"] == 5582 and params["mtu"] == DEFAULT_MTU


def test_real_launch_description_when_launch_ros_is_installed() -> None:
    pytest.importorskip("launch_ros", reason="launch_ros is not installable from PyPI here; AST checks above")
    spec = importlib.util.spec_from_file_location("husarnet_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    assert len(ld.entities) == 6
