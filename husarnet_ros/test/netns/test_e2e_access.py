"""Websetup and whitelist changes over the real overlay (issue #5; TESTPLAN rows 11, 12, 13, 14).

Layout: the reference topology's LAN. peerC runs the managed node "A" (websetup on, its websetup whitelist
names peerD's overlay address, a hosts file), peerD runs node "B" and plays the dashboard: it sends
commands with the real CLI (``husarnet-ros websetup send``) and with datagrams built by hand from the
node's secret (read from A's state dir), so the exact bytes can be replayed. mallory, on the same LAN,
sends the same valid datagrams from the underlay.

A runs the real daemon with ``--websetup-whitelist <B>``. Verdicts: the whitelist and counters from the control
socket, the websetup counters in ``status``, the hosts file, and whether any reply datagram came back.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from husarnet_ros.testing import e2e, traffic
from husarnet_ros.testing.netns import Lab, reference_topology, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]


WS_PORT = 5580
PORT = e2e.PORT


def _packed(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed


class Dashboard:
    """peerD's hand-driven websetup client: builds, sends and replays datagrams; reads authenticated replies."""

    def __init__(self, lab: Lab, ns, own: str, node: str, secret: bytes):
        self.lab, self.ns, self.own, self.node, self.secret = lab, ns, own, node, secret
        self.sock = lab.socket(ns, socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.bind((own, 0))
        self.sock.settimeout(0.2)
        lab.on_cleanup(self.sock.close)
        self._last = 0

    def counter(self) -> int:
        self._last = max(self._last + 1, int(time.time() * 1_000_000))
        return self._last

    def build(self, command: str, args=(), secret: bytes | None = None) -> tuple[int, bytes]:
        from husarnet_ros.core.websetup_proto import build_command

        c = self.counter()
        return c, build_command(secret or self.secret, _packed(self.own), c, command, args)

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, (self.node, WS_PORT))

    def replies(self, timeout: float) -> list:
        """Every authenticated reply that arrives within ``timeout`` seconds."""
        from husarnet_ros.core.websetup_proto import WebsetupError, parse_reply

        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                continue
            try:
                out.append(parse_reply(data, self.secret, _packed(self.own)))
            except WebsetupError:
                out.append(None)
        return out

    def request(self, command: str, args=(), timeout: float = 3.0):
        """Send a fresh command; return (datagram, reply) once the reply with our counter arrives."""
        counter, datagram = self.build(command, args)
        self.send(datagram)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.replies(0.2):
                if r is not None and r.counter == counter:
                    return datagram, r
        raise AssertionError(f"no reply to {command} {args}")


def _ws_counters(daemon) -> dict[str, int]:
    return dict(daemon.status()["websetup"]["counters"])


def _whitelist(daemon) -> dict[str, str]:
    return dict(daemon.control("whitelist")["entries"])


def _listed(daemon, addr: str) -> bool:
    want = ipaddress.IPv6Address(addr)
    return any(ipaddress.IPv6Address(a) == want for a in _whitelist(daemon))


def _start_a(lab: Lab, t, state: Path, b_addr: str, hosts: Path):
    return lab.start_daemon(
        t.peerC,
        state,
        websetup_whitelist=[b_addr],
        whitelist=[b_addr],
        peer=[f"{b_addr}@{e2e.endpoint(t.PEER_D_IP)}"],
        hosts_file=str(hosts),
        timers_scale=e2e.TIMERS_SCALE,
        udp_port=PORT,
    )


def _cli(lab: Lab, ns, node: str, secret_file: Path, store: Path, *args: str):
    argv = [sys.executable, "-m", "husarnet_ros.cli", "websetup", "send", node, *args]
    argv += ["--secret-file", str(secret_file), "--counter-store", str(store), "--reply-timeout", "3"]
    return lab.run(ns, argv, check=False, timeout=30)


