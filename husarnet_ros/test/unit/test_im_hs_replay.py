"""TESTPLAN row 6 (IM variant): replayed or old handshakes, and far-future timestamps.

An initiation carries the initiator's TAI64N timestamp inside the encrypted
payload; the responder keeps the newest one per peer and answers only newer
ones.  Expected: a replayed initiation (or response) creates no session,
resets no keys, changes nothing in the existing session and gets no reply at
all - also after the initiator restarted with the same key.  A withheld
initiation from a moment when the initiator's clock was far ahead must not
disturb the live session, and a peer whose clock was once far ahead (and is
now right again) must not be locked out after it restarts.
"""

from __future__ import annotations

import dataclasses
import time

from test_im_common import (
    EP_A,
    EP_B,
    FAST,
    MALLORY,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
    Lab,
    WallClock,
    connect,
    identity,
    msg_type,
    pair,
    spec,
    wait_for,
)

from husarnet_ros.core import handshake as hs

TEN_YEARS = 10 * 365 * 86400.0


def captured(lb: Lab, mtype: int, dst) -> list[bytes]:
    return [c.data for c in list(lb.net.captured) if c.dst == dst and msg_type(c.data) == mtype]


def index_snapshot(node) -> dict:
    return dict(node.engine._index._table)


def test_replayed_initiation_and_response_change_nothing_and_get_no_reply(tmp_path):
    with Lab(tmp_path, capture=True, log_sent=True) as lb:
        a, b = pair(lb)
        connect(a, b)
        lb.net.quiesce()
        inits = captured(lb, MSG_HANDSHAKE_INIT, EP_B)
        resps = captured(lb, MSG_HANDSHAKE_RESP, EP_A)
        assert inits and resps
        kp_a, kp_b = a.current(b), b.current(a)
        peer_b = b.peer(a)
        next_b, prev_b = peer_b.next, peer_b.previous
        idx_a, idx_b = index_snapshot(a), index_snapshot(b)
        resp_sent_b = len(b.sent_of_type(MSG_HANDSHAKE_RESP))
        replay_b, received_b = b.counter("replay"), b.counter("handshakes_received")
        completed = a.counter("handshakes_completed") + b.counter("handshakes_completed")
        # Every initiation A ever sent, from A's address and from mallory's, 3 times each.
        for src in (EP_A, MALLORY):
            for _ in range(3):
                for d in inits:
                    lb.net.inject(d, src, EP_B)
        n = 6 * len(inits)
        assert wait_for(lambda: b.counter("handshakes_received") - received_b == n)
        assert wait_for(lambda: b.counter("replay") - replay_b == n)
        # Every response B ever sent, replayed to A: it can never reinstall keys.
        for d in resps:
            lb.net.inject(d, EP_B, EP_A)
            lb.net.inject(d, MALLORY, EP_A)
        lb.net.quiesce()
        time.sleep(0.1)
        assert len(b.sent_of_type(MSG_HANDSHAKE_RESP)) == resp_sent_b  # no reply to any replay
        assert b.sent_to(MALLORY) == [] and a.sent_to(MALLORY) == []
        assert a.current(b) is kp_a and b.current(a) is kp_b
        assert peer_b.next is next_b and peer_b.previous is prev_b
        assert index_snapshot(a) == idx_a and index_snapshot(b) == idx_b
        assert a.counter("handshakes_completed") + b.counter("handshakes_completed") == completed
        assert b.peer(a).paths.endpoint == EP_A and MALLORY not in b.peer(a).paths.paths
        a.send(b, b"after-replay")
        b.send(a, b"after-replay")
        assert wait_for(lambda: b.payloads(b"after-replay") and a.payloads(b"after-replay"))


