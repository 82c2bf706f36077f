"""husarnet-ros against real nodes: each command runs as its own process, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from husarnet_ros.testing.ci import require

rclpy = require("rclpy", "rclpy not importable")
require("husarnet_msgs.msg", "husarnet_msgs not built (scripts/build_ros.sh)")

from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from husarnet_ros.core.identity import Identity  # noqa: E402
from husarnet_ros.node import HusarnetNode  # noqa: E402

PKG = Path(__file__).resolve().parents[2]
SUCCESS = TransitionCallbackReturn.SUCCESS


def cli(ctx: Any, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(ctx.get_domain_id())
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["PYTHONPATH"] = os.pathsep.join([str(PKG), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "husarnet_ros.cli", *argv], env=env, capture_output=True, text=True, timeout=timeout
    )


def make_node(ctx: Any, state: Path, namespace: str = "", **params: Any) -> HusarnetNode:
    values = {"state_dir": str(state), "hosts_file": "", "lan_discovery": False, "udp_port": 0, **params}
    return HusarnetNode(
        context=ctx, namespace=namespace, parameter_overrides=[Parameter(k, value=v) for k, v in values.items()]
    )


def test_no_node_exits_3_with_a_clear_message(ros_context: Any) -> None:
    r = cli(ros_context, "--timeout", "1", "status")
    assert r.returncode == 3, r.stderr
    assert "no husarnet node answered at /husarnet" in r.stderr
    r = cli(ros_context, "--timeout", "1", "whitelist", "ls")
    assert r.returncode == 3


def test_whitelist_commands_against_a_configured_node(ros_context: Any, spinner: Any, tmp_path: Path) -> None:
    node = spinner.add(make_node(ros_context, tmp_path / "state"))
    peer = Identity.generate()
    try:
        assert node.trigger_configure() == SUCCESS
        r = cli(ros_context, "whitelist", "add", peer.address_str, "laptop")
        assert r.returncode == 0, r.stderr
        assert "added" in r.stdout
        r = cli(ros_context, "whitelist", "ls", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {
            "enabled": True,
            "entries": [{"address": peer.address_str, "hostname": "laptop"}],
        }
        r = cli(ros_context, "whitelist", "add", "fd00::1")
        assert r.returncode == 1 and "fc94" in r.stderr
        r = cli(ros_context, "whitelist", "disable")
        assert r.returncode == 0 and "disabled" in r.stdout
        r = cli(ros_context, "whitelist", "rm", "laptop")
        assert r.returncode == 0, r.stderr
        r = cli(ros_context, "whitelist", "ls")
        assert r.returncode == 0 and "DISABLED; 0 entries" in r.stdout
        # Inactive: no status is published, so status reports no answering node.
        r = cli(ros_context, "--timeout", "1", "status")
        assert r.returncode == 3
    finally:
        node._release()
        node.destroy_node()


@pytest.mark.netns
def test_status_ip_wait_and_ping_between_two_nodes(ros_context: Any, node_pair: Any) -> None:
    a, b, a_id, b_id = node_pair(hostname="nodea", publish_period=0.2)
    for n in (a, b):
        assert n.trigger_configure() == SUCCESS
        assert n.trigger_activate() == SUCCESS
    r = cli(ros_context, "wait", "peer", "nodeb", "--wait-timeout", "30")
    assert r.returncode == 0, r.stderr
    assert b_id.address_str in r.stdout
    r = cli(ros_context, "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["address"] == a_id.address_str and st["hostname"] == "nodea"
    [peer] = st["peers"]
    assert peer["address"] == b_id.address_str and peer["is_secure"] and peer["path"] != "none"
    r = cli(ros_context, "status")
    assert r.returncode == 0 and "nodeb" in r.stdout and "PATH" in r.stdout
    r = cli(ros_context, "ip")
    assert r.stdout.strip() == a_id.address_str
    r = cli(ros_context, "ip", "nodeb")
    assert r.stdout.strip() == b_id.address_str
    r = cli(ros_context, "--node", "/b/husarnet", "ip")
    assert r.stdout.strip() == b_id.address_str
    r = cli(ros_context, "ping", "nodeb", "-c", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("reply from") == 2
    r = cli(ros_context, "ip", "nosuchpeer")
    assert r.returncode == 1
    r = cli(ros_context, "wait", "base", "--wait-timeout", "1")
    assert r.returncode == 1 and "base" in r.stderr
    other = Identity.generate().address_str
    r = cli(ros_context, "wait", "peer", other, "--wait-timeout", "1")
    assert r.returncode == 1 and "not connected" in r.stderr


@pytest.mark.netns
def test_setup_tun_for_an_unprivileged_user(tmp_path: Path, unique_ifname: str, ros_context: Any) -> None:
    state = tmp_path / "state"
    r = cli(ros_context, "setup-tun", "--user", "nobody", "--state-dir", str(state), "--interface", unique_ifname)
    try:
        assert r.returncode == 0, r.stderr
        ident = Identity.load(state / "id")
        nobody = __import__("pwd").getpwnam("nobody")
        assert (state / "id").stat().st_uid == nobody.pw_uid
        show = subprocess.run(["ip", "-6", "addr", "show", unique_ifname], capture_output=True, text=True).stdout
        assert ident.address_str in show
        # Persistent and owned by nobody: /sys says so.
        owner = Path(f"/sys/class/net/{unique_ifname}/owner").read_text().strip()
        assert owner == str(nobody.pw_uid)
    finally:
        r = cli(ros_context, "setup-tun", "--remove", "--interface", unique_ifname)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["ip", "link", "show", unique_ifname], capture_output=True).returncode != 0
