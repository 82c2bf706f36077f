"""The data plane: TUN -> session -> path -> socket, and back (WireGuard's send.go and receive.go).

Read it top to bottom:

* :meth:`Datapath.send_packets` takes a batch of IPv6 packets from the TUN
  (or :meth:`Engine.inject_packet`), checks that each one comes from our own
  address, finds the peer by destination, seals it with the peer's current
  keypair, groups the datagrams by endpoint and hands each group to the
  transport in one call (where UDP GSO can later slot in).
* :meth:`Datapath.receive` takes Data datagrams from the transport's receive
  thread, finds the keypair by receiver index, opens it (replay window and
  AEAD inside :class:`~husarnet_ros.core.session.Keypair`), follows the peer
  if it roamed (only now, after authentication and the replay window), checks
  that the inner IPv6 source is the authenticated peer's address, and writes
  the packets to the TUN (or the in-memory ``on_packet`` callback).

No per-packet work ever runs on the asyncio control loop: the loop is only
*told* about events (a handshake is needed, a probe reply arrived, a
responder's keypair was confirmed), through the :class:`ControlHooks` the
engine passes in, and those calls are rate-limited per peer.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .constants import OVERLAY_PREFIX, Timers
from .counters import Counters
from .offload import OffloadError, split_for_send
from .peer import IndexTable, Peer
from .session import Keypair, SessionDrop
from .transport import AnyEndpoint, RelayEndpoint
from .wire import (
    DATA_MIN_LEN,
    INNER_BASE_FIRST,
    INNER_BASE_LAST,
    INNER_PROBE,
    INNER_PROBE_REPLY,
    IPV6_HEADER_LEN,
    PROBE_LEN,
    build_probe_reply,
)

log = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
#: How often (seconds) the datapath may ask the loop for a handshake for the same peer.
_HANDSHAKE_NUDGE_INTERVAL = 0.05


class ControlHooks(Protocol):
    """What the datapath needs from the engine; every method is safe to call from any thread."""

    def send_datagrams(self, datagrams: list[bytes], endpoint: AnyEndpoint) -> None: ...

    def need_handshake(self, address: bytes, packet: bytes | None) -> None: ...

    def keypair_confirmed(self, peer: Peer) -> None: ...

    def probe_reply(self, peer: Peer, endpoint: AnyEndpoint, nonce: bytes, now: float) -> None: ...

    def base_plaintext(self, owner: Any, keypair: Keypair, plaintext: bytes, endpoint: AnyEndpoint) -> None: ...

    def path_kind(self, endpoint: AnyEndpoint) -> str: ...

    def is_allowed(self, address: bytes) -> bool: ...


class Datapath:
    """Seal/open threads' logic plus the TUN reader thread."""

    def __init__(
        self,
        address: bytes,
        peers: dict[bytes, Peer],
        index: IndexTable,
        counters: Counters,
        hooks: ControlHooks,
        deliver: Callable[[list[bytes]], None],
        *,
        timers: Timers,
        clock: Callable[[], float],
        wallclock: Callable[[], float],
    ) -> None:
        self.address = address
        self.peers = peers
        self.index = index
        self.counters = counters
        self.hooks = hooks
        self.deliver = deliver
        self.timers = timers
        self.clock = clock
        self.wallclock = wallclock
        self._tun: Any = None
        self._tun_thread: threading.Thread | None = None
        self._nudged: dict[bytes, float] = {}

    # --- outbound: TUN -> peers ------------------------------------------------
    def _nudge(self, address: bytes, packet: bytes | None, now: float) -> None:
        """Ask the loop for a handshake (and stage ``packet``), at most every few tens of ms per peer."""
        if packet is None and now - self._nudged.get(address, -1.0) < _HANDSHAKE_NUDGE_INTERVAL:
            return
        if len(self._nudged) > 4096:
            self._nudged.clear()
        self._nudged[address] = now
        self.hooks.need_handshake(address, packet)

    def send_packets(self, packets: list[bytes]) -> None:
        """Seal and send a batch of IPv6 packets read from the TUN."""
        now = self.clock()
        me = self.address
        peers = self.peers
        groups: dict[AnyEndpoint, list[bytes]] = {}
        drops: dict[str, int] = {}
        tx_packets = tx_bytes = 0
        for pkt in packets:
            if len(pkt) < IPV6_HEADER_LEN or pkt[0] >> 4 != 6:
                drops["malformed"] = drops.get("malformed", 0) + 1
                continue
            if pkt[8:24] != me:
                # Only our own address may leave through the overlay (no spoofing from this host).  The
                # kernel's own link-local chatter on the device (router solicitations, MLD) is not an
                # attack: it gets a neutral counter of its own.
                reason = "bad_local_src" if pkt[8:10] == OVERLAY_PREFIX else "not_overlay"
                drops[reason] = drops.get(reason, 0) + 1
                continue
            dst = bytes(pkt[24:40])
            peer = peers.get(dst)
            if peer is None or not self.hooks.is_allowed(dst):
                if dst[:2] != OVERLAY_PREFIX:
                    drops["unknown_peer"] = drops.get("unknown_peer", 0) + 1
                elif not self.hooks.is_allowed(dst):
                    drops["not_whitelisted"] = drops.get("not_whitelisted", 0) + 1
                else:
                    drops["no_session"] = drops.get("no_session", 0) + 1
                    self._nudge(dst, bytes(pkt), now)
                continue
            kp = peer.current
            endpoint = peer.paths.endpoint
            if kp is None or endpoint is None:
                peer.stage(bytes(pkt))
                drops["no_session"] = drops.get("no_session", 0) + 1
                self._nudge(dst, None, now)
                continue
            try:
                datagram = kp.seal(pkt)
            except SessionDrop:
                peer.stage(bytes(pkt))
                drops["expired"] = drops.get("expired", 0) + 1
                self._nudge(dst, None, now)
                continue
            group = groups.get(endpoint)
            if group is None:
                groups[endpoint] = group = []
            group.append(datagram)
            n = len(pkt)
            peer.tx_bytes += n
            peer.last_tx = peer.last_tx_data = now
            tx_packets += 1
            tx_bytes += n
            if kp.needs_rekey(now, self.timers):
                self._nudge(dst, None, now)
        for endpoint, datagrams in groups.items():
            self.hooks.send_datagrams(datagrams, endpoint)
        c = self.counters
        if tx_packets:
            c.inc("tx_packets", tx_packets)
            c.inc("tx_bytes", tx_bytes)
        for reason, n in drops.items():
            c.inc(reason, n)

    def send_plaintext(self, peer: Peer, plaintext: bytes, endpoint: AnyEndpoint | None = None) -> bool:
        """Seal a control payload (keepalive, probe) on the peer's current keypair; False if there is none."""
        kp = peer.current
        endpoint = endpoint if endpoint is not None else peer.paths.endpoint
        if kp is None or endpoint is None:
            return False
        try:
            datagram = kp.seal(plaintext)
        except SessionDrop:
            return False
        peer.last_tx = self.clock()
        self.hooks.send_datagrams([datagram], endpoint)
        return True

    # --- inbound: socket -> TUN ------------------------------------------------
    def receive(self, datagram: bytes, src: AnyEndpoint) -> None:
        """One Data datagram from the transport (type already known to be 4)."""
        self.receive_many([(datagram, src)])

    def receive_many(self, batch: list[tuple[bytes, AnyEndpoint]]) -> None:
        """Open a batch of Data datagrams and deliver the IPv6 packets they carry."""
        now = self.clock()
        me = self.address
        out: list[bytes] = []
        drops: dict[str, int] = {}
        rx_packets = rx_bytes = 0
        index_get = self.index.get
        for datagram, src in batch:
            if len(datagram) < DATA_MIN_LEN:
                drops["malformed"] = drops.get("malformed", 0) + 1
                continue
            kp = index_get(_U32.unpack_from(datagram, 4)[0])
            if not isinstance(kp, Keypair):
                drops["unknown_peer"] = drops.get("unknown_peer", 0) + 1
                continue
            try:
                plaintext = kp.open(datagram)
            except SessionDrop as drop:
                drops[drop.reason] = drops.get(drop.reason, 0) + 1
                continue
            peer = kp.owner
            if not isinstance(peer, Peer):
                self.hooks.base_plaintext(peer, kp, plaintext, src)
                continue
            if not self.hooks.is_allowed(peer.address):
                drops["not_whitelisted"] = drops.get("not_whitelisted", 0) + 1
                continue
            if kp is peer.next:
                self._confirm(peer, kp)
            if isinstance(src, RelayEndpoint) and src.peer_address != peer.address:
                src = RelayEndpoint(src.base_key, peer.address)  # the key, not the base's stamp, names the sender
            # Authenticated and past the replay window: only now may the peer's endpoint move.
            cur = peer.paths.current
            if cur is None or cur.endpoint != src or now - cur.last_auth_rx > 0.5:
                kind = self.hooks.path_kind(src)
                with peer.lock:
                    peer.paths.on_authenticated(src, kind, now)
            else:
                cur.last_auth_rx = now
            peer.last_rx = now
            peer.last_seen_wall = self.wallclock()
            if not plaintext:
                continue  # keepalive
            first = plaintext[0]
            if first >> 4 == 6:
                if len(plaintext) < IPV6_HEADER_LEN:
                    drops["malformed"] = drops.get("malformed", 0) + 1
                    continue
                if plaintext[8:24] != peer.address:
                    drops["bad_inner_src"] = drops.get("bad_inner_src", 0) + 1
                    continue
                if plaintext[24:40] != me and plaintext[24] != 0xFF:
                    drops["bad_inner_dst"] = drops.get("bad_inner_dst", 0) + 1
                    continue
                out.append(plaintext)
                n = len(plaintext)
                peer.rx_bytes += n
                peer.last_rx_data = now
                rx_packets += 1
                rx_bytes += n
            elif first == INNER_PROBE and len(plaintext) == PROBE_LEN:
                # Answer on the path the probe came in on, so that path gets validated.
                self.send_plaintext(peer, build_probe_reply(plaintext[1:]), src)
            elif first == INNER_PROBE_REPLY and len(plaintext) == PROBE_LEN:
                self.hooks.probe_reply(peer, src, bytes(plaintext[1:]), now)
            elif INNER_BASE_FIRST <= first <= INNER_BASE_LAST:
                drops["malformed"] = drops.get("malformed", 0) + 1  # base messages only from a base
            else:
                drops["malformed"] = drops.get("malformed", 0) + 1
        if out:
            try:
                self.deliver(out)
            except Exception:
                log.exception("delivering %d packets failed", len(out))
        c = self.counters
        if rx_packets:
            c.inc("rx_packets", rx_packets)
            c.inc("rx_bytes", rx_bytes)
        for reason, n in drops.items():
            c.inc(reason, n)

    def _confirm(self, peer: Peer, kp: Keypair) -> None:
        """Key confirmation (responder): the initiator used our new keypair, so it becomes current."""
        with peer.lock:
            if peer.next is not kp:
                return
            old = peer.previous
            peer.previous = peer.current
            peer.current = kp
            peer.next = None
            peer.session_started = self.clock()
        if old is not None:
            self.index.remove(old.local_index, old)
        self.hooks.keypair_confirmed(peer)

    # --- TUN reader thread ---------------------------------------------------------
    def start_tun(self, tun: Any) -> None:
        """Start the thread that reads the TUN in batches and sends what it reads."""
        self._tun = tun
        self._tun_thread = threading.Thread(target=self._tun_loop, name=f"tun-rx:{tun.name}", daemon=True)
        self._tun_thread.start()

    def _tun_loop(self) -> None:
        tun = self._tun
        vnet = tun.vnet_hdr
        mtu = tun.mtu
        while True:
            try:
                reads = tun.read_many(64)
            except Exception:  # TunError once closed
                return
            if not reads:
                continue
            if vnet:
                # TSO: one read may be a 64 kB super-packet; cut it into MTU-sized packets with checksums.
                packets: list[bytes] = []
                bad = 0
                for buf in reads:
                    try:
                        packets.extend(split_for_send(buf, True, mtu))
                    except OffloadError:
                        bad += 1
                if bad:
                    self.counters.inc("malformed", bad)
            else:
                packets = reads
            try:
                self.send_packets(packets)
            except Exception:
                log.exception("sending a TUN batch failed")

    def stop_tun(self) -> None:
        """Close the TUN (wakes the reader) and join the thread."""
        if self._tun is not None:
            self._tun.close()
        if self._tun_thread is not None:
            self._tun_thread.join(timeout=5)
            self._tun_thread = None
