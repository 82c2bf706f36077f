"""Super-packet mode (issue #6): seal a TSO/USO super-packet once, send it as path-MTU fragments.

Why: Python pays per packet.  Sealing one 64 kB TCP super-packet with one AEAD
call and sending its ~46 fragments with one UDP GSO ``sendmsg`` costs a
fraction of sealing 46 segments one by one; the receiver reassembles, opens
once and writes the super-packet to its TUN with its virtio-net header.  The
price: one lost fragment loses the whole super-packet (~46 TCP segments), so
the mode is only used while the receiver reports a clean path, and falls back
to per-segment sealing (:mod:`datapath`) for a while when it does not.

This module holds the two pieces of state, both pure and clock-driven:

* :class:`Reassembly` (receiver): a bounded table of partial super messages.
  A fragment is kept only if its keypair exists and its counter passes the
  replay window *check*; the table holds at most ``max_entries`` messages of at
  most ``SUPER_MAX_FRAGMENTS * SUPER_MAX_FRAGMENT`` bytes each (oldest evicted
  first) and forgets a message after ``timeout`` seconds.  Forged fragments can
  therefore only cost the attacker bandwidth: memory is bounded, every drop is
  counted, and nothing is trusted before the one AEAD open of the whole.
* :class:`SuperState` (per peer, both roles): which keypair the two ends agreed
  on, the receiver's fragment counts for the next report, and the sender's
  loss window with its fallback hold and exponential back-off (hysteresis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .wire import SUPER_MAX_FRAGMENT, SUPER_MAX_FRAGMENTS, SUPER_MAX_SEALED

#: Partial super messages held at once (all peers); at 2 kB x 64 fragments that is 4 MB at most.
MAX_ENTRIES = 32
#: A message whose fragments have not all arrived after this long is lost (GSO sends them back to back).
REASSEMBLY_TIMEOUT = 0.25
#: Loss above this fraction of fragments sends the peer back to per-segment sealing.
LOSS_THRESHOLD = 0.001
#: Fragments a loss window covers before it is judged clean and restarted.
LOSS_WINDOW = 20000
#: First fallback hold in seconds; doubles on each fallback that follows a retry, up to MAX_HOLD.
MIN_HOLD = 1.0
MAX_HOLD = 30.0
#: A peer that stayed clean this long in super mode forgets its back-off.
CLEAN_RESET = 10.0
#: Receiver reports: at most every REPORT_MIN_INTERVAL when fragments went missing, else every REPORT_INTERVAL.
REPORT_MIN_INTERVAL = 0.05
REPORT_INTERVAL = 0.5


class _Entry:
    __slots__ = ("born", "count", "frag_size", "have", "last_size", "owner", "parts")

    def __init__(self, owner: Any, count: int, now: float) -> None:
        self.owner = owner
        self.count = count
        self.parts: list[bytes | None] = [None] * count
        self.have = 0
        self.frag_size = 0  # size of every fragment but the last, once one of them arrived
        self.last_size = 0
        self.born = now


class Reassembly:
    """Bounded reassembly of DataSuper fragments, keyed by (keypair, counter).  Not thread-safe.

    :meth:`add` returns the whole ciphertext once the last fragment arrived, else None; it raises
    ValueError with a counter name for fragments that contradict what the entry already holds.
    :meth:`expire` returns the entries that timed out (or were evicted) so the caller can report
    their missing fragments to the sender.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES, timeout: float = REASSEMBLY_TIMEOUT) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.timeout = timeout
        self._entries: dict[tuple[int, int], _Entry] = {}  # insertion order = age
        self._lost: list[tuple[Any, int, int]] = []  # (owner, fragments received, fragments missing)

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self, local_index: int, owner: Any, counter: int, index: int, count: int, piece: bytes, now: float
    ) -> bytes | None:
        """Keep one fragment (header already parsed and checked by the caller); the sealed message when complete."""
        if not 0 <= index < count <= SUPER_MAX_FRAGMENTS or not 0 < len(piece) <= SUPER_MAX_FRAGMENT:
            raise ValueError("fragment_malformed")
        key = (local_index, counter)
        entries = self._entries
        e = entries.get(key)
        if e is None:
            if count == 1:
                return piece
            if len(entries) >= self.max_entries:
                old_key = next(iter(entries))
                old = entries.pop(old_key)
                self._lost.append((old.owner, old.have, old.count - old.have))
            e = entries[key] = _Entry(owner, count, now)
        elif e.count != count or e.owner is not owner:
            raise ValueError("fragment_mismatch")
        if e.parts[index] is not None:
            raise ValueError("fragment_duplicate")
        size = len(piece)
        if index == count - 1:
            if e.frag_size and size > e.frag_size:
                raise ValueError("fragment_mismatch")
            e.last_size = size
        else:
            if e.frag_size == 0:
                if e.last_size > size:
                    raise ValueError("fragment_mismatch")
                e.frag_size = size
            elif size != e.frag_size:
                raise ValueError("fragment_mismatch")
        e.parts[index] = piece
        e.have += 1
        if e.have < count:
            return None
        del entries[key]
        sealed = b"".join(e.parts)  # type: ignore[arg-type]
        if len(sealed) > SUPER_MAX_SEALED:
            raise ValueError("fragment_malformed")
        return sealed

    def expire(self, now: float) -> list[tuple[Any, int, int]]:
        """Drop entries older than the timeout; returns (owner, received, missing) for them and for evictions."""
        entries = self._entries
        lost = self._lost
        self._lost = []
        limit = now - self.timeout
        while entries:
            key = next(iter(entries))
            e = entries[key]
            if e.born > limit:
                break
            del entries[key]
            lost.append((e.owner, e.have, e.count - e.have))
        return lost

    def forget(self, local_index: int) -> None:
        """Drop every partial message of a keypair that went away."""
        for key in [k for k in self._entries if k[0] == local_index]:
            del self._entries[key]


