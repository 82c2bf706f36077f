"""End-to-end path and fault rows of TESTPLAN.md that need no base server.

Rows: 1 (baseline on one link), 20 (NAT rebinding with ``conntrack -F``; NAT mapping expiry, with a
keepalive inside the NAT timeout and without),
22 (10% loss), and LAN discovery with no base at all. Path state, endpoints and counters come from
the daemons' control sockets; traffic is real ping6 and TCP with a SHA-256 check over the overlay.

NAT rows use a "public" daemon on the WAN (in the plan's ``base`` namespace, running a normal node,
not the base server) and peerA behind natA: peerA knows the public endpoint, the public node only
learns peerA's NAT mapping from authenticated packets, so it must follow a rebinding on its own.
"""

from __future__ import annotations

import time

import pytest

from husarnet_ros.core.constants import Timers
from husarnet_ros.testing import e2e, traffic
from husarnet_ros.testing.netns import Lab, reference_topology, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]


def _finish(lab: Lab, daemons) -> None:
    problems = e2e.stop_all_and_check(lab, daemons)
    assert not problems, problems


def _port(endpoint: str) -> int:
    return int(str(endpoint).rsplit(":", 1)[1])


# --------------------------------------------------------------------------------------- row 1


def test_row1_baseline_two_hosts_on_one_link():
    with Lab("row1") as lab:
        t = reference_topology(lab)
        ds = e2e.start_mesh(lab, {"C": t.peerC, "D": t.peerD}, static={"C": t.PEER_C_IP, "D": t.PEER_D_IP})
        c, d = ds["C"], ds["D"]
        start = {n: e2e.drops(x) for n, x in ds.items()}
        r = traffic.ping(lab, t.peerC, d.address, count=5, interval=0.2, wait=2)
        assert r.received >= 4, r.output
        pc = c.wait_path(d.address, timeout=20)
        pd = d.wait_path(c.address, timeout=20)
        assert pc["is_secure"] and pd["is_secure"]
        assert t.PEER_D_IP in pc["endpoint"] and t.PEER_C_IP in pd["endpoint"]
        e2e.assert_no_drops(ds, start, staged=5)  # the first ping can beat the handshake: held, not lost
        before = {n: e2e.drops(x) for n, x in ds.items()}
        # Both directions carry TCP with byte-exact content.
        there = traffic.tcp_transfer(lab, t.peerD, t.peerC, d.address, mb=5, port=5201)
        back = traffic.tcp_transfer(lab, t.peerC, t.peerD, c.address, mb=5, port=5202, seed=2)
        assert there.ok, there
        assert back.ok, back
        # UDP echo both ways.
        rec = traffic.UdpRecorder.start(lab, t.peerD, "::", 7000)
        import socket

        s = lab.socket(t.peerC, socket.AF_INET6, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(b"echo me", (d.address, 7000))
        data, src = s.recvfrom(100)
        s.close()
        assert data == b"echo me" and src[0] == d.address
        assert rec.sources() == {c.address}
        # A clean network: no drop of any kind with the session up; the ping via the control socket works too.
        e2e.assert_no_drops(ds, before)
        assert c.control("ping", address=d.address, timeout=2.0)["rtt_ms"] > 0
        assert c.counters()["handshakes_completed"] + d.counters()["handshakes_completed"] >= 1
        _finish(lab, ds.values())
    e2e.assert_lab_clean(lab)


def test_lan_discovery_without_base():
    """C and D know only each other's address: multicast beacons find the endpoint, the path is 'lan'."""
    with Lab("lan") as lab:
        t = reference_topology(lab)
        ds = e2e.start_mesh(lab, {"C": t.peerC, "D": t.peerD})  # no static endpoints, no base
        c, d = ds["C"], ds["D"]
        entry = c.wait_path(d.address, paths=("lan",), timeout=30)
        assert entry["is_secure"]
        d.wait_path(c.address, paths=("lan",), timeout=10)
        assert traffic.ping(lab, t.peerC, d.address, count=3, wait=2).received == 3
        assert c.status()["base"] == "none"
        _finish(lab, ds.values())
    e2e.assert_lab_clean(lab)


# --------------------------------------------------------------------------------------- row 20


def _public_pair(lab: Lab, t, **extra):
    """peerA (behind natA) with a static peer 'X' on the WAN; X knows A by address only."""
    return e2e.start_mesh(lab, {"A": t.peerA, "X": t.base}, static={"X": t.BASE_IP}, extra={"A": extra, "X": extra})


def test_row20_nat_rebinding_session_recovers():
    with Lab("row20") as lab:
        t = reference_topology(lab, symmetric_nat=True)  # random ports: the flush really moves the mapping
        ds = _public_pair(lab, t)
        a, x = ds["A"], ds["X"]
        assert traffic.ping(lab, t.peerA, x.address, count=3, wait=2).received >= 2
        entry = x.wait_path(a.address, paths=("direct",), timeout=20)
        assert t.NAT_A_IP in entry["endpoint"]  # X sees A only through its NAT
        old_port = _port(entry["endpoint"])
        hs_before = a.counters()["handshakes_completed"]

        lab.conntrack_flush(t.natA)
        # Traffic from the inside recreates a mapping with a new external port; X must follow it within a
        # few seconds (the plan: keepalive + RTT; scaled keepalive is 1 s), then lose nothing more.
        assert wait_until(lambda: traffic.ping(lab, t.peerA, x.address, count=1, wait=1).received == 1, 5, interval=0.1)
        assert traffic.ping(lab, t.peerA, x.address, count=10, interval=0.2, wait=2).received == 10

        def moved() -> bool:
            e = x.peer(a.address)
            return e is not None and _port(e["endpoint"]) != old_port and e["path"] == "direct"

        assert wait_until(moved, 10), x.peer(a.address)
        # ... and traffic from the outside reaches A over the new mapping.
        assert x.control("ping", address=a.address, timeout=3.0)["rtt_ms"] > 0
        # Rebinding needed no new handshake.
        assert a.counters()["handshakes_completed"] == hs_before
        _finish(lab, ds.values())
    e2e.assert_lab_clean(lab)


def test_row20_nat_mapping_expiry_recovers():
    """Keepalive (probe rounds, 2.5 s scaled) slower than the NAT's 2 s UDP timeout: the session survives idling."""
    with Lab("row20b") as lab:
        t = reference_topology(lab)
        lab.set_sysctl(t.natA, "net.netfilter.nf_conntrack_udp_timeout", 2)
        lab.set_sysctl(t.natA, "net.netfilter.nf_conntrack_udp_timeout_stream", 2)
        ds = _public_pair(lab, t)
        a, x = ds["A"], ds["X"]
        assert traffic.ping(lab, t.peerA, x.address, count=3, wait=2).received >= 2
        x.wait_path(a.address, paths=("direct",), timeout=20)
        time.sleep(10)  # idle: without traffic from A the 2 s mapping would be long gone

        def reachable() -> bool:
            return x.control("ping", address=a.address, timeout=1.0)["rtt_ms"] > 0

        assert wait_until(reachable, 8, interval=0.5)
        assert x.path_to(a.address) == "direct"
        _finish(lab, ds.values())
    e2e.assert_lab_clean(lab)


def test_row20_keepalive_keeps_an_idle_nat_mapping():
    """Keepalives more often than the NAT's UDP timeout: an idle mapping never expires, traffic works at once."""
    nat_timeout = 2
    scale = 0.05  # probe rounds (the NAT keepalive, 25 s unscaled) every 1.25 s, inside the 2 s timeout
    timers = Timers().scaled(scale)
    assert timers.probe_interval < nat_timeout
    with Lab("row20k") as lab:
        # Random ports: a mapping that expired and came back would come back on another port.
        t = reference_topology(lab, symmetric_nat=True)
        lab.set_sysctl(t.natA, "net.netfilter.nf_conntrack_udp_timeout", nat_timeout)
        lab.set_sysctl(t.natA, "net.netfilter.nf_conntrack_udp_timeout_stream", nat_timeout)
        ds = _public_pair(lab, t, timers_scale=scale)
        a, x = ds["A"], ds["X"]
        assert wait_until(lambda: traffic.ping(lab, t.peerA, x.address, count=1, wait=1).received == 1, 10, 0.1)
        entry = x.wait_path(a.address, paths=("direct",), timeout=20)
        port = _port(entry["endpoint"])
        time.sleep(3 * nat_timeout)  # idle: no data either way, only keepalives
        # From the outside in, at once: the very first ping is answered (no retry, no wait for A to speak).
        first = traffic.ping(lab, t.base, a.address, count=1, wait=1)
        assert first.received == 1, (first.output, x.peer(a.address))
        entry = x.peer(a.address)
        assert entry["path"] == "direct" and _port(entry["endpoint"]) == port, (entry, port)  # same mapping
        _finish(lab, ds.values())
    e2e.assert_lab_clean(lab)


# --------------------------------------------------------------------------------------- row 22


def test_row22_ten_percent_loss_handshake_and_tcp_still_work():
    with Lab("row22") as lab:
        t = reference_topology(lab)
        rule = lab.loss(t.wan, 10)  # both directions of every UDP datagram crossing the WAN
        start = time.monotonic()
        ds = _public_pair(lab, t)
        a, x = ds["A"], ds["X"]
        assert wait_until(
            lambda: traffic.ping(lab, t.peerA, x.address, count=1, wait=1).received == 1, 30, interval=0.2
        )
        x.wait_path(a.address, paths=("direct",), timeout=20)
        res = traffic.tcp_transfer(lab, t.base, t.peerA, x.address, mb=3, timeout=120)
        assert res.ok, res
        r = traffic.ping(lab, t.peerA, x.address, count=30, interval=0.1, wait=1)
        assert 0 < r.loss < 0.5 or r.loss == 0, r.output  # ~19% expected round-trip loss, never a dead tunnel
        assert r.received >= 10
        assert lab.rule_packets(rule) > 0  # the impairment really dropped packets
        elapsed = time.monotonic() - start
        sent = a.counters()["handshakes_sent"] + x.counters()["handshakes_sent"]
        # No handshake storm: scaled rekey every 12 s plus retries of lost attempts every 0.5 s at most.
        assert sent <= 10 + elapsed / 1.0, (sent, elapsed)
        _finish(lab, ds.values())
    e2e.assert_lab_clean(lab)
