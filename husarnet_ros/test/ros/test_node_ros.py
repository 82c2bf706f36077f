"""The husarnet lifecycle node in-process: parameters, transitions, services, topics, DDS files.

Tests that bring the engine up (TUN device) are marked netns: they need root and use a unique
interface name in the root namespace, UDP on loopback only, no LAN discovery and no hosts file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from husarnet_ros.testing.ci import require

rclpy = require("rclpy", "rclpy not importable")
require("husarnet_msgs.msg", "husarnet_msgs not built (scripts/build_ros.sh)")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from husarnet_msgs.msg import PeerArray, Status  # noqa: E402
from husarnet_msgs.srv import (  # noqa: E402
    AddToWhitelist,
    ListWhitelist,
    PingPeer,
    RemoveFromWhitelist,
    SetWhitelistEnabled,
)
from husarnet_ros import dds  # noqa: E402
from husarnet_ros.core.identity import Identity  # noqa: E402
from husarnet_ros.node import LATCHED_QOS, PARAMETER_NAMES, HusarnetNode  # noqa: E402

SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
PEER = Identity.generate()
PEER2 = Identity.generate()


def make_node(ctx: Any, state_dir: Path, **params: Any) -> HusarnetNode:
    values = {
        "state_dir": str(state_dir),
        "hosts_file": "",
        "lan_discovery": False,
        "udp_port": 0,
        "hostname": "testbot",
        **params,
    }
    overrides = [Parameter(k, value=v) for k, v in values.items()]
    return HusarnetNode(context=ctx, parameter_overrides=overrides)


@pytest.fixture
def node(ros_context: Any, spinner: Any, tmp_path: Path) -> Any:
    n = spinner.add(make_node(ros_context, tmp_path / "state"))
    yield n
    n._release()
    n.destroy_node()


def service_names(node: HusarnetNode) -> set[str]:
    """Services the node object holds right now (the ROS graph would lag behind discovery)."""
    return {s.srv_name for s in node.services}


OUR_SERVICES = {"~/whitelist/add", "~/whitelist/remove", "~/whitelist/list", "~/whitelist/set_enabled", "~/ping"}


# ------------------------------------------------------------------ parameters
def test_every_parameter_is_declared_with_a_description(node: HusarnetNode) -> None:
    for name in PARAMETER_NAMES:
        assert node.has_parameter(name), name
        d = node.describe_parameter(name)
        assert len(d.description) > 20, name
    assert node.describe_parameter("state_dir").read_only
    assert node.describe_parameter("interface_name").read_only
    port = node.describe_parameter("udp_port").integer_range[0]
    assert (port.from_value, port.to_value) == (0, 65535)
    period = node.describe_parameter("publish_period").floating_point_range[0]
    assert period.from_value > 0
    assert node.get_parameter("whitelist").type_ == Parameter.Type.STRING_ARRAY
    assert node.get_parameter("whitelist").value == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("hostname", "not a hostname!"),
        ("udp_port", 70000),
        ("mtu", 576),
        ("publish_period", 0.0),
        ("warm_interval_ms", 0.2),  # within the descriptor's 0..100, under the 0.5 ms floor
        ("warm_interval_ms", 500.0),
        ("whitelist", ["198.18.0.1"]),
        ("whitelist", ["fc94::1 bad_name!"]),
        ("peers", ["fc94::1@nowhere"]),
        ("base_servers", ["base.example.org:0"]),
        ("base_servers", ["base.example.org:443#nothex"]),
        ("base_servers", ["base.example.org:443#" + "ab" * 32]),  # hex, but no husarnet key (no fc94 address)
        ("base_servers", ["b\u00e4se.example.org:443"]),  # not an ASCII host name
        ("websetup.whitelist", ["fd00::1"]),
        ("hosts_file", "relative/hosts"),
        ("state_dir", "/elsewhere"),  # read-only
        ("interface_name", "other0"),  # read-only
        ("udp_port", "5582"),  # wrong type
    ],
)
def test_bad_parameter_values_are_rejected_with_a_reason(node: HusarnetNode, name: str, value: Any) -> None:
    before = node.get_parameter(name).value
    [result] = node.set_parameters([Parameter(name, value=value)])
    assert not result.successful
    assert result.reason
    assert node.get_parameter(name).value == before


def test_good_parameter_values_are_accepted(node: HusarnetNode) -> None:
    good = [
        Parameter("hostname", value="robot-1"),
        Parameter(
            "base_servers",
            value=["base.example.org:443", "[fd00::1]:443:5582#" + PEER.public_key.hex(), "base2.example.org"],
        ),
        Parameter("whitelist", value=[PEER.address_str + " laptop"]),
        Parameter("peers", value=[f"[{PEER.address_str}]@[fd00::2]:5582"]),
        Parameter("udp_port", value=5583),
        Parameter("publish_period", value=0.5),
        Parameter("warm_interval_ms", value=0.0),  # off
        Parameter("warm_interval_ms", value=5.0),
    ]
    assert all(r.successful for r in node.set_parameters(good))
    assert node.get_parameter("warm_interval_ms").value == 5.0
    assert node.get_parameter("hostname").value == "robot-1"


def test_configure_time_parameters_are_refused_while_configured(node: HusarnetNode) -> None:
    assert node.trigger_configure() == SUCCESS
    [r] = node.set_parameters([Parameter("hostname", value="other")])
    assert not r.successful
    assert "cleanup" in r.reason
    # Runtime ones still apply.
    [r] = node.set_parameters([Parameter("publish_period", value=2.0)])
    assert r.successful
    assert node.trigger_cleanup() == SUCCESS
    [r] = node.set_parameters([Parameter("hostname", value="other")])
    assert r.successful


# ------------------------------------------------------------------ configure / cleanup
def test_configure_creates_identity_services_and_dds_files(node: HusarnetNode, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert node.trigger_configure() == SUCCESS
    ident = Identity.load(state / "id")
    assert node.identity.address == ident.address
    assert service_names(node) >= OUR_SERVICES
    files = dds.DdsFiles(state / "dds")
    assert dds.peers_in_fastdds_xml(files.fastdds.read_bytes()) == [ident.address_str]
    env = dds.parse_dds_env(files.env.read_bytes())
    assert env["FASTDDS_DEFAULT_PROFILES_FILE"] == str(files.fastdds)
    assert node.trigger_cleanup() == SUCCESS
    assert not (OUR_SERVICES & service_names(node))
    # Configure again: same identity (persisted), services back.
    assert node.trigger_configure() == SUCCESS
    assert node.identity.address == ident.address
    assert service_names(node) >= OUR_SERVICES


@pytest.mark.parametrize("problem", ["corrupt", "world_readable"])
def test_unusable_identity_fails_configure_and_creates_nothing(
    ros_context: Any, spinner: Any, tmp_path: Path, problem: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    id_path = state / "id"
    if problem == "corrupt":
        id_path.write_bytes(b"fc94::1 not-hex garbage\n")
        id_path.chmod(0o600)
    else:
        id_path.write_bytes(Identity.generate().serialize())
        id_path.chmod(0o644)
    before = id_path.read_bytes()
    n = spinner.add(make_node(ros_context, state))
    try:
        assert n.trigger_configure() == FAILURE
        assert id_path.read_bytes() == before  # never overwritten
        assert not (state / "dds").exists()
        assert not (OUR_SERVICES & service_names(n))
        assert n.engine is None and n.identity is None
        # The node is still usable: fix the file and configure succeeds.
        good = Identity.generate()
        id_path.write_bytes(good.serialize())
        id_path.chmod(0o600)
        assert n.trigger_configure() == SUCCESS
        assert n.identity.address == good.address
    finally:
        n._release()
        n.destroy_node()


def test_bad_configured_whitelist_fails_configure(ros_context: Any, spinner: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "whitelist.json").write_text("{not json")
    n = spinner.add(make_node(ros_context, state))
    try:
        assert n.trigger_configure() == FAILURE
        assert (state / "whitelist.json").read_text() == "{not json"
        assert not (OUR_SERVICES & service_names(n))
    finally:
        n._release()
        n.destroy_node()


# ------------------------------------------------------------------ services (configured, engine not needed)
def test_whitelist_services_good_and_bad_input(node: HusarnetNode, spinner: Any, tmp_path: Path) -> None:
    assert node.trigger_configure() == SUCCESS

    def listing() -> tuple[bool, list[str], list[str]]:
        r = spinner.call(node, ListWhitelist, "/husarnet/whitelist/list")
        return r.enabled, list(r.addresses), list(r.hostnames)

    assert listing() == (True, [], [])
    r = spinner.call(node, AddToWhitelist, "/husarnet/whitelist/add", address=PEER.address_str, hostname="laptop")
    assert r.success, r.message
    assert listing() == (True, [PEER.address_str], ["laptop"])
    r = spinner.call(node, AddToWhitelist, "/husarnet/whitelist/add", address=PEER.address_str, hostname="")
    assert r.success and "already" in r.message

    bad_adds = [
        ({"address": "198.18.0.1"}, "IPv6"),
        ({"address": "fd00::1"}, "fc94"),
        ({"address": "garbage"}, ""),
        ({"address": ""}, ""),
        ({"address": PEER2.address_str, "hostname": "bad host"}, "hostname"),
        ({"address": PEER2.address_str, "hostname": "LAPTOP"}, "already belongs"),
        ({"address": node.identity.address_str}, "own address"),
    ]
    for fields, word in bad_adds:
        r = spinner.call(node, AddToWhitelist, "/husarnet/whitelist/add", **fields)
        assert not r.success, fields
        assert word in r.message, (fields, r.message)
        assert listing() == (True, [PEER.address_str], ["laptop"]), fields

    # DDS profiles follow the whitelist.
    fastdds = tmp_path / "state" / "dds" / "fastdds.xml"
    assert dds.peers_in_fastdds_xml(fastdds.read_bytes()) == [node.identity.address_str, PEER.address_str]

    for target, word in ((PEER2.address_str, "not on the whitelist"), ("nosuchhost", "unknown hostname"), ("", "no")):
        r = spinner.call(node, RemoveFromWhitelist, "/husarnet/whitelist/remove", address=target)
        assert not r.success and word in r.message, (target, r.message)
    assert listing()[1] == [PEER.address_str]
    r = spinner.call(node, RemoveFromWhitelist, "/husarnet/whitelist/remove", address="Laptop")  # by hostname
    assert r.success, r.message
    assert listing() == (True, [], [])
    assert dds.peers_in_fastdds_xml(fastdds.read_bytes()) == [node.identity.address_str]

    r = spinner.call(node, SetWhitelistEnabled, "/husarnet/whitelist/set_enabled", enabled=False)
    assert r.success and "disabled" in r.message
    assert listing()[0] is False
    assert node.get_parameter("whitelist_enabled").value is False  # the parameter shows the state
    r = spinner.call(node, SetWhitelistEnabled, "/husarnet/whitelist/set_enabled", enabled=False)
    assert r.success and "already" in r.message
    # Persisted: survives cleanup and a new configure, which wins over the parameter's value.
    assert node.trigger_cleanup() == SUCCESS
    node.set_parameters([Parameter("whitelist_enabled", value=True)])
    assert node.trigger_configure() == SUCCESS
    assert listing()[0] is False
    assert node.get_parameter("whitelist_enabled").value is False
    saved = json.loads((tmp_path / "state" / "whitelist.json").read_text())
    assert saved  # written by the whitelist module, atomically


def test_ping_bad_input_and_inactive(node: HusarnetNode, spinner: Any) -> None:
    assert node.trigger_configure() == SUCCESS
    cases = [
        ({"address": PEER.address_str}, "not active"),
        ({"address": "not-an-address:"}, "IPv6"),
        ({"address": "nosuchhost"}, "unknown hostname"),
        ({"address": PEER.address_str, "timeout": -1.0}, "timeout"),
        ({"address": PEER.address_str, "timeout": 1000.0}, "timeout"),
    ]
    for fields, word in cases:
        r = spinner.call(node, PingPeer, "/husarnet/ping", **fields)
        assert not r.success, fields
        assert word in r.message, (fields, r.message)


def test_activate_without_a_usable_device_fails_with_one_clear_message(
    ros_context: Any, spinner: Any, tmp_path: Path
) -> None:
    """'lo' exists and is no TUN device: activation fails, the node stays inactive, nothing is left."""
    n = spinner.add(make_node(ros_context, tmp_path / "state", interface_name="lo"))
    threads_before = threading.active_count()
    try:
        assert n.trigger_configure() == SUCCESS
        assert n.trigger_activate() == FAILURE
        assert n.engine is None
        msg = n._activate_error
        assert "lo" in msg
        if os.geteuid() != 0:
            assert "setup-tun" in msg
        assert threading.active_count() <= threads_before
        diag = {s.name: s for s in n.diagnostics()}
        assert msg in diag["husarnet: node"].message
    finally:
        n._release()
        n.destroy_node()


# ------------------------------------------------------------------ active (root: TUN device)
def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@pytest.mark.netns
def test_activate_publishes_and_deactivate_removes_the_device(
    ros_context: Any, spinner: Any, tmp_path: Path, unique_ifname: str, waiter: Any
) -> None:
    n = spinner.add(
        make_node(
            ros_context,
            tmp_path / "state",
            interface_name=unique_ifname,
            whitelist=[PEER.address_str + " laptop"],
            publish_period=0.2,
        )
    )
    listener = rclpy.create_node("listener", context=ros_context)
    spinner.add(listener)
    try:
        assert n.trigger_configure() == SUCCESS
        assert not link_exists(unique_ifname)
        assert n.trigger_activate() == SUCCESS
        assert link_exists(unique_ifname)
        addrs = subprocess.run(["ip", "-6", "addr", "show", unique_ifname], capture_output=True, text=True).stdout
        assert n.identity.address_str in addrs

        # A subscriber that joins late still gets the latched peer table (transient_local).
        got: list[PeerArray] = []
        statuses: list[Status] = []
        diags: list[DiagnosticArray] = []
        listener.create_subscription(PeerArray, "/husarnet/peers", got.append, LATCHED_QOS)
        listener.create_subscription(Status, "/husarnet/status", statuses.append, LATCHED_QOS)
        listener.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 10)
        waiter(lambda: got and statuses and diags, 10, "peers, status and diagnostics")
        peers = {p.address: p for p in got[-1].peers}
        assert PEER.address_str in peers  # whitelisted peers are known (no session yet)
        assert peers[PEER.address_str].hostname == "laptop"
        assert peers[PEER.address_str].path == "none"
        assert not peers[PEER.address_str].is_secure
        st = statuses[-1]
        assert st.address == n.identity.address_str
        assert st.hostname == "testbot"
        assert st.interface_name == unique_ifname
        assert st.base_connection == Status.BASE_NONE
        assert st.whitelist_enabled
        assert st.dds_env_file.endswith("dds.env")
        assert {kv.key for kv in st.counters} >= {"malformed", "bad_mac", "replay"}
        names = {s.name for s in diags[-1].status}
        assert {"husarnet: node", "husarnet: peers", "husarnet: whitelist", "husarnet: dds"} <= names
        assert all(s.hardware_id == n.identity.address_str for s in diags[-1].status)

        # Late joiner: a second subscription created now gets the last message at once.
        late: list[PeerArray] = []
        listener.create_subscription(PeerArray, "/husarnet/peers", late.append, LATCHED_QOS)
        waiter(lambda: late, 5, "latched peers for a late subscriber")

        # On change, not only periodically: with a 60 s period, a whitelist change still shows at once,
        # and a ROS process started with the old DDS profile makes the status ask for a restart.
        [r] = n.set_parameters([Parameter("publish_period", value=60.0)])
        assert r.successful
        env = dict(os.environ, FASTDDS_DEFAULT_PROFILES_FILE=str(n.dds_files.fastdds))
        old_process = subprocess.Popen(["sleep", "60"], env=env)
        try:
            time.sleep(0.05)  # the profile must change strictly after the process started
            statuses.clear()
            r = spinner.call(listener, AddToWhitelist, "/husarnet/whitelist/add", address=PEER2.address_str)
            assert r.success, r.message
            waiter(lambda: any(PEER2.address_str in {p.address for p in m.peers} for m in got), 5, "peers on change")
            assert dds.peers_in_fastdds_xml(n.dds_files.fastdds.read_bytes())[1:] == sorted(
                [PEER.address_str, PEER2.address_str], key=lambda a: ipaddress.IPv6Address(a).packed
            )
            waiter(lambda: statuses and statuses[-1].dds_restart_needed, 5, "dds_restart_needed in the status")
            diag = {s.name: s for s in n.diagnostics()}
            assert diag["husarnet: dds"].level == DiagnosticStatus.WARN
        finally:
            old_process.kill()
            old_process.wait()

        r = spinner.call(listener, PingPeer, "/husarnet/ping", address=Identity.generate().address_str, timeout=0.5)
        assert not r.success and "unknown peer" in r.message
        r = spinner.call(listener, PingPeer, "/husarnet/ping", address="laptop", timeout=0.3)
        assert not r.success  # known but no session: the engine's error, not a hang

        assert n.trigger_deactivate() == SUCCESS
        assert not link_exists(unique_ifname)
        assert n.engine is None
        # While inactive the whitelist is still served (from the file).
        r = spinner.call(listener, ListWhitelist, "/husarnet/whitelist/list")
        assert set(r.addresses) == {PEER.address_str, PEER2.address_str}
        assert n.trigger_cleanup() == SUCCESS
        assert n.trigger_shutdown() == SUCCESS
    finally:
        n._release()
        listener.destroy_node()
        n.destroy_node()
    assert not link_exists(unique_ifname)


@pytest.mark.netns
def test_two_nodes_connect_and_ping_over_loopback(node_pair: Any, spinner: Any, waiter: Any) -> None:
    """Two nodes in one process, static peers on 127.0.0.1: the ping service measures a real round trip."""
    a, b, _, b_id = node_pair(hostname="testbot")
    for n in (a, b):
        assert n.trigger_configure() == SUCCESS
        assert n.trigger_activate() == SUCCESS
    r = None

    def pinged() -> bool:
        nonlocal r
        r = spinner.call(a, PingPeer, "/husarnet/ping", address="nodeb", timeout=1.0)
        return r.success

    waiter(pinged, 20, "a ping reply from node b")
    assert r.rtt_ms > 0
    assert b_id.address_str in r.message
    peers = {p.address: p for p in a.engine.peers()}
    assert peers[b_id.address].is_secure


def test_config_file_defaults_are_the_node_defaults(ros_context: Any) -> None:
    """config/husarnet.yaml loaded by rcl gives every parameter its declared default."""
    from husarnet_ros.node import PARAMETERS

    config = Path(__file__).resolve().parents[2] / "config" / "husarnet.yaml"
    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=["--ros-args", "--params-file", str(config)])
    n = HusarnetNode(context=ctx)
    try:
        for spec in PARAMETERS:
            value = n.get_parameter(spec.name).value
            if spec.type == Parameter.Type.STRING_ARRAY.value:
                value = list(value)
            assert value == spec.default, spec.name
    finally:
        n.destroy_node()
        ctx.try_shutdown()


def test_dds_peers_follow_the_whitelist_state(ros_context: Any, spinner: Any, tmp_path: Path, waiter: Any) -> None:
    """Enabled: DDS reaches whitelisted peers only. Disabled: also static (and known) peers."""
    static = Identity.generate()
    n = spinner.add(
        make_node(
            ros_context,
            tmp_path / "state",
            whitelist=[PEER.address_str],
            peers=[f"{static.address_str}@198.18.0.9:5582"],
        )
    )
    fastdds = tmp_path / "state" / "dds" / "fastdds.xml"
    try:
        assert n.trigger_configure() == SUCCESS
        own = n.identity.address_str
        assert dds.peers_in_fastdds_xml(fastdds.read_bytes()) == [own, PEER.address_str]
        # The runtime parameter persists the state and rewrites the profiles.
        [r] = n.set_parameters([Parameter("whitelist_enabled", value=False)])
        assert r.successful
        waiter(lambda: static.address_str in dds.peers_in_fastdds_xml(fastdds.read_bytes()), 5, "static peer in DDS")
        assert set(dds.peers_in_fastdds_xml(fastdds.read_bytes())) == {own, PEER.address_str, static.address_str}
        assert spinner.call(n, ListWhitelist, "/husarnet/whitelist/list").enabled is False
        r = spinner.call(n, SetWhitelistEnabled, "/husarnet/whitelist/set_enabled", enabled=True)
        assert r.success
        waiter(lambda: static.address_str not in dds.peers_in_fastdds_xml(fastdds.read_bytes()), 5, "static removed")
    finally:
        n._release()
        n.destroy_node()


@contextlib.contextmanager
def active_node_with_statuses(
    ros_context: Any, spinner: Any, state: Path, ifname: str, waiter: Any
) -> Iterator[tuple[Any, list[Status]]]:
    """An active node on ``ifname`` and the Status messages it publishes (the first one already in)."""
    n = spinner.add(make_node(ros_context, state, interface_name=ifname, publish_period=0.2))
    listener = rclpy.create_node("status_listener", context=ros_context)
    spinner.add(listener)
    try:
        assert n.trigger_configure() == SUCCESS
        assert n.trigger_activate() == SUCCESS
        statuses: list[Status] = []
        listener.create_subscription(Status, "/husarnet/status", statuses.append, LATCHED_QOS)
        waiter(lambda: statuses, 10, "a status")
        yield n, statuses
    finally:
        n._release()
        listener.destroy_node()
        n.destroy_node()
    assert not link_exists(ifname)


def node_diagnostic(n: Any) -> Any:
    return {s.name: s for s in n.diagnostics()}["husarnet: node"]


@pytest.mark.netns
def test_a_device_set_down_is_a_warning_and_setting_it_up_restores_the_address(
    ros_context: Any, spinner: Any, tmp_path: Path, unique_ifname: str, waiter: Any
) -> None:
    """'ip link set <dev> down' cuts the overlay: status.warning and a WARN diagnostic say so; 'up' heals it."""
    with active_node_with_statuses(ros_context, spinner, tmp_path / "state", unique_ifname, waiter) as (n, statuses):
        assert statuses[-1].warning == ""
        address = statuses[-1].address

        subprocess.run(["ip", "link", "set", unique_ifname, "down"], check=True)
        waiter(lambda: statuses and statuses[-1].warning, 10, "the warning in the status")
        assert f"{unique_ifname} is down" in statuses[-1].warning
        diag = node_diagnostic(n)
        assert diag.level == DiagnosticStatus.WARN and "is down" in diag.message

        subprocess.run(["ip", "link", "set", unique_ifname, "up"], check=True)
        waiter(lambda: statuses and statuses[-1].warning == "", 10, "the warning to clear")
        shown = subprocess.run(["ip", "-6", "addr", "show", "dev", unique_ifname], capture_output=True, text=True)
        assert f"{address}/16" in shown.stdout
        assert node_diagnostic(n).level == DiagnosticStatus.OK
        assert n.trigger_deactivate() == SUCCESS


@pytest.mark.netns
def test_a_device_deleted_under_the_active_node_is_an_error_and_reactivation_recovers(
    ros_context: Any, spinner: Any, tmp_path: Path, unique_ifname: str, waiter: Any
) -> None:
    """Deleting the interface under an active node must not leave a deaf overlay that reports OK."""
    with active_node_with_statuses(ros_context, spinner, tmp_path / "state", unique_ifname, waiter) as (n, statuses):
        assert statuses[-1].failure == ""
        assert node_diagnostic(n).level == DiagnosticStatus.OK

        subprocess.run(["ip", "link", "del", unique_ifname], check=True)
        waiter(lambda: statuses and statuses[-1].failure, 10, "the failure in the status")
        assert f"TUN device {unique_ifname!r} is gone" in statuses[-1].failure
        diag = node_diagnostic(n)
        assert diag.level == DiagnosticStatus.ERROR and "is gone" in diag.message

        # What the message advises: deactivate and activate brings the interface back, healthy.
        assert n.trigger_deactivate() == SUCCESS
        assert n.trigger_activate() == SUCCESS
        assert link_exists(unique_ifname)
        assert n.engine.status().failure == ""
        assert node_diagnostic(n).level == DiagnosticStatus.OK
        assert n.trigger_deactivate() == SUCCESS