@dataclass(eq=False)
class SuperState:
    """Per-peer super-packet state.  Written by the datapath threads only (plain attribute writes)."""

    #: The sessions (at most 3: current, previous, next) on which both ends agreed on DataSuper: from
    #: the handshake's FEATURE_OFFLOAD bits (responder) or the peer's authenticated acceptance report.
    agreed: list = field(default_factory=list)
    announced: Any = None  # the keypair on which we last sent our acceptance
    # receiver side: fragments since our last report, and when we sent it
    rx_received: int = 0
    rx_missing: int = 0
    reported_at: float = -1e9
    # sender side: loss window, fallback hold and back-off
    win_received: int = 0
    win_missing: int = 0
    hold_until: float = 0.0
    hold: float = 0.0
    clean_since: float = 0.0
    fallbacks: int = 0

    def agree(self, kp: Any) -> None:
        """Both ends accept DataSuper on session ``kp`` (the oldest of more than 3 is forgotten)."""
        if not self.is_agreed(kp):
            self.agreed = [*self.agreed[-2:], kp]

    def is_agreed(self, kp: Any) -> bool:
        return kp is not None and any(k is kp for k in self.agreed)

    def usable(self, kp: Any, now: float) -> bool:
        """Send DataSuper on ``kp`` now?  Only on an agreed session and outside a loss hold."""
        return now >= self.hold_until and self.is_agreed(kp)

    def on_report(self, received: int, missing: int, now: float) -> bool:
        """Fold a receiver report into the loss window; True if this report starts a fallback hold."""
        if now < self.hold_until:
            return False  # reports about fragments sent before the hold add nothing
        self.win_received += received
        self.win_missing += missing
        total = self.win_received + self.win_missing
        if self.win_missing and self.win_missing > LOSS_THRESHOLD * total:
            retried = self.hold > 0 and now - self.clean_since < CLEAN_RESET
            self.hold = min(MAX_HOLD, self.hold * 2) if retried else MIN_HOLD
            self.hold_until = now + self.hold
            self.clean_since = self.hold_until
            self.win_received = self.win_missing = 0
            self.fallbacks += 1
            return True
        if total >= LOSS_WINDOW:
            self.win_received = self.win_missing = 0
        if self.hold and now - self.clean_since >= CLEAN_RESET:
            self.hold = 0.0  # clean for long enough: the next fallback starts short again
        return False
