"""Super-packet mode (issue #6) between engines on the in-memory network.

A TSO read (virtio-net header + 64 kB TCP super-packet) injected at A must come
out at B as exactly the segments a per-segment split would produce (byte for
byte, checksums valid), sealed once and carried as path-MTU fragments
(DataSuper, type 6).  Negotiation, fallback under loss, and the attacks on
fragments (forged, duplicate, truncated, replayed, table flooding) are checked
through counters and delivered packets only.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import time
from pathlib import Path

import pytest
from test_im_common import EP_A, EP_B, Lab, Node, connect, identity, spec, wait_for
from test_offload import ref_l4_valid, tso_read

from husarnet_ros.core import datapath as datapath_mod
from husarnet_ros.core import offload as o
from husarnet_ros.core import superpacket as sp
from husarnet_ros.core.constants import DEFAULT_MTU
from husarnet_ros.core.memnet import Impairment
from husarnet_ros.core.warmer import ShadowPair
from husarnet_ros.core.wire import (
    DATA_SUPER_HEADER,
    DATA_SUPER_HEADER_LEN,
    MSG_DATA,
    MSG_DATA_SUPER,
    Malformed,
    SuperReport,
    parse_super_report,
)


def super_read(a: Node, b: Node, payload: bytes, seq: int = 1000) -> bytes:
    """A TSO read from A to B as the kernel hands it to the TUN reader."""
    r = bytearray(tso_read(payload, DEFAULT_MTU - 60 - 12, seq=seq))
    r[10 + 8 : 10 + 24] = a.address
    r[10 + 24 : 10 + 40] = b.address
    # Recompute the partial (pseudo-header) sum for the real addresses.
    pkt = r[10:]
    length = len(pkt) - 40
    pseudo = bytes(pkt[8:40]) + struct.pack(">IxxxB", length, 6)
    s = 0
    for i in range(0, len(pseudo), 2):
        s += pseudo[i] << 8 | pseudo[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    r[10 + 40 + 16 : 10 + 40 + 18] = struct.pack(">H", s)
    return bytes(r)


@pytest.fixture(autouse=True)
def small_loss_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A path counts as measured clean after 20 messages instead of 2000 (keeps the tests short)."""
    monkeypatch.setattr(sp, "LOSS_WINDOW", 20)


def make_pair(lb: Lab, super_a: bool = True, super_b: bool = True) -> tuple[Node, Node]:
    ia, ib = identity(0), identity(1)
    a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib])
    b = lb.node(ib, EP_B, whitelist=[ia])
    a.engine.config.super_packets = super_a
    b.engine.config.super_packets = super_b
    lb.start()
    connect(a, b)
    return a, b


def agreed(a: Node, b: Node) -> bool:
    """A sends DataSuper to B now: agreed on A's current session and measured clean."""
    p = a.peer(b)
    if p is None or not p.superpkt.is_agreed(p.current):
        return False
    if not p.superpkt.usable(p.current, a.engine._clock()):
        for _ in range(5):  # per-segment traffic for B to measure and report on
            a.send(b, b"warm")
        return False
    return True


def tcp_payloads(node: Node) -> bytes:
    with node._got_lock:
        got = list(node.got)
    return b"".join(p[40 + 32 :] for p in got if p[6] == 6 and len(p) > 72)


def test_superpacket_transfer_is_one_message_and_segments_match(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b) and agreed(b, a)), "super-packet mode was not agreed"
        payload = bytes(range(256)) * 250  # 64000 bytes
        read = super_read(a, b, payload)
        expected = o.split_for_send(read, True, DEFAULT_MTU)
        before = len(a.sent_of_type(MSG_DATA_SUPER))
        a.engine.inject_reads([read])
        assert wait_for(lambda: tcp_payloads(b) == payload), b.engine.counters.snapshot()
        frags = a.sent_of_type(MSG_DATA_SUPER)[before:]
        assert 40 <= len(frags) <= 64
        counters = {DATA_SUPER_HEADER.unpack_from(f)[2] for f in frags}
        assert len(counters) == 1  # one sealed message
        assert max(len(f) for f in frags) <= DEFAULT_MTU + 32  # never larger than a full Data datagram
        with b._got_lock:
            segs = [p for p in b.got if p[6] == 6 and len(p) > 72]
        assert segs == expected
        assert all(ref_l4_valid(s) for s in segs)
        assert b.counter("super_rx") == 1 and a.counter("super_tx") == 1


