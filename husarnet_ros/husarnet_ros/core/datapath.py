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
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .constants import OVERLAY_PREFIX, Timers
from .counters import Counters
from .identity import format_address
from .offload import (
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_LEN,
    OffloadError,
    read_packet,
    split_for_send,
)
from .path import Path
from .peer import IndexTable, Peer
from .session import Keypair, SessionDrop, check_super, open_super, seal_super
from .superpacket import (
    REPORT_INTERVAL,
    REPORT_MESSAGES,
    REPORT_MIN_INTERVAL,
    SPARSE_REPORT_INTERVAL,
    Reassembly,
    fragment_payload,
)
from .threads import NamedThread
from .transport import AnyEndpoint, Endpoint, RelayEndpoint
from .udp import DatagramRun
from .wire import (
    DATA_HEADER,
    DATA_HEADER_LEN,
    DATA_MIN_LEN,
    DATA_SUPER_HEADER,
    DATA_SUPER_HEADER_LEN,
    INNER_PROBE,
    INNER_PROBE_REPLY,
    INNER_SUPER_REPORT,
    IPV6_HEADER_LEN,
    MSG_DATA,
    MSG_DATA_SUPER,
    PROBE_LEN,
    SUPER_INDEXES,
    SUPER_MAX_FRAGMENT,
    SUPER_MAX_FRAGMENTS,
    SUPER_MAX_PLAINTEXT,
    SUPER_MAX_SEALED,
    SUPER_REPORT_LEN,
    TAG_LEN,
    Malformed,
    build_probe_reply,
    build_super_report,
    parse_super_report,
    super_fragment_run,
    super_run_headers,
    super_run_payloads,
)

log = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
_VNET = struct.Struct("<BBHHHH")
_SUPER_BYTE = bytes((MSG_DATA_SUPER,))
_DATA_WORD = _U32.pack(MSG_DATA)
_U64 = struct.Struct("<Q")
_DONTWAIT = socket.MSG_DONTWAIT  # the UDP socket is blocking for its receiver: a lone send must never wait
#: How often (seconds) the datapath may ask the loop for a handshake for the same peer.
_HANDSHAKE_NUDGE_INTERVAL = 0.05
#: Lone packets less than this many seconds apart belong to one exchange (a request and its answer, a
#: sample and its ACK): the path warmer times its warm-ups to when exchanges begin (warmer.py).
BURST_GAP = 0.002
#: A wait for the TUN shorter than this found a packet already queued: the TUN is busy, so the next
#: read is a batch.  A longer one slept, and the packet that woke it is taken alone (issue #6).
TUN_SLEPT = 50e-6
#: The IPv6 "no next header" value and the ICMPv6 echo request type, for :func:`_kernel_may_answer`.
_NO_NEXT_HEADER, _ECHO_REQUEST = 59, 128


