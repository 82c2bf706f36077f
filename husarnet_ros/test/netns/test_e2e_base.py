"""End-to-end rows of TESTPLAN.md that need the base server: peers behind two different NATs.

Rows: 1 (baseline through two NATs: hole punching gives a direct path), 18 (base killed mid-session:
direct traffic unaffected, reconnects back off exponentially, a new peer waits for the base, recovery after
restart), 24 (direct UDP blocked mid-session: relay within T; unblocked: back to direct within T2).
peerA and peerB know each other only by fc94 address; everything else comes from the base. Verdicts
from control-socket path state and counters, and from a WAN sniffer.
"""

from __future__ import annotations

import itertools
import signal
import socket
import time

import pytest

from husarnet_ros.core.constants import Timers
from husarnet_ros.testing import e2e, traffic
from husarnet_ros.testing.netns import WAN_ONLINK, Lab, reference_topology, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

PEER_E_IP = "198.18.0.5"  # a node on the WAN itself (no NAT), for "a new peer turns up"


def _nat_pair(lab: Lab, t, base: e2e.BaseServer):
    return e2e.start_mesh(
        lab, {"A": t.peerA, "B": t.peerB}, extra={"A": {"base": [base.spec]}, "B": {"base": [base.spec]}}
    )


def _finish(lab: Lab, daemons) -> None:
    problems = e2e.stop_all_and_check(lab, daemons)
    assert not problems, problems


def test_row1_baseline_through_two_nats():
    """Hole punching gives a direct path that carries 50 MB of TCP each way and UDP, with no drop anywhere."""
    with Lab("b1") as lab:
        t = reference_topology(lab)
        base = e2e.start_base(lab, t)
        ds = _nat_pair(lab, t, base)
        a, b = ds["A"], ds["B"]
        assert wait_until(lambda: a.status()["base"] != "none" and b.status()["base"] != "none", 15)
        start = {n: e2e.drops(x) for n, x in ds.items()}
        pings: list[int] = []

        def ping_once() -> bool:
            pings.append(1)
            return traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1

        assert wait_until(ping_once, 20, interval=0.2)
        ea = a.wait_path(b.address, paths=("direct",), timeout=30)
        eb = b.wait_path(a.address, paths=("direct",), timeout=30)
        assert t.NAT_B_IP in ea["endpoint"] and t.NAT_A_IP in eb["endpoint"]  # hole punched NAT to NAT
        e2e.assert_no_drops(ds, start, staged=len(pings))  # pings sent before the session was up are held
        before = {n: e2e.drops(x) for n, x in ds.items()}
        there = traffic.tcp_transfer(lab, t.peerB, t.peerA, b.address, mb=50, port=5201)
        back = traffic.tcp_transfer(lab, t.peerA, t.peerB, a.address, mb=50, port=5202, seed=2)
        assert there.ok and there.received_bytes == 50_000_000, there
        assert back.ok and back.received_bytes == 50_000_000, back
        # UDP over the overlay: every datagram (up to near the overlay MTU) echoed byte for byte, by B only.
        rec = traffic.UdpRecorder.start(lab, t.peerB, "::", 7000)
        payloads = [bytes([i]) * size for i, size in enumerate((1, 200, 1000, 1300) * 5)]
        assert traffic.udp_echo(lab, t.peerA, b.address, 7000, payloads) == payloads
        assert rec.sources() == {a.address}
        assert traffic.ping(lab, t.peerB, a.address, count=5).received == 5
        # No drop of any kind (loss or security) on either side with the session up.
        e2e.assert_no_drops(ds, before)
        assert a.path_to(b.address) == "direct" and b.path_to(a.address) == "direct"
        _finish(lab, ds.values())
        base.proc.stop()
    e2e.assert_lab_clean(lab)


def _reconnect_wait(failures: int) -> tuple[float, float]:
    """The documented wait before a base reconnect after ``failures`` failed attempts (DESIGN.md 5).

    Exponential backoff with jitter: ``base_reconnect_min * 2**failures`` capped at ``base_reconnect_max``,
    times a random factor in [0.5, 1] (``BaseClient.backoff_delay``); 0 failures right after a lost login.
    """
    t = Timers().scaled(e2e.TIMERS_SCALE)
    d = min(t.base_reconnect_max, t.base_reconnect_min * 2**failures)
    return 0.5 * d, d


def _attempts_bounds(window: float) -> tuple[int, int]:
    """Fewest and most reconnect attempts the schedule allows within ``window`` s of losing the base.

    Tolerance for a loaded 2-core VM: waits may run 1.5x long, and 0.7x short (timestamps of two
    attempts read back to back by a starved sniffer thread).
    """
    fewest = most = 0
    slow = fast = 0.0
    for failures in range(100):
        lo, hi = _reconnect_wait(failures)
        slow += 1.5 * hi
        fast += 0.7 * lo
        fewest += slow <= window
        most += fast <= window
    return fewest, most