def test_tiny_last_fragment_is_kept(tmp_path: Path) -> None:
    """A last fragment shorter than a Data header + tag (here 5 bytes of ciphertext) still completes the message."""
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b))
        frag = DEFAULT_MTU + 32 - DATA_SUPER_HEADER_LEN
        payload = b"t" * (30 * frag + 5 - (10 + 40 + 32 + 16))
        before = len(a.sent_of_type(MSG_DATA_SUPER))
        a.engine.inject_reads([super_read(a, b, payload)])
        assert wait_for(lambda: tcp_payloads(b) == payload), b.engine.counters.snapshot()
        frags = a.sent_of_type(MSG_DATA_SUPER)[before:]
        assert len(frags[-1]) == DATA_SUPER_HEADER_LEN + 5
        assert b.counter("reassembly_timeout") == 0


def test_mixed_offload_and_plain_peer_use_per_segment(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb, super_a=True, super_b=False)
        time.sleep(0.3)
        assert a.peer(b).superpkt.agreed == [] and b.peer(a).superpkt.agreed == []
        payload = b"x" * 30000
        a.engine.inject_reads([super_read(a, b, payload)])
        assert wait_for(lambda: tcp_payloads(b) == payload)
        assert a.sent_of_type(MSG_DATA_SUPER) == []
        assert len(a.sent_of_type(MSG_DATA)) >= 22
        assert b.counter("malformed") == 0


def test_plain_initiator_and_offload_responder(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb, super_a=False, super_b=True)
        time.sleep(0.3)
        payload = b"y" * 20000
        b.engine.inject_reads([super_read(b, a, payload)])
        assert wait_for(lambda: tcp_payloads(a) == payload)
        assert b.sent_of_type(MSG_DATA_SUPER) == []
        assert a.counter("malformed") == 0


def test_lossy_path_falls_back_to_per_segment(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b))
        lb.net.set_impairment(Impairment(drop=0.05), src=EP_A, dst=EP_B)
        st = a.peer(b).superpkt
        deadline = time.monotonic() + 10
        seq = 0
        while a.counter("super_fallback") == 0 and time.monotonic() < deadline:
            a.engine.inject_reads([super_read(a, b, b"z" * 60000, seq=seq)])
            seq += 60000
            time.sleep(0.02)
        assert a.counter("super_fallback") >= 1, (a.engine.counters.snapshot(), b.engine.counters.snapshot())
        assert not st.usable(a.peer(b).current, a.engine._clock())
        sent = len(a.sent_of_type(MSG_DATA_SUPER))
        a.engine.inject_reads([super_read(a, b, b"w" * 60000, seq=seq)])
        time.sleep(0.1)
        assert len(a.sent_of_type(MSG_DATA_SUPER)) == sent  # per segment while the hold lasts
        # The receiver counts the super messages it gave up on.  The fallback may come first (a gap shows
        # as soon as any later message arrives): they expire REASSEMBLY_TIMEOUT after their first fragment,
        # at its next look (the per-segment read above gives it one).
        assert wait_for(lambda: b.counter("reassembly_timeout") >= 1, 2)


def test_super_state_needs_a_clean_window_and_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sp, "LOSS_WINDOW", 2000)
    kp = object()
    st = sp.SuperState()
    assert not st.usable(kp, 0.0)  # never without agreement
    st.agree(kp)
    assert not st.usable(kp, 0.0)  # nor before the path was measured clean
    assert not st.on_report(0, 0, 1000, 1000, 1.0)
    assert not st.usable(kp, 1.0)  # 1000 messages are not a window yet
    assert not st.on_report(0, 0, 1000, 1002, 1.2)  # two losses in 2002 messages: below 0.1 %
    assert st.usable(kp, 1.2) and st.clean_since == 1.2
    # 4 of 100 super messages never completed: fall back for MIN_HOLD, then only after a clean window.
    assert st.on_report(4600, 4, 96, 100, 2.0)
    assert st.hold == sp.MIN_HOLD and not st.usable(kp, 2.5)
    assert not st.usable(kp, 3.5)  # the hold is over but the path is not measured clean
    assert not st.on_report(0, 0, 1000, 1020, 3.6)  # still lossy (per segment): stays off, no new fallback
    assert st.fallbacks == 1 and not st.usable(kp, 10.0)
    assert not st.on_report(0, 0, 3000, 3000, 10.0)  # clean window: back on
    assert st.usable(kp, 10.0)
    assert st.on_report(0, 0, 90, 100, 10.5)  # lossy right after the retry: longer hold
    assert st.hold == 2 * sp.MIN_HOLD and st.fallbacks == 2
    assert not st.on_report(0, 0, 3000, 3000, 13.0)
    assert not st.on_report(0, 0, 3000, 3000, 24.0)  # clean long enough: back-off forgotten
    assert st.hold == 0.0
    assert not st.on_report(0, 0, 2998, 3000, 24.5)  # an isolated burst (2 messages) is tolerated
    assert st.on_report(0, 0, 97, 100, 25.0) and st.hold == sp.MIN_HOLD
    st2 = sp.SuperState()
    for k in range(5):
        st2.agree(k)
    assert st2.agreed == [2, 3, 4]  # at most three sessions remembered