class ControlHooks(Protocol):
    """What the datapath needs from the engine; every method is safe to call from any thread."""

    def send_datagrams(self, datagrams: list[bytes], endpoint: AnyEndpoint) -> None: ...

    def send_control(self, datagram: bytes, endpoint: AnyEndpoint) -> None: ...

    def send_segmented(self, parts: list[bytes | memoryview], segment: int, endpoint: AnyEndpoint) -> None: ...

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
        mtu: int = 1371,
        super_packets: bool = False,
        deliver_super: Callable[[list[bytes]], None] | None = None,
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
        self._tun_skip = 0
        self._tun_thread: threading.Thread | None = None
        self._nudged: dict[bytes, float] = {}
        #: Super-packet mode (:mod:`superpacket`): on iff this node can take super-packets (TUN offload)
        #: and sends them; used per peer only where both ends agreed and the path measures clean.
        self.mtu = mtu
        self.super_packets = super_packets
        self.deliver_super = deliver_super
        # A fragment is as large as a full-size Data datagram (overlay MTU + header + tag): never larger.
        self.fragment_size = fragment_payload(mtu)
        self._reassembly = Reassembly()  # receive thread only (super fragments never come relayed)
        #: Set by the engine when the underlay is a UDP socket / the inbound side a TUN device: the lone-packet
        #: paths call them directly instead of going through the hooks' general batch calls (issue #6).
        #: ``sendto`` is the socket's bare send, taking the address ``sockaddr`` made of an endpoint (kept in
        #: the peer's :class:`Lane`); when it fails (full buffer, path error) the hooks' careful send takes over.
        self.sendto: Callable[[bytes, int, Any], object] | None = None
        self.sockaddr: Callable[[Endpoint], Any] | None = None
        self.write_direct: Callable[[bytes], None] | None = None
        #: Given (on the TUN thread) the error that stopped the TUN reader while the device was not closed by
        #: us (deleted or detached by someone else): without it the overlay would go deaf while looking healthy.
        self.on_tun_failure: Callable[[Exception], None] | None = None
        self._tun_send_lock = threading.Lock()  # TUN reads and their sends: TUN thread or _write_and_answer
        self._lane_gen = 0  # bumped by drop_lanes (whitelist changes): a lane of an older generation is stale
        #: How many exchanges of lone packets began, when the latest did and when its latest packet left
        #: (``clock`` seconds), stamped by the lone paths after their packet left: the path warmer learns
        #: the traffic's period from them, and that traffic with no pause keeps the path warm by itself.
        #: Either thread stamps; a race only blurs one stamp by the gap between two packets.
        self.bursts = 0
        self.burst_at = float("-inf")
        self.lone_at = float("-inf")
        #: Packets that entered a lone path, and that count as of the last one through: unequal while a
        #: packet is on its way (or after one a lone path declined), so the path warmer does not start
        #: a warm-up that would take the GIL from it.  A hint: a lost race only costs one warm-up's wait.
        self.lone_started = 0
        self.lone_finished = 0
        #: Called when an exchange begins, after its packet left (the engine passes PathWarmer.nudge).
        self.on_exchange: Callable[[], None] | None = None

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
        """Seal and send a batch of plain IPv6 packets (read from a TUN without virtio-net headers, or injected)."""
        if len(packets) == 1 and self._send_lone(packets[0]):
            return
        self._send_batch(packets, {}, [])

    def _send_batch(
        self,
        packets: list[bytes],
        groups: dict[AnyEndpoint, list[bytes]],
        sent_peers: list[Peer],
        sent: tuple[int, int] = (0, 0),
    ) -> None:
        """Seal a batch of packets, group the datagrams by endpoint and send each group in one transport call.

        ``groups`` may already hold datagrams per endpoint (super-packet fragments of the same TUN
        batch, for ``sent_peers``, ``sent`` = (packets, bytes)); they leave with this batch's.
        """
        now = self.clock()
        me = self.address
        peers = self.peers
        is_allowed = self.hooks.is_allowed
        drops: dict[str, int] = {}
        tx_packets, tx_bytes = sent
        fresh = False
        # Per batch, not per packet: the peer, its keypair and path, and the whitelist verdict.
        last_dst = None
        peer: Peer | None = None
        kp: Keypair | None = None
        group: list[bytes] | None = None
        seal = None
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
            dst = pkt[24:40]
            if dst != last_dst:
                last_dst = dst
                group = seal = None
                fresh = True
                peer = peers.get(dst)
                if peer is None or not is_allowed(dst):
                    peer = None
                else:
                    kp = peer.current
                    endpoint = peer.paths.endpoint
                    if kp is not None and endpoint is not None:
                        group = groups.get(endpoint)
                        if group is None:
                            groups[endpoint] = group = []
                        seal = kp.seal
            if peer is None:
                dst = bytes(dst)
                if dst[:2] != OVERLAY_PREFIX:
                    drops["unknown_peer"] = drops.get("unknown_peer", 0) + 1
                elif not is_allowed(dst):
                    drops["not_whitelisted"] = drops.get("not_whitelisted", 0) + 1
                else:
                    drops["no_session"] = drops.get("no_session", 0) + 1
                    self._nudge(dst, bytes(pkt), now)
                continue
            if seal is None or group is None:
                peer.stage(bytes(pkt))
                drops["no_session"] = drops.get("no_session", 0) + 1
                self._nudge(peer.address, None, now)
                continue
            try:
                datagram = seal(pkt)
            except SessionDrop:
                peer.stage(bytes(pkt))
                drops["expired"] = drops.get("expired", 0) + 1
                self._nudge(peer.address, None, now)
                last_dst = None  # look again: a new keypair may be current by the next packet
                continue
            group.append(datagram)
            if fresh:
                sent_peers.append(peer)
                fresh = False
            tx_packets += 1
            n = len(pkt)
            tx_bytes += n
            peer.tx_bytes += n
        self._after_send(groups, sent_peers, tx_packets, tx_bytes, drops, now)

    def _send_lone(self, buf: bytes, skip: int = 0) -> bool:
        """Seal and send one packet on its peer's lane; False (before any key is used) leaves it to the batch loop.

        Light traffic (an echo, a DDS heartbeat, a service call) arrives one packet per TUN read, and
        its latency is set by how much code runs on a CPU whose caches went cold since the last packet
        (issue #6).  So only the common case is taken here, with the least code before the send: our
        own source, to a peer with a valid :class:`Lane` (which holds the whitelist verdict and the
        socket address).  Drops and their counters, staging for a handshake, the relay: the batch loop's.
        ``skip`` is the virtio-net header's length for a TUN read with one: an all-zero header leaves
        the packet as it is; a checksum left to us (a UDP or TCP packet from a local socket: DDS, a
        service call) is completed first; segmentation (a TSO/USO read) is the batch loop's.
        """
        self.lone_started += 1
        if skip:
            if buf[1] or len(buf) > skip + self.mtu:
                return False
            if buf[0]:
                try:
                    pkt = read_packet(buf)
                except OffloadError:
                    return False  # the batch loop counts it
            else:
                pkt = buf[skip:]
        else:
            pkt = buf
        if len(pkt) < IPV6_HEADER_LEN or pkt[0] >> 4 != 6 or pkt[8:24] != self.address:
            return False
        peer = self.peers.get(pkt[24:40])
        if peer is None:
            return False
        lane = peer.lane
        if (
            lane is None
            or lane.kp is not peer.current
            or lane.path is not peer.paths.current
            or lane.gen != self._lane_gen
        ):
            lane = self._make_lane(peer)
            if lane is None:
                return False
        kp = lane.kp
        try:
            datagram = kp.seal(pkt)
        except SessionDrop:
            return False  # expired: the batch loop stages the packet and asks for a handshake
        sent = False
        if self.sendto is not None:
            try:
                self.sendto(datagram, _DONTWAIT, lane.addr)
                sent = True
            except OSError:  # a full buffer or a path error: the careful send waits for room, or counts a loss
                pass
        if not sent:
            self.hooks.send_datagrams([datagram], lane.path.endpoint)
        # Everything below runs after the packet left.
        now = self.clock()
        self._stamp_exchange(now)
        n = len(pkt)
        peer.tx_bytes += n
        peer.last_tx = peer.last_tx_data = now
        if kp.needs_rekey(now, self.timers):
            self._nudge(peer.address, None, now)
        self.counters.inc_traffic("tx_packets", "tx_bytes", n)
        return True

    def _stamp_exchange(self, now: float, data: bool = True) -> None:
        """Mark the lone packet finished, and count it as a new exchange if it came BURST_GAP after the last.

        All of it is for the path warmer: finished packets end its deferral, exchanges pace it, and a new
        one wakes it from idle (``on_exchange``).  Only ``data`` (a packet for or from the TUN) counts
        towards exchanges: a keepalive or a path probe is no one's traffic, and the warmer must neither
        pace nor wake for one (it also moves no traffic counter, which the warmer's idle rule reads).
        Called by both lone paths once their packet has left, so it costs the packet nothing.
        """
        self.lone_finished = self.lone_started
        if not data:
            return
        if now - self.lone_at > BURST_GAP:
            self.burst_at = now
            self.bursts += 1
            if self.on_exchange is not None:
                self.on_exchange()
        self.lone_at = now

    def _make_lane(self, peer: Peer) -> Lane | None:
        """The peer's lane for its current keypair and direct path, if it may have one (else None).

        The full rules run here, once per keypair, path or whitelist change: a keypair, a validated
        direct path (never the relay) and the whitelist's consent.  A whitelist change that lands
        while this runs bumps the generation, and the lane made from the old verdict is not kept.
        """
        gen = self._lane_gen
        kp = peer.current
        path = peer.paths.current
        if kp is None or path is None or type(path.endpoint) is not tuple or not self.hooks.is_allowed(peer.address):
            return None
        try:
            addr = path.endpoint if self.sockaddr is None else self.sockaddr(path.endpoint)
        except (OSError, ValueError):
            return None
        lane = Lane(kp, path, addr, gen)
        peer.lane = lane
        if self._lane_gen != gen:
            peer.lane = None
            return None
        return lane

    def drop_lanes(self) -> None:
        """Forget every peer's lane (the whitelist changed): the next packet of each goes through the full rules.

        Safe from any thread; the engine calls it from the whitelist listener, right after the change.
        """
        self._lane_gen += 1
        for peer in list(self.peers.values()):
            peer.lane = None

    def _after_send(
        self,
        groups: dict[AnyEndpoint, list[bytes]],
        sent_peers: list[Peer],
        tx_packets: int,
        tx_bytes: int,
        drops: dict[str, int],
        now: float,
    ) -> None:
        """Hand each endpoint's datagrams to the transport; per-batch peer stamps, rekey nudges and counters."""
        for endpoint, datagrams in groups.items():
            if datagrams:
                self.hooks.send_datagrams(datagrams, endpoint)
        if sent_peers:
            for peer in {id(p): p for p in sent_peers}.values():
                peer.last_tx = peer.last_tx_data = now
                kp = peer.current
                if kp is not None and kp.needs_rekey(now, self.timers):
                    self._nudge(peer.address, None, now)
        c = self.counters
        if tx_packets:
            c.inc("tx_packets", tx_packets)
            c.inc("tx_bytes", tx_bytes)
        for reason, n in drops.items():
            c.inc(reason, n)

    def send_reads(self, reads: list[bytes]) -> None:
        """A batch of TUN reads with virtio-net headers: super-packets sealed whole where agreed, the rest split.

        A TSO/USO read to a peer in super-packet mode is sealed once (virtio-net header included, so
        the receiver writes it back with its gso parameters) and leaves as fragments of at most a
        full-size Data datagram, one GSO run per super-packet.  Everything else is cut into
        MTU-sized packets with checksums (:func:`offload.split_for_send`) and sealed one by one.
        """
        if len(reads) == 1 and self._send_lone(reads[0], VNET_HDR_LEN):
            return
        self._send_read_batch(reads)

    def _send_read_batch(self, reads: list[bytes]) -> None:
        """The rules of :meth:`send_reads` for every read: super-packets, splitting, checksums, drops."""
        mtu = self.mtu
        packets: list[bytes] = []
        groups: dict[AnyEndpoint, list[bytes]] = {}
        sent_peers: list[Peer] = []
        bad = sent = sent_bytes = 0
        use_super = self.super_packets
        now = self.clock()
        for buf in reads:
            if use_super and len(buf) > VNET_HDR_LEN + mtu and buf[1] & ~VIRTIO_NET_HDR_GSO_ECN:
                n = self._send_super(buf, now, sent_peers)
                if n:
                    sent += 1
                    sent_bytes += n
                    continue
            try:
                packets.extend(split_for_send(buf, True, mtu))
            except OffloadError:
                bad += 1
        if bad:
            self.counters.inc("malformed", bad)
        if sent:
            self.counters.inc("super_tx", sent)
        if packets:
            self._send_batch(packets, groups, sent_peers, (sent, sent_bytes))
        elif sent:
            self._after_send(groups, sent_peers, sent, sent_bytes, {}, now)

    def _send_super(self, buf: bytes, now: float, sent_peers: list[Peer]) -> int:
        """Seal one super-packet read for a peer in super mode; its size, or 0 to send it per segment."""
        pkt_src = buf[VNET_HDR_LEN + 8 : VNET_HDR_LEN + 24]
        dst = bytes(buf[VNET_HDR_LEN + 24 : VNET_HDR_LEN + 40])
        if buf[VNET_HDR_LEN] >> 4 != 6 or pkt_src != self.address:
            return 0
        if len(buf) + TAG_LEN > SUPER_MAX_FRAGMENTS * self.fragment_size or len(buf) > SUPER_MAX_PLAINTEXT:
            return 0  # checked before sealing: a counter is never spent on a message we cannot send
        peer = self.peers.get(dst)
        if peer is None or not self.hooks.is_allowed(dst):
            return 0
        kp = peer.current
        endpoint = peer.paths.endpoint
        if endpoint is None or isinstance(endpoint, RelayEndpoint) or not peer.superpkt.usable(kp, now):
            return 0  # never on the relay path; never before agreement or during a loss hold
        try:
            counter, sealed = seal_super(kp, buf)
            run = super_fragment_run(kp.remote_index, counter, sealed, self.fragment_size)
        except (SessionDrop, ValueError):
            return 0
        # Sent now, not with the batch: the receiver starts on it while we seal the next one, and no
        # message sealed meanwhile on another thread (a report, a keepalive) overtakes a batch of these.
        self.hooks.send_segmented([run], DATA_SUPER_HEADER_LEN + self.fragment_size, endpoint)
        sent_peers.append(peer)
        n = len(buf) - VNET_HDR_LEN
        peer.tx_bytes += n
        return n

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
        self.hooks.send_control(datagram, endpoint)
        return True

    # --- inbound: socket -> TUN ------------------------------------------------
    def receive(self, datagram: bytes, src: AnyEndpoint) -> None:
        """One Data datagram from the transport (type already known to be 4)."""
        self.receive_many([(datagram, src)])

    def receive_many(self, batch: list[tuple[bytes, AnyEndpoint]]) -> None:
        """Open a batch of Data (and DataSuper) datagrams and deliver the IPv6 packets they carry.

        An item may be a :class:`~.udp.DatagramRun` (a GRO buffer of DataSuper fragments): its complete
        messages are joined straight from the buffer (:meth:`_expand_runs`), anything else in it is cut
        into datagrams and handled like the rest of the batch.
        """
        for item in batch:
            if type(item[0]) is DatagramRun:
                batch = self._expand_runs(batch)
                break
        else:
            if len(batch) == 1 and self.receive_lone(*batch[0]):
                return
        now = self.clock()
        me = self.address
        out: list[bytes] = []
        supers: list[bytes] = []
        drops: dict[str, int] = {}
        rx_packets = rx_bytes = 0
        index_get = self.index.get
        is_allowed = self.hooks.is_allowed
        allowed: dict[bytes, bool] = {}  # whitelist verdicts, once per peer per batch
        active: dict[int, Peer] = {}  # peers heard from in this batch
        track = self.super_packets  # message counts per keypair for the loss reports: [lo, hi, count]
        seen: dict[Keypair, list[int]] = {}
        skip = 0
        last_kp: Keypair | None = None
        last_src: AnyEndpoint | None = None
        last_named_src: AnyEndpoint | None = None
        last_peer: Peer | None = None
        last_receiver = -1  # the receiver index of the last Data datagram, and the keypair it named
        run_kp: Keypair | None = None
        for i, (datagram, src) in enumerate(batch):
            if skip:
                skip -= 1
                continue
            is_super = type(datagram) is SealedSuper or datagram[:1] == _SUPER_BYTE
            if is_super:
                if type(datagram) is SealedSuper:  # joined from a GRO buffer (_expand_runs)
                    opened = self._super_sealed(datagram, src, now, drops)
                else:  # lengths checked there: a last fragment may be tiny
                    # A whole super message in order in this batch is joined at once; anything else
                    # goes fragment by fragment through the reassembly table.
                    run = self._super_run(batch, i, src)
                    if run > 1:
                        skip = run - 1
                        opened = self._super_whole(batch, i, run, src, now, drops)
                    else:
                        opened = self._super_fragment(datagram, src, now, drops)
                if opened is None:
                    continue
                kp, plaintext, counter = opened
            else:
                # The header parsed once, and the keypair looked up once per run of datagrams to the same
                # receiver index (a GRO buffer is one): a bulk transfer pays these per datagram (issue #6).
                if len(datagram) < DATA_MIN_LEN:
                    drops["malformed"] = drops.get("malformed", 0) + 1
                    continue
                word, receiver, counter = DATA_HEADER.unpack_from(datagram)  # type word, receiver index, counter
                if word != MSG_DATA:
                    drops["malformed"] = drops.get("malformed", 0) + 1
                    continue
                if receiver != last_receiver:
                    last_receiver = receiver
                    found = index_get(receiver)
                    run_kp = found if type(found) is Keypair else None
                kp = run_kp
                if kp is None:
                    drops["unknown_peer"] = drops.get("unknown_peer", 0) + 1
                    continue
                try:
                    plaintext = kp.authenticate(counter, memoryview(datagram)[DATA_HEADER_LEN:], None)
                except SessionDrop as drop:
                    drops[drop.reason] = drops.get(drop.reason, 0) + 1
                    continue
            if track:
                t = seen.get(kp)
                if t is None:
                    seen[kp] = [counter, counter, 1]
                else:
                    if counter < t[0]:
                        t[0] = counter
                    elif counter > t[1]:
                        t[1] = counter
                    t[2] += 1
            if kp is last_kp and src == last_src:
                # Another datagram of the same session from the same endpoint: owner, whitelist verdict
                # and path were settled by the previous one in this batch (same ``now``).
                peer = last_peer
                address = peer.address
                src = last_named_src
            else:
                batch_src = src
                peer = kp.owner
                if not isinstance(peer, Peer):
                    if is_super:
                        drops["malformed"] = drops.get("malformed", 0) + 1
                    else:
                        self.hooks.base_plaintext(peer, kp, plaintext, src)
                    continue
                address = peer.address
                ok = allowed.get(address)
                if ok is None:
                    ok = allowed[address] = is_allowed(address)
                if not ok:
                    drops["not_whitelisted"] = drops.get("not_whitelisted", 0) + 1
                    continue
                if kp is peer.next:
                    self._confirm(peer, kp)
                if isinstance(src, RelayEndpoint) and src.peer_address != address:
                    src = RelayEndpoint(src.base_key, address)  # the key, not the base's stamp, names the sender
                # Authenticated and past the replay window: only now may the peer's endpoint move.
                cur = peer.paths.current
                if cur is None or cur.endpoint != src or now - cur.last_auth_rx > 0.5:
                    kind = self.hooks.path_kind(src)
                    chosen = is_super or not plaintext or plaintext[0] >> 4 == 6  # not a probe (sent everywhere)
                    with peer.lock:
                        peer.paths.on_authenticated(src, kind, now, data=chosen)
                else:
                    cur.last_auth_rx = now
                active[id(peer)] = peer
                last_kp, last_src, last_peer, last_named_src = kp, batch_src, peer, src
            if not plaintext:
                continue  # keepalive
            if is_super:
                reason = _check_super_plaintext(plaintext, address, me)
                if reason is not None:
                    drops[reason] = drops.get(reason, 0) + 1
                    continue
                supers.append(plaintext)
                n = len(plaintext) - VNET_HDR_LEN
                peer.rx_bytes += n
                peer.last_rx_data = now
                rx_packets += 1
                rx_bytes += n
                continue
            if plaintext[0] >> 4 != 6:
                self._inner_control(peer, kp, plaintext, src, now, drops)
                continue
            reason = _inner_packet_drop(plaintext, address, me)
            if reason is not None:
                drops[reason] = drops.get(reason, 0) + 1
                continue
            out.append(plaintext)
            n = len(plaintext)
            peer.rx_bytes += n
            peer.last_rx_data = now
            rx_packets += 1
            rx_bytes += n
        if active:
            wall = self.wallclock()
            for peer in active.values():
                peer.last_rx = now
                peer.last_seen_wall = wall
        if out:
            try:
                self.deliver(out)
            except Exception:
                log.exception("delivering %d packets failed", len(out))
        if supers:
            self.counters.inc("super_rx", len(supers))
            try:
                if self.deliver_super is not None:
                    self.deliver_super(supers)
            except Exception:
                log.exception("delivering %d super-packets failed", len(supers))
        if track:
            for kp, (lo, hi, count) in seen.items():
                if isinstance(kp.owner, Peer):
                    kp.owner.superpkt.count_messages(kp, lo, hi, count)
            self._super_housekeeping(active, now, drops)
        c = self.counters
        if rx_packets:
            c.inc("rx_packets", rx_packets)
            c.inc("rx_bytes", rx_bytes)
        for reason, n in drops.items():
            c.inc(reason, n)

    def _inner_control(
        self, peer: Peer, kp: Keypair, plaintext: bytes, src: AnyEndpoint, now: float, drops: dict[str, int]
    ) -> None:
        """An authenticated non-IP payload from a peer: probe, probe reply or super-packet report."""
        first = plaintext[0]
        if first == INNER_PROBE and len(plaintext) == PROBE_LEN:
            # Answer on the path the probe came in on, so that path gets validated.
            self.send_plaintext(peer, build_probe_reply(plaintext[1:]), src)
        elif first == INNER_PROBE_REPLY and len(plaintext) == PROBE_LEN:
            self.hooks.probe_reply(peer, src, bytes(plaintext[1:]), now)
        elif first == INNER_SUPER_REPORT and len(plaintext) == SUPER_REPORT_LEN:
            self._on_super_report(peer, kp, plaintext, now, drops)
        else:  # unknown, wrong length, or a base message (those only ever come from a base)
            drops["malformed"] = drops.get("malformed", 0) + 1

    def receive_lone(self, datagram: bytes, src: Any) -> bool:
        """Open and deliver one Data datagram on its peer's lane; False (before any AEAD work) leaves it to the batch.

        The receive-side twin of :meth:`_send_lone`: a lone datagram on a confirmed keypair of a
        peer with a valid :class:`Lane`, from the lane's address, skips the batch bookkeeping.  ``src``
        is the sender as the socket reported it (the form the lane keeps; an endpoint in memory mode).
        The receive rule is the same (:meth:`Keypair.open`: window check, AEAD, commit) and so are the
        inner-packet checks (:func:`_inner_packet_drop`).  Relayed datagrams, another source address
        (roaming needs the path update), the first use of a responder's next keypair (it confirms the
        keypair) and super fragments all go the batch way.  The UDP receive thread offers every lone
        datagram here first (:meth:`UdpSocket.recv_batch`), so anything but a Data message is declined.
        """
        self.lone_started += 1
        if len(datagram) < DATA_MIN_LEN or datagram[:4] != _DATA_WORD:
            return False
        kp = self.index.lookup(_U32.unpack_from(datagram, 4)[0])
        if type(kp) is not Keypair:
            return False
        peer = kp.owner
        if type(peer) is not Peer:
            return False
        lane = peer.lane
        if lane is None or lane.path is not peer.paths.current or lane.gen != self._lane_gen:
            lane = self._make_lane(peer)
            if lane is None:
                return False
        # Any keypair of the peer but a responder's unconfirmed next one (using it confirms it: the batch
        # path's job).  The previous keypair is common: after handshakes that crossed, each end may keep
        # receiving on the session it holds as previous.
        if kp is peer.next or src != lane.addr:
            return False
        c = self.counters
        counter = _U64.unpack_from(datagram, 8)[0]
        try:  # the keypair was found by the header's receiver index: its rule from the counter on
            plaintext = kp.authenticate(counter, memoryview(datagram)[DATA_HEADER_LEN:], None)
        except SessionDrop as drop:
            c.inc(drop.reason)
            return True
        drops: dict[str, int] = {}
        delivered = 0
        is_packet = bool(plaintext) and plaintext[0] >> 4 == 6  # else a keepalive or an inner control message
        if is_packet:
            reason = _inner_packet_drop(plaintext, peer.address, self.address)
            if reason is None:
                try:
                    write = self.write_direct
                    if write is None:
                        self.deliver([plaintext])
                    elif self._tun is not None and _kernel_may_answer(plaintext):
                        self._write_and_answer(write, plaintext)
                    else:
                        write(plaintext)
                except Exception:
                    log.exception("delivering a packet failed")
                delivered = len(plaintext)
            else:
                drops[reason] = 1
        # Everything below runs after the packet (and any answer) left.
        now = self.clock()
        self._stamp_exchange(now, is_packet)
        path = lane.path
        if now - path.last_auth_rx > 0.5:
            with peer.lock:  # now and then the full path rule, which may prefer another path (path.py)
                peer.paths.on_authenticated(path.endpoint, path.kind, now, data=is_packet or not plaintext)
        else:
            path.last_auth_rx = now
        peer.last_rx = now
        peer.last_seen_wall = self.wallclock()
        if delivered:
            peer.rx_bytes += delivered
            peer.last_rx_data = now
            c.inc_traffic("rx_packets", "rx_bytes", delivered)
        elif plaintext and not is_packet:  # a probe, a probe reply or a super-packet report
            self._inner_control(peer, kp, plaintext, path.endpoint, now, drops)
        if self.super_packets:
            # Loss accounting for super-packet mode: needed only at the next report, and a report due now
            # (every REPORT_INTERVAL) must not delay the packet.
            st = peer.superpkt
            st.count_messages(kp, counter, counter, 1)
            # The full look only when one may be due (SuperState.check_at): made for every packet, on a cold
            # CPU it cost a light-traffic round trip about 0.1 ms.
            if now >= st.check_at:
                self._super_housekeeping({id(peer): peer}, now, drops)
        for reason, n in drops.items():
            c.inc(reason, n)
        return True

    # --- super-packet mode: receive side -------------------------------------------
    def _super_fragment(
        self, datagram: bytes, src: AnyEndpoint, now: float, drops: dict[str, int]
    ) -> tuple[Keypair, bytes, int] | None:
        """Keep one DataSuper fragment; once its message is whole, open it: (keypair, plaintext, counter) or None.

        Every check that needs no AEAD runs before the fragment is kept: we accept super-packets at
        all, not relayed, header strict, keypair known and its counter inside the replay window.
        """
        if not self.super_packets or isinstance(src, RelayEndpoint):
            drops["fragment_dropped"] = drops.get("fragment_dropped", 0) + 1
            return None
        n = len(datagram)
        if n <= DATA_SUPER_HEADER_LEN or n > DATA_SUPER_HEADER_LEN + SUPER_MAX_FRAGMENT:
            drops["fragment_malformed"] = drops.get("fragment_malformed", 0) + 1
            return None
        word, receiver, counter, index, count, reserved = DATA_SUPER_HEADER.unpack_from(datagram)
        if word != MSG_DATA_SUPER or reserved or not index < count <= SUPER_MAX_FRAGMENTS:
            drops["fragment_malformed"] = drops.get("fragment_malformed", 0) + 1
            return None
        kp = self.index.get(receiver)
        if not isinstance(kp, Keypair) or not isinstance(kp.owner, Peer):
            drops["unknown_peer"] = drops.get("unknown_peer", 0) + 1
            return None
        verdict = check_super(kp, counter)
        if verdict is not None:
            drops[verdict] = drops.get(verdict, 0) + 1
            return None
        try:
            sealed = self._reassembly.add(receiver, kp, counter, index, count, datagram[DATA_SUPER_HEADER_LEN:], now)
        except ValueError as exc:
            reason = str(exc)
            drops[reason] = drops.get(reason, 0) + 1
            return None
        if sealed is None:
            return None
        return self._open_super_message(kp, counter, sealed, count, drops, weight=1)

    def _super_run(self, batch: list[tuple[bytes, AnyEndpoint]], i: int, src: AnyEndpoint) -> int:
        """Length of the complete in-order fragment run of one super message starting at ``batch[i]``, or 0.

        Complete means: fragments 0..count-1 in order, from one source, with one header (type,
        receiver index, counter) and count, every slice but the last of one size, the last not longer.
        """
        first = batch[i][0]
        n = len(first)
        if n <= DATA_SUPER_HEADER_LEN or n > DATA_SUPER_HEADER_LEN + SUPER_MAX_FRAGMENT or first[16] != 0:
            return 0
        count = first[17]
        if not 1 < count <= SUPER_MAX_FRAGMENTS or i + count > len(batch) or first[18:20] != b"\0\0":
            return 0
        head = first[:16]
        tail = first[17:20]
        for k in range(1, count):
            d, s2 = batch[i + k]
            if d[:16] != head or d[16] != k or d[17:20] != tail or s2 != src:
                return 0
            if len(d) != n and (k != count - 1 or len(d) > n or len(d) <= DATA_SUPER_HEADER_LEN):
                return 0
        return count

    def _super_whole(
        self,
        batch: list[tuple[bytes, AnyEndpoint]],
        i: int,
        count: int,
        src: AnyEndpoint,
        now: float,
        drops: dict[str, int],
    ) -> tuple[Keypair, bytes, int] | None:
        """Open a complete run found by :meth:`_super_run`: the same checks as fragment by fragment, once."""
        sealed = b"".join([d[DATA_SUPER_HEADER_LEN:] for d, _ in batch[i : i + count]])
        return self._super_sealed(SealedSuper(batch[i][0], sealed, count), src, now, drops)

    def _expand_runs(self, batch: list[tuple[Any, AnyEndpoint]]) -> list[tuple[Any, AnyEndpoint]]:
        """The batch with each DatagramRun's complete messages joined (SealedSuper) and the rest cut up.

        A complete message is what :meth:`_super_run` accepts, found in the buffer itself: fragments
        0..count-1 of one header, in order, every one of the run's size but the last, which may be
        shorter.  Joining happens before any key is looked up; :meth:`_super_sealed` does every check.
        """
        out: list[tuple[Any, AnyEndpoint]] = []
        for item in batch:
            run = item[0]
            if type(run) is not DatagramRun:
                out.append(item)
                continue
            src = item[1]
            data, seg = run.data, run.seg
            n = len(data)
            off = 0
            while off < n:
                count = _whole_message_at(data, off, seg)
                if count:
                    sealed = super_run_payloads(data, off, count, seg)
                    out.append((SealedSuper(data[off : off + DATA_SUPER_HEADER_LEN], sealed, count), src))
                    off += count * seg
                else:
                    out.append((data[off : off + seg], src))
                    off += seg
        return out

    def _super_sealed(
        self, msg: SealedSuper, src: AnyEndpoint, now: float, drops: dict[str, int]
    ) -> tuple[Keypair, bytes, int] | None:
        """Open one joined super message: the checks of the fragment-by-fragment path, once for all fragments."""
        count = msg.count
        if not self.super_packets or isinstance(src, RelayEndpoint):
            drops["fragment_dropped"] = drops.get("fragment_dropped", 0) + count
            return None
        word, receiver, counter, _index, _count, _reserved = DATA_SUPER_HEADER.unpack_from(msg.header)
        if word != MSG_DATA_SUPER:
            drops["fragment_malformed"] = drops.get("fragment_malformed", 0) + count
            return None
        kp = self.index.get(receiver)
        if not isinstance(kp, Keypair) or not isinstance(kp.owner, Peer):
            drops["unknown_peer"] = drops.get("unknown_peer", 0) + count
            return None
        verdict = check_super(kp, counter)
        if verdict is not None:
            drops[verdict] = drops.get(verdict, 0) + count
            return None
        self._reassembly.forget_message(receiver, counter)  # stray earlier copies of these fragments
        return self._open_super_message(kp, counter, msg.sealed, count, drops, weight=count)

    def _open_super_message(
        self, kp: Keypair, counter: int, sealed: bytes, count: int, drops: dict[str, int], *, weight: int
    ) -> tuple[Keypair, bytes, int] | None:
        """Open a reassembled super message (one AEAD call) and count its fragments as received.

        ``weight`` is how many fragments an oversize message counts as dropped: the one that completed
        it on the fragment-by-fragment path, the whole run on the fast path.
        """
        if len(sealed) > SUPER_MAX_SEALED:
            drops["fragment_malformed"] = drops.get("fragment_malformed", 0) + weight
            return None
        try:
            plaintext = open_super(kp, counter, sealed)
        except SessionDrop as drop:
            drops[drop.reason] = drops.get(drop.reason, 0) + 1
            return None
        kp.owner.superpkt.rx_received += count
        return kp, plaintext, counter

    def _super_housekeeping(self, active: dict[int, Peer], now: float, drops: dict[str, int]) -> None:
        """Expire stale reassemblies (counted as missing), then send the reports that are due."""
        if len(self._reassembly):
            for kp, received, missing in self._reassembly.expire(now):
                st = kp.owner.superpkt
                st.rx_received += received
                st.rx_missing += missing
                active[id(kp.owner)] = kp.owner
                drops["reassembly_timeout"] = drops.get("reassembly_timeout", 0) + 1
        for peer in active.values():
            st = peer.superpkt
            since = now - st.reported_at
            kp = peer.current
            if kp is None:
                continue
            agreed = st.is_agreed(kp)
            due = (
                (st.rx_missing and since >= REPORT_MIN_INTERVAL)
                or (st.rx_received and since >= REPORT_INTERVAL)
                or (
                    agreed
                    and (
                        st.announced is not kp
                        or (
                            st.msg_count
                            and since >= REPORT_INTERVAL
                            and (st.msg_count >= REPORT_MESSAGES or since >= SPARSE_REPORT_INTERVAL)
                        )
                        or (since >= REPORT_MIN_INTERVAL and st.gaps())
                    )
                )
            )
            if due and self.send_plaintext(peer, build_super_report(True, *st.take_report())):
                st.reported_at = now
                st.announced = kp
            # When the lone receive path looks again: what may fall due REPORT_MIN_INTERVAL after the last
            # report (or at once, if its send failed) is looked for then; anything else no sooner than
            # REPORT_INTERVAL from now, unless a message out of order or another session comes first
            # (SuperState.check_at).  Clean light traffic is then looked at every REPORT_INTERVAL, not
            # every packet: the look cost the receive about 17 us after its packet on a cold CPU.
            if st.rx_missing or st.gaps() or (agreed and st.announced is not kp):
                st.check_at = st.reported_at + REPORT_MIN_INTERVAL
            else:
                st.check_at = now + REPORT_INTERVAL

    # --- super-packet mode: send side (reports from the receiver) ------------------
    def _on_super_report(self, peer: Peer, kp: Keypair, plaintext: bytes, now: float, drops: dict[str, int]) -> None:
        """The peer accepts DataSuper on ``kp`` and/or tells us how many of our fragments went missing."""
        if not self.super_packets:
            drops["malformed"] = drops.get("malformed", 0) + 1  # we never offered super-packets
            return
        try:
            report = parse_super_report(plaintext)
        except Malformed:
            drops["malformed"] = drops.get("malformed", 0) + 1
            return
        st = peer.superpkt
        if report.accept:
            st.agree(kp)  # authenticated on this session: both ends have agreed
        if st.on_report(report.received, report.missing, report.messages, report.span, now):
            self.counters.inc("super_fallback")
            log.info(
                "super-packets to %s: %d of %d messages lost (%d fragments missing), per-segment for >= %.0f s",
                format_address(peer.address),
                report.span - report.messages,
                report.span,
                report.missing,
                st.hold,
            )

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
        self._tun_skip = VNET_HDR_LEN if tun.vnet_hdr else 0  # what _send_lone skips of each read
        self._tun_thread = NamedThread(target=self._tun_loop, name=f"tun-rx:{tun.name}", daemon=True)
        self._tun_thread.start()

    def _tun_loop(self) -> None:
        tun = self._tun
        self.mtu = tun.mtu
        self.fragment_size = fragment_payload(tun.mtu)
        lock = self._tun_send_lock
        skip = self._tun_skip
        send_lone = self._send_lone
        read_one = tun.read_one
        clock = self.clock
        woke = False
        while True:
            try:
                # Read and send under one lock: the UDP thread may send an answer it finds on the TUN
                # (_write_and_answer), and the lock keeps what leaves in the order the TUN gave it.  A read
                # that ends a sleep is taken alone: after idle it almost always is, and a drain attempt
                # (a failing read) would sit on its path on a cold CPU.  The lone send is called from here
                # directly: on a cold CPU each call layer on the way to the socket costs latency (issue #6).
                lone = False
                answering = not lock.acquire(blocking=False)
                if answering:
                    # The receive thread holds it: it is writing a packet to the TUN and taking the answer
                    # the kernel queued meanwhile, most likely the very packet that woke us.  So look before
                    # reading: a read that finds nothing raises, which costs about 30 us on a cold CPU.
                    lock.acquire()
                try:
                    if woke:
                        buf = read_one() if not answering or tun.wait_readable(0) else None
                        got = buf is not None
                        if got:
                            try:
                                lone = sent = send_lone(buf, skip)
                            except Exception:
                                log.exception("sending a TUN read failed")
                                sent = True
                            if not sent:
                                self._send_read_slow(buf)
                    else:
                        reads = tun.read_ready(64)
                        got = bool(reads)
                        if got:
                            self._send_tun_reads(reads)
                finally:
                    lock.release()
                if got and not lone:
                    woke = False  # a backlog, or bulk traffic: drain it in batches
                    continue
                # Nothing queued, or a lone packet just left: wait, without a drain attempt after it.  That
                # failing read (and its exception) ran while the packet's answer was on its way: on a
                # 2-CPU machine this thread is often preempted by the receiver it woke, and finished the
                # attempt just as the answer came, on the CPU the kernel then woke the application on.  A
                # packet already queued ends the wait at once, and is then read in a batch: under load
                # batches still form.
                started = clock()
                tun.wait_readable()
                woke = clock() - started >= TUN_SLEPT
            except Exception as exc:  # TunError once closed by stop_tun: the normal end
                if not tun.closed:
                    self._tun_failed(exc)
                return

    def _tun_failed(self, exc: Exception) -> None:
        """The TUN reader ends on an error it cannot recover from: whoever set ``on_tun_failure`` reports it."""
        notify = self.on_tun_failure
        if notify is None:
            log.error("the TUN reader stopped: %s", exc, exc_info=exc)
            return
        try:
            notify(exc)
        except Exception:
            log.exception("reporting the TUN failure failed")

    def _send_read_slow(self, buf: bytes) -> None:
        """One TUN read on its own that :meth:`_send_lone` declined: the batch loop's rules for it."""
        try:
            if self._tun.vnet_hdr:
                self._send_read_batch([buf])
            else:
                self._send_batch([buf], {}, [])
        except Exception:
            log.exception("sending a TUN read failed")

    def _send_tun_reads(self, reads: list[bytes]) -> None:
        """Seal and send TUN reads: with virtio-net headers (TSO super-packets) or plain packets."""
        try:
            if self._tun.vnet_hdr:
                self.send_reads(reads)
            else:
                self.send_packets(reads)
        except Exception:
            log.exception("sending a TUN batch failed")

    def _write_and_answer(self, write: Callable[[bytes], None], packet: bytes) -> None:
        """Write a received packet to the TUN and send, from this (the UDP) thread, the answer it queued.

        An echo reply, a TCP ACK or a service's quick response is usually queued while our write is
        still in the kernel.  Sending it from this thread, awake and on a warm CPU, saves the TUN
        thread's wake-up and its cold start: about 0.1 ms of a light-traffic round trip here (issue #6).
        The write is made holding the TUN thread's lock: the answer wakes the TUN thread during the
        write, and unlocked it took the answer first in a third of the round trips (100 Hz pings);
        locked it waits for us and then finds nothing.  When the TUN thread holds the lock (it is
        reading or sending) the packet is written all the same and the TUN thread takes the answer, so
        what leaves stays in the TUN's order.  One answer at most: the TUN thread takes the rest.
        """
        lock = self._tun_send_lock
        if not lock.acquire(blocking=False):
            write(packet)
            return
        try:
            write(packet)  # an error is the caller's to report; the lock is released all the same
            try:
                buf = self._tun.read_one()
            except Exception:  # TunError once closed: the TUN thread ends on its own
                return
            try:
                if buf is not None and not self._send_lone(buf, self._tun_skip):
                    self._send_read_slow(buf)
            except Exception:
                log.exception("sending a TUN answer failed")
        finally:
            lock.release()

    def stop_tun(self) -> None:
        """Close the TUN (wakes the reader) and join the thread."""
        if self._tun is not None:
            self._tun.close()
        if self._tun_thread is not None:
            self._tun_thread.join(timeout=5)
            self._tun_thread = None


