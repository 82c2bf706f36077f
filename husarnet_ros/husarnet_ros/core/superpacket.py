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

from .wire import (
    DATA_MIN_LEN,
    DATA_SUPER_HEADER_LEN,
    SUPER_MAX_FRAGMENT,
    SUPER_MAX_FRAGMENTS,
    SUPER_MAX_SEALED,
    TAG_LEN,
)

#: Partial super messages held at once (all peers); at 2 kB x 64 fragments that is 4 MB at most.
MAX_ENTRIES = 32
#: A message whose fragments have not all arrived after this long is lost (GSO sends them back to back).
REASSEMBLY_TIMEOUT = 0.1
#: Loss above this fraction of messages sends the peer back to per-segment sealing.
LOSS_THRESHOLD = 0.001
#: Messages a loss window must cover before the path counts as measured clean.
LOSS_WINDOW = 2000
#: First fallback hold in seconds; doubles on each fallback that follows a retry, up to MAX_HOLD.
MIN_HOLD = 1.0
MAX_HOLD = 30.0
#: A peer that stayed clean this long in super mode forgets its back-off.
CLEAN_RESET = 10.0
#: Receiver reports: at most every REPORT_MIN_INTERVAL when fragments went missing, else every REPORT_INTERVAL.
REPORT_MIN_INTERVAL = 0.05
REPORT_INTERVAL = 0.2
#: A report that would only say "these few messages arrived, none missing" waits until it covers
#: REPORT_MESSAGES or SPARSE_REPORT_INTERVAL passed: light traffic (a heartbeat, a service call) made
#: one report datagram per message each way, sealed and opened right behind the answer on the CPU the
#: answer's reader was woken on, to fill a loss window that needs LOSS_WINDOW messages anyway.
REPORT_MESSAGES = 100
SPARSE_REPORT_INTERVAL = 5.0


#: Payload bytes one UDP GSO send and one UDP GRO buffer carry: the kernel's 64 kB limit on one packet
#: less the IPv6 and UDP headers, with a margin.
GRO_PAYLOAD_BUDGET = 65000
#: The virtio-net header that precedes a super-packet in its plaintext.
_VNET_HDR_LEN = 10


def fragment_payload(mtu: int) -> int:
    """Ciphertext bytes per DataSuper fragment: a fragment is as large as a full-size Data datagram, never larger."""
    return min(SUPER_MAX_FRAGMENT, mtu + DATA_MIN_LEN - DATA_SUPER_HEADER_LEN)


