"""Counters: every known reason present, increments never lost across threads."""

from __future__ import annotations

import threading

from husarnet_ros.core.counters import DROP_REASONS, KNOWN_COUNTERS, TRAFFIC_COUNTERS, Counters


def test_snapshot_lists_every_known_counter_at_zero() -> None:
    snap = Counters().snapshot()
    assert set(snap) == set(KNOWN_COUNTERS)
    assert all(v == 0 for v in snap.values())
    for name in ("malformed", "bad_mac", "replay", "too_old", "not_whitelisted", "bad_inner_src", "rate_limited"):
        assert name in DROP_REASONS
    assert "handshakes_completed" in TRAFFIC_COUNTERS


def test_inc_and_snapshot_is_a_copy() -> None:
    c = Counters()
    c.inc("replay")
    c.inc("rx_bytes", 1400)
    c.inc("bad_sig")  # a reason another module adds
    snap = c.snapshot()
    assert snap["replay"] == 1
    assert snap["rx_bytes"] == 1400
    assert snap["bad_sig"] == 1
    assert c["replay"] == 1 and c.get("never") == 0
    snap["replay"] = 99
    assert c.get("replay") == 1
    c.reset()
    assert c.get("rx_bytes") == 0 and "bad_sig" not in c.snapshot()


def test_concurrent_increments_are_not_lost() -> None:
    c = Counters()
    n_threads, n_each = 4, 20000

    def work() -> None:
        for _ in range(n_each):
            c.inc("rx_packets")
            c.inc("rx_bytes", 3)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.get("rx_packets") == n_threads * n_each
    assert c.get("rx_bytes") == 3 * n_threads * n_each


def test_inc_traffic_counts_one_packet_and_its_bytes_across_threads() -> None:
    c = Counters()

    def work() -> None:
        for _ in range(2000):
            c.inc_traffic("rx_packets", "rx_bytes", 100)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.get("rx_packets") == 8000
    assert c.get("rx_bytes") == 800_000
