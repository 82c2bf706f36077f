"""offload: virtio-net header, TSO/USO split, TCP coalescing; checked against a textbook reference."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from husarnet_ros.core import offload as o

SRC = bytes.fromhex("fc94" + "11" * 14)
DST = bytes.fromhex("fc94" + "22" * 14)
MTU = 1420


# --- independent reference (slow, obviously right) ---------------------------


def ref_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_l4_valid(pkt: bytes) -> bool:
    """RFC 1071 verification of the TCP/UDP/ICMPv6 checksum of an IPv6 packet without extension headers."""
    nh = pkt[6]
    body = pkt[40:]
    assert struct.unpack(">H", pkt[4:6])[0] == len(body), "IPv6 payload length"
    pseudo = pkt[8:40] + struct.pack(">IxxxB", len(body), nh)
    return ref_sum(pseudo + body) == 0xFFFF


def ipv6(
    nh: int, body: bytes, src: bytes = SRC, dst: bytes = DST, tc_flow: bytes = b"\x60\0\0\0", hop: int = 64
) -> bytes:
    return tc_flow + struct.pack(">HBB", len(body), nh, hop) + src + dst + body


def tcp_hdr(sport: int, dport: int, seq: int, ack: int, flags: int, options: bytes = b"", window: int = 500) -> bytes:
    assert len(options) % 4 == 0
    doff = (20 + len(options)) // 4
    return struct.pack(">HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0) + options


def with_checksum(pkt: bytes, offset_in_l4: int) -> bytes:
    """Fill the L4 checksum with the reference implementation."""
    b = bytearray(pkt)
    b[40 + offset_in_l4 : 42 + offset_in_l4] = b"\0\0"
    body = bytes(b[40:])
    pseudo = bytes(b[8:40]) + struct.pack(">IxxxB", len(body), b[6])
    c = (~ref_sum(pseudo + body)) & 0xFFFF
    if b[6] == 17 and c == 0:
        c = 0xFFFF
    b[40 + offset_in_l4 : 42 + offset_in_l4] = struct.pack(">H", c)
    return bytes(b)


def tcp_segment(
    seq: int, payload: bytes, flags: int = o.TCP_ACK, options: bytes = b"", ack: int = 7, **kw: object
) -> bytes:
    return with_checksum(ipv6(6, tcp_hdr(40000, 5201, seq, ack, flags, options) + payload, **kw), 16)  # type: ignore[arg-type]


def partial_sum_field(pkt: bytearray, l4: int, off: int) -> None:
    """Put the folded pseudo-header sum in the checksum field, as the kernel does for CHECKSUM_PARTIAL."""
    length = len(pkt) - l4
    pseudo = bytes(pkt[8:40]) + struct.pack(">IxxxB", length, pkt[6])
    pkt[l4 + off : l4 + off + 2] = struct.pack(">H", ref_sum(pseudo))


TS_OPT = b"\x01\x01\x08\x0a" + struct.pack(">II", 123456, 654321)


def tso_read(
    payload: bytes, gso: int, seq: int = 0xFFFFF000, flags: int = o.TCP_ACK | o.TCP_PSH, options: bytes = TS_OPT
) -> bytes:
    """A TUN read as the kernel produces it for a TSO super-packet."""
    th = tcp_hdr(40000, 5201, seq, 99, flags, options)
    pkt = bytearray(ipv6(6, th + payload))
    partial_sum_field(pkt, 40, 16)
    h = o.VnetHdr(o.VIRTIO_NET_HDR_F_NEEDS_CSUM, o.VIRTIO_NET_HDR_GSO_TCPV6, 40 + len(th), gso, 40, 16)
    return o.build_vnet_hdr(h) + bytes(pkt)


def ref_complete_partial(write: bytes) -> bytes:
    """What the kernel does with a NEEDS_CSUM TUN write: checksum from csum_start over the partial field."""
    h = o.parse_vnet_hdr(write)
    pkt = bytearray(write[10:])
    if h.flags & o.VIRTIO_NET_HDR_F_NEEDS_CSUM:
        at = h.csum_start + h.csum_offset
        c = (~ref_sum(bytes(pkt[h.csum_start :]))) & 0xFFFF
        pkt[at : at + 2] = struct.pack(">H", c)
    return bytes(pkt)


# --- virtio-net header ---------------------------------------------------------


def test_vnet_hdr_round_trip_and_layout() -> None:
    h = o.VnetHdr(1, 4, 72, 1348, 40, 16)
    raw = o.build_vnet_hdr(h)
    assert raw == bytes([1, 4]) + struct.pack("<HHHH", 72, 1348, 40, 16)
    assert o.parse_vnet_hdr(raw) == h
    assert o.build_vnet_hdr(o.VnetHdr()) == o.PLAIN_VNET_HDR


def test_vnet_hdr_short_and_out_of_range() -> None:
    with pytest.raises(o.OffloadError):
        o.parse_vnet_hdr(b"\0" * 9)
    with pytest.raises(ValueError):
        o.build_vnet_hdr(o.VnetHdr(gso_size=70000))


@given(st.binary(min_size=10, max_size=10))
def test_vnet_hdr_property(raw: bytes) -> None:
    assert o.build_vnet_hdr(o.parse_vnet_hdr(raw)) == raw


# --- checksum helpers --------------------------------------------------------------


def ref_fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@given(st.binary(max_size=3000), st.integers(0, 1 << 40))
def test_checksum_matches_reference(data: bytes, initial: int) -> None:
    assert o.checksum(data, initial) == (~ref_fold(ref_sum(data) + initial)) & 0xFFFF
    assert o.checksum(data) == (~ref_sum(data)) & 0xFFFF


def test_checksum_known_vector() -> None:
    # RFC 1071 section 3 example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert o.checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2) & 0xFFFF


# --- split --------------------------------------------------------------------


def test_split_plain_packet_untouched() -> None:
    p = tcp_segment(5, b"x" * 100)
    assert o.split_for_send(p, False, MTU) == [p]
    assert o.split_for_send(o.PLAIN_VNET_HDR + p, True, MTU) == [p]
    with pytest.raises(o.OffloadError):
        o.split_for_send(b"\0" * 1500, False, MTU)


def test_split_tso_superpacket() -> None:
    payload = os.urandom(60001)
    gso = 1348  # MTU 1420 - 40 - 32 (TCP with timestamps)
    pkts = o.split_for_send(tso_read(payload, gso, flags=o.TCP_ACK | o.TCP_PSH | o.TCP_FIN | o.TCP_CWR), True, MTU)
    assert len(pkts) == (60001 + gso - 1) // gso
    got = b""
    for i, p in enumerate(pkts):
        assert len(p) <= MTU
        assert ref_l4_valid(p), f"segment {i} checksum"
        th = p[40:72]
        seq, ack = struct.unpack(">II", th[4:12])
        assert seq == (0xFFFFF000 + i * gso) & 0xFFFFFFFF  # wraps around 2**32
        assert ack == 99
        flags = th[13]
        last = i == len(pkts) - 1
        assert bool(flags & o.TCP_FIN) is last and bool(flags & o.TCP_PSH) is last
        assert bool(flags & o.TCP_CWR) is (i == 0)
        assert flags & o.TCP_ACK
        assert th[20:] == TS_OPT
        got += p[72:]
    assert got == payload


@pytest.mark.parametrize("gso", [1348, 1347, 1299, 1000])
def test_split_same_without_numpy(monkeypatch: pytest.MonkeyPatch, gso: int) -> None:
    assert o.load_numpy() and o._np is not None
    buf = tso_read(os.urandom(30001), gso)
    fast = o.split_for_send(buf, True, MTU)
    monkeypatch.setattr(o, "_np", None)
    monkeypatch.setattr(o, "_numpy_tried", True)  # the split must not import it again
    assert o.split_for_send(buf, True, MTU) == fast
    assert all(ref_l4_valid(p) for p in fast)


def test_numpy_is_imported_by_the_first_split_not_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # Start-up: loading the engine (which loads this module) must not import numpy (0.1 s of a node's start).
    code = "import sys; import husarnet_ros.core.engine; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
    # A split of a single segment does not need it; the first that sums several chunks imports it, then and there.
    monkeypatch.setattr(o, "_np", None)
    monkeypatch.setattr(o, "_numpy_tried", False)
    [one] = o.split_for_send(tso_read(os.urandom(1000), 1348), True, MTU)
    assert ref_l4_valid(one) and o._np is None and not o._numpy_tried
    payload = os.urandom(20000)
    pkts = o.split_for_send(tso_read(payload, 1348), True, MTU)
    assert o._numpy_tried and o._np is not None
    assert b"".join(p[72:] for p in pkts) == payload and all(ref_l4_valid(p) for p in pkts)


def test_split_respects_smaller_mtu_limit() -> None:
    payload = os.urandom(10000)
    pkts = o.split_for_send(tso_read(payload, 1348), True, 1280)
    assert all(len(p) <= 1280 for p in pkts)
    assert b"".join(p[72:] for p in pkts) == payload
    assert all(ref_l4_valid(p) for p in pkts)


def test_split_needs_csum_single_packet() -> None:
    for nh, body, off in (
        (6, tcp_hdr(1, 2, 3, 4, o.TCP_ACK) + b"abc", 16),
        (17, struct.pack(">HHHH", 5, 6, 13, 0) + b"hello", 6),
    ):
        pkt = bytearray(ipv6(nh, body))
        partial_sum_field(pkt, 40, off)
        buf = o.build_vnet_hdr(o.VnetHdr(o.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 40, off)) + bytes(pkt)
        [out] = o.split_for_send(buf, True, MTU)
        assert ref_l4_valid(out)
        assert out[: 40 + off] == bytes(pkt[: 40 + off])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([(6, 16), (17, 6)]), st.binary(max_size=1300), st.binary(min_size=32, max_size=32))
def test_read_packet_completes_any_checksum_left_to_us(proto: tuple[int, int], payload: bytes, addrs: bytes) -> None:
    """The lone send path's one-call completion agrees with the reference for TCP and UDP, odd and even lengths."""
    nh, off = proto
    if nh == 6:
        body = tcp_hdr(40000, 5201, 1, 2, o.TCP_ACK | o.TCP_PSH) + payload
    else:
        body = struct.pack(">HHHH", 7400, 7401, 8 + len(payload), 0) + payload
    pkt = bytearray(ipv6(nh, body, src=addrs[:16], dst=addrs[16:]))
    partial_sum_field(pkt, 40, off)
    hdr = o.build_vnet_hdr(o.VnetHdr(o.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 40, off))
    out = o.read_packet(hdr + bytes(pkt))
    assert isinstance(out, bytes) and len(out) == len(pkt)
    assert ref_l4_valid(out)
    assert out[: 40 + off] == pkt[: 40 + off] and out[42 + off :] == pkt[42 + off :]
    assert out[40 + off : 42 + off] != b"\0\0"  # UDP: a computed 0 would mean "no checksum" (RFC 768)
    assert o.read_packet(memoryview(hdr + bytes(pkt))) == out  # any bytes-like read


