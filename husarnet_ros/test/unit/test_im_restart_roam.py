"""TESTPLAN row 21 (IM variant): peer restart with lost session state, and roaming to a new endpoint.

Expected: when one side restarts (its keys are gone, same identity), the pair
renegotiates within a few keepalive/rekey-timeout periods - never by waiting
for the stale keys to age out (rekey-after 120 s and reject-after 180 s stay at
WireGuard's values here, so a test that only passes through them would time
out).  A peer's endpoint moves only on an authenticated packet from the new
address: garbage, replays and replayed handshakes from there move nothing.
"""

from __future__ import annotations

import time

from test_im_common import (
    EP_A,
    EP_B,
    FAST,
    MSG_DATA,
    MSG_HANDSHAKE_INIT,
    Lab,
    connect,
    identity,
    msg_type,
    pair,
    spec,
    wait_for,
)

#: The pair must be working again well before any 120 s / 180 s timer could have helped.
RECOVERY = 4.0
PUB1 = ("198.18.1.1", 5582)
PUB2 = ("198.18.2.1", 6000)


def until_delivered(src, dst, tag: bytes, timeout: float = RECOVERY) -> float:
    """Keep sending ``tag`` src->dst every 50 ms; return how long it took to arrive (asserts it does)."""
    t0 = time.monotonic()
    while not dst.payloads(tag):
        assert time.monotonic() - t0 < timeout, (
            f"{tag!r} not delivered within {timeout} s: src {src.engine.counters.snapshot()} "
            f"dst {dst.engine.counters.snapshot()}"
        )
        src.send(dst, tag)
        wait_for(lambda: dst.payloads(tag), 0.05)
    return time.monotonic() - t0


def settle_idle(sender, receiver) -> None:
    """``sender`` speaks last and ``receiver`` acknowledges with a keepalive: both sides idle and content."""
    sender.send(receiver, b"last-word")
    assert wait_for(lambda: receiver.payloads(b"last-word"))
    p = receiver.peer(sender)
    assert wait_for(lambda: p.last_tx > p.last_rx_data > p.last_tx_data, 3)


def test_timers_are_the_slow_defaults():
    assert FAST.rekey_after_time >= 120 and FAST.reject_after_time >= 180


def test_responder_restart_sender_renegotiates_promptly(tmp_path):
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        b2 = lb.restart(b, state_dir=tmp_path / "b2")
        took = until_delivered(a, b2, b"to-new-b")
        assert took < RECOVERY
        assert b2.secure_with(a) and a.secure_with(b2)
        until_delivered(b2, a, b"from-new-b")


def test_initiator_restart_while_the_other_side_is_idle(tmp_path):
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        settle_idle(a, b)
        kp_b = b.current(a)
        a2 = lb.restart(a, state_dir=tmp_path / "a2")
        until_delivered(a2, b, b"from-new-a")
        assert b.current(a) is not kp_b
        until_delivered(b, a2, b"to-new-a")


def test_restarted_side_talks_first_to_an_idle_peer(tmp_path):
    """Both are configured with each other; B restarts and B (not A) has something to send."""
    with Lab(tmp_path) as lb:
        ia, ib = identity(0), identity(1)
        a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib])
        b = lb.node(ib, EP_B, peers=[spec(ia, EP_A)], whitelist=[ia])
        lb.start()
        connect(a, b)
        settle_idle(b, a)
        b2 = lb.restart(b, state_dir=tmp_path / "b2")
        until_delivered(b2, a, b"hello-from-new-b")
        until_delivered(a, b2, b"and-back")


def test_idle_stale_side_starts_talking_to_a_restarted_peer(tmp_path):
    """B restarted silently; much later A (still holding the dead keys) sends: it must renegotiate, not hang."""
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        settle_idle(a, b)
        b2 = lb.restart(b, state_dir=tmp_path / "b2")
        time.sleep(0.3)  # nobody talks for a while; A's keys are stale but A cannot know
        assert a.current(b2) is not None
        until_delivered(a, b2, b"late")
        until_delivered(b2, a, b"late-back")


def test_roaming_moves_the_endpoint_only_after_an_authenticated_packet(tmp_path):
    with Lab(tmp_path, capture=True, log_sent=True) as lb:
        lb.net.set_nat(EP_A, PUB1)
        a, b = pair(lb)
        connect(a, b)
        peer = b.peer(a)
        assert peer.paths.endpoint == PUB1
        kp_b = b.current(a)
        completed = a.counter("handshakes_completed") + b.counter("handshakes_completed")
        lb.net.quiesce()
        # From the address A is about to move to, an attacker plays: every captured data datagram
        # and initiation of A's, plus garbage carrying B's receiver index for A.
        old = [c.data for c in lb.net.captured if c.dst == EP_B and msg_type(c.data) in (MSG_DATA, MSG_HANDSHAKE_INIT)]
        assert old
        for d in old:
            lb.net.inject(d, PUB2, EP_B)
        garbage = MSG_DATA.to_bytes(4, "little") + kp_b.local_index.to_bytes(4, "little")
        garbage += (10**6).to_bytes(8, "little") + bytes(48)
        lb.net.inject(garbage, PUB2, EP_B)
        assert wait_for(lambda: b.counter("replay") >= len(old) and b.counter("bad_mac") >= 1)
        lb.net.quiesce()
        time.sleep(0.05)
        assert peer.paths.endpoint == PUB1
        assert PUB2 not in peer.paths.paths or not peer.paths.paths[PUB2].validated
        assert b.sent_to(PUB2) == []
        # Now A really moves (new address and port; the old mapping is dead) and speaks: B follows at once.
        lb.net.set_nat(EP_A, PUB2)
        until_delivered(a, b, b"from-new-address")
        assert wait_for(lambda: peer.paths.endpoint == PUB2, 1.0)
        sent_before = len(b.sent_to(PUB1))
        until_delivered(b, a, b"to-new-address")
        # No user data goes to the dead address any more; B may still probe it as a candidate path
        # (an authenticated Probe is 16 + 9 + 16 = 41 bytes, a keepalive 32; an IPv6 packet is at least 72).
        assert [d for d in b.sent_to(PUB1)[sent_before:] if len(d) > 41] == []
        # Roaming needed no new handshake.
        assert b.current(a) is kp_b
        assert a.counter("handshakes_completed") + b.counter("handshakes_completed") == completed


def test_idle_peer_that_moved_is_found_again_by_its_own_probes(tmp_path):
    """A moves while idle; only B has traffic. A's periodic authenticated probes tell B the new address."""
    with Lab(tmp_path) as lb:
        lb.net.set_nat(EP_A, PUB1)
        a, b = pair(lb)
        connect(a, b)
        settle_idle(b, a)
        lb.net.set_nat(EP_A, PUB2)
        # B keeps sending to the old address until A's next probe round (probe_interval 0.5 s) arrives.
        took = until_delivered(b, a, b"find-me", timeout=RECOVERY)
        assert took < RECOVERY
        assert b.peer(a).paths.endpoint == PUB2
