"""The node as a process (``ros2 run husarnet_ros husarnet_node``) and repeated lifecycle churn.

Both need a TUN device, so they are root-only (netns marker) and use a unique interface name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from husarnet_ros.testing.ci import require

rclpy = require("rclpy", "rclpy not importable")
require("husarnet_msgs.msg", "husarnet_msgs not built (scripts/build_ros.sh)")

from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from husarnet_ros.node import HusarnetNode  # noqa: E402

PKG = Path(__file__).resolve().parents[2]
SUCCESS = TransitionCallbackReturn.SUCCESS


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def node_process(ctx: Any, state: Path, ifname: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(ctx.get_domain_id())
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["PYTHONPATH"] = os.pathsep.join([str(PKG), env.get("PYTHONPATH", "")])
    params = {
        "autostart": "true",
        "state_dir": str(state),
        "interface_name": ifname,
        "udp_port": "0",
        "lan_discovery": "false",
        "hosts_file": "''",
    }
    argv = [sys.executable, "-m", "husarnet_ros.node", "--ros-args"]
    for k, v in params.items():
        argv += ["-p", f"{k}:={v}"]
    return subprocess.Popen(
        [*argv, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_autostart_brings_the_device_up_and_a_signal_removes_it(
    ros_context: Any, spinner: Any, tmp_path: Path, unique_ifname: str, waiter: Any, sig: int
) -> None:
    from husarnet_msgs.msg import Status
    from husarnet_ros.node import LATCHED_QOS

    listener = spinner.add(rclpy.create_node("listener", context=ros_context))
    statuses: list[Any] = []
    listener.create_subscription(Status, "/husarnet/status", statuses.append, LATCHED_QOS)
    proc = node_process(ros_context, tmp_path / "state", unique_ifname)
    try:
        # The first status is published once activation is complete.
        waiter(lambda: statuses or proc.poll() is not None, 60, "the node's first status")
        assert proc.poll() is None, proc.communicate()[0]
        assert statuses[0].interface_name == unique_ifname
        assert link_exists(unique_ifname)
        proc.send_signal(sig)
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    listener.destroy_node()
    assert proc.returncode == 0, out
    assert "active:" in out
    assert not link_exists(unique_ifname)


@pytest.mark.netns
def test_autostart_with_a_corrupt_identity_exits_1_with_the_reason(
    ros_context: Any, tmp_path: Path, unique_ifname: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "id").write_text("garbage\n")
    (state / "id").chmod(0o600)
    proc = node_process(ros_context, state, unique_ifname)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1, out
    assert "identity file" in out and "configure failed" in out
    assert (state / "id").read_text() == "garbage\n"
    assert not link_exists(unique_ifname)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.netns
def test_lifecycle_churn_leaves_no_threads_fds_or_devices(
    ros_context: Any, spinner: Any, tmp_path: Path, unique_ifname: str
) -> None:
    overrides = {
        "state_dir": str(tmp_path / "state"),
        "interface_name": unique_ifname,
        "hosts_file": "",
        "lan_discovery": False,
        "udp_port": 0,
    }
    node = spinner.add(
        HusarnetNode(context=ros_context, parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    )
    try:
        # One warm-up round: ROS and DDS create their own long-lived threads and sockets lazily.
        assert node.trigger_configure() == SUCCESS
        assert node.trigger_activate() == SUCCESS
        assert node.trigger_deactivate() == SUCCESS
        assert node.trigger_cleanup() == SUCCESS
        threads, fds = threading.active_count(), open_fds()
        for _ in range(3):
            assert node.trigger_configure() == SUCCESS
            assert node.trigger_activate() == SUCCESS
            assert link_exists(unique_ifname)
            assert node.trigger_deactivate() == SUCCESS
            assert not link_exists(unique_ifname)
            assert node.trigger_activate() == SUCCESS
            assert node.trigger_deactivate() == SUCCESS
            assert node.trigger_cleanup() == SUCCESS
        assert threading.active_count() == threads, [t.name for t in threading.enumerate()]
        leaked = open_fds() - fds
        assert not leaked, {
            fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")
        }
        # Shutdown from active also releases everything.
        assert node.trigger_configure() == SUCCESS
        assert node.trigger_activate() == SUCCESS
        assert node.trigger_shutdown() == SUCCESS
        assert not link_exists(unique_ifname)
        assert node.engine is None
    finally:
        node._release()
        node.destroy_node()