def test_read_packet_without_needs_csum_and_bad_offsets() -> None:
    pkt = with_checksum(ipv6(17, struct.pack(">HHHH", 1, 2, 12, 0) + b"udp!"), 6)
    assert bytes(o.read_packet(o.PLAIN_VNET_HDR + pkt)) == pkt  # nothing left to us: the packet as it came
    for start, off in ((40, 100), (20, 6), (40, len(pkt) - 41)):
        hdr = o.build_vnet_hdr(o.VnetHdr(o.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, start, off))
        with pytest.raises(o.OffloadError, match="outside"):
            o.read_packet(hdr + pkt)
    with pytest.raises(o.OffloadError, match="header needs"):
        o.read_packet(b"\x01\x00\x00")


def test_split_uso() -> None:
    payload = os.urandom(1200 * 5 + 7)
    body = struct.pack(">HHHH", 1111, 2222, 8 + len(payload), 0) + payload
    pkt = bytearray(ipv6(17, body))
    partial_sum_field(pkt, 40, 6)
    buf = o.build_vnet_hdr(o.VnetHdr(1, o.VIRTIO_NET_HDR_GSO_UDP_L4, 48, 1200, 40, 6)) + bytes(pkt)
    pkts = o.split_for_send(buf, True, MTU)
    assert len(pkts) == 6
    assert [len(p) - 48 for p in pkts] == [1200] * 5 + [7]
    assert all(ref_l4_valid(p) for p in pkts)
    assert all(struct.unpack(">H", p[44:46])[0] == len(p) - 40 for p in pkts)
    assert b"".join(p[48:] for p in pkts) == payload
    with pytest.raises(o.OffloadError):
        o.split_for_send(buf, True, 1000)  # datagrams cannot be re-cut