def test_replay_after_initiator_restart_with_same_key(tmp_path):
    with Lab(tmp_path, capture=True, log_sent=True) as lb:
        a, b = pair(lb)
        connect(a, b)
        lb.net.quiesce()
        inits = captured(lb, MSG_HANDSHAKE_INIT, EP_B)
        assert inits
        # A restarts with the same key and endpoint but stays quiet (no static peer): only the replay speaks.
        a2 = lb.restart(a, peers=[], state_dir=tmp_path / "a2")
        kp_b = b.current(a)
        resp_sent_b = len(b.sent_of_type(MSG_HANDSHAKE_RESP))
        replay_b = b.counter("replay")
        for d in inits:
            lb.net.inject(d, EP_A, EP_B)
        assert wait_for(lambda: b.counter("replay") - replay_b == len(inits))
        lb.net.quiesce()
        time.sleep(0.1)
        assert len(b.sent_of_type(MSG_HANDSHAKE_RESP)) == resp_sent_b
        assert b.current(a) is kp_b and b.peer(a).next is None
        assert a2.engine.peers() == [] or not a2.secure_with(b)
        # The genuine restarted peer (newer timestamp) still gets in, with fresh keys.
        a2.engine.add_candidates(b.address, [EP_B], public_key=b.id.public_key, source="base")
        connect(a2, b)
        assert b.current(a) is not kp_b
        # And the old initiations are still replays afterwards.
        replay_b = b.counter("replay")
        resp_sent_b = len(b.sent_of_type(MSG_HANDSHAKE_RESP))
        kp_b2 = b.current(a)
        for d in inits:
            lb.net.inject(d, MALLORY, EP_B)
        assert wait_for(lambda: b.counter("replay") - replay_b == len(inits))
        lb.net.quiesce()
        assert len(b.sent_of_type(MSG_HANDSHAKE_RESP)) == resp_sent_b and b.current(a) is kp_b2


def test_withheld_far_future_initiation_does_not_disturb_the_session(tmp_path):
    """mallory captured (and dropped) an initiation A made while its clock was 10 years ahead, and plays it now.

    B cannot tell it from a fresh one, so it may answer (to mallory, who cannot finish it), but the
    live session must not change, traffic must not stop, and the pair must still rekey afterwards.
    """
    timers = dataclasses.replace(FAST, rekey_after_time=1.0, reject_after_time=3.0)
    with Lab(tmp_path, timers=timers, log_sent=True) as lb:
        a, b = pair(lb)
        connect(a, b)
        kp_b = b.current(a)
        future = hs.tai64n(time.time() + TEN_YEARS)
        msg, _state = hs.create_initiation(a.id, b.id.public_key, 0x1234, future, hs.local_features())
        lb.net.inject(msg, MALLORY, EP_B)
        assert wait_for(lambda: b.counter("handshakes_received") >= 2)
        lb.net.quiesce()
        assert b.current(a) is kp_b
        assert b.peer(a).paths.endpoint == EP_A
        # Whatever B answered went to mallory only, and was no bigger than what mallory sent.
        assert all(len(d) <= len(msg) for d in b.sent_to(MALLORY))
        # Continuous traffic for 4 s (past rekey-after and reject-after): nothing lost, keys renewed.
        sent = 0
        t_end = time.monotonic() + 4.0
        while time.monotonic() < t_end:
            a.send(b, b"ff%05d" % sent)
            b.send(a, b"ff%05d" % sent)
            sent += 1
            time.sleep(0.01)
        assert wait_for(lambda: len(b.payloads(b"ff")) == sent and len(a.payloads(b"ff")) == sent, 3), (
            sent,
            len(b.payloads(b"ff")),
            len(a.payloads(b"ff")),
            b.engine.counters.snapshot(),
        )
        assert b.current(a) is not kp_b and b.current(a) is not None


def test_peer_whose_clock_was_far_ahead_reconnects_after_restart(tmp_path):
    """A ran with its clock 10 years ahead (RTC wrong), then restarts with the right time.

    B holds A's far-future timestamps and a stale session; A's new Hellos and initiations carry older
    timestamps.  The pair must reconnect promptly - not after B's stale keys age out (180 s here).
    """
    wall = WallClock()
    wall.offset = TEN_YEARS
    with Lab(tmp_path) as lb:
        ia, ib = identity(0), identity(1)
        a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib], wallclock=wall)
        b = lb.node(ib, EP_B, whitelist=[ia])
        lb.start()
        connect(a, b)
        # The last word is A's, and B has acknowledged it with a keepalive: B is idle and content,
        # with nothing of its own waiting for an answer (so no timer of B's will renegotiate soon).
        a.send(b, b"last-word")
        assert wait_for(lambda: b.payloads(b"last-word"))
        pb = b.peer(a)
        assert wait_for(lambda: pb.last_tx > pb.last_rx_data > pb.last_tx_data, 3)
        wall.offset = 0.0  # NTP fixed the clock; then the node restarts and loses its session
        a2 = lb.restart(a, state_dir=tmp_path / "a2")
        t0 = time.monotonic()
        deadline = t0 + 5.0
        while not b.payloads(b"back") and time.monotonic() < deadline:
            a2.send(b, b"back")
            wait_for(lambda: b.payloads(b"back"), 0.2)
        took = time.monotonic() - t0
        assert b.payloads(b"back"), (
            f"A (restarted, clock corrected) not reconnected within 5 s: A {a2.engine.counters.snapshot()} "
            f"B {b.engine.counters.snapshot()}"
        )
        assert took < 5.0