class Lane:
    """A peer's current keypair on its current direct path, with the checks that need doing once done once.

    Why: on light traffic every packet meets a CPU whose caches went cold since the last one, and a
    hop's latency grows with the code and data it touches (issue #6).  The whitelist verdict, the
    socket address and the pairing of keypair and path are settled when the lane is made
    (:meth:`Datapath._make_lane`); each packet then only checks that nothing moved since: the same
    keypair and path are current and the whitelist has not changed (:meth:`Datapath.drop_lanes`).
    """

    __slots__ = ("addr", "gen", "kp", "path")

    def __init__(self, kp: Keypair, path: Path, addr: Any, gen: int) -> None:
        self.kp = kp
        self.path = path
        self.addr = addr  # the socket's form of path.endpoint (the endpoint itself without a socket)
        self.gen = gen


class SealedSuper:
    """A whole super message joined from its fragments: the first fragment's header and the sealed bytes."""

    __slots__ = ("count", "header", "sealed")

    def __init__(self, header: bytes, sealed: bytes, count: int) -> None:
        self.header = header
        self.sealed = sealed
        self.count = count


def _whole_message_at(data: bytes, off: int, seg: int) -> int:
    """Fragments of the complete super message starting at ``data[off]`` in a GRO buffer, or 0.

    The rules of :meth:`Datapath._super_run`: fragment 0 of ``count`` (2..64) with a zero reserved
    field, fragments 1..count-1 following at ``seg`` bytes with the same type word, receiver index,
    counter and count, each ``seg`` bytes long but the last, which may be shorter (it ends the buffer).
    """
    n = len(data)
    if seg <= DATA_SUPER_HEADER_LEN or seg > DATA_SUPER_HEADER_LEN + SUPER_MAX_FRAGMENT or n - off <= seg:
        return 0
    if data[off] != MSG_DATA_SUPER or data[off + 16] != 0:
        return 0
    count = data[off + 17]
    last = off + (count - 1) * seg
    if not 1 < count <= SUPER_MAX_FRAGMENTS or data[off + 18 : off + 20] != b"\0\0" or last >= n:
        return 0
    if n - last <= DATA_SUPER_HEADER_LEN:
        return 0
    # All headers at once, not fragment by fragment (a Python loop cost more than the AEAD, issue #6):
    # the index column must read 0..count-1; with it zeroed, every header must be fragment 0's.
    heads = super_run_headers(data, off, count, seg)
    if heads[16::DATA_SUPER_HEADER_LEN] != SUPER_INDEXES[:count]:
        return 0
    heads[16::DATA_SUPER_HEADER_LEN] = bytes(count)
    if heads != heads[:DATA_SUPER_HEADER_LEN] * count:
        return 0
    return count