def test_split_rejects_ipv4_and_garbage() -> None:
    with pytest.raises(o.OffloadError, match="IPv4"):
        o.split_for_send(o.PLAIN_VNET_HDR + b"\x45" + b"\0" * 39, True, MTU)
    bad = bytearray(tso_read(b"x" * 5000, 1348))
    bad[10 + 40 + 12] = 0x10  # data offset 4 bytes
    with pytest.raises(o.OffloadError):
        o.split_for_send(bytes(bad), True, MTU)


# --- coalesce ------------------------------------------------------------------


def parse_write(w: bytes) -> tuple[o.VnetHdr, bytes]:
    return o.parse_vnet_hdr(w), w[10:]


def test_round_trip_split_then_coalesce_is_one_superpacket_with_same_stream() -> None:
    payload = os.urandom(64000)
    first = o.split_for_send(tso_read(payload, 1348), True, MTU)
    c = o.Coalescer()
    for p in first:
        c.add(p)
    writes = c.flush()
    assert len(writes) == 1
    h, pkt = parse_write(writes[0])
    assert h.gso_type == o.VIRTIO_NET_HDR_GSO_TCPV6
    assert h.flags == o.VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert (h.gso_size, h.csum_start, h.csum_offset, h.hdr_len) == (1348, 40, 16, 72)
    assert len(pkt) <= o.MAX_PACKET
    assert pkt[72:] == payload
    assert pkt[40 + 13] == o.TCP_ACK | o.TCP_PSH
    # The kernel completes the partial checksum; the result must verify.
    assert ref_l4_valid(ref_complete_partial(writes[0]))
    # Splitting the coalesced write again (as a sender's kernel would) gives the same packets.
    assert o.split_for_send(writes[0], True, MTU) == first