def _syn_times(frames, src: str, port: int, since: float) -> list[float]:
    """Arrival times of TCP SYNs (not SYN-ACKs) from ``src`` to ``port`` in IPv4 Ethernet frames after ``since``."""
    out = []
    for f in frames:
        d = f.data
        if f.outgoing or f.time < since or len(d) < 34 or d[12:14] != b"\x08\x00" or d[23] != 6:
            continue
        tcp = 14 + (d[14] & 0x0F) * 4
        if len(d) < tcp + 14 or socket.inet_ntoa(d[26:30]) != src:
            continue
        if int.from_bytes(d[tcp + 2 : tcp + 4], "big") == port and d[tcp + 13] & 0x12 == 0x02:
            out.append(f.time)
    return out


def test_row18_base_killed_mid_session():
    """Base crash: direct traffic goes on, reconnects back off exponentially, a new peer waits for the base."""
    with Lab("b18") as lab:
        t = reference_topology(lab)
        base = e2e.start_base(lab, t)
        # peerE: a new node on the WAN that A trusts; it starts only once the base is gone.
        peer_e = lab.host("peerE")
        lab.link(peer_e, t.wan, f"{PEER_E_IP}/32", onlink=WAN_ONLINK[:1])
        hosts = {"A": t.peerA, "B": t.peerB, "E": peer_e}
        opts = e2e.mesh_options(lab, hosts, extra={n: {"base": [base.spec]} for n in hosts})
        ds = {n: lab.start_daemon(hosts[n], e2e.state_dir(lab, n), **opts[n]) for n in ("A", "B")}
        a, b = ds["A"], ds["B"]
        assert wait_until(
            lambda: traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1, 20, interval=0.2
        )
        a.wait_path(b.address, paths=("direct",), timeout=30)
        b.wait_path(a.address, paths=("direct",), timeout=30)
        sniff = lab.sniff(t.base, "eth0")
        attempts_before = {n: x.counters()["base_connect_attempts"] for n, x in ds.items()}
        pinger = lab.spawn(t.peerA, ["ping", "-6", "-n", "-i", "0.2", "-c", "50", "-W", "1", b.address])
        killed_at = time.time()
        base.proc.stop(sig=9)  # crash, not a clean shutdown

        # New peers wait: E knows A by address only, and only the base can say where A is.
        ds["E"] = e = lab.start_daemon(peer_e, e2e.state_dir(lab, "E"), **opts["E"])
        assert traffic.ping(lab, peer_e, a.address, count=3, wait=1).received == 0
        assert (e.peer(a.address) or {}).get("path", "none") == "none", e.peer(a.address)

        pinger.wait(timeout=30)
        result = traffic.parse_ping(pinger.output())
        assert result.transmitted == 50 and result.received == 50, result.output[-300:]  # direct path unaffected
        assert a.status()["base"] == "none" and b.status()["base"] == "none"
        window = time.time() - killed_at
        fewest, most = _attempts_bounds(window)
        for n, x in ds.items():
            if n == "E":
                continue
            attempts = x.counters()["base_connect_attempts"] - attempts_before[n]
            # A fixed 0.5 s retry would make ~2 per second; the backoff allows about 8 in 10 s.
            assert fewest <= attempts <= most, (n, attempts, fewest, most, window)
            # Each wait roughly doubles: attempt j follows attempt j-1 by the schedule's wait for j failures.
            syns = _syn_times(sniff.frames, t.NAT_A_IP if n == "A" else t.NAT_B_IP, 443, killed_at)
            assert len(syns) >= fewest, (n, syns)
            gaps = [round(later - first, 3) for first, later in itertools.pairwise(syns)]
            for failures, gap in enumerate(gaps, start=1):
                lo, hi = _reconnect_wait(failures)
                assert 0.7 * lo <= gap <= 1.5 * hi + 0.3, (n, failures, gap, gaps)
        # Restart the same base (same key): every node logs in again within the longest wait, the direct
        # session was never touched, and the new peer E now finds A and connects.
        base2 = e2e.start_base(lab, t, state_dir=base.state_dir)
        logged_in = Timers().scaled(e2e.TIMERS_SCALE).base_reconnect_max * 1.5 + 5
        assert wait_until(lambda: all(x.status()["base"] != "none" for x in ds.values()), logged_in)
        assert a.path_to(b.address) == "direct"
        assert wait_until(
            lambda: traffic.ping(lab, peer_e, a.address, count=1, wait=1).received == 1, 15, interval=0.2
        ), (e.peer(a.address), a.peer(e.address))
        assert e.peer(a.address)["is_secure"]
        _finish(lab, ds.values())
        base2.proc.stop()
    e2e.assert_lab_clean(lab)


