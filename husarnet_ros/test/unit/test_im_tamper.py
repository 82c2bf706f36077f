"""TESTPLAN row 8 (IM variant): tampering with data datagrams in flight.

A relay (or anyone on path) can flip bits, truncate, or inject garbage that
claims an existing session's receiver index.  Expected: the AEAD refuses it
(``bad_mac``; header damage shows up as ``unknown_peer`` / ``malformed``),
nothing reaches the TUN, nothing crashes, and the session is *not* torn down:
the same keypair stays current, the replay window is not moved by the forged
counter (the genuine datagram with that counter is still accepted), and the
peer's endpoint never moves to the tamperer.
"""

from __future__ import annotations

import queue
import random
import threading
import time

from test_im_common import EP_A, EP_B, MALLORY, MSG_DATA, Lab, connect, identity, packet, pair, wait_for

from husarnet_ros.core.transport import RelayEndpoint

DROPS = ("bad_mac", "unknown_peer", "malformed", "too_old", "replay", "expired")


def drops(node) -> dict[str, int]:
    return {r: node.counter(r) for r in DROPS}


def flip(datagram: bytes, bit: int) -> bytes:
    buf = bytearray(datagram)
    buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)


def test_bit_flips_in_ciphertext_and_tag_are_bad_mac_and_do_not_burn_the_counter(tmp_path):
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        kp_b = b.current(a)
        handshakes = b.counter("handshakes_completed") + a.counter("handshakes_completed")
        rng = random.Random(8)
        kp = a.current(b)
        originals = []
        before = drops(b)
        for i in range(40):
            d = kp.seal(packet(a.address, b.address, b"tamper-%02d" % i))
            originals.append(d)
            bit = rng.randrange(16 * 8, len(d) * 8)  # anywhere in ciphertext or tag
            lb.net.inject(flip(d, bit), EP_A, EP_B)
        assert wait_for(lambda: b.counter("bad_mac") - before["bad_mac"] == 40)
        lb.net.quiesce()
        after = drops(b)
        assert {r: after[r] - before[r] for r in DROPS} == {r: 40 if r == "bad_mac" else 0 for r in DROPS}
        assert not b.payloads(b"tamper-")
        # A forged copy must not consume the counter: every genuine original is still accepted, once.
        for d in originals:
            lb.net.inject(d, EP_A, EP_B)
        assert wait_for(lambda: len(b.payloads(b"tamper-")) == 40)
        assert sorted(b.payloads(b"tamper-")) == [b"tamper-%02d" % i for i in range(40)]
        # Not torn down: same keypair, no renegotiation, endpoint unchanged, traffic flows both ways.
        assert b.current(a) is kp_b
        assert b.counter("handshakes_completed") + a.counter("handshakes_completed") == handshakes
        assert b.peer(a).paths.endpoint == EP_A
        a.send(b, b"after-a")
        b.send(a, b"after-b")
        assert wait_for(lambda: b.payloads(b"after-a") and a.payloads(b"after-b"))


def test_header_tampering_and_truncation_are_dropped_with_reasons(tmp_path):
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        kp_b = b.current(a)
        kp = a.current(b)
        before = drops(b)
        sealed = [kp.seal(packet(a.address, b.address, b"hdr-%d" % i)) for i in range(6)]
        # Counter flipped to a far-future value (bit 62): passes the window check, fails the tag;
        # if it moved the window, every later genuine packet would be too_old.
        lb.net.inject(flip(sealed[0], 8 * 8 + 62), EP_A, EP_B)
        # Receiver index damaged: no such session.
        lb.net.inject(flip(sealed[1], 4 * 8 + 3), EP_A, EP_B)
        # Type / reserved bytes damaged: not a Data message at all.
        lb.net.inject(flip(sealed[2], 1 * 8 + 1), EP_A, EP_B)
        # Truncations: below the minimum Data length, and a cut tag.
        lb.net.inject(sealed[3][:20], EP_A, EP_B)
        lb.net.inject(sealed[4][:-1], EP_A, EP_B)
        # Extra trailing bytes: the tag no longer matches.
        lb.net.inject(sealed[5] + b"\x00", EP_A, EP_B)
        assert wait_for(lambda: sum(drops(b).values()) - sum(before.values()) == 6)
        lb.net.quiesce()
        after = drops(b)
        delta = {r: after[r] - before[r] for r in DROPS}
        assert delta["bad_mac"] == 3, delta  # far-future counter, cut tag, extra byte
        assert delta["unknown_peer"] == 1, delta
        assert delta["malformed"] == 2, delta  # bad type word, too short
        assert delta["too_old"] == 0 and delta["replay"] == 0
        assert not b.payloads(b"hdr-")
        # The window was not moved: the genuine datagrams (lower counters) are all accepted.
        for d in sealed:
            lb.net.inject(d, EP_A, EP_B)
        assert wait_for(lambda: len(b.payloads(b"hdr-")) == 6)
        assert b.current(a) is kp_b and b.peer(a).paths.endpoint == EP_A


