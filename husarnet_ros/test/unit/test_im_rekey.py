"""TESTPLAN row 26 (IM variant): rekey boundaries and counter limits, with short :class:`Timers`.

Expected: with a rekey every ~1 s, 5 s of continuous traffic both ways loses
nothing and keys really change several times; a datagram sealed under a key
is still accepted while that key is the *previous* one (in-flight packets
drain) but refused once the key is older than reject-after-time; a small
message limit forces a rekey before the key may no longer be used, again
without loss.
"""

from __future__ import annotations

import dataclasses
import time

from test_im_common import EP_A, EP_B, FAST, Lab, connect, packet, pair, wait_for


def stream_both_ways(a, b, seconds: float, tag: bytes, seen: list | None = None) -> int:
    """Send both ways every 5 ms; record every distinct keypair A sends with in ``seen``."""
    n = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        a.send(b, tag + b"%06d" % n)
        b.send(a, tag + b"%06d" % n)
        n += 1
        if seen is not None:
            kp = a.current(b)
            if kp is not None and all(kp is not k for k in seen):
                seen.append(kp)
        time.sleep(0.005)
    return n


def test_rekey_every_second_for_five_seconds_loses_nothing(tmp_path):
    timers = dataclasses.replace(FAST, rekey_after_time=1.0, reject_after_time=3.0)
    with Lab(tmp_path, timers=timers) as lb:
        a, b = pair(lb, timers=timers)
        connect(a, b)
        completed = a.counter("handshakes_completed") + b.counter("handshakes_completed")
        keys: list = []
        n = stream_both_ways(a, b, 5.0, b"rk", keys)
        want = [b"rk%06d" % i for i in range(n)]
        assert wait_for(lambda: len(b.payloads(b"rk")) == n and len(a.payloads(b"rk")) == n, 5), (
            n,
            len(b.payloads(b"rk")),
            len(a.payloads(b"rk")),
            a.engine.counters.snapshot(),
            b.engine.counters.snapshot(),
        )
        assert sorted(b.payloads(b"rk")) == want and sorted(a.payloads(b"rk")) == want
        assert len(keys) >= 4, len(keys)  # ~1 new key per second
        assert a.counter("handshakes_completed") + b.counter("handshakes_completed") - completed >= 4
        for node in (a, b):
            assert node.counter("expired") == 0 and node.counter("too_old") == 0 and node.counter("bad_mac") == 0


def test_previous_key_drains_then_is_rejected_after_reject_after_time(tmp_path):
    timers = dataclasses.replace(FAST, rekey_after_time=0.5, reject_after_time=2.0)
    with Lab(tmp_path, timers=timers) as lb:
        a, b = pair(lb, timers=timers)
        connect(a, b)
        kp1 = a.current(b)
        # Datagrams sealed now under the first key, held back by "the network".
        held = [kp1.seal(packet(a.address, b.address, b"old%02d" % i)) for i in range(20)]
        # Traffic until A has rekeyed: kp1 is now B's previous key.
        deadline = time.monotonic() + 5
        i = 0
        while a.current(b) is kp1:
            assert time.monotonic() < deadline
            a.send(b, b"tick%04d" % i)
            i += 1
            time.sleep(0.01)
        assert time.monotonic() - kp1.created < timers.reject_after_time - 0.5
        # In-flight packets under the previous key still drain.
        for d in held[:10]:
            lb.net.inject(d, EP_A, EP_B)
        assert wait_for(lambda: len(b.payloads(b"old")) == 10, 2)
        # Once the key is older than reject-after-time, the rest are refused (and never delivered).
        while time.monotonic() - kp1.created < timers.reject_after_time + 0.3:
            a.send(b, b"tick%04d" % i)
            i += 1
            time.sleep(0.02)
        before = {r: b.counter(r) for r in ("expired", "unknown_peer")}
        for d in held[10:]:
            lb.net.inject(d, EP_A, EP_B)
        assert wait_for(lambda: sum(b.counter(r) - before[r] for r in before) == 10, 2)
        lb.net.quiesce()
        time.sleep(0.05)
        assert len(b.payloads(b"old")) == 10
        assert b.counter("bad_mac") == 0
        # And no keypair of B's still opens kp1's traffic.
        assert all(getattr(v, "local_index", None) != kp1.remote_index for v in b.engine._index._table.values())
        a.send(b, b"fresh")
        assert wait_for(lambda: b.payloads(b"fresh"))


def test_small_message_limit_forces_a_rekey_without_loss(tmp_path):
    timers = dataclasses.replace(FAST, rekey_after_messages=300, reject_after_messages=600)
    with Lab(tmp_path, timers=timers) as lb:
        a, b = pair(lb, timers=timers)
        connect(a, b)
        completed = a.counter("handshakes_completed") + b.counter("handshakes_completed")
        keys: list = []
        n = 2000
        for i in range(n):
            a.send(b, b"ml%06d" % i)
            kp = a.current(b)
            if kp is not None and all(kp is not k for k in keys):
                keys.append(kp)
            if i % 10 == 0:
                time.sleep(0.002)
        assert wait_for(lambda: len(b.payloads(b"ml")) == n, 5), (len(b.payloads(b"ml")), a.engine.counters.snapshot())
        assert sorted(b.payloads(b"ml")) == [b"ml%06d" % i for i in range(n)]
        # 2000 messages with a 300-message rekey threshold: several new keys, none used past its limit.
        assert len(keys) >= 4, len(keys)
        assert a.counter("handshakes_completed") + b.counter("handshakes_completed") - completed >= 4
        assert all(kp.send_counter <= timers.reject_after_messages for kp in keys)
