"""Per-peer state and the index table (WireGuard's peer.go and indextable.go).

A :class:`Peer` is keyed by its 16-byte fc94 address.  It holds up to three
keypairs, as WireGuard does: ``current`` (used to send), ``previous`` (still
accepted while in-flight packets drain) and ``next`` (a responder's fresh
keypair, promoted to current only once the initiator has sent on it - key
confirmation).  The datapath threads read these slots and the control loop
writes them, so every multi-field change happens under ``peer.lock``.

The :class:`IndexTable` maps our random 32-bit receiver indexes to whatever
owns them: a :class:`Keypair` for data, or a pending handshake.  Indexes are
random (not sequential) so they reveal nothing about how many sessions a node
has, and lookups from the datapath are a single dict read.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .path import PathSet
from .superpacket import SuperState

#: Packets queued per peer while a handshake is in flight (WireGuard's MaxStagedPackets is 128).
MAX_STAGED_PACKETS = 128


@dataclass
class PendingHandshake:
    """Our initiation in flight: the handshake state and when we (re)sent it."""

    peer: Peer
    state: Any  # handshake.InitiatorState
    local_index: int
    sent_at: float
    message: bytes


class IndexTable:
    """Random 32-bit local indexes -> Keypair or PendingHandshake (or an external owner such as the base client)."""

    def __init__(self) -> None:
        self._table: dict[int, Any] = {}
        self._lock = threading.Lock()
        #: ``lookup(index)``: :meth:`get` as the dict's own method, for the data path's per-packet lookup.
        self.lookup = self._table.get

    def reserve(self, owner: Any) -> int:
        """A fresh random non-zero index bound to ``owner``."""
        with self._lock:
            while True:
                idx = secrets.randbits(32)
                if idx and idx not in self._table:
                    self._table[idx] = owner
                    return idx

    def set(self, index: int, owner: Any) -> None:
        with self._lock:
            self._table[index] = owner

    def get(self, index: int) -> Any:
        return self._table.get(index)

    def remove(self, index: int, owner: Any = None) -> None:
        """Free ``index`` (only if it still belongs to ``owner`` when one is given)."""
        with self._lock:
            if owner is None or self._table.get(index) is owner:
                self._table.pop(index, None)

    def __len__(self) -> int:
        return len(self._table)


@dataclass(eq=False)
class Peer:
    """Everything the engine knows about one remote node."""

    address: bytes
    public_key: bytes | None = None
    hostname: str = ""
    static: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    current: Any = None  # session.Keypair
    previous: Any = None
    next: Any = None
    paths: PathSet = field(default_factory=PathSet)
    staged: deque = field(default_factory=lambda: deque(maxlen=MAX_STAGED_PACKETS), repr=False)
    handshake: PendingHandshake | None = None
    handshake_started: float | None = None  # first attempt of the current series (gives up after rekey_attempt_time)
    next_attempt: float = 0.0  # earliest time to start a new series after giving up
    attempt_sent_at: float = -1e9  # last Hello/initiation of the current series
    attempt_jitter: float = 0.0
    last_init_timestamp: bytes = bytes(12)  # TAI64N of the newest initiation we accepted (replay rule)
    last_hello_ts: int = 0
    hello_sent_at: float = -1e9
    hello_replied_at: float = -1e9
    last_probe_round: float = -1e9
    relayed_rounds: int = 0  # probe rounds sent while relayed (fast retries of the hole punch, path.py)
    last_query: float = -1e9  # last time we asked the base(s) about this peer
    cookie: bytes | None = field(default=None, repr=False)  # from the peer's cookie reply (cookie.py)
    cookie_at: float = -1e9
    # traffic (monotonic times; written by datapath threads, read by the loop - plain attribute writes)
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_rx: float = 0.0  # any authenticated packet
    last_rx_data: float = 0.0  # non-keepalive authenticated packet
    last_tx: float = 0.0  # anything sent on a session
    last_tx_data: float = 0.0  # non-keepalive packet sent
    unanswered_since: float = 0.0  # engine._path_unanswered: first tick that saw data unanswered on the path
    last_seen_wall: float = 0.0
    session_started: float = 0.0
    pings: dict = field(default_factory=dict, repr=False)  # nonce -> (sent_at, future)
    superpkt: SuperState = field(default_factory=SuperState, repr=False)  # super-packet agreement and loss
    lane: Any = field(default=None, repr=False)  # datapath.Lane: the lone-packet paths' checked shortcut

    def keypairs(self) -> list[Any]:
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def stage(self, packet: bytes) -> None:
        """Keep a packet for when the session is up (oldest dropped when full)."""
        self.staged.append(packet)

    def take_staged(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.staged.popleft())
            except IndexError:
                return out