def test_garbage_claiming_a_live_session_from_another_source(tmp_path):
    """mallory knows B's receiver index for A (it is in clear in every header) and injects garbage."""
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = pair(lb)
        connect(a, b)
        kp_b = b.current(a)
        rng = random.Random(88)
        idx = kp_b.local_index
        before = b.counter("bad_mac")
        for i in range(50):
            body = rng.randbytes(16 + rng.randrange(0, 200))
            counter = rng.choice([1000 + i, 10**6 + i, 2**63 + i])  # never used by A yet
            d = MSG_DATA.to_bytes(4, "little") + idx.to_bytes(4, "little") + counter.to_bytes(8, "little") + body
            lb.net.inject(d, MALLORY, EP_B)
        assert wait_for(lambda: b.counter("bad_mac") - before == 50)
        lb.net.quiesce()
        time.sleep(0.05)
        assert b.current(a) is kp_b
        peer = b.peer(a)
        assert peer.paths.endpoint == EP_A
        assert MALLORY not in peer.paths.paths
        assert b.sent_to(MALLORY) == []
        a.send(b, b"still-up")
        assert wait_for(lambda: b.payloads(b"still-up"))


def test_random_in_flight_corruption_never_delivers_garbage_or_tears_down(tmp_path):
    from husarnet_ros.core.memnet import Impairment

    with Lab(tmp_path, seed=808) as lb:
        a, b = pair(lb)
        connect(a, b)
        kp_b = b.current(a)
        completed = a.counter("handshakes_completed") + b.counter("handshakes_completed")
        lb.net.set_impairment(Impairment(corrupt=0.5), src=EP_A, dst=EP_B)
        sent = {b"rc-%03d" % i for i in range(200)}
        for p in sorted(sent):
            a.send(b, p)
        lb.net.quiesce()
        assert wait_for(lambda: b.counter("bad_mac") > 30)
        time.sleep(0.05)
        got = b.payloads(b"rc-")
        # Only intact originals arrive, each at most once; the rest are counted, never delivered.
        assert set(got) <= sent and len(got) == len(set(got))
        assert all(p[40:] in sent or not p[40:].startswith(b"rc") for p in b.got)
        assert all(p[8:24] == a.address for p in b.got)
        assert 50 < len(got) < 200
        assert b.current(a) is kp_b
        assert a.counter("handshakes_completed") + b.counter("handshakes_completed") == completed
        lb.net.set_impairment(Impairment(), src=EP_A, dst=EP_B)
        a.send(b, b"clean")
        assert wait_for(lambda: b.payloads(b"clean"))


class TamperingRelay:
    """A test-only relay between two in-memory engines that flips one bit in every ``every``-th Data datagram.

    Each engine sees the other only as a :class:`RelayEndpoint` (no direct path exists), exactly as
    with a base server relaying opaque sealed datagrams.  A worker thread delivers, so no engine calls
    into another engine on its own thread.
    """

    def __init__(self, base_key: str, every: int, seed: int) -> None:
        self.base_key = base_key
        self.every = every
        self.rng = random.Random(seed)
        self.nodes: dict[bytes, object] = {}
        self.q: queue.Queue = queue.Queue()
        self.forwarded = 0
        self.tampered = 0
        self.tamper = True
        self._n = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def attach(self, node) -> None:
        self.nodes[node.address] = node
        node.engine.set_relay_sender(lambda d, ep, src=node.address: self.q.put((src, ep.peer_address, d)))

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            src, dst, d = item
            node = self.nodes.get(dst)
            if node is None:
                continue
            if self.tamper and d[:1] == bytes([MSG_DATA]) and len(d) > 32:
                self._n += 1
                if self._n % self.every == 0:
                    bit = self.rng.randrange(16 * 8, len(d) * 8)
                    d = flip(d, bit)
                    self.tampered += 1
            self.forwarded += 1
            node.engine.deliver_datagram(d, RelayEndpoint(self.base_key, src))

    def close(self) -> None:
        self.q.put(None)
        self._thread.join(timeout=5)


def test_relayed_session_survives_a_tampering_relay(tmp_path):
    base = "198.18.0.100:443"
    with Lab(tmp_path) as lb:
        ia, ib = identity(0), identity(1)
        a = lb.node(ia, EP_A, whitelist=[ib])
        b = lb.node(ib, EP_B, whitelist=[ia])
        lb.start()
        relay = TamperingRelay(base, every=3, seed=9)
        try:
            relay.attach(a)
            relay.attach(b)
            relay.tamper = False
            # What the base client would do: the peer is reachable through the relay (key verified by the base).
            a.engine.add_candidates(ib.address, [RelayEndpoint(base, ib.address)], public_key=ib.public_key)
            b.engine.add_candidates(ia.address, [RelayEndpoint(base, ia.address)], public_key=ia.public_key)
            connect(a, b)
            assert wait_for(lambda: any(p.path == "relay" for p in a.engine.peers() if p.address == ib.address))
            kp_b = b.current(a)
            completed = a.counter("handshakes_completed") + b.counter("handshakes_completed")
            relay.tamper = True
            before = b.counter("bad_mac")
            for i in range(60):
                a.send(b, b"rl-%02d" % i)
            assert wait_for(lambda: relay.q.empty() and len(b.payloads(b"rl-")) + b.counter("bad_mac") - before >= 60)
            got = b.payloads(b"rl-")
            assert b.counter("bad_mac") - before >= 15  # every third data datagram was flipped
            assert set(got) <= {b"rl-%02d" % i for i in range(60)} and len(got) == len(set(got))
            assert b.current(a) is kp_b
            assert a.counter("handshakes_completed") + b.counter("handshakes_completed") == completed
            relay.tamper = False
            b.send(a, b"back")
            assert wait_for(lambda: a.payloads(b"back"))
        finally:
            relay.close()