def _kernel_may_answer(packet: bytes) -> bool:
    """Whether the kernel may queue an answer to ``packet`` on the TUN while we write it (a checked IPv6 packet).

    It answers in the write's own softirq only what it handles itself: an echo request (the reply), a
    TCP segment (an ACK, a SYN-ACK, a reset).  A UDP datagram's answer (DDS, a service call) comes from
    a process that the write only wakes and that cannot run before the write returns, so looking for it
    is a read that fails: on a cold CPU about 30 us (the error it raises), right where the woken
    process may be waiting for this CPU.  Nor does an echo reply or any other ICMPv6 message get an
    answer.  Anything else (extension headers, other protocols) is looked for, as before.
    """
    next_header = packet[6]
    if next_header in (IPPROTO_UDP, _NO_NEXT_HEADER):
        return False
    if next_header == IPPROTO_ICMPV6:
        return len(packet) > IPV6_HEADER_LEN and packet[IPV6_HEADER_LEN] == _ECHO_REQUEST
    return True


def _inner_packet_drop(plaintext: bytes, peer_address: bytes, me: bytes) -> str | None:
    """Why an opened IPv6 packet must not reach the TUN (drop counter name), or None if it may.

    Its source must be the peer whose key opened it; its destination us, or multicast.
    """
    if len(plaintext) < IPV6_HEADER_LEN:
        return "malformed"
    if plaintext[8:24] != peer_address:
        return "bad_inner_src"
    if plaintext[24:40] != me and plaintext[24] != 0xFF:
        return "bad_inner_dst"
    return None


