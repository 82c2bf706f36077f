"""Engine start/stop rules and the daemon's command line and control socket (no root needed)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from husarnet_ros.core.engine import Engine, EngineConfig, EngineError, parse_peer_spec, udp_bind_error
from husarnet_ros.core.identity import Identity, format_address
from husarnet_ros.core.memnet import MemoryNetwork
from husarnet_ros.daemon import control, scaled_timers

REPO = Path(__file__).resolve().parents[3]
PKG = REPO / "husarnet_ros"


def test_parse_peer_spec():
    addr, ep = parse_peer_spec("fc94::1@198.18.0.2:5582")
    assert addr == bytes.fromhex("fc94" + "00" * 13 + "01") and ep == ("198.18.0.2", 5582)
    assert parse_peer_spec("[fc94::1]@[fd00::2]:7") == (addr, ("fd00::2", 7))
    assert parse_peer_spec("fc94::1") == (addr, None)
    for bad in ("fd00::1@198.18.0.2:1", "fc94::1@198.18.0.2", "fc94::1@host:1", "nonsense"):
        with pytest.raises(ValueError):
            parse_peer_spec(bad)


def test_bad_identity_file_is_a_clear_error_and_leaves_nothing(tmp_path):
    before = set(threading.enumerate())
    (tmp_path / "id").write_text("garbage\n")
    os.chmod(tmp_path / "id", 0o600)
    net = MemoryNetwork()
    t = net.transport(("198.18.0.1", 5582))
    eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False), transport=t)
    with pytest.raises(EngineError, match="identity file"):
        eng.start()
    assert t.closed
    eng.stop()  # harmless after a failed start
    net.close()
    assert set(threading.enumerate()) <= before
    assert (tmp_path / "id").read_text() == "garbage\n"  # never overwritten


def test_world_readable_identity_refused(tmp_path):
    Identity.generate().save(tmp_path / "id")
    os.chmod(tmp_path / "id", 0o644)
    eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False, udp_port=0))
    with pytest.raises(EngineError, match="identity file"):
        eng.start()


def test_udp_port_in_use_says_so_and_what_to_do(tmp_path):
    holder = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    holder.bind(("::", 0))
    port = holder.getsockname()[1]
    try:
        eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False, udp_port=port))
        with pytest.raises(EngineError, match=rf"UDP port {port} is in use .*choose another udp_port"):
            eng.start()
    finally:
        holder.close()
    # A port below 1024 for a normal user gets other advice than "another instance" (root may bind it).
    denied = udp_bind_error(443, OSError(errno.EACCES, "Permission denied"))
    assert "needs privileges" in denied and "another" not in denied
    assert udp_bind_error(1, OSError(errno.EADDRNOTAVAIL, "Cannot assign")) == "cannot open UDP port 1: Cannot assign"
    said = "cannot bind UDP port 7: Cannot assign"  # UdpTransport's own text names the port already
    assert udp_bind_error(7, OSError(errno.EADDRNOTAVAIL, said)) == said


def test_bad_peer_spec_fails_start(tmp_path):
    eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False, udp_port=0, peers=["x@y"]))
    with pytest.raises(EngineError):
        eng.start()


def test_start_creates_identity_and_runs_once(tmp_path):
    before = set(threading.enumerate())
    eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False, udp_port=0))
    eng.start()
    try:
        assert Identity.load(tmp_path / "id").address == eng.address
        st = eng.status()
        assert st.address == eng.address and st.base == "none" and st.whitelist_enabled
        assert "bad_inner_src" in st.counters
        with pytest.raises(EngineError):
            eng.start()
    finally:
        eng.stop()
    eng.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not set(threading.enumerate()) <= before:
        time.sleep(0.01)
    assert set(threading.enumerate()) <= before


def test_scaled_timers():
    t = scaled_timers(0.1)
    assert t.rekey_timeout == pytest.approx(0.5) and t.rekey_after_time == pytest.approx(12.0)
    assert t.reject_after_messages == scaled_timers(1.0).reject_after_messages
    with pytest.raises(ValueError):
        scaled_timers(0)


def _daemon(*args: str) -> list[str]:
    return [sys.executable, "-m", "husarnet_ros.daemon", *args]


def test_daemon_print_address(tmp_path):
    out = subprocess.run(
        _daemon("--state-dir", str(tmp_path), "--print-address"), cwd=PKG, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == format_address(Identity.load(tmp_path / "id").address)


def test_daemon_control_socket_and_sigterm(tmp_path):
    ctl = tmp_path / "ctl"
    other = Identity.generate()
    proc = subprocess.Popen(
        _daemon(
            "--state-dir", str(tmp_path / "s"), "--no-tun", "--udp-port", "0", "--no-lan-discovery",
            "--control", str(ctl), "--timers-scale", "0.1", "--log-level", "WARNING",
        ),
        cwd=PKG,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "ready" in line, proc.stderr.read() if proc.poll() is not None else line
        assert oct(ctl.stat().st_mode & 0o777) == "0o600"
        st = control(ctl, "status")
        assert st["ok"] and st["status"]["address"].startswith("fc94:") and st["status"]["udp_port"] > 0
        assert control(ctl, "whitelist_add", address=other.address_str, hostname="robot2") == {
            "ok": True,
            "changed": True,
        }
        # The reply means "persisted"; the engine's loop applies the change to its peer table a moment later.
        deadline = time.monotonic() + 5.0
        while not (peers := control(ctl, "peers")["peers"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [(p["address"], p["hostname"], p["is_whitelisted"], p["path"]) for p in peers] == [
            (other.address_str, "robot2", True, "none")
        ]
        wl = control(ctl, "whitelist")
        assert wl["enabled"] is True and wl["entries"] == {other.address_str: "robot2"}
        assert control(ctl, "whitelist_set_enabled", enabled=False)["changed"] is True
        assert control(ctl, "whitelist_set_enabled", enabled="no")["ok"] is False
        assert control(ctl, "whitelist_remove", address=other.address_str)["changed"] is True
        ping = control(ctl, "ping", address=other.address_str, timeout=0.5)
        assert ping["ok"] is False and "session" in ping["error"]
        assert control(ctl, "counters")["counters"]["bad_mac"] == 0
        assert control(ctl, "nope")["ok"] is False
        assert control(ctl, "whitelist_add")["ok"] is False  # missing argument
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not ctl.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_hosts_file_block_follows_whitelist_and_is_removed_on_stop(tmp_path):
    hosts = tmp_path / "hosts"
    original = "127.0.0.1\tlocalhost\n"
    hosts.write_text(original)
    other = Identity.generate()
    cfg = EngineConfig(
        state_dir=tmp_path / "s", use_tun=False, lan_discovery=False, udp_port=0, hostname="robot1",
        hosts_file=str(hosts),
    )  # fmt: skip
    eng = Engine(cfg)
    eng.start()
    try:
        text = hosts.read_text()
        assert text.startswith(original)
        me = format_address(eng.address)
        assert f"{me}\trobot1" in text and f"{me}\thusarnet-local" in text
        eng.whitelist.add(other.address, "robot2")
        deadline = time.monotonic() + 2
        while "robot2" not in hosts.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f"{other.address_str}\trobot2" in hosts.read_text()
        assert eng.status().websetup == {"enabled": False}  # no TUN: no overlay address to listen on
    finally:
        eng.stop()
    assert hosts.read_text() == original
    eng.whitelist.add(Identity.generate().address, "robot3")  # a stopped engine never rewrites the file
    time.sleep(0.05)
    assert hosts.read_text() == original


def test_stop_from_a_listener_is_refused_not_deadlocked(tmp_path):
    eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False, udp_port=0))
    errors: list[Exception] = []

    def listener(kind: str) -> None:
        try:
            eng.stop()
        except EngineError as exc:
            errors.append(exc)

    eng.add_listener(listener)
    eng.start()
    try:
        eng.whitelist.add(Identity.generate().address)
        deadline = time.monotonic() + 2
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert errors and "own thread" in str(errors[0])
        assert eng.status().address == eng.address  # still running
    finally:
        eng.stop()


def test_start_stop_cycles_leak_no_fds_or_threads(tmp_path):
    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False, udp_port=0))
    eng.start()  # first start creates the identity and loads libraries; measure from here
    eng.stop()
    before_fds, before_threads = fds(), set(threading.enumerate())
    for _ in range(5):
        eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False, udp_port=0))
        eng.start()
        eng.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (fds() <= before_fds and set(threading.enumerate()) <= before_threads):
        time.sleep(0.02)
    assert fds() <= before_fds, fds() - before_fds
    assert set(threading.enumerate()) <= before_threads


def test_tun_failure_undoes_the_socket(tmp_path):
    """A late failure (the TUN) releases what came before it (the UDP port) and says what went wrong."""
    import socket

    from husarnet_ros.testing.ports import free_udp_ports

    (port,) = free_udp_ports(1)  # outside the ephemeral range: no port-0 bind can take it meanwhile
    before = set(threading.enumerate())
    bad_name = "x" * 40  # longer than IFNAMSIZ: refused whether or not we are root
    eng = Engine(EngineConfig(state_dir=tmp_path, interface_name=bad_name, udp_port=port, lan_discovery=False))
    with pytest.raises(EngineError):
        eng.start()
    again = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        again.bind(("::", port))  # the engine's socket is gone
    finally:
        again.close()
    assert set(threading.enumerate()) <= before


UNPRIVILEGED_PAIR = r"""
import encodings.ascii, json, logging, os, sys, threading, time
from pathlib import Path
# Everything is imported before dropping privileges: the interpreter may live where nobody cannot read.
from husarnet_ros.core import hosts
from husarnet_ros.core.engine import Engine, EngineConfig, EngineError
from husarnet_ros.core.identity import Identity, format_address
from husarnet_ros.core.memnet import MemoryNetwork

