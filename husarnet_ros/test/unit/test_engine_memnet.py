"""Two (or three) engines on the in-memory network: data, handshake and fault behaviour.

Every assertion is on delivered packets, datagrams sent and drop counters,
never on log text.  Timers are shrunk so WireGuard's 5 s / 10 s / 120 s rules
play out in well under a second.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

# Shared with the test_im_* suite: endpoints, shrunk timers, cached identities, packet and polling helpers.
from test_im_common import EP_A, EP_B, FAST, MALLORY, identity, packet, wait_for

from husarnet_ros.core.constants import Timers
from husarnet_ros.core.engine import Engine, EngineConfig
from husarnet_ros.core.identity import Identity, format_address
from husarnet_ros.core.memnet import Impairment, MemoryNetwork
from husarnet_ros.core.wire import MSG_DATA


class Node:
    def __init__(self, engine: Engine, transport, ident: Identity) -> None:
        self.engine = engine
        self.transport = transport
        self.id = ident
        self.address = ident.address
        self.got: list[bytes] = []
        engine.on_packet = self.got.append

    def send(self, dst: Node, payload: bytes) -> None:
        self.engine.inject_packet(packet(self.address, dst.address, payload))

    def payloads(self) -> list[bytes]:
        return [p[40:] for p in self.got]

    def counter(self, name: str) -> int:
        return self.engine.counters.get(name)

    def peer(self, other: Node):
        return self.engine._peers.get(other.address)

    def secure_with(self, other: Node) -> bool:
        return any(p.address == other.address and p.is_secure for p in self.engine.peers())


class Lab:
    def __init__(self, tmp: Path, seed: int = 1, timers: Timers = FAST, capture: bool = False) -> None:
        self.tmp = tmp
        self.net = MemoryNetwork(seed, capture=capture)
        self.timers = timers
        self.nodes: list[Node] = []

    def node(self, i: int, ep, *, peers=(), whitelist=(), whitelist_enabled=True) -> Node:
        ident = identity(i)
        cfg = EngineConfig(
            state_dir=self.tmp / f"n{i}",
            use_tun=False,
            lan_discovery=False,
            peers=list(peers),
            whitelist=[format_address(w.address if isinstance(w, Node) else w) for w in whitelist],
            whitelist_enabled=whitelist_enabled,
            timers=self.timers,
        )
        t = self.net.transport(ep)
        n = Node(Engine(cfg, identity=ident, transport=t), t, ident)
        self.nodes.append(n)
        return n

    def start(self) -> None:
        for n in self.nodes:
            n.engine.start()

    def close(self) -> None:
        for n in self.nodes:
            n.engine.stop()
        self.net.close()


def spec(i: int, ep) -> str:
    return f"{format_address(identity(i).address)}@{ep[0]}:{ep[1]}"


@pytest.fixture
def lab(tmp_path):
    labs: list[Lab] = []

    def make(**kw) -> Lab:
        lb = Lab(tmp_path / f"lab{len(labs)}", **kw)
        labs.append(lb)
        return lb

    yield make
    for lb in labs:
        lb.close()


def two(lab, **kw) -> tuple[Lab, Node, Node]:
    """A knows B's endpoint (static peer); B learns A's from the handshake. Each whitelists the other."""
    lb = lab(**kw)
    a = lb.node(0, EP_A, peers=[spec(1, EP_B)], whitelist=[identity(1).address])
    b = lb.node(1, EP_B, whitelist=[identity(0).address])
    lb.start()
    return lb, a, b


def connect(a: Node, b: Node, timeout: float = 5.0) -> None:
    """Send A->B until delivered, then B->A until delivered (the session is confirmed both ways)."""
    deadline = time.monotonic() + timeout
    i = 0
    while b"conn-a" not in b.payloads():
        assert time.monotonic() < deadline, "A->B never delivered"
        a.send(b, b"conn-a")
        i += 1
        wait_for(lambda: b"conn-a" in b.payloads(), 0.2)
    while b"conn-b" not in a.payloads():
        assert time.monotonic() < deadline, "B->A never delivered"
        b.send(a, b"conn-b")
        wait_for(lambda: b"conn-b" in a.payloads(), 0.2)


# --------------------------------------------------------------------------- basics
def test_exchange_both_ways_and_ping(lab):
    _lb, a, b = two(lab)
    a.send(b, b"first")  # staged while the key is discovered and the handshake runs
    assert wait_for(lambda: b.payloads() == [b"first"])
    for i in range(20):
        b.send(a, b"b%d" % i)
        a.send(b, b"a%d" % i)
    assert wait_for(lambda: len(a.got) == 20 and len(b.got) == 21), (len(a.got), len(b.got), b.payloads()[:3])
    assert a.payloads() == [b"b%d" % i for i in range(20)]
    # Inner packets arrive unchanged and with the right source.
    assert all(p[8:24] == a.address for p in b.got)
    assert wait_for(lambda: a.secure_with(b) and b.secure_with(a))
    info = next(p for p in a.engine.peers() if p.address == b.address)
    assert info.path == "direct" and info.endpoint == "198.18.0.2:5582" and info.cipher
    assert info.tx_bytes > 0 and info.rx_bytes > 0 and info.last_seen > 0
    assert a.engine.ping(b.address) > 0
    assert b.engine.ping(a.address) > 0
    assert b.counter("handshakes_received") >= 1 and a.counter("handshakes_completed") >= 1
    for n in (a, b):
        for reason in ("bad_mac", "replay", "bad_inner_src", "not_whitelisted", "malformed"):
            assert n.counter(reason) == 0, (reason, n.engine.counters.snapshot())


def test_outbound_source_must_be_ours(lab):
    _lb, a, b = two(lab)
    connect(a, b)
    before = b.transport.sent, len(b.got)
    a.engine.inject_packet(packet(identity(5).address, b.address, b"spoof"))
    assert a.counter("bad_local_src") == 1
    time.sleep(0.05)
    assert b"spoof" not in b.payloads() and len(b.got) == before[1]


def test_handshake_completes_under_30_percent_loss(lab):
    lb = lab(seed=11)
    lb.net.set_impairment(Impairment(drop=0.3))
    a = lb.node(0, EP_A, peers=[spec(1, EP_B)], whitelist=[identity(1).address])
    b = lb.node(1, EP_B, whitelist=[identity(0).address])
    lb.start()
    assert wait_for(lambda: a.secure_with(b), 15)
    connect(a, b, timeout=15)
    assert wait_for(lambda: b.secure_with(a), 5)
    assert lb.net.dropped > 0


def test_reordering_within_window_is_delivered(lab):
    lb, a, b = two(lab, seed=5)
    connect(a, b)
    lb.net.set_impairment(Impairment(reorder=0.3, reorder_delay=0.15), src=EP_A)
    n = 300
    for i in range(n):
        a.send(b, b"r%04d" % i)
    assert wait_for(lambda: len(b.got) == n + 1)
    got = [p for p in b.payloads() if p.startswith(b"r")]
    assert sorted(got) == [b"r%04d" % i for i in range(n)]
    assert got != sorted(got)  # they really were reordered
    assert b.counter("too_old") == 0 and b.counter("replay") == 0


def test_duplicates_dropped_and_counted(lab):
    lb, a, b = two(lab)
    connect(a, b)
    lb.net.set_impairment(Impairment(duplicate=1.0), src=EP_A)
    for i in range(50):
        a.send(b, b"d%02d" % i)
    assert wait_for(lambda: b.counter("replay") >= 50)
    lb.net.quiesce()
    assert [p for p in b.payloads() if p.startswith(b"d")] == [b"d%02d" % i for i in range(50)]


def test_replayed_datagram_delivered_once_and_endpoint_does_not_move(lab):
    lb, a, b = two(lab, capture=True)
    connect(a, b)
    a.send(b, b"pay-me-once")
    assert wait_for(lambda: b"pay-me-once" in b.payloads())
    lb.net.quiesce()
    replay_before = b.counter("replay")
    captured = [c for c in lb.net.captured if c.dst == EP_B and c.data[0] == MSG_DATA]
    assert captured
    # Replay every data datagram A ever sent to B: immediately, 20 times, and from another address.
    lb.net.replay(lambda c: c.dst == EP_B and c.data[0] == MSG_DATA, times=1)
    lb.net.replay(lambda c: c.dst == EP_B and c.data[0] == MSG_DATA, src=MALLORY, times=20)
    assert wait_for(lambda: b.counter("replay") >= replay_before + 21 * len(captured))
    lb.net.quiesce()
    time.sleep(0.05)
    assert b.payloads().count(b"pay-me-once") == 1
    peer = b.peer(a)
    assert peer.paths.endpoint == EP_A
    assert MALLORY not in peer.paths.paths or not peer.paths.paths[MALLORY].validated
    # Nothing ever went to the replayer.
    assert not [c for c in lb.net.captured if c.dst == MALLORY]


def test_non_whitelisted_peer_gets_no_reply(lab):
    lb = lab()
    a = lb.node(0, EP_A, peers=[spec(1, EP_B)], whitelist=[identity(1).address])
    b = lb.node(1, EP_B, whitelist=[])  # B allows nobody
    lb.start()
    # Key discovery: A's Hellos are ignored.
    a.send(b, b"knock")
    assert wait_for(lambda: b.counter("not_whitelisted") >= 2)
    # Even when A knows B's key (e.g. from the base), its initiations are ignored.
    a.engine.add_candidates(b.address, [EP_B], public_key=b.id.public_key, source="base")
    assert wait_for(lambda: a.counter("handshakes_sent") >= 2)
    assert wait_for(lambda: b.counter("handshakes_received") >= 2)
    time.sleep(0.3)
    assert b.transport.sent == 0
    assert b.got == [] and not a.secure_with(b) and not b.secure_with(a)
    # And B cannot send to A either (both directions blocked).
    b.send(a, b"out")
    assert b.counter("not_whitelisted") >= 3 and b.transport.sent == 0


def test_forged_inner_source_dropped(lab):
    _lb, a, b = two(lab)
    connect(a, b)
    c_addr = identity(2).address
    kp = a.peer(b).current
    # A (authenticated) sends a packet claiming to come from C: sealed with A's real key, bypassing A's own check.
    forged = kp.seal(packet(c_addr, b.address, b"forged"))
    a.transport.send(forged, EP_B)
    assert wait_for(lambda: b.counter("bad_inner_src") == 1)
    assert b"forged" not in b.payloads()
    assert all(p[8:24] == a.address for p in b.got)
    # The session itself is unharmed.
    a.send(b, b"still-fine")
    assert wait_for(lambda: b"still-fine" in b.payloads())


def test_whitelist_removal_tears_session_down(lab):
    _lb, a, b = two(lab)
    connect(a, b)
    peer_obj = b.peer(a)
    assert peer_obj.current is not None
    assert [v for v in b.engine._index._table.values() if getattr(v, "owner", None) is peer_obj]
    t0 = time.monotonic()
    assert b.engine.whitelist.remove(a.address)
    assert wait_for(lambda: b.peer(a) is None or b.peer(a).current is None, 1.0)
    assert time.monotonic() - t0 < 1.0
    assert not b.secure_with(a)
    assert not [v for v in b.engine._index._table.values() if getattr(v, "owner", None) is peer_obj]
    n = len(b.got)
    sent_before = b.transport.sent
    for _ in range(5):
        a.send(b, b"after-removal")
    time.sleep(0.3)
    assert len(b.got) == n
    b.send(a, b"b-after")
    assert b.counter("not_whitelisted") >= 1
    assert b.transport.sent == sent_before  # B answers nothing (no handshake replies, no data)


def test_rekey_with_short_timers_loses_nothing(lab):
    timers = dataclasses.replace(
        FAST, rekey_after_time=0.6, reject_after_time=2.0, keepalive_timeout=0.3, rekey_timeout=0.15
    )
    _lb, a, b = two(lab, timers=timers)
    connect(a, b)
    start_completed = a.counter("handshakes_completed") + b.counter("handshakes_completed")
    n = 0
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        a.send(b, b"k%05d" % n)
        b.send(a, b"k%05d" % n)
        n += 1
        time.sleep(0.005)
    assert wait_for(lambda: len([p for p in b.payloads() if p.startswith(b"k")]) == n, 3)
    assert wait_for(lambda: len([p for p in a.payloads() if p.startswith(b"k")]) == n, 3)
    assert sorted(p for p in b.payloads() if p.startswith(b"k")) == [b"k%05d" % i for i in range(n)]
    completed = a.counter("handshakes_completed") + b.counter("handshakes_completed") - start_completed
    assert completed >= 3, completed  # several rekeys happened during the stream
    for node in (a, b):
        assert node.counter("expired") == 0 and node.counter("no_session") <= 1


def test_nat_rebinding_roams_on_authenticated_traffic(lab):
    lb = lab()
    lb.net.set_nat(EP_A, ("198.18.50.1", 40000))
    a = lb.node(0, EP_A, peers=[spec(1, EP_B)], whitelist=[identity(1).address])
    b = lb.node(1, EP_B, whitelist=[identity(0).address])
    lb.start()
    connect(a, b)
    assert b.peer(a).paths.endpoint == ("198.18.50.1", 40000)
    lb.net.set_nat(EP_A, ("198.18.50.1", 41234))  # conntrack flushed: new external port
    a.send(b, b"after-rebind")
    assert wait_for(lambda: b"after-rebind" in b.payloads())
    assert wait_for(lambda: b.peer(a).paths.endpoint == ("198.18.50.1", 41234), 3)
    b.send(a, b"reply-after-rebind")
    assert wait_for(lambda: b"reply-after-rebind" in a.payloads(), 3)


def test_corruption_counted_not_fatal(lab):
    lb, a, b = two(lab, seed=3)
    connect(a, b)
    lb.net.set_impairment(Impairment(corrupt=1.0), src=EP_A)
    for _ in range(20):
        a.send(b, b"garbled")
    assert wait_for(lambda: b.counter("bad_mac") + b.counter("unknown_peer") + b.counter("malformed") >= 20)
    assert b"garbled" not in b.payloads()
    lb.net.set_impairment(Impairment(), src=EP_A)
    a.send(b, b"clean")
    assert wait_for(lambda: b"clean" in b.payloads())


def test_restarted_peer_reconnects(lab, tmp_path):
    lb, a, b = two(lab)
    connect(a, b)
    # B restarts (loses its keys); A keeps sending on its dead session, notices and renegotiates.
    b.engine.stop()
    b.transport.close()
    t2 = lb.net.transport(EP_B)
    cfg = dataclasses.replace(b.engine.config, state_dir=tmp_path / "b2")
    b2 = Node(Engine(cfg, identity=b.id, transport=t2), t2, b.id)
    lb.nodes.append(b2)
    b2.engine.start()
    deadline = time.monotonic() + 10
    while b"after-restart" not in b2.payloads():
        assert time.monotonic() < deadline
        a.send(b2, b"after-restart")
        time.sleep(0.1)


def test_stop_leaves_no_threads(tmp_path):
    before = set(threading.enumerate())
    lb = Lab(tmp_path)
    a = lb.node(0, EP_A, peers=[spec(1, EP_B)], whitelist=[identity(1).address])
    b = lb.node(1, EP_B, whitelist=[identity(0).address])
    lb.start()
    connect(a, b)
    a.engine.stop()
    a.engine.stop()  # idempotent
    b.engine.stop()
    lb.net.close()
    assert wait_for(lambda: set(threading.enumerate()) <= before, 5), set(threading.enumerate()) - before
    assert len(a.engine._index) == 0 and len(b.engine._index) == 0


def test_garbage_datagrams_never_break_the_engine(lab):
    """Random, truncated and type-prefixed junk from anywhere: counted, never answered, session unharmed."""
    import random

    lb, a, b = two(lab, capture=True)
    connect(a, b)
    rng = random.Random(99)
    sent_before = b.transport.sent
    # Every message type (1-6, with zero reserved bytes), no type word at all, and an unknown one.
    kinds = [b"", *(bytes([t, 0, 0, 0]) for t in range(1, 7)), b"\x09"]
    real = a.peer(b).current.seal(packet(a.address, b.address, b"x"))
    for i in range(600):
        prefix = rng.choice(kinds)
        body = rng.randbytes(rng.choice([0, 3, 12, 28, 60, 64, 80, 128, 168, 300]))  # 4 + 60: a cookie reply
        if i % 50 == 0:
            body = bytearray(real)
            body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)  # one flipped bit in a real datagram
            lb.net.inject(bytes(body), MALLORY, EP_B)
            continue
        lb.net.inject(prefix + body, rng.choice([EP_A, MALLORY]), EP_B)
    lb.net.quiesce()
    time.sleep(0.3)
    c = b.engine.counters.snapshot()
    # Cookie replies nobody asked for count as no_session; super fragments as fragment_* or unknown_peer.
    reasons = ("malformed", "bad_mac", "unknown_peer", "bad_id", "bad_sig", "no_session", "fragment_dropped")
    junk = sum(c.get(k, 0) for k in (*reasons, "fragment_malformed"))
    assert junk >= 500, {k: v for k, v in c.items() if v}
    assert c["no_session"] >= 1, c  # type 3 reached the cookie-reply handler
    assert c.get("fragment_dropped", 0) + c.get("fragment_malformed", 0) >= 1, c  # type 6 reached the data path
    assert b.transport.sent - sent_before <= 20  # only its own keepalives/probes to A, nothing for the junk
    assert not [c for c in lb.net.captured if c.dst == MALLORY]  # never a word to the sender of junk
    a.send(b, b"still-alive")
    assert wait_for(lambda: b"still-alive" in b.payloads())
    b.send(a, b"and-back")
    assert wait_for(lambda: b"and-back" in a.payloads())


def test_message_count_limit_forces_rekey_without_loss(lab):
    """REKEY_AFTER_MESSAGES / REJECT_AFTER_MESSAGES shrunk to 40 / 100: keys roll over by count, nothing lost."""
    timers = dataclasses.replace(FAST, rekey_after_messages=40, reject_after_messages=100)
    _lb, a, b = two(lab, timers=timers)
    connect(a, b)
    first = a.peer(b).current
    n = 400
    for i in range(n):
        a.send(b, b"m%04d" % i)
        time.sleep(0.001)
    assert wait_for(lambda: len([p for p in b.payloads() if p.startswith(b"m")]) == n, 5), (
        len([p for p in b.payloads() if p.startswith(b"m")]),
        a.engine.counters.snapshot(),
    )
    assert sorted(p for p in b.payloads() if p.startswith(b"m")) == [b"m%04d" % i for i in range(n)]
    assert a.peer(b).current is not first
    assert a.counter("handshakes_completed") >= n // 100
    assert all(kp.send_counter < 100 for kp in a.peer(b).keypairs())


def test_whitelisting_a_lan_neighbour_seen_in_a_beacon_connects_without_waiting_for_the_next(lab) -> None:
    """Beacons heard before the whitelist entry existed are remembered, so whitelisting connects at once.

    The two beacons are the only endpoint hints either side ever gets (no static peer, no base, no more
    beacons), so the pair can only connect if the engine kept them.
    """
    lb = lab()
    a = lb.node(0, EP_A)
    b = lb.node(1, EP_B)
    lb.start()
    a.engine.add_candidates(b.address, [EP_B], public_key=b.id.public_key, source="beacon")
    b.engine.add_candidates(a.address, [EP_A], public_key=a.id.public_key, source="beacon")
    assert wait_for(lambda: a.engine._unlisted_beacons and b.engine._unlisted_beacons)
    assert a.peer(b) is None and b.peer(a) is None  # remembered, but nothing allocated or sent for them

    a.engine.whitelist.add(b.address)
    b.engine.whitelist.add(a.address)
    connect(a, b)
    assert a.secure_with(b) and b.secure_with(a)
    assert a.engine._unlisted_beacons == {} and b.engine._unlisted_beacons == {}


def test_unlisted_beacon_cache_is_bounded_and_keeps_only_verified_keys(lab, monkeypatch) -> None:
    from husarnet_ros.core import engine as engine_mod

    monkeypatch.setattr(engine_mod, "MAX_UNLISTED_BEACONS", 3)
    lb = lab()
    a = lb.node(0, EP_A)
    lb.start()
    others = [identity(i) for i in range(2, 7)]
    for i, ident in enumerate(others):
        a.engine.add_candidates(ident.address, [("198.18.1.1", 1000 + i)], public_key=ident.public_key, source="beacon")
    # A key that does not hash to the claimed address is never remembered.
    a.engine.add_candidates(others[0].address, [("198.18.1.9", 9)], public_key=identity(1).public_key, source="beacon")
    assert wait_for(lambda: len(a.engine._unlisted_beacons) == 3)
    time.sleep(0.1)
    assert list(a.engine._unlisted_beacons) == [o.address for o in others[2:]]  # oldest evicted
    assert a.engine.peers() == []
