"""Per-reason drop and traffic counters.

Tests and operators assert on these numbers, never on log text, so every
place that drops a packet names a reason here.  Increments come from the
datapath threads and the control loop at the same time; a plain ``dict``
update (``d[k] = d.get(k, 0) + n``) can lose increments when two threads
interleave, so one small lock guards the dict.  The lock is uncontended in
the common case and costs far less than the AEAD call next to it.
"""

from __future__ import annotations

import threading

# Drop reasons (DESIGN.md 4.10 and docs/ARCHITECTURE.md "Counters").
DROP_REASONS: tuple[str, ...] = (
    "malformed",
    "bad_mac",
    "replay",
    "too_old",
    "not_whitelisted",
    "bad_inner_src",
    "rate_limited",
    "unknown_peer",
    "bad_id",
    "expired",
    "no_session",
    "no_path",
    "tun_write_failed",
)

# Traffic and handshake totals.
TRAFFIC_COUNTERS: tuple[str, ...] = (
    "rx_packets",
    "tx_packets",
    "rx_bytes",
    "tx_bytes",
    "handshakes_sent",
    "handshakes_received",
    "handshakes_completed",
    "cookie_replies_sent",
    "cookie_replies_received",
)

KNOWN_COUNTERS: tuple[str, ...] = DROP_REASONS + TRAFFIC_COUNTERS


class Counters:
    """Thread-safe named integer counters; every known name starts at 0 so a snapshot is complete.

    Names outside :data:`KNOWN_COUNTERS` are accepted (other modules may add
    reasons such as ``bad_sig``) and appear in snapshots once incremented.
    """

    __slots__ = ("_lock", "_values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(KNOWN_COUNTERS, 0)

    def inc(self, reason: str, n: int = 1) -> None:
        """Add ``n`` (default 1) to the counter called ``reason``."""
        with self._lock:
            self._values[reason] = self._values.get(reason, 0) + n

    def inc_traffic(self, packets_name: str, bytes_name: str, nbytes: int) -> None:
        """One packet and its bytes under one lock: the light-traffic paths count every packet (issue #6)."""
        with self._lock:
            values = self._values
            values[packets_name] = values.get(packets_name, 0) + 1
            values[bytes_name] = values.get(bytes_name, 0) + nbytes

    def get(self, reason: str) -> int:
        """Current value of one counter (0 if never incremented)."""
        return self._values.get(reason, 0)

    def __getitem__(self, reason: str) -> int:
        return self.get(reason)

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of every counter, safe to hand to another thread or serialise."""
        with self._lock:
            return dict(self._values)

    def reset(self) -> None:
        """Set every counter back to 0 (tests and benchmarks only)."""
        with self._lock:
            self._values = dict.fromkeys(KNOWN_COUNTERS, 0)
