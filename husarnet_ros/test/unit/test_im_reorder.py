"""TESTPLAN row 7 (IM variant): reordering inside and beyond the 8192-packet replay window.

Inside the window every packet is accepted exactly once whatever the order;
a packet more than 8192 counters behind the newest accepted one is dropped as
``too_old`` before any decryption, and one already seen as ``replay``.  The
datagrams are sealed with the sender's real keypair and delivered through the
receiver's real receive path in a seeded order, so the counts are exact.
"""

from __future__ import annotations

import random

from test_im_common import EP_A, EP_B, Lab, connect, packet, pair, wait_for

from husarnet_ros.core.constants import REPLAY_WINDOW_SIZE
from husarnet_ros.core.memnet import Impairment


def _seal_stream(a, b, n: int, tag: bytes) -> tuple[list[bytes], int]:
    """``n`` datagrams A->B on A's current keypair; returns them and the first counter used."""
    kp = a.current(b)
    out = [kp.seal(packet(a.address, b.address, tag + b"%06d" % i)) for i in range(n)]
    first = int.from_bytes(out[0][8:16], "little")
    return out, first


def _max_displacement(got: list[bytes]) -> int:
    """How far (in packets) the most delayed packet arrived behind its send position."""
    seqs = [int(p[-6:]) for p in got]
    return max(pos - s for pos, s in enumerate(seqs)) if seqs else 0


def test_25_percent_reordered_up_to_2000_deep_all_delivered_once(tmp_path):
    n = 6000
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        stream, _ = _seal_stream(a, b, n, b"ro")
        rng = random.Random(7)
        keys = []
        for i in range(n):
            late = rng.randint(1, 2000) if rng.random() < 0.25 else 0
            keys.append((i + late, i))
        order = [i for _k, i in sorted(keys)]
        for i in order:
            lb.net.inject(stream[i], EP_A, EP_B)
        assert wait_for(lambda: len(b.payloads(b"ro")) == n, 20)
        lb.net.quiesce()
        got = b.payloads(b"ro")
        assert sorted(got) == [b"ro%06d" % i for i in range(n)]
        depth = _max_displacement(got)
        assert 1000 < depth <= 2000, depth  # really reordered, and as deep as planned
        assert b.counter("too_old") == 0 and b.counter("replay") == 0 and b.counter("bad_mac") == 0


def test_impairer_reorder_through_the_real_send_path(tmp_path):
    """The same property with the seeded impairer on A's real datapath (25 % held back)."""
    n = 2500
    with Lab(tmp_path, seed=77) as lb:
        a, b = pair(lb)
        connect(a, b)
        lb.net.set_impairment(Impairment(reorder=0.25, reorder_delay=0.05), src=EP_A, dst=EP_B)
        for i in range(n):
            a.send(b, b"rr%06d" % i)
        assert wait_for(lambda: len(b.payloads(b"rr")) == n, 20)
        got = b.payloads(b"rr")
        assert sorted(got) == [b"rr%06d" % i for i in range(n)]
        assert got != sorted(got)
        assert _max_displacement(got) < REPLAY_WINDOW_SIZE
        assert b.counter("too_old") == 0 and b.counter("replay") == 0


def test_beyond_the_window_is_too_old_exactly_at_the_edge(tmp_path):
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        stream, c0 = _seal_stream(a, b, 9001, b"ow")
        for d in stream[1000:]:
            lb.net.inject(d, EP_A, EP_B)
        assert wait_for(lambda: len(b.payloads(b"ow")) == 8001, 20)
        lb.net.quiesce()
        kp_b = b.current(a)
        last = kp_b._replay.last  # newest accepted counter (A's own keepalives may be newer still)
        assert last >= c0 + 9000
        too_old_before = b.counter("too_old")
        for d in stream[:1000]:
            lb.net.inject(d, EP_A, EP_B)
        expected_old = [i for i in range(1000) if last - (c0 + i) > REPLAY_WINDOW_SIZE]
        expected_ok = [i for i in range(1000) if last - (c0 + i) <= REPLAY_WINDOW_SIZE]
        assert expected_old and expected_ok  # the edge falls inside the late batch
        assert wait_for(lambda: b.counter("too_old") - too_old_before == len(expected_old), 10)
        assert wait_for(lambda: len(b.payloads(b"ow")) == 8001 + len(expected_ok))
        lb.net.quiesce()
        late = {p for p in b.payloads(b"ow") if int(p[2:]) < 1000}
        assert late == {b"ow%06d" % i for i in expected_ok}
        # The first accepted late one sits exactly on the window edge.
        assert last - (c0 + min(expected_ok)) == REPLAY_WINDOW_SIZE
        # Re-sending anything already accepted is a replay, not a second delivery.
        replay_before = b.counter("replay")
        for d in stream[5000:5100]:
            lb.net.inject(d, EP_A, EP_B)
        assert wait_for(lambda: b.counter("replay") - replay_before == 100)
        assert len(b.payloads(b"ow")) == 8001 + len(expected_ok)
        assert b.counter("bad_mac") == 0
        # The session is fine afterwards.
        a.send(b, b"ow-after")
        assert wait_for(lambda: b.payloads(b"ow-after"))
