"""TESTPLAN row 11 (IM variant): whitelist changes mid-session, and the disabled / enabled-empty states.

Expected (DESIGN.md 4.7): removing a peer tears its session down within one
second and traffic stops in both directions (the removed peer's renegotiation
attempts get silence); re-adding it lets it back in; *disabled* lets any
valid identity in; *enabled and empty* denies everyone, in and out.
"""

from __future__ import annotations

import time

from test_im_common import EP_A, EP_B, EP_C, Lab, connect, identity, pair, spec, wait_for

from husarnet_ros.core.peer import PendingHandshake
from husarnet_ros.core.session import Keypair


def owned_entries(node, other) -> list:
    """Index-table entries (keypairs, pending handshakes) that belong to ``other``."""
    out = []
    for v in list(node.engine._index._table.values()):
        owner = v.owner if isinstance(v, Keypair) else v.peer if isinstance(v, PendingHandshake) else None
        if getattr(owner, "address", None) == other.address:
            out.append(v)
    return out


def stream(a, b, seconds: float, tag: bytes, at: dict[float, callable] | None = None) -> None:
    """Send both ways every 10 ms for ``seconds``; run each ``at[t]`` action once ``t`` s have passed."""
    pending = dict(sorted((at or {}).items()))
    t0 = time.monotonic()
    i = 0
    while (now := time.monotonic()) - t0 < seconds:
        for t in [t for t in pending if now - t0 >= t]:
            pending.pop(t)()
        a.send(b, tag + b"a%05d" % i)
        b.send(a, tag + b"b%05d" % i)
        i += 1
        time.sleep(0.01)


def test_removal_tears_down_within_a_second_and_traffic_stops_both_ways(tmp_path):
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = pair(lb)
        connect(a, b)
        marks: dict[str, float] = {}

        def remove() -> None:
            marks["t0"] = time.monotonic()
            assert b.engine.whitelist.remove(a.address)

        def settle() -> None:
            time.sleep(max(0.0, marks["t0"] + 1.0 - time.monotonic()))  # the removal itself may fsync slowly
            marks["t1"] = time.monotonic()
            marks["b_sent"] = len(b.transport.sent_log)

        stream(a, b, 2.0, b"w", {0.3: remove, 1.3: settle})
        assert marks["t1"] - marks["t0"] >= 1.0
        # Traffic flowed before the removal, both ways.
        assert b.payloads(b"wa") and a.payloads(b"wb")
        # Within 1 s: no session, no keypair or pending handshake left for A, A not listed as secure.
        assert b.peer(a) is None or b.peer(a).current is None
        assert owned_entries(b, a) == []
        assert not b.secure_with(a)
        # From 1 s after the removal on, nothing is delivered either way and B sends A nothing at all,
        # not even answers to A's renegotiation attempts.
        t_after = marks["t0"] + 1.0
        assert b.delivered_after(t_after, b"wa") == []
        assert a.delivered_after(t_after, b"wb") == []
        assert [d for ep, d in b.transport.sent_log[marks["b_sent"] :] if ep == EP_A] == []
        assert b.counter("not_whitelisted") > 0  # B's own packets to A are refused at the source
        assert wait_for(lambda: a.counter("handshakes_sent") > 0 or a.counter("unknown_peer") > 0, 3)


def test_readding_lets_the_peer_back_in(tmp_path):
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        assert b.engine.whitelist.remove(a.address)
        assert wait_for(lambda: not b.secure_with(a), 1.0)
        assert b.engine.whitelist.add(a.address)
        deadline = time.monotonic() + 5
        while not b.payloads(b"again"):
            assert time.monotonic() < deadline, (a.engine.counters.snapshot(), b.engine.counters.snapshot())
            a.send(b, b"again")
            wait_for(lambda: b.payloads(b"again"), 0.2)
        b.send(a, b"again-b")
        assert wait_for(lambda: a.payloads(b"again-b"))