def test_coalesce_stops_at_64k_and_keeps_stream() -> None:
    payload = os.urandom(200000)
    c = o.Coalescer()
    seq = 1000
    for off in range(0, len(payload), 1360):
        c.add(tcp_segment(seq + off, payload[off : off + 1360]))
    writes = c.flush()
    assert len(writes) >= 4
    stream = b""
    expect_seq = seq
    for w in writes:
        _, pkt = parse_write(w)
        assert len(pkt) <= 65535
        assert struct.unpack(">I", pkt[44:48])[0] == expect_seq
        body = pkt[60:]
        expect_seq += len(body)
        stream += body
        assert ref_l4_valid(ref_complete_partial(w))
    assert stream == payload


def test_coalesce_max_segments_bound() -> None:
    c = o.Coalescer(max_segments=8)
    for i in range(20):
        c.add(tcp_segment(i * 100, b"a" * 100))
    assert len(c.flush()) == 3


def test_coalesce_only_in_order_same_flow() -> None:
    a0 = tcp_segment(0, b"a" * 100)
    a1 = tcp_segment(100, b"b" * 100)
    gap = tcp_segment(300, b"c" * 100)  # hole at 200
    other_ack = tcp_segment(400, b"d" * 100, ack=8)
    fin = tcp_segment(500, b"e" * 100, flags=o.TCP_ACK | o.TCP_FIN)
    c = o.Coalescer()
    for p in (a0, a1, gap, other_ack, fin):
        c.add(p)
    writes = c.flush()
    assert len(writes) == 4
    assert parse_write(writes[0])[1][60:] == b"a" * 100 + b"b" * 100
    for w, p in zip(writes[1:], (gap, other_ack, fin), strict=True):
        assert w == o.PLAIN_VNET_HDR + p


def test_coalesce_psh_ends_group_and_short_segment_is_last() -> None:
    c = o.Coalescer()
    c.add(tcp_segment(0, b"a" * 100))
    c.add(tcp_segment(100, b"b" * 50))  # shorter: must be the last of the group
    c.add(tcp_segment(150, b"c" * 50))
    c.add(tcp_segment(200, b"d" * 50, flags=o.TCP_ACK | o.TCP_PSH))
    c.add(tcp_segment(250, b"e" * 50))
    writes = c.flush()
    assert [parse_write(w)[1][60:] for w in writes] == [b"a" * 100 + b"b" * 50, b"c" * 50 + b"d" * 50, b"e" * 50]
    assert parse_write(writes[1])[1][53] & o.TCP_PSH
    assert parse_write(writes[0])[1][53] & o.TCP_PSH == 0
    assert o.parse_vnet_hdr(writes[1]).gso_size == 50


def test_coalesce_requires_equal_options_and_ip_fields() -> None:
    opt2 = b"\x01\x01\x08\x0a" + struct.pack(">II", 2, 2)
    cases = [
        tcp_segment(100, b"b" * 100, options=opt2),
        tcp_segment(100, b"b" * 100, options=TS_OPT, hop=63),
        tcp_segment(100, b"b" * 100, options=TS_OPT, tc_flow=b"\x60\x10\0\0"),
    ]
    for other in cases:
        c = o.Coalescer()
        c.add(tcp_segment(0, b"a" * 100, options=TS_OPT))
        c.add(other)
        assert len(c.flush()) == 2


