"""Two daemons in two network namespaces joined by one veth: ping6 and a 50 MB TCP transfer over fc94.

A deliberately tiny fixture of its own (the richer lab is ``husarnet_ros.testing.netns``): two
namespaces named with this PID, a veth created directly inside them (198.18.x.x), and cleanup
that stops only the daemons this test started and deletes only its own namespaces.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from husarnet_ros.daemon import control
from husarnet_ros.testing.netns import wait_until

pytestmark = pytest.mark.netns

PKG = Path(__file__).resolve().parents[2]
PREFIX = f"hrd{os.getpid()}"
NS_A, NS_B = f"{PREFIX}a", f"{PREFIX}b"
IP_A, IP_B = "198.18.77.1", "198.18.77.2"
TRANSFER = 50 * 1024 * 1024


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout, cwd=PKG)


def in_ns(ns: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, **kw)


SERVER = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
"""

CLIENT = r"""
import hashlib, random, socket, sys
size = int(sys.argv[2])
rng = random.Random(1234)
data = rng.randbytes(size)
c = socket.create_connection((sys.argv[1], 7000), timeout=60)
c.sendall(data); c.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = c.recv(4096)
    if not b:
        break
    reply += b
print(len(data), hashlib.sha256(data).hexdigest())
print(reply.decode())
"""


@pytest.fixture
def namespaces():
    created: list[str] = []
    try:
        for ns in (NS_A, NS_B):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "veth0", "netns", NS_A, "type", "veth", "peer", "name", "veth0", "netns", NS_B)
        for ns, ip in ((NS_A, IP_A), (NS_B, IP_B)):
            in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", "veth0")
            in_ns(ns, "ip", "link", "set", "veth0", "up")
        yield
    finally:
        for ns in created:
            sh("ip", "netns", "del", ns, check=False)


