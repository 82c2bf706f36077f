"""virtio-net header, TSO/USO splitting on send and TCP coalescing (GRO) on receive.

Why: a TUN device opened with ``IFF_VNET_HDR`` and TSO/USO offloads hands the
data plane one 64 kB TCP super-packet per read instead of ~46 MTU-sized
packets, and accepts the same on write.  Python pays per packet, so these
offloads are what make a Python tunnel fast.  The peer-to-peer wire still
carries ordinary IPv6 packets that fit the overlay MTU (each sealed on its own,
so one lost datagram costs one TCP segment, not a whole super-packet):

* send: :func:`split_for_send` turns one TUN read into complete IPv6 packets
  with correct lengths, sequence numbers, flags and full checksums;
* receive: :class:`Coalescer` merges consecutive in-order segments of one TCP
  flow back into a GSO super-packet for one TUN write, exactly as
  wireguard-go's ``tun/offload_linux.go`` does (gso TCPV6, NEEDS_CSUM, the
  pseudo-header sum in the checksum field); everything else passes through
  with a plain header.

Checksums use the identity "one's-complement sum of 16-bit words == the
number's value mod 0xffff" (2**16 == 1 mod 0xffff), so CPython's C bignum
code does the per-byte work: ``int.from_bytes(data, "big") % 0xffff``.

Everything here is pure (no I/O; the one side effect: the first TSO read to
split imports numpy, see :func:`load_numpy`) and every parser raises
:class:`OffloadError` (a ``ValueError``) on malformed input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

VNET_HDR_LEN = 10

VIRTIO_NET_HDR_F_NEEDS_CSUM = 0x01
VIRTIO_NET_HDR_F_DATA_VALID = 0x02

VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

IPV6_HDR_LEN = 40
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
TCP_MIN_HDR_LEN = 20
UDP_HDR_LEN = 8
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

MAX_PACKET = 65535  # largest IPv6 packet (header + payload) a TUN write may carry
MAX_SEGMENTS = 64  # bound on one coalesced super-packet (Linux's GRO limit is 64 segments too)

# A TUN write of a packet that needs nothing from the kernel but normal receive processing.
PLAIN_VNET_HDR = bytes(VNET_HDR_LEN)

_VNET = struct.Struct("<BBHHHH")  # little-endian: the host order of every platform we run on
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_TCP_FIXED = struct.Struct(">IIBBHHH")  # seq, ack, data offset, flags, window, checksum, urgent
_SEG_HDR = struct.Struct(">4sH34s4sIIBBHHH")  # IPv6 header (payload length apart) + fixed TCP header

# numpy (it comes with the ROS wheels) sums the checksum chunks of a TSO read vectorised (_chunk_sums).
# It is not imported with this module: the import takes 0.1-0.15 s here, a fifth of a node's start-up
# (issue #3 counts set-up time from the process start), and only bulk transfers need it.  The first TSO
# read with several segments imports it, in the thread that splits the read: a one-off pause of the first
# bulk transfer.  Not on a thread of its own: while an import runs, sys.modules holds the module half
# made, and code elsewhere in the process that looks there first (hypothesis does) fails on it.
_np: Any = None
_numpy_tried = False


def load_numpy() -> bool:
    """Import numpy for the vectorised checksums now; False when it is not installed (the bignum path stays)."""
    global _np, _numpy_tried
    _numpy_tried = True
    try:
        import numpy
    except ImportError:  # pragma: no cover - exercised where numpy is absent
        return False
    _np = numpy
    return True


class OffloadError(ValueError):
    """A TUN read or a packet that cannot be split or parsed (malformed or unsupported)."""


@dataclass(frozen=True)
class VnetHdr:
    """``struct virtio_net_hdr`` (without ``num_buffers``): what the kernel says about one TUN packet."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0


def parse_vnet_hdr(buf: bytes | bytearray | memoryview) -> VnetHdr:
    if len(buf) < VNET_HDR_LEN:
        raise OffloadError(f"virtio-net header needs {VNET_HDR_LEN} bytes, got {len(buf)}")
    return VnetHdr(*_VNET.unpack_from(buf, 0))