def _up(lab: Lab, t, a, b) -> None:
    assert wait_until(lambda: traffic.ping(lab, t.peerD, a.address, count=1, wait=1).received == 1, 20, 0.2)
    a.wait_path(b.address, timeout=15)


def _websetup_pair(lab: Lab) -> tuple:
    """The websetup tests' set-up: A (websetup on, B on both its whitelists, its own hosts file) and B, up.

    Returns ``(topology, a, b, a_state, a_addr, b_addr, hosts)``.
    """
    t = reference_topology(lab)
    a_state, b_state = lab.tmp / "state-A", lab.tmp / "state-B"
    a_addr, b_addr = lab.daemon_address(a_state), lab.daemon_address(b_state)
    hosts = lab.tmp / "hosts-A"
    hosts.write_text("127.0.0.1 localhost\n")
    a = _start_a(lab, t, a_state, b_addr, hosts)
    b = lab.start_daemon(
        t.peerD,
        b_state,
        whitelist=[a_addr],
        peer=[f"{a_addr}@{e2e.endpoint(t.PEER_C_IP)}"],
        timers_scale=e2e.TIMERS_SCALE,
        udp_port=PORT,
    )
    _up(lab, t, a, b)
    return t, a, b, a_state, a_addr, b_addr, hosts


def test_websetup_over_the_overlay_replay_underlay_and_crash():
    from husarnet_ros.core import websetup
    from husarnet_ros.core.identity import Identity

    with Lab("wsa") as lab:
        t, a, b, a_state, a_addr, b_addr, hosts = _websetup_pair(lab)
        assert a.status()["websetup"]["listening"]

        secret = websetup.read_secret(a_state)
        secret_file = lab.tmp / "ws-secret"
        secret_file.write_text(secret.hex())
        os.chmod(secret_file, 0o600)
        store = lab.tmp / "ws-counter.json"
        x, y, z = (Identity.generate().address_str for _ in range(3))

        # --- the real CLI as dashboard: whitelist-add, host-add, whitelist-rm.
        r = _cli(lab, t.peerD, a_addr, secret_file, store, "whitelist-add", x, "robot-x")
        assert r.returncode == 0, r.stderr
        assert _listed(a, x) and _whitelist(a)[x] == "robot-x"
        r = _cli(lab, t.peerD, a_addr, secret_file, store, "host-add", y, "cam-y")
        assert r.returncode == 0, r.stderr
        assert re.search(rf"^{re.escape(y)}\tcam-y$", hosts.read_text(), re.M), hosts.read_text()
        r = _cli(lab, t.peerD, a_addr, secret_file, store, "whitelist-rm", x)
        assert r.returncode == 0, r.stderr
        assert not _listed(a, x)

        # --- hand-built datagrams: wrong secret -> silence, no change.
        dash = Dashboard(lab, t.peerD, b_addr, a_addr, secret)
        before = _ws_counters(a)
        _c, forged = dash.build("whitelist-add", (y,), secret=bytes(32))
        dash.send(forged)
        assert dash.replies(1.0) == []
        assert not _listed(a, y)
        assert _ws_counters(a)["bad_mac"] == before["bad_mac"] + 1

        # --- a valid command applies once; the same bytes again are a replay (no reply, no effect).
        add_y, reply = dash.request("whitelist-add", (y,))
        assert reply.ok and _listed(a, y)
        assert a.control("whitelist_remove", address=y)["changed"]
        before = _ws_counters(a)
        for _ in range(3):
            dash.send(add_y)
        assert dash.replies(1.0) == []
        assert not _listed(a, y)
        got = _ws_counters(a)
        assert got["replay"] == before["replay"] + 3 and got["accepted"] == before["accepted"], got

        # --- from the underlay: a valid, fresh datagram must still be ignored.
        _c, fresh = dash.build("whitelist-add", (z,))
        sniff = lab.sniff(t.mallory, "eth1")
        m_v4 = lab.socket(t.mallory, socket.AF_INET, socket.SOCK_DGRAM)
        m_v4.bind((t.MALLORY_LAN_IP, 0))
        m_v4.settimeout(0.2)
        m_v4.sendto(fresh, (t.PEER_C_IP, WS_PORT))  # A's underlay IP
        # To A's fc94 address across the LAN: from a non-overlay source, and from a forged overlay source
        # (B's address); only the TUN-bound socket would accept it, and the LAN is not the TUN.
        lab.run(t.mallory, ["ip", "-6", "route", "add", f"{a_addr}/128", "via", "fd00:3::2"])
        lab.run(t.mallory, ["ip", "-6", "addr", "add", f"{b_addr}/128", "dev", "lo", "nodad"])
        m_fd = lab.socket(t.mallory, socket.AF_INET6, socket.SOCK_DGRAM)
        m_fd.bind(("fd00:3::66", 0))
        m_fd.settimeout(0.2)
        m_fc = lab.socket(t.mallory, socket.AF_INET6, socket.SOCK_DGRAM)
        m_fc.bind((b_addr, 0))
        m_fc.settimeout(0.2)
        m_fd.sendto(fresh, (a_addr, WS_PORT))
        m_fc.sendto(fresh, (a_addr, WS_PORT))
        time.sleep(1.0)
        assert not _listed(a, z)
        for s in (m_v4, m_fd, m_fc):
            with pytest.raises((TimeoutError, ConnectionRefusedError)):
                s.recv(65536)
            s.close()
        to_a = [f for f in sniff.frames if fresh in f.data and f.outgoing]
        assert len(to_a) == 3, "the three underlay copies must really have left mallory"
        assert not [p for p in sniff.udp() if p.sport == WS_PORT], "A answered an underlay datagram"
        assert _ws_counters(a)["accepted"] == got["accepted"]
        # The very same bytes through the overlay are fine: the underlay copies were ignored, not broken.
        dash.send(fresh)
        assert any(r is not None and r.ok for r in dash.replies(1.5))
        assert _listed(a, z)
        lab.run(t.mallory, ["ip", "-6", "addr", "del", f"{b_addr}/128", "dev", "lo"])

        # --- kill -9 right after an acknowledged change; the change and the replay state survive.
        w = Identity.generate().address_str
        _dg, reply = dash.request("whitelist-add", (w, "robot-w"))
        assert reply.ok
        a.proc.stop(sig=signal.SIGKILL)
        assert a.proc.returncode == -signal.SIGKILL
        a = _start_a(lab, t, a_state, b_addr, hosts)
        assert _listed(a, w) and _whitelist(a)[w] == "robot-w"
        _up(lab, t, a, b)
        dash.send(add_y)  # replay after the restart
        assert dash.replies(1.0) == []
        assert not _listed(a, y)
        assert _ws_counters(a)["replay"] == 1
        _dg, reply = dash.request("whitelist-rm", (w,))
        assert reply.ok and not _listed(a, w)

        # --- 50 concurrent copies of one fresh command (row 13): applied exactly once.
        v = Identity.generate().address_str
        _c, burst = dash.build("whitelist-add", (v,))
        before = _ws_counters(a)
        senders = [threading.Thread(target=dash.send, args=(burst,)) for _ in range(50)]
        for th in senders:
            th.start()
        for th in senders:
            th.join()
        replies = dash.replies(1.5)
        assert len([r for r in replies if r is not None and r.ok]) == 1, replies
        assert _listed(a, v)
        got = _ws_counters(a)
        assert got["accepted"] - before["accepted"] == 1, got
        refused = sum(got[k] - before[k] for k in ("replay", "rate_limited"))
        assert refused == 49, (before, got)

        # Row 12: neither the secret nor its hex form is in any log the lab kept.
        for log in lab.tmp.glob("*.log"):
            data = log.read_bytes()
            assert secret not in data and secret.hex().encode() not in data, log

        problems = e2e.stop_all_and_check(lab, [a, b])
        assert not problems, problems
    e2e.assert_lab_clean(lab)