def test_interleaved_flows_coalesce_separately_in_flow_order() -> None:
    def seg(port: int, seq: int) -> bytes:
        p = bytearray(tcp_segment(seq, bytes([port & 0xFF]) * 100))
        p[40:42] = struct.pack(">H", port)
        return with_checksum(bytes(p), 16)

    c = o.Coalescer()
    for i in range(6):
        c.add(seg(1, i * 100))
        c.add(seg(2, i * 100))
    writes = c.flush()
    assert len(writes) == 2
    for w in writes:
        assert len(parse_write(w)[1][60:]) == 600
        assert ref_l4_valid(ref_complete_partial(w))


def test_non_tcp_and_odd_packets_pass_through() -> None:
    icmp = with_checksum(ipv6(58, b"\x80\0\0\0\0\1\0\1" + b"ping"), 2)
    udp = with_checksum(ipv6(17, struct.pack(">HHHH", 1, 2, 12, 0) + b"udp!"), 6)
    hop_by_hop = ipv6(0, b"\x06\0" + b"\x01\x04\0\0\0\0" + tcp_hdr(1, 2, 3, 4, o.TCP_ACK) + b"x" * 10)
    frag = ipv6(44, b"\x06\0\0\x01\0\0\0\x05" + b"y" * 64)
    syn = tcp_segment(0, b"", flags=o.TCP_SYN)
    pure_ack = tcp_segment(0, b"")
    big = tcp_segment(0, b"z" * 65000)
    packets = [icmp, udp, hop_by_hop, frag, syn, pure_ack, big, big]
    c = o.Coalescer()
    for p in packets:
        c.add(p)
    writes = c.flush()
    assert writes[:6] == [o.PLAIN_VNET_HDR + p for p in packets[:6]]
    # Two maximal segments cannot merge (over 64 kB) but stay valid single writes.
    assert writes[6:] == [o.PLAIN_VNET_HDR + big, o.PLAIN_VNET_HDR + big]


def test_non_vnet_coalescer_is_identity() -> None:
    c = o.Coalescer(vnet=False)
    pkts = [tcp_segment(i * 10, b"q" * 10) for i in range(5)]
    for p in pkts:
        c.add(p)
    assert c.flush() == pkts
    assert c.flush() == []


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(1, 70000),
    gso=st.integers(200, 1348),
    seq=st.integers(0, 2**32 - 1),
    mtu=st.integers(1280, 1500),
    psh=st.booleans(),
)
def test_split_coalesce_round_trip_property(total: int, gso: int, seq: int, mtu: int, psh: bool) -> None:
    payload = random.Random(total).randbytes(total)
    flags = o.TCP_ACK | (o.TCP_PSH if psh else 0)
    if 72 + total > 65535:
        payload = payload[: 65535 - 72]
    sent = o.split_for_send(tso_read(payload, gso, seq=seq, flags=flags), True, mtu)
    assert all(len(p) <= mtu and ref_l4_valid(p) for p in sent)
    c = o.Coalescer()
    for p in sent:
        c.add(p)
    stream = b""
    for w in c.flush():
        pkt = ref_complete_partial(w)
        assert ref_l4_valid(pkt)
        stream += pkt[72:]
    assert stream == payload


# --- hostile input: only ValueError-family exceptions ---------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.booleans())
def test_split_fuzz(data: bytes, vnet: bool) -> None:
    try:
        out = o.split_for_send(data, vnet, MTU)
    except ValueError:
        return
    assert all(isinstance(p, bytes) and len(p) <= MTU for p in out)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=10, max_size=10), st.binary(min_size=40, max_size=2000), st.sampled_from([6, 17, 0, 44, 58]))
def test_split_fuzz_structured(hdr: bytes, body: bytes, nh: int) -> None:
    buf = hdr + b"\x60" + body[1:6] + bytes([nh]) + body[7:]
    try:
        out = o.split_for_send(buf, True, MTU)
    except ValueError:
        return
    assert all(len(p) <= MTU for p in out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_coalescer_fuzz(packets: list[bytes]) -> None:
    c = o.Coalescer()
    for p in packets:
        c.add(b"\x60" + p[1:6] + b"\x06" + p[7:] if len(p) > 7 else p)
    inputs = [b"\x60" + p[1:6] + b"\x06" + p[7:] if len(p) > 7 else p for p in packets]
    writes = c.flush()
    assert len(writes) <= len(inputs)
    assert all(isinstance(w, bytes) and len(w) >= 10 for w in writes)
    for w in writes:
        if o.parse_vnet_hdr(w).gso_type == o.VIRTIO_NET_HDR_GSO_NONE:
            assert w[10:] in inputs