def build_vnet_hdr(h: VnetHdr) -> bytes:
    for name in ("flags", "gso_type"):
        if not 0 <= getattr(h, name) <= 0xFF:
            raise OffloadError(f"virtio-net {name} out of range")
    for name in ("hdr_len", "gso_size", "csum_start", "csum_offset"):
        if not 0 <= getattr(h, name) <= 0xFFFF:
            raise OffloadError(f"virtio-net {name} out of range")
    return _VNET.pack(h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset)


# --- checksums ---------------------------------------------------------------


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Unfolded one's-complement sum of ``data`` as 16-bit big-endian words (odd tail zero-padded), mod 0xffff."""
    v = int.from_bytes(data, "big")
    if len(data) & 1:
        v <<= 8
    return v % 0xFFFF


def fold(total: int) -> int:
    """Fold an unbounded sum to 16 bits; a non-zero sum never folds to 0 (one's-complement -0 is 0xffff)."""
    s = total % 0xFFFF
    return 0xFFFF if s == 0 and total else s


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of ``data`` added to an unfolded ``initial`` sum."""
    return ~fold(initial + ones_sum(data)) & 0xFFFF


def ipv6_pseudo_sum(src_dst: bytes | bytearray | memoryview, proto: int, length: int) -> int:
    """Unfolded sum of the IPv6 pseudo-header (RFC 8200 8.1); ``src_dst`` = the 32 address bytes."""
    return int.from_bytes(src_dst, "big") + length + proto


def _udp_final(c: int) -> int:
    return 0xFFFF if c == 0 else c  # RFC 768/8200: a computed 0 is sent as 0xffff


# --- send side: one TUN read -> packets that fit the overlay MTU ---------------


def split_for_send(buf: bytes | bytearray | memoryview, vnet: bool, mss_limit: int) -> list[bytes]:
    """Complete IPv6 packets, each at most ``mss_limit`` bytes (the overlay MTU), from one TUN read.

    ``buf`` is what :meth:`TunDevice.read` returned: with ``vnet`` a virtio-net header and possibly
    a TCP (TSO) or UDP (USO) super-packet and/or a packet whose checksum the kernel left to us
    (NEEDS_CSUM); without ``vnet`` one plain packet.  Raises :class:`OffloadError` for reads that
    cannot be turned into valid packets (the caller counts and drops them).
    """
    if not vnet:
        if len(buf) > mss_limit:
            raise OffloadError(f"packet of {len(buf)} bytes exceeds the MTU {mss_limit}")
        return [bytes(buf)]
    if len(buf) < VNET_HDR_LEN:
        raise OffloadError(f"virtio-net header needs {VNET_HDR_LEN} bytes, got {len(buf)}")
    # Plain tuple unpack, not VnetHdr: this runs once per TUN read (also for every small packet).
    _flags, gso_type, _hdr_len, gso_size, csum_start, _csum_offset = _VNET.unpack_from(buf, 0)
    pkt = memoryview(buf)[VNET_HDR_LEN:]
    if len(pkt) < IPV6_HDR_LEN or pkt[0] >> 4 != 6:
        if len(pkt) and pkt[0] >> 4 == 4:
            raise OffloadError("IPv4 packet: the overlay carries IPv6 only")
        raise OffloadError("not an IPv6 packet")
    gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        if len(pkt) > mss_limit:
            raise OffloadError(f"packet of {len(pkt)} bytes exceeds the MTU {mss_limit}")
        return [bytes(read_packet(buf))]  # its checksum completed if the kernel left it to us
    if gso == VIRTIO_NET_HDR_GSO_TCPV6:
        return _split_tcp(pkt, gso_size, csum_start, mss_limit)
    if gso == VIRTIO_NET_HDR_GSO_UDP_L4:
        return _split_udp(pkt, gso_size, csum_start, mss_limit)
    raise OffloadError(f"unsupported gso_type {gso_type}")


def read_packet(buf: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """The packet of a TUN read that holds one (no segmentation), its checksum completed where the kernel left it to us.

    What the kernel's skb_checksum_help does for NEEDS_CSUM (a UDP or TCP packet from a local socket:
    a DDS datagram, a service call): the checksum field holds the pseudo-header sum, and the sum runs
    from ``csum_start`` to the end.  The caller has checked that the read asks for no segmentation
    and fits the MTU.  The light-traffic send path (``Datapath._send_lone``) calls this for every such
    read, so it is one call of plain arithmetic: after 10 ms idle, split_for_send's layers of helpers
    took 19 us for a 112-byte UDP packet, this takes 6 (issue #6).  Raises :class:`OffloadError` for
    checksum offsets outside the packet.
    """
    if len(buf) < VNET_HDR_LEN:
        raise OffloadError(f"virtio-net header needs {VNET_HDR_LEN} bytes, got {len(buf)}")
    flags, _gso_type, _hdr_len, _gso_size, start, offset = _VNET.unpack_from(buf, 0)
    if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return buf[VNET_HDR_LEN:]
    begin = VNET_HDR_LEN + start
    at = begin + offset
    if start < IPV6_HDR_LEN or at + 2 > len(buf):
        raise OffloadError("checksum offsets outside the packet")
    total = int.from_bytes(buf[begin:], "big")  # as ones_sum() and checksum(), inline
    if (len(buf) - begin) & 1:
        total <<= 8
    # Never 0 (the sum mod 0xffff is at most 0xfffe): a UDP checksum needs no 0 -> 0xffff (RFC 768).
    c = ~(total % 0xFFFF) & 0xFFFF
    return b"".join((buf[VNET_HDR_LEN:at], c.to_bytes(2, "big"), buf[at + 2 :]))


def _chunk_sums(payload: memoryview, seg: int) -> list[int]:
    """One's-complement sums (unfolded) of every ``seg``-sized chunk of ``payload``; the last may be short.

    numpy, once loaded, sums all full chunks in one vectorised call, about 8x faster than per-chunk
    bignum arithmetic; until then (or without numpy) the bignum path.  An odd chunk size (the
    usual one: MSS 1299 at MTU 1371 with TCP timestamps) is summed as its even-offset bytes (high
    halves of the 16-bit words, the last one zero-padded) and its odd-offset bytes (low halves).
    """
    total = len(payload)
    full = total // seg
    sums: list[int]
    if full > 1 and not _numpy_tried:
        load_numpy()
    np = _np
    if np is not None and full > 1 and not seg & 1:
        words = np.frombuffer(payload, dtype=">u2", count=full * seg // 2).reshape(full, seg // 2)
        sums = words.sum(axis=1, dtype=np.uint32).tolist()
    elif np is not None and full > 1:
        rows = np.frombuffer(payload, dtype=np.uint8, count=full * seg).reshape(full, seg)
        high = rows[:, 0::2].sum(axis=1, dtype=np.uint32)
        low = rows[:, 1::2].sum(axis=1, dtype=np.uint32)
        sums = (high * 256 + low).tolist()
    else:
        sums = [ones_sum(payload[i * seg : (i + 1) * seg]) for i in range(full)]
    if full * seg < total or total == 0:
        sums.append(ones_sum(payload[full * seg :]))
    return sums


def _split_tcp(pkt: memoryview, gso_size: int, csum_start: int, limit: int) -> list[bytes]:
    l4 = csum_start or IPV6_HDR_LEN
    n = len(pkt)
    if l4 < IPV6_HDR_LEN or l4 + TCP_MIN_HDR_LEN > n:
        raise OffloadError("TSO packet: TCP header outside the packet")
    if l4 == IPV6_HDR_LEN and pkt[6] != IPPROTO_TCP:
        raise OffloadError("TSO packet that is not TCP")
    doff = (pkt[l4 + 12] >> 4) * 4
    hdrs = l4 + doff
    if doff < TCP_MIN_HDR_LEN or hdrs > n:
        raise OffloadError("TSO packet: bad TCP data offset")
    seg = min(gso_size, limit - hdrs)
    if seg <= 0:
        raise OffloadError(f"TSO segment size {gso_size} does not fit MTU {limit}")
    payload = pkt[hdrs:]
    # Fixed parts, summed once: addresses + protocol, ports, ack, data offset, window, urgent,
    # options.  Per segment only seq, flags and length change, and a field's contribution to a
    # mod-0xffff sum is its value, so the checksum is a few additions.
    ip_head = bytes(pkt[:4])
    ip_tail = bytes(pkt[6:l4])  # next header, hop limit, addresses, extension headers
    ports = bytes(pkt[l4 : l4 + 4])
    seq0, ack, doff_byte, flags, window, _csum, urgent = _TCP_FIXED.unpack_from(pkt, l4 + 4)
    options = bytes(pkt[l4 + TCP_MIN_HDR_LEN : hdrs])
    base = (
        int.from_bytes(pkt[8:40], "big")
        + IPPROTO_TCP
        + int.from_bytes(ports, "big")
        + ack
        + (doff_byte << 8)
        + window
        + urgent
        + int.from_bytes(options, "big")
    )
    ext_len = l4 - IPV6_HDR_LEN
    sums = _chunk_sums(payload, seg)
    last_i = len(sums) - 1
    pack = (_SEG_HDR if l4 == IPV6_HDR_LEN else struct.Struct(f">4sH{l4 - 6}s4sIIBBHHH")).pack
    out: list[bytes] = []
    append = out.append
    for i, csum in enumerate(sums):
        off = i * seg
        chunk = payload[off : off + seg]
        tlen = doff + len(chunk)
        f = flags if i == last_i else flags & ~(TCP_FIN | TCP_PSH)
        if i:
            f &= ~TCP_CWR
        seq = (seq0 + off) & 0xFFFFFFFF
        v = (base + tlen + seq + f + csum) % 0xFFFF
        head = pack(
            ip_head, ext_len + tlen, ip_tail, ports, seq, ack, doff_byte, f, window, ~(v or 0xFFFF) & 0xFFFF, urgent
        )
        append(b"".join((head, options, chunk)))
    return out


def _split_udp(pkt: memoryview, gso_size: int, csum_start: int, limit: int) -> list[bytes]:
    l4 = csum_start or IPV6_HDR_LEN
    n = len(pkt)
    if l4 < IPV6_HDR_LEN or l4 + UDP_HDR_LEN > n:
        raise OffloadError("USO packet: UDP header outside the packet")
    if l4 == IPV6_HDR_LEN and pkt[6] != IPPROTO_UDP:
        raise OffloadError("USO packet that is not UDP")
    hdrs = l4 + UDP_HDR_LEN
    seg = gso_size
    if seg <= 0 or hdrs + seg > limit:
        # UDP datagrams cannot be re-cut: the application chose the size.
        raise OffloadError(f"USO segment size {gso_size} does not fit MTU {limit}")
    ip = bytearray(pkt[:l4])
    uh = bytearray(pkt[l4:hdrs])
    addr_sum = int.from_bytes(pkt[8:40], "big") + IPPROTO_UDP
    ext_len = l4 - IPV6_HDR_LEN
    payload = pkt[hdrs:]
    out: list[bytes] = []
    for off in range(0, max(len(payload), 1), seg):
        chunk = payload[off : off + seg]
        ulen = UDP_HDR_LEN + len(chunk)
        _U16.pack_into(uh, 4, ulen)
        uh[6] = uh[7] = 0
        c = checksum(chunk, addr_sum + ulen + int.from_bytes(uh, "big"))
        _U16.pack_into(uh, 6, _udp_final(c))
        _U16.pack_into(ip, 4, ext_len + ulen)
        out.append(b"".join((ip, uh, chunk)))
    return out


# --- receive side: packets -> TUN writes, TCP segments coalesced ---------------


class _Group:
    """An open run of in-order segments of one TCP flow, to become one GSO super-packet."""

    __slots__ = ("ackdoff", "count", "doff", "gso", "head", "length", "next_seq", "opts", "payloads", "pre", "psh")

    def __init__(self, head: bytes, doff: int, seq: int, plen: int, psh: bool) -> None:
        self.head = head
        self.doff = doff
        self.pre = head[:4]  # version, traffic class, flow label
        self.ackdoff = head[48:53]  # acknowledgment number and data offset
        self.opts = head[60 : IPV6_HDR_LEN + doff]
        self.gso = plen
        self.payloads = [memoryview(head)[IPV6_HDR_LEN + doff :]]
        self.count = 1
        self.next_seq = (seq + plen) & 0xFFFFFFFF
        self.length = len(head)
        self.psh = psh

    def build(self) -> bytes:
        head = self.head
        if self.count == 1:
            return PLAIN_VNET_HDR + head
        doff = self.doff
        hdrs = IPV6_HDR_LEN + doff
        tlen = self.length - IPV6_HDR_LEN
        ip = bytearray(head[:IPV6_HDR_LEN])
        _U16.pack_into(ip, 4, tlen)
        th = bytearray(head[IPV6_HDR_LEN:hdrs])
        if self.psh:
            th[13] |= TCP_PSH
        # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, the kernel adds the rest.
        _U16.pack_into(th, TCP_CSUM_OFFSET, fold(ipv6_pseudo_sum(ip[8:40], IPPROTO_TCP, tlen)))
        vh = _VNET.pack(
            VIRTIO_NET_HDR_F_NEEDS_CSUM,
            VIRTIO_NET_HDR_GSO_TCPV6,
            hdrs,
            self.gso,
            IPV6_HDR_LEN,
            TCP_CSUM_OFFSET,
        )
        return b"".join((vh, ip, th, *self.payloads))


class Coalescer:
    """Receive-side GRO: collect decrypted IPv6 packets, then :meth:`flush` them as TUN writes.

    Merges consecutive in-order TCP segments of one flow (same addresses and ports, contiguous
    sequence numbers, same ACK number, only ACK/PSH flags, identical IPv6 traffic class/flow label/hop
    limit and TCP options, equal sizes except a smaller last one, PSH only on the last) into one
    ``GSO_TCPV6`` super-packet.  Everything else (other protocols, extension headers, fragments,
    SYN/FIN/RST, pure ACKs) passes through unchanged with a plain header.  Packets of one flow keep
    their order.  With ``vnet=False`` (a TUN without virtio-net headers) it returns the packets as they
    came.  Not thread-safe: one per receive thread.  This is the receive hot path (one call per
    packet), hence the flat code.
    """

    def __init__(self, vnet: bool = True, max_packet: int = MAX_PACKET, max_segments: int = MAX_SEGMENTS) -> None:
        if not IPV6_HDR_LEN + TCP_MIN_HDR_LEN < max_packet <= MAX_PACKET:
            raise ValueError("max_packet out of range")
        self.vnet = vnet
        self.max_packet = max_packet
        self.max_segments = max(1, max_segments)
        self._out: list[bytes | _Group] = []
        self._open: dict[bytes, _Group] = {}

    def __len__(self) -> int:
        return len(self._out)

    def add(self, packet: bytes) -> None:
        """Queue one IPv6 packet (already authenticated and checked by the caller)."""
        n = len(packet)
        if n < 60 or packet[6] != IPPROTO_TCP or packet[0] >> 4 != 6 or not self.vnet:
            self._out.append(PLAIN_VNET_HDR + packet if self.vnet else packet)
            return
        doff = (packet[52] >> 4) << 2
        plen = n - IPV6_HDR_LEN - doff
        key = packet[8:44]  # addresses and ports
        if (
            plen <= 0
            or doff < TCP_MIN_HDR_LEN
            or packet[53] & ~TCP_PSH != TCP_ACK
            or (packet[4] << 8 | packet[5]) != n - IPV6_HDR_LEN
        ):
            # Not coalescable; also ends the flow's open run so the flow keeps its order.
            self._open.pop(key, None)
            self._out.append(PLAIN_VNET_HDR + packet)
            return
        seq = int.from_bytes(packet[44:48], "big")
        psh = packet[53] & TCP_PSH
        opened = self._open
        g = opened.get(key)
        if g is not None:
            if (
                seq == g.next_seq
                and plen <= g.gso
                and packet[48:53] == g.ackdoff
                and packet[:4] == g.pre
                and packet[7] == g.head[7]  # hop limit
                and (doff == TCP_MIN_HDR_LEN or packet[60 : IPV6_HDR_LEN + doff] == g.opts)
                and g.length + plen <= self.max_packet
                and g.count < self.max_segments
            ):
                g.payloads.append(memoryview(packet)[IPV6_HDR_LEN + doff :])
                g.count += 1
                g.length += plen
                g.next_seq = (seq + plen) & 0xFFFFFFFF
                if psh or plen < g.gso:
                    g.psh = bool(psh)
                    del opened[key]  # nothing may follow a PSH or a short segment
                return
            del opened[key]
        g = _Group(packet, doff, seq, plen, bool(psh))
        self._out.append(g)
        if not psh:
            opened[key] = g

    def flush(self) -> list[bytes]:
        """The queued packets as TUN writes (virtio-net header + packet when ``vnet``), in order."""
        out = self._out
        self._out = []
        self._open = {}
        return [item if isinstance(item, bytes) else item.build() for item in out]