_TS = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", re.M)


def _ping_stops_after(lab: Lab, ns, address: str, remove: Callable[[], None]) -> None:
    """Ping ``address`` from ``ns`` every 50 ms; ``remove()`` after 1.5 s; no reply may arrive 1 s after it.

    Row 11's "loss starts within T" with T = 1 s: the removal must reach the live session (not only new
    handshakes) within a few ticks.
    """
    ping = lab.spawn(ns, ["ping", "-6", "-n", "-D", "-i", "0.05", "-w", "4", address])
    time.sleep(1.5)
    remove()
    removed_at = time.time()
    ping.wait(timeout=20)
    replies = [float(ts) for ts, _seq in _TS.findall(ping.output())]
    assert len([r for r in replies if r < removed_at]) >= 10, ping.output()[-500:]
    late = [r - removed_at for r in replies if r > removed_at + 1.0]
    assert late == [], f"replies {late} s after the removal"


def test_row11_whitelist_removal_mid_ping_stops_traffic_within_a_second():
    with Lab("wsrm") as lab:
        t = reference_topology(lab)
        ds = e2e.start_mesh(lab, {"C": t.peerC, "D": t.peerD}, static={"C": t.PEER_C_IP, "D": t.PEER_D_IP})
        c, d = ds["C"], ds["D"]
        _up(lab, t, c, d)

        def remove() -> None:
            assert c.control("whitelist_remove", address=d.address)["changed"]

        _ping_stops_after(lab, t.peerD, c.address, remove)
        entry = c.peer(d.address)
        assert entry is None or not entry["is_secure"] or entry["path"] == "none", entry
        # D still holds its keys; C has dropped them: D's packets die at C as unknown_peer (no session),
        # then its new initiations as not_whitelisted.
        before = c.counters()
        assert traffic.ping(lab, t.peerD, c.address, count=3, interval=0.2, wait=1).received == 0
        got = e2e.delta(before, c.counters())
        assert got.get("not_whitelisted", 0) + got.get("unknown_peer", 0) >= 1, got
        problems = e2e.stop_all_and_check(lab, ds.values())
        assert not problems, problems
    e2e.assert_lab_clean(lab)


