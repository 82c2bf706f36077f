"""Forged control traffic end to end (issue #3 test 8; TESTPLAN rows 19, 25 and 16 at the base and beacon ports).

- Row 19: mallory spoofs the base's IP:port towards peerA's NAT mapping (raw IPv4 with the base as source,
  which the NAT lets in as replies) and sends a plaintext PEER_INFO naming mallory as B's endpoint, Data
  messages with random and with the real base receiver index, a replay of a real base datagram and a Hello
  carrying the base's key. peerA's base state, its path and endpoint for B stay as they were and A never
  sends anything to mallory.
- Row 25: mallory re-sends B's own signed beacon from mallory's LAN address (and forges one): A may probe
  the address, but the A<->B session stays on B's endpoint and no overlay data reaches mallory.
- Row 16: random, truncated and bit-flipped datagrams at the base's UDP and TCP ports and at the beacon
  multicast port for ~5 s: the base, the relay and the nodes keep working.
Verdicts come from the control sockets (status, peers, counters) and from sniffers, never from logs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import struct
import threading
import time

import pytest

from husarnet_ros.testing import e2e, traffic
from husarnet_ros.testing.netns import Lab, reference_topology, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]


PORT = e2e.PORT
BEACON_PORT = 5581
BEACON_GROUP4 = "224.3.252.148"
# Drop reasons a node may count for a datagram that is not what it claims to be.
REJECTS = (
    "malformed",
    "bad_mac",
    "replay",
    "too_old",
    "unknown_peer",
    "bad_id",
    "bad_sig",
    "not_whitelisted",
    "rate_limited",
    "base_malformed",
    "base_bad_mac",
    "base_replay",
    "base_unknown_index",
    "base_bad_peer_info",
)


def _rejected(before: dict, after: dict) -> int:
    return sum(after.get(k, 0) - before.get(k, 0) for k in REJECTS)


def _finish(lab: Lab, daemons, *bases: e2e.BaseServer) -> None:
    problems = e2e.stop_all_and_check(lab, daemons)
    assert not problems, problems
    for b in bases:
        assert b.proc.stop() == 0, b.proc.tail()


# --------------------------------------------------------------------------------------- row 19


def test_row19_spoofed_base_messages_change_nothing():
    from husarnet_ros.core import base_proto as bp
    from husarnet_ros.core import wire
    from husarnet_ros.core.identity import Identity

    with Lab("f19") as lab:
        t = reference_topology(lab)
        base = e2e.start_base(lab, t)
        ds = e2e.start_mesh(
            lab, {"A": t.peerA, "B": t.peerB}, extra={"A": {"base": [base.spec]}, "B": {"base": [base.spec]}}
        )
        a, b = ds["A"], ds["B"]
        wan = lab.sniff(t.wan, "br0")
        assert wait_until(lambda: traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1, 20, 0.2)
        entry0 = a.wait_path(b.address, paths=("direct",), timeout=30)
        assert wait_until(lambda: a.status()["base"] == "udp", 15), a.status()
        status0 = a.status()

        def base_to_a() -> list[bytes]:
            return [
                p.payload
                for p in wan.udp(port=PORT)
                if p.src == t.BASE_IP and p.dst == t.NAT_A_IP and wire.message_type(p.payload) == wire.MSG_DATA
            ]

        assert wait_until(lambda: base_to_a(), 20), "need a real base->A datagram (UDP_PONG) to learn its index"
        real = base_to_a()[-1]
        rx_index, counter = struct.unpack_from("<II", real, 4)[0], struct.unpack_from("<Q", real, 8)[0]
        m_sniff = lab.sniff(t.mallory, "eth0")
        b_pub = Identity.load(b.state_dir / "id").public_key
        mallory_ep = (t.MALLORY_WAN_IP, PORT)
        peer_info = bp.build_peer_info(ipaddress.IPv6Address(b.address).packed, b_pub, 3, [mallory_ep])
        me = Identity.generate()
        hello = bytearray(wire.build_hello(me, bytes(16), int(time.time() * 1000)))
        hello[8:40] = bytes.fromhex(base.pubkey)  # claims the base's key; the signature is mallory's
        forged = [
            peer_info,  # a bare base control message, no session at all
            wire.build_data_header(rx_index, counter + 1000) + peer_info + os.urandom(16),  # real index, no key
            wire.build_data_header(int.from_bytes(os.urandom(4), "little"), 7) + os.urandom(48),  # random index
            real,  # a replay of the base's own datagram
            bytes(hello),
            wire.build_hello(me, None, int(time.time() * 1000)),  # mallory's own key, 'from the base'
        ]
        before = a.counters()
        for _round in range(5):
            for payload in forged:
                pkt = traffic.build_ipv4_udp(t.BASE_IP, t.NAT_A_IP, PORT, PORT, payload)
                traffic.send_raw_ipv4(lab, t.mallory, pkt)
            time.sleep(0.1)
        n = 5 * len(forged)
        arrived = [p for p in wan.udp(port=PORT) if p.dst == t.NAT_A_IP and p.payload in forged]
        assert len(arrived) >= n, "the spoofed datagrams must really be on the wire"
        # They pass the NAT (they look like the base's replies) and are all rejected.
        # Seen here: malformed (bare PEER_INFO, mallory's Hello), bad_mac, unknown_peer, replay, bad_sig.
        assert wait_until(lambda: _rejected(before, a.counters()) >= n, 5), e2e.delta(before, a.counters())
        time.sleep(1.0)
        assert _rejected(before, a.counters()) == n, e2e.delta(before, a.counters())
        status1 = a.status()
        assert (status1["base"], status1["base_address"]) == (status0["base"], status0["base_address"])
        entry1 = a.peer(b.address)
        assert entry1["path"] == "direct" and entry1["endpoint"] == entry0["endpoint"], (entry0, entry1)
        assert not [p for p in m_sniff.udp() if p.src == t.NAT_A_IP], "A sent something to the bogus endpoint"
        assert traffic.ping(lab, t.peerA, b.address, count=3, interval=0.2).received == 3
        assert a.counters()["base_connect_attempts"] == before["base_connect_attempts"]
        _finish(lab, ds.values(), base)
    e2e.assert_lab_clean(lab)


# --------------------------------------------------------------------------------------- row 25


def test_row25_spoofed_beacons_do_not_redirect_the_session():
    from husarnet_ros.core import beacon as bc

    with Lab("f25") as lab:
        t = reference_topology(lab)
        ds = e2e.start_mesh(lab, {"C": t.peerC, "D": t.peerD})  # LAN discovery only
        c, d = ds["C"], ds["D"]
        entry0 = c.wait_path(d.address, paths=("lan",), timeout=30)
        assert traffic.ping(lab, t.peerC, d.address, count=3, interval=0.2, wait=2).received == 3
        # From now on D's real beacons no longer reach C; mallory will deliver D's freshest one instead.
        for rule in ("ip saddr 198.18.3.3 udp dport 5581 counter drop", "ip6 nexthdr udp udp dport 5581 counter drop"):
            lab.add_rule(t.lan, rule)
        d_eth = lab.sniff(t.peerD, "eth0")

        def d_beacons() -> list[bytes]:
            return [p.payload for p in d_eth.udp(port=BEACON_PORT) if p.src == t.PEER_D_IP]

        assert wait_until(lambda: d_beacons(), 5), "D sends beacons"
        captured = d_beacons()[-1]
        assert bc.parse_beacon(captured).address.hex() != ""  # a genuine, verifiable beacon of D
        m_lan = lab.sniff(t.mallory, "eth1")
        before = c.counters()
        pinger = lab.spawn(t.peerC, ["ping", "-6", "-n", "-i", "0.1", "-c", "30", d.address])
        s = lab.socket(t.mallory, socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((t.MALLORY_LAN_IP, 0))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(t.MALLORY_LAN_IP))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        s.sendto(captured, (BEACON_GROUP4, BEACON_PORT))  # D's own beacon, from mallory's address
        bad_sig = bytearray(captured)
        bad_sig[54:62] = struct.pack("<Q", int(time.time() * 1000) + 1)  # fresher timestamp, old signature
        s.sendto(bytes(bad_sig), (BEACON_GROUP4, BEACON_PORT))
        s.sendto(captured, (t.PEER_C_IP, BEACON_PORT))  # and unicast
        s.close()
        pinger.wait(timeout=20)
        result = traffic.parse_ping(pinger.output())
        got = e2e.delta(before, c.counters())
        assert got.get("beacon_accepted", 0) >= 1, got  # the spoof did reach the path logic
        assert got.get("beacon_bad_sig", 0) + got.get("beacon_replay", 0) + got.get("beacon_stale", 0) >= 1, got
        assert result.received == 30, result.output[-300:]
        entry1 = c.peer(d.address)
        assert entry1["path"] == "lan" and entry1["endpoint"] == entry0["endpoint"], (entry0, entry1)
        assert t.MALLORY_LAN_IP not in entry1["endpoint"]
        # Mallory may see authenticated probes (small), never the pings' data.
        to_mallory = [p for p in m_lan.udp(port=PORT) if p.dst == t.MALLORY_LAN_IP]
        assert all(len(p.payload) <= 64 for p in to_mallory), [len(p.payload) for p in to_mallory]
        _finish(lab, ds.values())
    e2e.assert_lab_clean(lab)


# --------------------------------------------------------------------------------------- row 16


def _tcp_garbage(lab: Lab, ns, addr: tuple[str, int], rng: random.Random, stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError), contextlib.closing(lab.socket(ns, socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.settimeout(1)
            s.connect(addr)
            for _ in range(rng.randrange(1, 6)):
                kind = rng.randrange(3)
                if kind == 0:
                    s.sendall(rng.randbytes(rng.randrange(1, 400)))
                elif kind == 1:  # a plausible frame header with garbage (or a lying length)
                    body = rng.randbytes(rng.randrange(0, 200))
                    s.sendall(struct.pack(">H", rng.choice([len(body), 65535, 0])) + body)
                else:  # a Hello-sized frame of noise
                    s.sendall(struct.pack(">H", 128) + bytes([5, 0, 0, 0]) + rng.randbytes(124))
        time.sleep(0.02)


def test_row16_fuzz_at_base_udp_tcp_and_beacon_ports():
    with Lab("f16") as lab:
        t = reference_topology(lab)
        base = e2e.start_base(lab, t)
        lab.block_udp(t.wan, t.NAT_A_IP, t.NAT_B_IP)  # A <-> B only through the relay
        pair = e2e.start_mesh(
            lab, {"A": t.peerA, "B": t.peerB}, extra={"A": {"base": [base.spec]}, "B": {"base": [base.spec]}}
        )
        lan = e2e.start_mesh(lab, {"C": t.peerC, "D": t.peerD})
        a, b, c, d = pair["A"], pair["B"], lan["C"], lan["D"]
        base_sniff = lab.sniff(t.base, "eth0")
        lan_sniff = lab.sniff(t.peerD, "eth0")
        assert wait_until(lambda: traffic.ping(lab, t.peerA, b.address, count=1, wait=1).received == 1, 30, 0.2)
        a.wait_path(b.address, paths=("relay",), timeout=15)
        c.wait_path(d.address, paths=("lan",), timeout=30)
        assert wait_until(lambda: lan_sniff.udp(port=BEACON_PORT), 5)
        udp_samples = [p.payload for p in base_sniff.udp(port=PORT)][:50]
        beacons = [p.payload for p in lan_sniff.udp(port=BEACON_PORT)][:20]
        assert udp_samples and beacons
        before = {n: x.counters() for n, x in {"C": c, "D": d}.items()}
        pings = [
            lab.spawn(t.peerA, ["ping", "-6", "-n", "-i", "0.2", "-w", "8", b.address]),
            lab.spawn(t.peerC, ["ping", "-6", "-n", "-i", "0.2", "-w", "8", d.address]),
        ]
        stop = threading.Event()
        tcp = threading.Thread(
            target=_tcp_garbage, args=(lab, t.mallory, (t.BASE_IP, 443), random.Random(1), stop), daemon=True
        )
        tcp.start()
        u = lab.socket(t.mallory, socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((t.MALLORY_WAN_IP, 0))
        mc = lab.socket(t.mallory, socket.AF_INET, socket.SOCK_DGRAM)
        mc.bind((t.MALLORY_LAN_IP, 0))
        mc.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(t.MALLORY_LAN_IP))
        mc.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        gen_u = traffic.fuzz_datagrams(random.Random(16), udp_samples)
        gen_b = traffic.fuzz_datagrams(random.Random(17), beacons)
        sent = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for _ in range(20):
                with contextlib.suppress(OSError):
                    u.sendto(next(gen_u), (t.BASE_IP, PORT))
                    mc.sendto(next(gen_b), (BEACON_GROUP4, BEACON_PORT))
                    sent += 1
            time.sleep(0.01)
        stop.set()
        tcp.join(timeout=5)
        u.close()
        mc.close()
        results = [traffic.parse_ping(p.output()) for p in pings if p.wait(timeout=20) is not None]
        assert sent >= 500
        assert base.proc.alive and all(x.proc.alive for x in (a, b, c, d))
        for r in results:
            assert r.transmitted >= 20 and r.loss <= 0.2, r.output[-300:]
        for n, x in {"C": c, "D": d}.items():
            got = e2e.delta(before[n], x.counters())
            beacon_rejects = sum(
                v
                for k, v in got.items()
                if k.startswith("beacon_") and k not in ("beacon_tx", "beacon_rx", "beacon_accepted")
            )
            assert beacon_rejects >= 1, (n, got)
        # The base still relays and both nodes are still logged in.
        assert traffic.ping(lab, t.peerB, a.address, count=3, interval=0.2).received == 3
        assert a.status()["base"] != "none" and b.status()["base"] != "none"
        assert traffic.ping(lab, t.peerC, d.address, count=3, interval=0.2).received == 3
        _finish(lab, [*pair.values(), *lan.values()], base)
    e2e.assert_lab_clean(lab)