class Daemon:
    def __init__(self, ns: str, state: Path, args: list[str], *, lan: bool = False) -> None:
        self.ns = ns
        self.ctl = state / "ctl"
        cmd = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "husarnet_ros.daemon",
            "--state-dir", str(state), "--control", str(self.ctl), *([] if lan else ["--no-lan-discovery"]),
            "--timers-scale", "0.2", "--log-level", "WARNING", *args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=PKG, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.proc.kill()
            raise AssertionError(f"daemon in {ns} did not start: {line} {self.proc.stderr.read()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return -9
        return self.proc.returncode


def print_address(state: Path) -> str:
    out = sh(sys.executable, "-m", "husarnet_ros.daemon", "--state-dir", str(state), "--print-address", timeout=60)
    return out.stdout.strip()


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_two_daemons_ping6_and_50mb_tcp(tmp_path, namespaces, offload):
    extra = [] if offload else ["--no-offload"]
    sa, sb = tmp_path / "a", tmp_path / "b"
    addr_a, addr_b = print_address(sa), print_address(sb)
    assert addr_a.startswith("fc94:") and addr_b.startswith("fc94:")
    daemons: list[Daemon] = []
    try:
        daemons.append(Daemon(NS_A, sa, ["--peer", f"{addr_b}@{IP_B}:5582", "--whitelist", addr_b, *extra]))
        daemons.append(Daemon(NS_B, sb, ["--whitelist", addr_a, *extra]))
        a, b = daemons
        status = control(a.ctl, "status")["status"]
        assert status["offload"] is offload
        assert status["websetup"]["listening"] is True and status["websetup"]["address"] == addr_a
        # The TUN is up with the address and the /16 route.
        link = in_ns(NS_A, "ip", "-6", "addr", "show", "dev", "hnet0").stdout
        assert addr_a in link and "/16" in link
        ok = False
        for _ in range(10):
            if in_ns(NS_A, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", addr_b, check=False).returncode == 0:
                ok = True
                break
        assert ok, control(a.ctl, "counters")
        assert in_ns(NS_B, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", addr_a, check=False).returncode == 0
        peers = control(a.ctl, "peers")["peers"]
        assert [(p["address"], p["path"], p["is_secure"]) for p in peers] == [(addr_b, "lan", True)]
        assert control(b.ctl, "ping", address=addr_a)["ok"]
        # 50 MB over TCP through the overlay, checksummed on both ends.
        server = subprocess.Popen(
            ["ip", "netns", "exec", NS_B, sys.executable, "-c", SERVER, addr_b],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            assert server.stdout.readline().strip() == "listening"
            out = in_ns(NS_A, sys.executable, "-c", CLIENT, addr_b, str(TRANSFER), timeout=600)
            sent, received = out.stdout.strip().splitlines()
            assert sent == received, (sent, received)
            assert sent.split()[0] == str(TRANSFER)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        counters = control(b.ctl, "counters")["counters"]
        assert counters["rx_bytes"] >= TRANSFER
        for reason in ("bad_mac", "bad_inner_src", "not_whitelisted"):
            assert counters[reason] == 0, counters
        # Clean exit removes the devices.
        for d in daemons:
            assert d.stop() == 0
        for ns in (NS_A, NS_B):
            assert in_ns(ns, "ip", "link", "show", "hnet0", check=False).returncode != 0
    finally:
        for d in daemons:
            d.stop()
    sh("ip", "netns", "del", NS_A)
    sh("ip", "netns", "del", NS_B)
    names = sh("ip", "netns", "list").stdout
    assert NS_A not in names and NS_B not in names


def test_lan_discovery_without_base_or_static_peers(tmp_path, namespaces):
    """A field with no internet: only multicast beacons introduce the two whitelisted robots."""
    sa, sb = tmp_path / "a", tmp_path / "b"
    addr_a, addr_b = print_address(sa), print_address(sb)
    daemons: list[Daemon] = []
    try:
        daemons.append(Daemon(NS_A, sa, ["--whitelist", addr_b], lan=True))
        daemons.append(Daemon(NS_B, sb, ["--whitelist", addr_a], lan=True))
        a, _b = daemons
        deadline = time.monotonic() + 30
        peers: list = []
        while time.monotonic() < deadline:
            peers = control(a.ctl, "peers")["peers"]
            if peers and peers[0]["is_secure"]:
                break
            time.sleep(0.2)
        assert [(p["address"], p["path"], p["is_secure"]) for p in peers] == [(addr_b, "lan", True)], peers
        assert peers[0]["endpoint"] == f"{IP_B}:5582"
        assert in_ns(NS_A, "ping", "-6", "-c", "2", "-W", "2", addr_b, check=False).returncode == 0
        for d in daemons:
            assert d.stop() == 0
    finally:
        for d in daemons:
            d.stop()


def _link_local(ns: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = in_ns(ns, "ip", "-6", "-o", "addr", "show", "dev", "veth0", "scope", "link").stdout
        if out and "tentative" not in out:
            return out.split()[3].split("/")[0]
        time.sleep(0.1)
    raise AssertionError(f"no usable link-local address in {ns}")


def test_static_peer_on_ipv6_link_local_endpoint(tmp_path, namespaces):
    """The socket reports link-local sources without a scope; the path must keep '%veth0' to reply."""
    ll_b = _link_local(NS_B)
    sa, sb = tmp_path / "a", tmp_path / "b"
    addr_a, addr_b = print_address(sa), print_address(sb)
    daemons: list[Daemon] = []
    try:
        daemons.append(Daemon(NS_A, sa, ["--peer", f"{addr_b}@[{ll_b}%veth0]:5582", "--whitelist", addr_b]))
        daemons.append(Daemon(NS_B, sb, ["--whitelist", addr_a]))
        a, b = daemons
        ok = any(
            in_ns(NS_A, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", addr_b, check=False).returncode == 0
            for _ in range(8)
        )
        assert ok, control(a.ctl, "counters")
        peers = control(a.ctl, "peers")["peers"]
        assert [(p["path"], p["endpoint"]) for p in peers] == [("lan", f"[{ll_b}%veth0]:5582")]
        assert in_ns(NS_B, "ping", "-6", "-c", "2", "-W", "2", addr_a, check=False).returncode == 0
        assert control(b.ctl, "ping", address=addr_a)["ok"]
        for d in daemons:
            assert d.stop() == 0
    finally:
        for d in daemons:
            d.stop()


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_a_tun_deleted_under_the_daemon_ends_it_with_the_reason(tmp_path, namespaces, offload):
    """Someone deletes hnet0 under a running daemon: it must not go on deaf and healthy-looking, but exit
    non-zero saying what happened, so its supervisor (systemd, launch respawn) starts it afresh."""
    d = Daemon(NS_A, tmp_path / "a", [] if offload else ["--no-offload"])
    try:
        assert control(d.ctl, "status")["status"]["failure"] == ""
        in_ns(NS_A, "ip", "link", "del", "hnet0")
        try:
            code = d.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError("the daemon kept running without its TUN device") from None
        err = d.proc.stderr.read()
        assert code == 1, err
        assert "error: TUN device 'hnet0' is gone" in err and "restart husarnet_ros" in err, err
    finally:
        d.stop()


def test_a_tun_set_down_and_up_again_is_reported_and_gets_its_address_back(tmp_path, namespaces):
    """'ip link set hnet0 down; ... up' (an operator, a network manager): IPv6 drops the address and route on
    down and does not bring them back on up.  The daemon must say the overlay is cut while the link is down,
    count the packets it could not deliver, and restore its address once the link is up again."""
    sa, sb = tmp_path / "a", tmp_path / "b"
    addr_a, addr_b = print_address(sa), print_address(sb)
    daemons: list[Daemon] = []

    def ping_b() -> bool:
        return in_ns(NS_A, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", addr_b, check=False).returncode == 0

    try:
        daemons.append(Daemon(NS_A, sa, ["--peer", f"{addr_b}@{IP_B}:5582", "--whitelist", addr_b]))
        daemons.append(Daemon(NS_B, sb, ["--whitelist", addr_a]))
        b = daemons[1]
        assert wait_until(ping_b, 20), "no first ping"
        assert control(b.ctl, "status")["status"]["warning"] == ""
        in_ns(NS_B, "ip", "link", "set", "hnet0", "down")
        assert wait_until(lambda: control(b.ctl, "status")["status"]["warning"], 5), "no warning"
        warning = control(b.ctl, "status")["status"]["warning"]
        assert "hnet0 is down" in warning and "ip link set hnet0 up" in warning, warning
        assert not ping_b()  # the overlay is cut, and the packets B could not deliver are counted
        assert wait_until(lambda: control(b.ctl, "counters")["counters"]["tun_write_failed"] > 0, 5)
        in_ns(NS_B, "ip", "link", "set", "hnet0", "up")
        assert wait_until(lambda: control(b.ctl, "status")["status"]["warning"] == "", 5), "the warning stayed"
        link = in_ns(NS_B, "ip", "-6", "addr", "show", "dev", "hnet0").stdout
        assert f"{addr_b}/16" in link, link
        assert "fc94::/16" in in_ns(NS_B, "ip", "-6", "route", "show", "dev", "hnet0").stdout
        assert wait_until(ping_b, 10), "no ping after the link came back"
        for d in daemons:
            assert d.stop() == 0
    finally:
        for d in daemons:
            d.stop()


def test_path_warmer_runs_while_traffic_flows_stops_when_idle_and_can_be_switched_off(tmp_path, namespaces):
    """Issue #6: the shadow packets of the path warmer run beside real traffic, never instead of it."""
    sa, sb = tmp_path / "a", tmp_path / "b"
    addr_a, addr_b = print_address(sa), print_address(sb)
    daemons: list[Daemon] = []
    try:
        daemons.append(Daemon(NS_A, sa, ["--peer", f"{addr_b}@{IP_B}:5582", "--whitelist", addr_b]))
        daemons.append(Daemon(NS_B, sb, ["--whitelist", addr_a, "--warm-interval", "0"]))
        a, b = daemons
        assert wait_until(
            lambda: in_ns(NS_A, "ping", "-6", "-c", "1", "-W", "2", addr_b, check=False).returncode == 0, 30, 0.5
        ), control(a.ctl, "counters")
        ping = in_ns(NS_A, "ping", "-6", "-c", "40", "-i", "0.05", "-W", "2", addr_b, check=False)
        assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
        status = control(a.ctl, "status")["status"]
        during = status["warm_rounds"]
        assert during > 0  # A warmed while the pings flowed ...
        # ... paced by the pings once it learnt their 50 ms period: it woke from a sleep through the
        # quiet part of a period before most pings (one such wake-up per ping at most, +1 for the one
        # that never came after the last).
        assert 10 <= status["warm_paced_rounds"] <= 41, status
        assert status["warm_streaming"] == 0  # 20 Hz is slower than the warmer: it warms
        # 1 kHz pings (a control loop) keep the path warm themselves: the warmer leaves them alone.
        fast = in_ns(NS_A, "ping", "-6", "-c", "400", "-i", "0.001", "-W", "2", addr_b, check=False)
        assert fast.returncode == 0, fast.stdout
        after = control(a.ctl, "status")["status"]
        assert after["warm_streaming"] >= 50, after
        assert after["warm_rounds"] - during < after["warm_streaming"], after  # it mostly looked, not warmed
        b_status = control(b.ctl, "status")["status"]
        assert (b_status["warm_rounds"], b_status["warm_deferred"]) == (0, 0)  # ... B, switched off, never did
        # Idle for longer than the warmer's one second: it stops working.
        time.sleep(1.5)
        settled = control(a.ctl, "status")["status"]["warm_rounds"]
        time.sleep(1.0)
        assert control(a.ctl, "status")["status"]["warm_rounds"] == settled
        # Nothing the shadow did reached the real path: no receive rule refused anything, and the traffic
        # counters hold the real packets (the shadow's thousands of rounds would show).
        refused = ("malformed", "bad_mac", "replay", "too_old", "expired", "unknown_peer", "bad_inner_src")
        for d in daemons:
            counters = control(d.ctl, "counters")["counters"]
            assert {k: counters[k] for k in refused if counters[k]} == {}, counters
            assert 441 <= counters["rx_packets"] < 600 and 441 <= counters["tx_packets"] < 600, counters
        for d in daemons:
            assert d.stop() == 0
    finally:
        for d in daemons:
            d.stop()