def test_row24_direct_blocked_mid_session_relay_then_direct_again():
    """A direct session loses its path while traffic flows: relay within T, direct again within T2 of unblocking."""
    timers = Timers().scaled(e2e.TIMERS_SCALE)
    # T: data sent on the direct path and unanswered on it for keepalive + rekey_timeout (WireGuard's rule,
    # from the first unanswered send) gives the path up, and the relay path (kept validated by the probe
    # rounds) takes over; +1 s for the ticker and a loaded VM. It once took
    # path_timeout (5x longer): the rule counted from the latest send, which a steady stream keeps young.
    fallback_t = timers.keepalive_timeout + timers.rekey_timeout + 1.0
    assert fallback_t < timers.path_timeout / 2
    # T2: while relayed, direct candidates are probed again at least every probe_interval; a reply switches.
    upgrade_t = 2 * timers.probe_interval
    with Lab("b24") as lab:
        t = reference_topology(lab)
        base = e2e.start_base(lab, t)
        ds = _nat_pair(lab, t, base)
        a, b = ds["A"], ds["B"]
        assert wait_until(
            lambda: traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1, 20, interval=0.2
        )
        a.wait_path(b.address, paths=("direct",), timeout=30)
        b.wait_path(a.address, paths=("direct",), timeout=30)
        pinger = lab.spawn(t.peerA, ["ping", "-6", "-n", "-i", "0.1", "-W", "1", b.address])  # traffic throughout
        block = lab.block_udp(t.wan, t.NAT_A_IP, t.NAT_B_IP)  # base stays reachable
        blocked_at = time.monotonic()

        def relayed() -> bool:
            return a.path_to(b.address) == "relay" and b.path_to(a.address) == "relay"

        assert wait_until(relayed, fallback_t, interval=0.05), (a.peer(b.address), b.peer(a.address))
        assert traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1
        assert time.monotonic() - blocked_at <= fallback_t + 1  # the ping above answered in a round trip
        pinger.stop(sig=signal.SIGINT)
        res = traffic.tcp_transfer(lab, t.peerB, t.peerA, b.address, mb=1, port=5201)
        assert res.ok, res
        assert a.counters()["base_relay_tx"] > 0 and b.counters()["base_relayed_rx"] > 0
        assert sum(lab.rule_packets(r) for r in block) > 0  # direct attempts really hit the block
        lab.unblock(block)
        # The switch back happens only after an authenticated probe reply on the direct path.
        entry = a.wait_path(b.address, paths=("direct",), timeout=upgrade_t)
        assert t.NAT_B_IP in entry["endpoint"]
        b.wait_path(a.address, paths=("direct",), timeout=upgrade_t)
        assert traffic.ping(lab, t.peerA, b.address, count=5).received == 5
        _finish(lab, ds.values())
        base.proc.stop()
    e2e.assert_lab_clean(lab)


def test_symmetric_nats_on_both_sides_fall_back_to_the_relay():
    """Two 'masquerade random' NATs: no hole can be punched, so the pair must stay reachable via the relay."""
    with Lab("bsym") as lab:
        t = reference_topology(lab, symmetric_nat=True)
        base = e2e.start_base(lab, t)
        ds = _nat_pair(lab, t, base)
        a, b = ds["A"], ds["B"]
        assert wait_until(
            lambda: traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1, 30, interval=0.2
        )
        entry = a.wait_path(b.address, paths=("relay",), timeout=15)
        assert entry["is_secure"]
        assert traffic.ping(lab, t.peerB, a.address, count=5).received == 5
        res = traffic.tcp_transfer(lab, t.peerB, t.peerA, b.address, mb=1, port=5201)
        assert res.ok, res
        _finish(lab, ds.values())
        base.proc.stop()
    e2e.assert_lab_clean(lab)


def test_row18_relayed_pair_recovers_after_base_restart():
    """Relayed traffic stops with the base and comes back once the same base is restarted."""
    with Lab("b18r") as lab:
        t = reference_topology(lab)
        base = e2e.start_base(lab, t)
        lab.block_udp(t.wan, t.NAT_A_IP, t.NAT_B_IP)  # only the relay can carry A <-> B
        ds = _nat_pair(lab, t, base)
        a, b = ds["A"], ds["B"]
        assert wait_until(
            lambda: traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1, 30, interval=0.2
        )
        a.wait_path(b.address, paths=("relay",), timeout=15)
        base.proc.stop(sig=9)
        assert wait_until(lambda: a.status()["base"] == "none" and b.status()["base"] == "none", 10)
        assert traffic.ping(lab, t.peerA, b.address, count=3, wait=1).received == 0  # nothing can carry it now
        base2 = e2e.start_base(lab, t, state_dir=base.state_dir)
        assert wait_until(
            lambda: traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1, 30, interval=0.2
        ), (a.status(), a.peers())
        r = traffic.ping(lab, t.peerB, a.address, count=5)
        # Should this fail again (once, on a loaded machine, 4 of 5 came back), say where the echo was lost.
        assert r.received == 5, (r.output, a.counters(), b.counters(), a.peers(), b.peers(), a.status(), b.status())
        _finish(lab, ds.values())
        base2.proc.stop()
    e2e.assert_lab_clean(lab)