def test_initiator_side_removal_stops_both_directions(tmp_path):
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = pair(lb)
        connect(a, b)
        marks: dict[str, float] = {}

        def remove() -> None:
            marks["t0"] = time.monotonic()
            assert a.engine.whitelist.remove(b.address)

        def settle() -> None:
            time.sleep(max(0.0, marks["t0"] + 1.0 - time.monotonic()))
            marks["a_sent"] = len(a.transport.sent_log)

        stream(a, b, 2.0, b"i", {0.3: remove, 1.3: settle})
        t_after = marks["t0"] + 1.0
        assert b.delivered_after(t_after, b"ia") == [] and a.delivered_after(t_after, b"ib") == []
        assert owned_entries(a, b) == []
        # A is static-configured with B, but while B is not allowed A sends it nothing (no handshakes either).
        assert [d for ep, d in a.transport.sent_log[marks["a_sent"] :] if ep == EP_B] == []


def test_disabled_whitelist_lets_any_valid_identity_in(tmp_path):
    with Lab(tmp_path) as lb:
        ib = identity(1)
        b = lb.node(ib, EP_B, whitelist=[], whitelist_enabled=False)
        # Neither A nor C is listed anywhere on B.
        a = lb.node(identity(0), EP_A, peers=[spec(ib, EP_B)], whitelist=[ib])
        c = lb.node(identity(2), EP_C, peers=[spec(ib, EP_B)], whitelist=[ib])
        lb.start()
        assert not b.engine.whitelist.enabled
        connect(a, b)
        connect(c, b)
        assert b.secure_with(a) and b.secure_with(c)
        assert b.counter("not_whitelisted") == 0
        # Enabling it again with an empty list: deny all, both sessions torn down within a second.
        t0 = time.monotonic()
        assert b.engine.whitelist.set_enabled(True)
        assert wait_for(lambda: not b.secure_with(a) and not b.secure_with(c), 1.0)
        assert time.monotonic() - t0 < 1.0
        assert owned_entries(b, a) == [] and owned_entries(b, c) == []
        n = len(b.got)
        a.send(b, b"denied")
        c.send(b, b"denied")
        time.sleep(0.2)
        assert len(b.got) == n


def test_enabled_and_empty_denies_everyone_in_and_out(tmp_path):
    with Lab(tmp_path, log_sent=True) as lb:
        ib = identity(1)
        b = lb.node(ib, EP_B, whitelist=[], whitelist_enabled=True)
        a = lb.node(identity(0), EP_A, peers=[spec(ib, EP_B)], whitelist=[ib])
        c = lb.node(identity(2), EP_C, peers=[spec(ib, EP_B)], whitelist=[ib], whitelist_enabled=False)
        lb.start()
        assert b.engine.whitelist.enabled and b.engine.whitelist.entries() == {}
        # A and C even know B's key (as from the base): their initiations are refused too.
        for n in (a, c):
            n.engine.add_candidates(ib.address, [EP_B], public_key=ib.public_key, source="base")
            n.send(b, b"knock")
        assert wait_for(lambda: a.counter("handshakes_sent") >= 2 and c.counter("handshakes_sent") >= 2, 5)
        assert wait_for(lambda: b.counter("not_whitelisted") >= 4, 5)
        lb.net.quiesce()
        assert b.transport.sent_log == []  # silence: no Hello reply, no handshake response
        assert b.got == [] and b.engine.peers() == [] and len(b.engine._index) == 0
        assert not a.secure_with(b) and not c.secure_with(b)
        # Outbound from B is refused too.
        b.send(a, b"out")
        b.send(c, b"out")
        assert b.transport.sent_log == []


def test_removal_closes_the_lone_packet_fast_path_before_remove_returns(tmp_path):
    """The data path's lanes hold a whitelist verdict: the listener drops them at once, not a loop tick later."""
    with Lab(tmp_path) as lb:
        a, b = pair(lb)
        connect(a, b)
        b.send(a, b"before")
        assert wait_for(lambda: a.payloads(b"before"))
        peer = b.peer(a)
        assert peer.lane is not None  # the packet took the lone path, which made the lane
        refused = b.counter("not_whitelisted")
        assert b.engine.whitelist.remove(a.address)
        assert peer.lane is None
        b.send(a, b"after")
        assert b.counter("not_whitelisted") == refused + 1
        assert not wait_for(lambda: a.payloads(b"after"), 0.3)