def test_row11_websetup_whitelist_rm_mid_ping_stops_traffic_within_a_second():
    """The plan's exact recipe: B is removed from A's whitelist *via websetup* while B pings A.

    The command is a fresh ``whitelist-rm B`` authenticated with A's shared secret, sent over the overlay
    from B (on A's websetup whitelist, so the dashboard removes its own node). It tears the live session
    down, not only future handshakes. No reply is expected: A may no longer talk to B.
    """
    from husarnet_ros.core import websetup

    with Lab("wsrm2") as lab:
        t, a, b, a_state, a_addr, b_addr, _hosts = _websetup_pair(lab)
        dash = Dashboard(lab, t.peerD, b_addr, a_addr, websetup.read_secret(a_state))
        _counter, rm_b = dash.build("whitelist-rm", (b_addr,))
        before_ws = _ws_counters(a)

        _ping_stops_after(lab, t.peerD, a_addr, lambda: dash.send(rm_b))
        got_ws = _ws_counters(a)
        assert got_ws["accepted"] == before_ws["accepted"] + 1, (before_ws, got_ws)
        assert not _listed(a, b_addr)
        entry = a.peer(b_addr)
        assert entry is None or not entry["is_secure"] or entry["path"] == "none", entry
        before = a.counters()
        assert traffic.ping(lab, t.peerD, a_addr, count=3, interval=0.2, wait=1).received == 0
        got = e2e.delta(before, a.counters())
        assert got.get("not_whitelisted", 0) + got.get("unknown_peer", 0) >= 1, got
        problems = e2e.stop_all_and_check(lab, [a, b])
        assert not problems, problems
    e2e.assert_lab_clean(lab)