def test_receiver_message_counts_give_the_span() -> None:
    st = sp.SuperState()
    kp, kp2 = object(), object()
    st.count_messages(kp, 10, 20, 9)
    st.count_messages(kp, 21, 30, 10)
    assert st.gaps() == 2
    assert st.take_report() == (0, 0, 19, 21)
    assert st.take_report() == (0, 0, 0, 0)
    st.count_messages(kp, 33, 33, 1)  # 31 and 32 are missing at the report boundary
    assert st.gaps() == 2
    assert st.take_report() == (0, 0, 1, 3)
    st.count_messages(kp, 31, 32, 2)  # ... and arrive late: they make up for the gaps reported
    assert st.take_report() == (0, 0, 2, 0)
    win = sp.SuperState()
    win.on_report(0, 0, 1, 3, 0.0)
    win.on_report(0, 0, 2, 0, 0.1)
    assert win.win_missing == 2 and win.win_total == 3  # the sender's judgement stays conservative
    st.count_messages(kp2, 0, 4, 5)  # a new session restarts the counts
    st.rx_received, st.rx_missing = 40, 3
    assert st.take_report() == (40, 3, 5, 5)


def fragments_of(a: Node, b: Node, payload: bytes, seq: int = 0) -> list[bytes]:
    before = len(a.sent_of_type(MSG_DATA_SUPER))
    a.engine.inject_reads([super_read(a, b, payload, seq=seq)])
    assert wait_for(lambda: len(a.sent_of_type(MSG_DATA_SUPER)) > before)
    time.sleep(0.05)
    return a.sent_of_type(MSG_DATA_SUPER)[before:]


def test_forged_duplicate_truncated_fragments_are_dropped_and_counted(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b))
        # Block A->B so we control what B sees.
        lb.net.set_impairment(Impairment(drop=1.0), src=EP_A, dst=EP_B)
        frags = fragments_of(a, b, b"q" * 50000)
        lb.net.set_impairment(Impairment(), src=EP_A, dst=EP_B)
        got0 = len(b.got)
        # A header without ciphertext, reserved bits set, index >= count: malformed fragments.
        lb.net.inject(frags[0][:DATA_SUPER_HEADER_LEN], EP_A, EP_B)
        bad = bytearray(frags[0])
        bad[18] = 1
        lb.net.inject(bytes(bad), EP_A, EP_B)
        bad = bytearray(frags[0])
        bad[16] = bad[17]
        lb.net.inject(bytes(bad), EP_A, EP_B)
        assert wait_for(lambda: b.counter("fragment_malformed") == 3)
        # A forged fragment (flipped byte) plus the genuine rest: reassembles, fails the tag, nothing delivered.
        forged = bytearray(frags[1])
        forged[-1] ^= 1
        lb.net.inject(bytes(forged), EP_A, EP_B)
        lb.net.inject(frags[1], EP_A, EP_B)  # duplicate index: refused
        for f in frags[:1] + frags[2:]:
            lb.net.inject(f, EP_A, EP_B)
        assert wait_for(lambda: b.counter("bad_mac") == 1), b.engine.counters.snapshot()
        assert b.counter("fragment_duplicate") == 1
        assert len(b.got) == got0


def test_replayed_super_message_is_not_delivered_twice(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b))
        payload = b"p" * 40000
        frags = fragments_of(a, b, payload)
        assert wait_for(lambda: tcp_payloads(b) == payload)
        n = len(b.got)
        for f in frags:
            lb.net.inject(f, EP_A, EP_B)
        assert wait_for(lambda: b.counter("replay") >= len(frags))
        assert len(b.got) == n