def tso_limit(mtu: int) -> int:
    """Largest TSO/USO super-packet (IPv6 packet length) whose sealed message fits one GSO send and one GRO buffer.

    Set as the TUN's ``gso_max_size``: the kernel's default (64 kB) makes a sealed super-packet one
    fragment longer than one GSO send, so every message took two ``sendmsg`` calls and arrived in two GRO
    buffers; a few hundred bytes less per super-packet keeps it at one of each.
    """
    per = fragment_payload(mtu)
    count = min(SUPER_MAX_FRAGMENTS, GRO_PAYLOAD_BUDGET // (per + DATA_SUPER_HEADER_LEN))
    return count * per - TAG_LEN - _VNET_HDR_LEN


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

    def forget_message(self, local_index: int, counter: int) -> None:
        """Drop a partial message (its fragments arrived again, complete, and are handled whole)."""
        self._entries.pop((local_index, counter), None)

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
    # receiver side: fragments and messages since our last report, and when we sent it
    rx_received: int = 0
    rx_missing: int = 0
    msg_kp: Any = None  # the session the message counts are about
    msg_base: int = -1  # first counter not yet covered by a report (-1: no report yet on msg_kp)
    msg_lo: int = 0
    msg_hi: int = -1
    msg_count: int = 0
    reported_at: float = -1e9
    #: The lone receive path need not look for a due report before this time (the clock's): set by each
    #: full look (``Datapath._super_housekeeping``), and 0 again after anything that may make a report due
    #: sooner: a message out of order (a gap, or a late one), another session, an agreement.
    check_at: float = 0.0
    # sender side: loss window, "measured clean", fallback hold and back-off
    win_total: int = 0
    win_missing: int = 0
    clean: bool = False
    hold_until: float = 0.0
    hold: float = 0.0
    clean_since: float = 0.0
    fallbacks: int = 0

    def agree(self, kp: Any) -> None:
        """Both ends accept DataSuper on session ``kp`` (the oldest of more than 3 is forgotten)."""
        if not self.is_agreed(kp):
            self.agreed = [*self.agreed[-2:], kp]
            self.check_at = 0.0  # our acceptance is to be announced on it

    def is_agreed(self, kp: Any) -> bool:
        return kp is not None and any(k is kp for k in self.agreed)

    def usable(self, kp: Any, now: float) -> bool:
        """Send DataSuper on ``kp`` now?  Only on an agreed session, measured clean, outside a loss hold."""
        return self.clean and now >= self.hold_until and self.is_agreed(kp)

    # --- receiver side ---------------------------------------------------------------
    def count_messages(self, kp: Any, lo: int, hi: int, count: int) -> None:
        """``count`` messages with counters in [lo, hi] opened on ``kp`` (one batch's worth).

        Counts continue across reports on the same session: the next report's span starts right after
        the previous one's highest counter, so a message lost at a boundary is still seen; one that
        arrives late (reordered behind a report) is counted in the next report without widening its span
        (the sender does not let it cancel the gap already reported: its judgement stays conservative).
        """
        if kp is not self.msg_kp:
            self.msg_kp = kp
            self.msg_base = -1
            self.msg_lo, self.msg_hi, self.msg_count = lo, hi, count
            self.check_at = 0.0
            return
        if lo != self.msg_hi + 1:
            self.check_at = 0.0  # a gap, or a message that came late: reported within REPORT_MIN_INTERVAL
        if self.msg_base < 0:
            self.msg_lo = min(self.msg_lo, lo)
        self.msg_hi = max(self.msg_hi, hi)
        self.msg_count += count

    def gaps(self) -> int:
        """Counters missing in the span seen since the last report (lost, or not yet arrived)."""
        return max(0, self.msg_hi - self.msg_lo + 1 - self.msg_count) if self.msg_count else 0

    def take_report(self) -> tuple[int, int, int, int]:
        """(fragments received, fragments missing, messages, counter span) since the last report; resets them.

        ``messages`` may exceed ``span`` when late messages make up for gaps already reported.
        """
        span = max(0, self.msg_hi - self.msg_lo + 1) if self.msg_count else 0
        out = (self.rx_received, self.rx_missing, self.msg_count, span)
        self.rx_received = self.rx_missing = 0
        if self.msg_count:
            self.msg_base = self.msg_lo = max(self.msg_hi + 1, self.msg_lo)
            self.msg_hi = self.msg_lo - 1
            self.msg_count = 0
        return out

    # --- sender side -----------------------------------------------------------------
    def on_report(self, received: int, missing: int, messages: int, span: int, now: float) -> bool:
        """Fold a receiver report into the loss window; True if this report ends super-packet mode.

        Loss is counted in messages (the counter gaps the receiver saw): a super-packet with one
        missing fragment never opens, so it is one lost message, as is a lost Data datagram.  Loss is
        then measured in the unit TCP loses, whatever the mode.  The path counts as clean once a
        window of at least LOSS_WINDOW messages lost at most LOSS_THRESHOLD of them; 3 or more losses
        above that rate end super-packet mode for a hold that doubles while losses follow retries.
        (``received``/``missing`` fragments are diagnostics: every incomplete super-packet already
        shows as a gap.)
        """
        del received, missing
        self.win_total += span
        # Conservative: a report whose late messages outnumber its gaps does not cancel earlier losses.
        self.win_missing += max(0, span - messages)
        if self.win_missing >= 3 and self.win_missing > LOSS_THRESHOLD * max(self.win_total, LOSS_WINDOW):
            was_clean = self.clean
            self.clean = False
            self.win_total = self.win_missing = 0
            if not was_clean:
                return False  # per segment already: it stays so until a clean window
            retried = self.hold > 0 and now - self.clean_since < CLEAN_RESET
            self.hold = min(MAX_HOLD, self.hold * 2) if retried else MIN_HOLD
            self.hold_until = now + self.hold
            self.fallbacks += 1
            return True
        if self.win_total >= LOSS_WINDOW:
            if not self.clean:
                self.clean = True
                self.clean_since = now
            self.win_total = self.win_missing = 0
        if self.hold and self.clean and now - self.clean_since >= CLEAN_RESET:
            self.hold = 0.0  # clean for long enough: the next fallback starts short again
        return False
