"""Candidate paths to one peer and the rule that picks the one we send on.

Endpoints learned from the base, LAN beacons, static config or the source of a
handshake are only *hints*.  A path is used for data only after an
authenticated round trip on it: a Probe/ProbeReply pair (or the handshake
itself, which is one), or an authenticated data packet that passed the replay
window arriving from it (roaming, as WireGuard does, but never on a replay).

Preference is LAN, then direct, then relay (DESIGN.md 4.4); among validated
paths of the same kind the one that most recently carried authenticated
traffic wins, so a peer that roamed or was NAT-rebound is followed at once.
Across kinds the peer is followed too once the preferred path has been silent
for ``stale_after`` while the peer's traffic (data or keepalives, not probes,
which go to every path) arrives on another validated path: a robot that moved
to another subnet, or a peer that fell back to the relay.  A validated path
that carries nothing authenticated for ``path_timeout`` falls back to being a
candidate.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .constants import REKEY_TIMEOUT
from .transport import AnyEndpoint, RelayEndpoint, format_endpoint

KIND_LAN = "lan"
KIND_DIRECT = "direct"
KIND_RELAY = "relay"
KIND_NONE = "none"
PREFERENCE = {KIND_LAN: 3, KIND_DIRECT: 2, KIND_RELAY: 1}

#: Bound on remembered candidates per peer (untrusted hints must not grow memory).
MAX_CANDIDATES = 16

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def classify(endpoint: AnyEndpoint, local_networks: list[Network], *, from_beacon: bool = False) -> str:
    """'relay' for a relay endpoint, 'lan' for a beacon source or a directly connected subnet, else 'direct'."""
    if isinstance(endpoint, RelayEndpoint):
        return KIND_RELAY
    if from_beacon:
        return KIND_LAN
    host = endpoint[0].split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return KIND_DIRECT
    if ip.is_link_local:
        return KIND_LAN
    for net in local_networks:
        if ip.version == net.version and ip in net:
            return KIND_LAN
    return KIND_DIRECT


@dataclass
class Path:
    """One candidate endpoint and what we know about it."""

    endpoint: AnyEndpoint
    kind: str
    source: str  # 'static' | 'base' | 'beacon' | 'cache' | 'handshake' | 'roam'
    added: float
    validated: bool = False
    rtt: float | None = None
    last_auth_rx: float = 0.0
    last_data_rx: float = 0.0  # the peer's own traffic (data, keepalive) arrived here, as on_authenticated was told
    probe_nonce: bytes | None = None
    probe_sent: float = 0.0

    def describe(self) -> str:
        return format_endpoint(self.endpoint)


class PathSet:
    """The candidate and validated paths of one peer.  Not thread-safe: the peer's lock guards it."""

    def __init__(self, stale_after: float = REKEY_TIMEOUT) -> None:
        self.paths: dict[AnyEndpoint, Path] = {}
        self.current: Path | None = None
        #: Silence of the preferred path after which the peer's traffic on another path wins (the engine
        #: sets its own, scaled, rekey_timeout).
        self.stale_after = stale_after

    def add_candidate(self, endpoint: AnyEndpoint, kind: str, source: str, now: float) -> Path:
        """Remember a hint (idempotent); a better kind learned later (e.g. a beacon) upgrades it."""
        p = self.paths.get(endpoint)
        if p is not None:
            if PREFERENCE[kind] > PREFERENCE[p.kind]:
                p.kind = kind
            return p
        if len(self.paths) >= MAX_CANDIDATES:
            # Oldest unvalidated hint first; else the validated path heard from longest ago (a peer that
            # sends authenticated packets from ever new ports must not grow the table either).
            others = [q for q in self.paths.values() if q is not self.current]
            victim = min(others, key=lambda q: (q.validated, q.last_auth_rx if q.validated else q.added))
            del self.paths[victim.endpoint]
        p = Path(endpoint, kind, source, now)
        self.paths[endpoint] = p
        return p

    def remove(self, endpoint: AnyEndpoint) -> None:
        p = self.paths.pop(endpoint, None)
        if p is not None and p is self.current:
            self.current = None
            self._reselect()

    def candidates(self) -> list[Path]:
        """Every known path, best kind first (handshakes and probes go to all of them)."""
        return sorted(self.paths.values(), key=lambda q: -PREFERENCE[q.kind])

    def on_authenticated(
        self, endpoint: AnyEndpoint, kind: str, now: float, rtt: float | None = None, *, data: bool = False
    ) -> bool:
        """An authenticated packet came from ``endpoint`` (after the replay check); True if the path changed.

        ``data``: it was the peer's own traffic (a data packet or a keepalive), which goes only on the
        path the peer chose, unlike probes and their replies.
        """
        p = self.paths.get(endpoint)
        if p is None:
            p = self.add_candidate(endpoint, kind, "roam", now)
        p.validated = True
        p.last_auth_rx = now
        if data:
            p.last_data_rx = now
        if rtt is not None:
            p.rtt = rtt if p.rtt is None else 0.75 * p.rtt + 0.25 * rtt
        return self._reselect()

    def start_probe(self, endpoint: AnyEndpoint, nonce: bytes, now: float) -> None:
        p = self.paths.get(endpoint)
        if p is not None:
            p.probe_nonce = nonce
            p.probe_sent = now

    def on_probe_reply(self, endpoint: AnyEndpoint, nonce: bytes, kind: str, now: float) -> Path | None:
        """Match a ProbeReply to our probe on the path it arrived on; validates that path with its RTT.

        Only the endpoint the reply came *from* is proven.  A reply that
        carries the nonce of a probe sent to another endpoint does not
        validate that one: an on-link attacker who advertised its own address
        (beacon) could otherwise forward our probe to the real peer with our
        source address, let the genuine reply arrive on the peer's real path,
        and so have its own address validated and preferred (TESTPLAN 25).
        """
        p = self.paths.get(endpoint)
        if p is not None and p.probe_nonce == nonce:
            p.probe_nonce = None
            self.on_authenticated(endpoint, p.kind, now, now - p.probe_sent)
            return p
        # A reply without a matching probe still proves the path it arrived on (it is authenticated).
        self.on_authenticated(endpoint, kind, now)
        return None

    def invalidate(self, endpoint: AnyEndpoint | None = None) -> None:
        """Forget that ``endpoint`` (or every path) works, e.g. when replies stopped coming."""
        for p in self.paths.values():
            if endpoint is None or p.endpoint == endpoint:
                p.validated = False
        self._reselect()

    def expire(self, now: float, path_timeout: float) -> bool:
        """Validated paths silent for ``path_timeout`` become candidates again; True if the path changed."""
        for p in self.paths.values():
            if p.validated and now - p.last_auth_rx > path_timeout:
                p.validated = False
        return self._reselect()

    def _reselect(self) -> bool:
        best = None
        for p in self.paths.values():
            if not p.validated:
                continue
            if best is None or (PREFERENCE[p.kind], p.last_auth_rx) > (PREFERENCE[best.kind], best.last_auth_rx):
                best = p
        # Stay on the current path while it is as good a kind and alive: avoids flapping
        # between two equally good endpoints that both answer probes.
        cur = self.current
        if (
            cur is not None
            and cur.validated
            and best is not None
            and PREFERENCE[cur.kind] >= PREFERENCE[best.kind]
            and (best.last_auth_rx - cur.last_auth_rx < 1.0 or cur.kind != best.kind)
        ):
            best = cur
        # Follow the peer across kinds: its traffic arrives elsewhere and the chosen path has been silent.
        if best is not None:
            moved = max((p for p in self.paths.values() if p.validated), key=lambda q: q.last_data_rx)
            if moved is not best and moved.last_data_rx - best.last_auth_rx > self.stale_after:
                best = moved
        changed = best is not self.current
        self.current = best
        return changed

    @property
    def kind(self) -> str:
        return self.current.kind if self.current is not None else KIND_NONE

    @property
    def endpoint(self) -> AnyEndpoint | None:
        return self.current.endpoint if self.current is not None else None


#: While a peer is only reachable through the relay, direct candidates are probed again after
#: probe_interval/25 (1 s), doubling each round up to probe_interval: a hole punch that lost the race
#: (our probe reached the peer's NAT before the peer's own packet opened it) is retried within seconds.
RELAYED_FAST_ROUNDS = 5


def probe_interval_for(kind: str, relayed_rounds: int, probe_interval: float) -> float:
    """Seconds between probe rounds for a peer whose current path is of ``kind``.

    ``relayed_rounds`` counts the rounds already sent while relayed (or pathless); a direct or LAN
    peer keeps the plain interval, which also keeps NAT mappings open.
    """
    if kind not in (KIND_RELAY, KIND_NONE) or relayed_rounds >= RELAYED_FAST_ROUNDS:
        return probe_interval
    return min(probe_interval, probe_interval / 25 * 2**relayed_rounds)