def test_reassembly_table_is_bounded() -> None:
    r = sp.Reassembly(max_entries=4, timeout=0.25)
    owner = object()
    for counter in range(100):
        assert r.add(7, owner, counter, 0, 64, b"x" * 2048, 0.0) is None
        assert len(r) <= 4
    lost = r.expire(0.0)
    assert len(lost) == 96 and all(m == 63 for _, _, m in lost)
    assert len(r.expire(1.0)) == 4 and len(r) == 0
    with pytest.raises(ValueError, match="fragment_malformed"):
        r.add(7, owner, 1, 0, 2, b"x" * 2049, 0.0)
    with pytest.raises(ValueError, match="fragment_malformed"):
        r.add(7, owner, 1, 2, 2, b"x", 0.0)
    assert r.add(7, owner, 1, 0, 3, b"a" * 10, 0.0) is None
    with pytest.raises(ValueError, match="fragment_mismatch"):
        r.add(7, owner, 1, 1, 3, b"b" * 9, 0.0)  # middle fragment of another size
    with pytest.raises(ValueError, match="fragment_mismatch"):
        r.add(7, owner, 1, 2, 4, b"b", 0.0)  # another count
    with pytest.raises(ValueError, match="fragment_mismatch"):
        r.add(7, owner, 1, 2, 3, b"b" * 11, 0.0)  # last longer than the others
    with pytest.raises(ValueError, match="fragment_duplicate"):
        r.add(7, owner, 1, 0, 3, b"a" * 10, 0.0)
    assert r.add(7, owner, 1, 2, 3, b"c" * 4, 0.0) is None
    assert r.add(7, owner, 1, 1, 3, b"b" * 10, 0.0) == b"a" * 10 + b"b" * 10 + b"c" * 4
    assert r.add(7, owner, 2, 0, 1, b"solo", 0.0) == b"solo"


def test_whole_run_in_one_batch_is_joined_at_once(tmp_path: Path) -> None:
    """The receive thread's fast path: a complete in-order run in one GRO batch (same checks, one join)."""
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b))
        lb.net.set_impairment(Impairment(drop=1.0), src=EP_A, dst=EP_B)
        p1, p2 = b"g" * 50000, b"h" * 30000
        frags1 = fragments_of(a, b, p1)
        frags2 = fragments_of(a, b, p2, seq=50000)
        lb.net.set_impairment(Impairment(), src=EP_A, dst=EP_B)
        dp = b.engine._datapath
        got0 = len(b.got)
        # A forged run (one flipped bit) costs one AEAD open and delivers nothing.
        forged = list(frags1)
        forged[3] = forged[3][:-1] + bytes([forged[3][-1] ^ 1])
        dp.receive_many([(f, EP_A) for f in forged])
        assert b.counter("bad_mac") == 1 and len(b.got) == got0
        # The genuine run in one batch: delivered once; the same batch again is a replay, per fragment.
        dp.receive_many([(f, EP_A) for f in frags1])
        assert wait_for(lambda: tcp_payloads(b) == p1), b.engine.counters.snapshot()
        replays = b.counter("replay")
        dp.receive_many([(f, EP_A) for f in frags1])
        assert b.counter("replay") == replays + len(frags1)
        # Fragments from two sources are not a run: they go through the reassembly table (the AEAD, not
        # the outer source, vouches for them) and complete there.
        other = ("198.18.0.9", 5582)
        dp.receive_many([(f, EP_A if k % 2 else other) for k, f in enumerate(frags2)])
        assert wait_for(lambda: tcp_payloads(b) == p1 + p2)
        assert b.counter("bad_mac") == 1 and b.counter("super_rx") == 2


def reports_sent_by(node: Node) -> list[tuple[float, SuperReport]]:
    """The super-packet reports ``node`` sends from now on, with the time each left, filled in as they go.

    Only this node's: the peer reports too, on its own schedule, and a list of both sides' reports
    would make any count or order in it a race.
    """
    dp = node.engine._datapath
    sent: list[tuple[float, SuperReport]] = []
    send = dp.send_plaintext

    def recording(peer, plaintext: bytes, endpoint=None) -> bool:  # type: ignore[no-untyped-def]
        ok = send(peer, plaintext, endpoint)
        with contextlib.suppress(Malformed):
            report = parse_super_report(plaintext)
            if ok:
                sent.append((time.monotonic(), report))
        return ok

    dp.send_plaintext = recording
    return sent