hosts_file, base, uid = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ida, idb = Identity.generate(), Identity.generate()
if uid >= 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
logged = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: logged.append(record.getMessage())
logging.getLogger("husarnet_ros").addHandler(handler)
net = MemoryNetwork()
def engine(ident, other, ep, **kw):
    cfg = EngineConfig(state_dir=base / ep[0], use_tun=False, lan_discovery=False,
                       whitelist=[format_address(other.address)], **kw)
    return Engine(cfg, identity=ident, transport=net.transport(ep))
a = engine(ida, idb, ("198.18.0.1", 5582), hostname="robot1", hosts_file=hosts_file,
           peers=[f"{format_address(idb.address)}@198.18.0.2:5582"])
b = engine(idb, ida, ("198.18.0.2", 5582))
a.start(); b.start()
rtt, deadline = None, time.monotonic() + 20
while rtt is None and time.monotonic() < deadline:
    try:
        rtt = a.ping(idb.address, timeout=1.0)
    except EngineError:
        time.sleep(0.05)
changed = threading.Event()
a.add_listener(lambda kind: kind == "whitelist" and changed.set())
a.whitelist.add(Identity.generate().address, "robot3")  # a later change of names tries again
print(json.dumps({"warning": a.status().warning, "rtt": rtt, "retried": changed.wait(10), "logged": logged}))
a.stop(); b.stop(); net.close()
"""


def test_unwritable_hosts_file_is_a_warning_and_the_overlay_runs() -> None:
    """A normal user (after setup-tun) cannot write /etc/hosts: the node still comes up and names the fix.

    Run as nobody when we are root (as a normal user as is), with the hosts file in a directory that user
    cannot write and the file not writable either: neither a rename nor the in-place rewrite works.
    """
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as base:  # not tmp_path: others cannot enter pytest's 0700 tree
        os.chmod(base, 0o755)
        etc, states = Path(base) / "etc", Path(base) / "states"
        etc.mkdir()
        states.mkdir()
        hosts = etc / "hosts"
        hosts.write_text("127.0.0.1\tlocalhost\n")
        uid = 65534 if os.geteuid() == 0 else -1
        if uid >= 0:
            os.chown(states, uid, uid)
        hosts.chmod(0o644 if uid >= 0 else 0o444)
        etc.chmod(0o755 if uid >= 0 else 0o555)
        try:
            r = subprocess.run(
                [sys.executable, "-c", UNPRIVILEGED_PAIR, str(hosts), str(states), str(uid)],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(PKG)},
            )
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            assert hosts.read_text() == "127.0.0.1\tlocalhost\n"
        finally:
            etc.chmod(0o755)
    assert out["rtt"] is not None, "the peers did not connect"
    warning = out["warning"]
    assert f"hosts file {hosts} not updated" in warning and "Permission denied" in warning
    assert "run as root" in warning and f"write access to {hosts}" in warning and "hosts_file to ''" in warning
    assert out["retried"]
    assert [m for m in out["logged"] if "not updated" in m] == [warning]  # once, although written twice


def test_hosts_and_tun_warnings_stand_side_by_side_and_clear_apart(tmp_path):
    """One status().warning for both causes: the TUN coming back keeps the hosts warning, a good write clears it."""
    from test_engine_interface import FakeTun, check

    hosts = tmp_path / "hosts"
    hosts.write_text("# END husarnet_ros\n")  # a stray marker: refused (fix it by hand), never rewritten
    eng = Engine(
        EngineConfig(state_dir=tmp_path / "s", use_tun=False, lan_discovery=False, udp_port=0, hosts_file=str(hosts))
    )
    eng.start()
    try:
        hosts_warning = eng.status().warning
        assert hosts_warning.startswith(f"hosts file {hosts} not updated") and "stray" in hosts_warning
        notified: list[str] = []
        eng.add_listener(notified.append)
        eng._tun = FakeTun()
        eng._tun.up = False
        check(eng)
        assert "hnet0 is down" in eng.status().warning and hosts_warning in eng.status().warning
        eng._tun.up = True
        check(eng)
        assert eng.status().warning == hosts_warning
        eng._tun = None
        hosts.write_text("")  # fixed by hand: the next change of names writes the block and clears the warning
        notified.clear()
        eng.whitelist.add(Identity.generate().address, "robot2")
        deadline = time.monotonic() + 5
        while eng.status().warning and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.status().warning == ""
        assert "robot2" in hosts.read_text()
        deadline = time.monotonic() + 5
        while "status" not in notified and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "status" in notified  # the ROS node republishes its status at once
    finally:
        eng._tun = None
        eng.stop()
