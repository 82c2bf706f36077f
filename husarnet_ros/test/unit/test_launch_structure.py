"""The launch file and the parameters file, checked without ROS 2's launch (not installable here).

The launch file is read as a syntax tree: the node, its arguments, and the two event handlers
that configure and then activate it on every distribution. Its node-building function also runs
over stand-ins for launch and launch_ros, and what it passes is held to launch_ros's rule for
parameter values (an empty list stops a real launch). When launch_ros is importable the
description is also built for real.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
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


class _Recorded:
    """Stands in for any launch action or event: keeps what it was built with."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs


class _Configuration(_Recorded):
    """LaunchConfiguration: performs to the value the fake context holds for its name."""

    def perform(self, context: dict) -> str:
        return context[self.args[0]]


@pytest.fixture
def launch_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The launch file imported over stand-ins for launch and launch_ros, so _launch_node really runs."""
    names = {
        "launch": ("LaunchContext", "LaunchDescription"),
        "launch.actions": ("DeclareLaunchArgument", "EmitEvent", "OpaqueFunction", "RegisterEventHandler"),
        "launch.event_handlers": ("OnProcessStart",),
        "launch.events": ("matches_action",),
        "launch.substitutions": ("PathJoinSubstitution",),
        "launch_ros": (),
        "launch_ros.actions": ("LifecycleNode",),
        "launch_ros.event_handlers": ("OnStateTransition",),
        "launch_ros.events": (),
        "launch_ros.events.lifecycle": ("ChangeState",),
        "launch_ros.substitutions": ("FindPackageShare",),
        "lifecycle_msgs": (),
        "lifecycle_msgs.msg": (),
    }
    for module, attrs in names.items():
        fake = types.ModuleType(module)
        for attr in attrs:
            setattr(fake, attr, _Recorded)
        monkeypatch.setitem(sys.modules, module, fake)
    sys.modules["launch.substitutions"].LaunchConfiguration = _Configuration
    sys.modules["lifecycle_msgs.msg"].Transition = types.SimpleNamespace(TRANSITION_CONFIGURE=1, TRANSITION_ACTIVATE=3)
    spec = importlib.util.spec_from_file_location("husarnet_launch_stubbed", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _passable_by_launch_ros(value: object) -> bool:
    """What launch_ros can hand to a node from a parameters dict: a scalar, or a non-empty list of one type."""
    if isinstance(value, (bool, int, float, str, bytes)):
        return True
    return (
        isinstance(value, list)
        and bool(value)
        and type(value[0]) in (bool, int, float, str)
        and all(type(v) is type(value[0]) for v in value)
    )


def _node_parameters(mod: types.ModuleType, **arguments: str) -> dict:
    context = {"config_file": str(CONFIG), "hostname": "", "base_servers": "", **arguments}
    entities = mod._launch_node(context)
    [node] = [e for e in entities if e.kwargs.get("executable") == "husarnet_node"]
    [params] = node.kwargs["parameters"]
    return params


def test_launch_node_passes_only_what_launch_ros_accepts(launch_module: types.ModuleType, tmp_path: Path) -> None:
    # The shipped file has four empty lists (base_servers, whitelist, peers, websetup.whitelist):
    # launch_ros stops the launch on an empty list, so they are left to the node's own defaults.
    params = _node_parameters(launch_module)
    bad = {name: value for name, value in params.items() if not _passable_by_launch_ros(value)}
    assert bad == {}
    assert "whitelist" not in params and "websetup.whitelist" not in params
    assert params["autostart"] is False and params["interface_name"] == "hnet0"
    # Arguments override the file; a list from the command line is passed as a list of strings.
    params = _node_parameters(launch_module, hostname="robot1", base_servers="['base.example.org:443', 'b:1:2']")
    assert params["hostname"] == "robot1" and params["base_servers"] == ["base.example.org:443", "b:1:2"]
    # A file with a filled list passes it on.
    config = tmp_path / "p.yaml"
    config.write_text("husarnet:\n  ros__parameters:\n    whitelist: ['fc94::1 robot2']\n    mtu: 1400\n")
    assert _node_parameters(launch_module, config_file=str(config)) == {
        "whitelist": ["fc94::1 robot2"],
        "mtu": 1400,
        "autostart": False,
    }
    # A key without a value is refused with the file and the key named (launch_ros: a bare TypeError).
    config.write_text("husarnet:\n  ros__parameters:\n    hostname:\n")
    with pytest.raises(ValueError, match=r"p\.yaml: parameter 'hostname' has no value"):
        _node_parameters(launch_module, config_file=str(config))


def test_real_launch_description_when_launch_ros_is_installed() -> None:
    pytest.importorskip("launch_ros", reason="launch_ros is not installable from PyPI here; AST checks above")
    spec = importlib.util.spec_from_file_location("husarnet_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    assert len(ld.entities) == 6