def test_light_traffic_is_reported_in_bulk_and_loss_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report that would only say "a few messages arrived" waits for REPORT_MESSAGES or SPARSE_REPORT_INTERVAL.

    Before, every light-traffic message more than REPORT_INTERVAL after the last report made one report
    datagram: a heartbeat cost two datagrams each way.  Loss is still reported within REPORT_MIN_INTERVAL.
    The path probes count as messages too, so once the interval passed the report may come with a probe
    that arrives before the test's own next message: the test reads B's reports whichever brought them.
    """
    monkeypatch.setattr(datapath_mod, "SPARSE_REPORT_INTERVAL", 2.5)
    with Lab(tmp_path) as lb:
        a, b = make_pair(lb)
        reports = reports_sent_by(b)
        assert wait_for(lambda: agreed(a, b))
        time.sleep(2.6)  # SPARSE_REPORT_INTERVAL: the next message reports what is left of the warm-up
        flushed = time.monotonic()
        a.send(b, b"flush")
        assert wait_for(lambda: reports and reports[-1][0] > flushed)
        last_report = reports[-1][0]  # the interval runs from here (a busy machine makes it a while after the send)
        time.sleep(0.25)
        reports.clear()
        for i in range(4):  # light traffic: one message every 0.25 s, each 0.2 s after the last report
            a.send(b, b"beat%d" % i)
            assert wait_for(lambda i=i: b.payloads(b"beat%d" % i))
            time.sleep(0.25)
        assert time.monotonic() - last_report < 2.4, "the machine was too slow to test within the interval"
        assert reports == [], "no report for a few clean messages"
        time.sleep(max(0.0, last_report + 2.6 - time.monotonic()))
        a.send(b, b"late")  # SPARSE_REPORT_INTERVAL since the last report: the few are reported by now
        assert wait_for(lambda: b.payloads(b"late") and reports), reports
        sparse_at, first = reports[0]
        assert sparse_at - last_report >= 2.5  # held back for the interval, not sent with a beat
        assert first.messages == first.span >= 5  # the beats and at least "late" or a probe, none missing
        time.sleep(0.25)
        n = len(reports)
        for _ in range(datapath_mod.REPORT_MESSAGES):  # steadier traffic: reported once REPORT_MESSAGES arrived
            a.send(b, b"steady")
            time.sleep(0.005)  # one by one, in order (a burst may be reordered, and a gap is reported at once)
        assert wait_for(lambda: sum(r.messages for _, r in reports[n:]) >= datapath_mod.REPORT_MESSAGES, 1), reports
        assert reports[-1][0] - sparse_at < 2.4  # not held back for SPARSE_REPORT_INTERVAL
        # Loss: a message that never arrives leaves a gap, reported within REPORT_MIN_INTERVAL of the next.
        time.sleep(0.25)
        n = len(reports)
        lb.net.set_impairment(Impairment(drop=1.0), src=EP_A, dst=EP_B)
        a.send(b, b"lost")
        time.sleep(0.05)
        lb.net.set_impairment(None, src=EP_A, dst=EP_B)
        a.send(b, b"after-loss")
        assert wait_for(lambda: len(reports) > n, 1)
        last = reports[-1][1]
        assert last.span - last.messages == 1


def test_lone_receives_look_for_a_due_report_only_when_one_may_be_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clean in-order light traffic is looked at every REPORT_INTERVAL; a gap or another session at once.

    The full look (``Datapath._super_housekeeping``) ran after every lone receive once REPORT_MIN_INTERVAL
    had passed since the last report, and on a cold CPU it cost the receive about 17 us after its packet.
    """
    now = [1000.0]
    pair = ShadowPair(vnet_hdr=False, mtu=DEFAULT_MTU, super_packets=True, clock=lambda: now[0], wallclock=time.time)
    looks: list[float] = []
    full_look = datapath_mod.Datapath._super_housekeeping

    def counting(self: datapath_mod.Datapath, *args: object) -> None:
        if self is pair.b:
            looks.append(now[0])
        full_look(self, *args)

    monkeypatch.setattr(datapath_mod.Datapath, "_super_housekeeping", counting)
    assert pair.round()  # the first message on the session: looked at
    assert len(looks) == 1
    for _ in range(100):  # one second of 100 Hz traffic, in order
        now[0] += 0.01
        assert pair.round()
    assert 4 <= len(looks) <= 7, looks  # every REPORT_INTERVAL (0.2 s), not every packet
    assert all(b - a >= sp.REPORT_INTERVAL - 1e-9 for a, b in itertools.pairwise(looks))

    # Another session: its first message is looked at at once.
    pair.rekey()
    now[0] += 0.01
    n = len(looks)
    assert pair.round()
    assert len(looks) == n + 1 and looks[-1] == now[0]
    for _ in range(30):
        now[0] += 0.01
        assert pair.round()
    assert len(looks) <= n + 3

    # A message that never arrives: the next one shows the gap and is looked at at once.
    now[0] += 0.01
    pair.sent.clear()
    assert pair.a._send_lone(pair._read, 0)  # sealed and "sent", but never given to B
    now[0] += 0.01
    n = len(looks)
    assert pair.round()
    assert len(looks) == n + 1 and looks[-1] == now[0]
    assert pair.b.peers[next(iter(pair.b.peers))].superpkt.gaps() == 1