def _check_super_plaintext(plaintext: bytes, peer_address: bytes, me: bytes) -> str | None:
    """Why an opened super-packet must not reach the TUN (drop counter name), or None if it may.

    The plaintext is a virtio-net header and one IPv6 packet.  Its inner source must be the
    authenticated peer and its destination us (unicast only); the gso parameters must describe a
    TCP or UDP packet whose checksum field lies inside it, so the kernel never gets offsets that
    point elsewhere.
    """
    n = len(plaintext)
    if n < VNET_HDR_LEN + IPV6_HEADER_LEN or plaintext[VNET_HDR_LEN] >> 4 != 6:
        return "bad_super_hdr"
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(plaintext)
    pkt_len = n - VNET_HDR_LEN
    if plaintext[VNET_HDR_LEN + 8 : VNET_HDR_LEN + 24] != peer_address:
        return "bad_inner_src"
    if plaintext[VNET_HDR_LEN + 24 : VNET_HDR_LEN + 40] != me:
        return "bad_inner_dst"
    gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    nh = plaintext[VNET_HDR_LEN + 6]
    if gso == VIRTIO_NET_HDR_GSO_TCPV6:
        if nh != IPPROTO_TCP or gso_size == 0:
            return "bad_super_hdr"
    elif gso == VIRTIO_NET_HDR_GSO_UDP_L4:
        if nh != IPPROTO_UDP or gso_size == 0:
            return "bad_super_hdr"
    elif gso != VIRTIO_NET_HDR_GSO_NONE:
        return "bad_super_hdr"
    if flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM or hdr_len > pkt_len:
        return "bad_super_hdr"
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and (csum_start < IPV6_HEADER_LEN or csum_start + csum_offset + 2 > pkt_len):
        return "bad_super_hdr"
    return None
