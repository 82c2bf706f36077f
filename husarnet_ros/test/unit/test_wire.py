"""Wire formats: exact sizes, round trips, strict rejection of every malformed variant."""

from __future__ import annotations

import os

import pytest

from husarnet_ros.core import wire
from husarnet_ros.core.identity import Identity, address_from_pubkey


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


def test_sizes_match_the_documented_layouts() -> None:
    assert wire.HANDSHAKE_INIT_LEN == 168
    assert wire.HANDSHAKE_RESP_LEN == 80
    assert wire.DATA_HEADER_LEN == 16
    assert wire.DATA_MIN_LEN == 32
    assert wire.HELLO_LEN == 128
    assert wire.INIT_PAYLOAD_LEN == 48 and wire.RESP_PAYLOAD_LEN == 4


def test_handshake_init_round_trip_and_layout() -> None:
    eph, st, pl, mac = os.urandom(32), os.urandom(48), os.urandom(64), os.urandom(16)
    raw = wire.build_handshake_init(0xDEADBEEF, eph, st, pl, mac)
    assert len(raw) == 168
    assert raw[:4] == b"\x01\x00\x00\x00"
    assert raw[4:8] == (0xDEADBEEF).to_bytes(4, "little")
    assert raw[wire.INIT_NOISE_SLICE] == eph + st + pl
    assert raw[-16:] == mac
    msg = wire.parse_handshake_init(raw)
    assert msg == wire.HandshakeInit(0xDEADBEEF, eph, st, pl, mac)
    assert wire.message_type(raw) == wire.MSG_HANDSHAKE_INIT


def test_handshake_resp_round_trip_and_layout() -> None:
    eph, pl, mac = os.urandom(32), os.urandom(20), os.urandom(16)
    raw = wire.build_handshake_resp(7, 0xFFFFFFFF, eph, pl, mac)
    assert len(raw) == 80
    assert raw[:12] == b"\x02\x00\x00\x00" + (7).to_bytes(4, "little") + b"\xff" * 4
    assert raw[wire.RESP_NOISE_SLICE] == eph + pl
    assert wire.parse_handshake_resp(raw) == wire.HandshakeResp(7, 0xFFFFFFFF, eph, pl, mac)


@pytest.mark.parametrize(
    ("parse", "raw"),
    [
        (wire.parse_handshake_init, wire.build_handshake_init(1, bytes(32), bytes(48), bytes(64))),
        (wire.parse_handshake_resp, wire.build_handshake_resp(1, 2, bytes(32), bytes(20))),
    ],
)
def test_handshake_parsers_reject_bad_length_type_and_reserved(parse, raw: bytes) -> None:
    parse(raw)
    for bad in (raw[:-1], raw + b"\0", b"", raw[:4]):
        with pytest.raises(wire.Malformed):
            parse(bad)
    for i in (1, 2, 3):
        with pytest.raises(wire.Malformed) as exc:
            parse(raw[:i] + b"\x01" + raw[i + 1 :])
        assert exc.value.reason == "malformed"
    with pytest.raises(wire.Malformed):
        parse(b"\x04" + raw[1:])


def test_build_rejects_wrong_field_sizes() -> None:
    with pytest.raises(ValueError):
        wire.build_handshake_init(1, bytes(31), bytes(48), bytes(64))
    with pytest.raises(ValueError):
        wire.build_handshake_init(1 << 32, bytes(32), bytes(48), bytes(64))
    with pytest.raises(ValueError):
        wire.build_handshake_resp(1, -1, bytes(32), bytes(20))
    with pytest.raises(ValueError):
        wire.build_data_header(1, 1 << 64)
    with pytest.raises(ValueError):
        wire.build_probe(bytes(7))


def test_data_header() -> None:
    head = wire.build_data_header(0x01020304, 2**64 - 1)
    assert head == b"\x04\x00\x00\x00\x04\x03\x02\x01" + b"\xff" * 8
    dgram = head + bytes(16)
    assert wire.data_header(dgram) == (0x01020304, 2**64 - 1)
    assert wire.data_header(memoryview(dgram)) == (0x01020304, 2**64 - 1)
    assert wire.data_receiver_index(dgram) == 0x01020304
    assert wire.message_type(dgram) == wire.MSG_DATA
    with pytest.raises(wire.Malformed):
        wire.data_header(dgram[:-1])  # no room for the tag
    with pytest.raises(wire.Malformed):
        wire.data_header(b"\x04\x00\x01\x00" + dgram[4:])
    with pytest.raises(wire.Malformed):
        wire.data_header(b"\x02" + dgram[1:])


def test_message_type_rejects_unknown_and_reserved() -> None:
    for t in (1, 2, 3, 4, 5, 6):
        assert wire.message_type(bytes((t, 0, 0, 0))) == t
    for bad in (b"", b"\x01\x00\x00", b"\x07\x00\x00\x00", b"\x00\x00\x00\x00", b"\x01\x00\x00\x80", b"\xff" * 4):
        with pytest.raises(wire.Malformed):
            wire.message_type(bad)


def test_hello_round_trip(ident: Identity) -> None:
    target = bytes.fromhex("fc94") + os.urandom(14)
    raw = wire.build_hello(ident, target, 1_700_000_000_123, flags=5)
    assert len(raw) == 128 and raw[:4] == b"\x05\x00\x00\x00"
    h = wire.parse_hello(raw)
    assert h.public_key == ident.public_key
    assert h.address == ident.address
    assert h.timestamp_ms == 1_700_000_000_123
    assert h.flags == 5
    assert h.target == target and not h.is_broadcast
    assert wire.build_hello(ident, target, h.timestamp_ms, h.flags)[:64] == raw[:64]
    bcast = wire.parse_hello(wire.build_hello(ident, None, 1, 0))
    assert bcast.is_broadcast and bcast.target == bytes(16)


def test_hello_signature_is_domain_separated(ident: Identity) -> None:
    raw = wire.build_hello(ident, None, 42)
    # the signature covers the domain string, so a plain signature over the same bytes is refused
    plain = raw[:64] + ident.sign(raw[:64])
    with pytest.raises(wire.BadSignature) as exc:
        wire.parse_hello(plain)
    assert exc.value.reason == "bad_sig"


def test_hello_any_bit_flip_in_signed_part_or_signature_is_refused(ident: Identity) -> None:
    raw = bytearray(wire.build_hello(ident, None, 42))
    for byte in [*range(4, 128, 5), 127]:
        flipped = bytearray(raw)
        flipped[byte] ^= 0x10
        with pytest.raises(wire.Malformed) as exc:
            wire.parse_hello(bytes(flipped))
        # changing the key mostly breaks the address rule; everything else breaks the signature
        assert exc.value.reason in ("bad_sig", "bad_id")
        if not 8 <= byte < 40:
            assert exc.value.reason == "bad_sig", byte


def test_hello_with_key_that_has_no_address() -> None:
    # Find a key whose hash breaks the address rule; signed correctly, it is still refused as bad_id.
    from nacl.signing import SigningKey

    for i in range(1000):
        sk = SigningKey(i.to_bytes(32, "little"))
        pub = bytes(sk.verify_key)
        if address_from_pubkey(pub) is None:
            break
    head = wire.HELLO.pack(wire.MSG_HELLO, 0, pub, 1, bytes(16), bytes(64))[:64]
    raw = head + sk.sign(wire.HELLO_DOMAIN + head).signature
    with pytest.raises(wire.BadIdentity) as exc:
        wire.parse_hello(raw)
    assert exc.value.reason == "bad_id"


def test_hello_rejects_length_and_reserved(ident: Identity) -> None:
    raw = wire.build_hello(ident, None, 1)
    with pytest.raises(wire.Malformed):
        wire.parse_hello(raw[:-1])
    with pytest.raises(wire.Malformed):
        wire.parse_hello(raw + b"\0")
    with pytest.raises(wire.Malformed) as exc:
        wire.parse_hello(raw[:3] + b"\x01" + raw[4:])
    assert exc.value.reason == "malformed"


def test_inner_kinds() -> None:
    assert wire.inner_kind(b"") == wire.KIND_KEEPALIVE
    assert wire.inner_kind(b"\x60" + bytes(39)) == wire.KIND_IPV6
    assert wire.inner_kind(wire.build_probe(bytes(8))) == wire.KIND_PROBE
    assert wire.inner_kind(wire.build_probe_reply(bytes(8))) == wire.KIND_PROBE_REPLY
    assert wire.inner_kind(b"\x10") == wire.KIND_BASE and wire.inner_kind(b"\x2f") == wire.KIND_BASE
    for bad in (b"\x45" + bytes(19), b"\x00", b"\x03", b"\x30", b"\xff"):
        with pytest.raises(wire.Malformed):
            wire.inner_kind(bad)


def test_probe_round_trip() -> None:
    nonce = os.urandom(8)
    assert wire.parse_probe(wire.build_probe(nonce)) == wire.Probe(False, nonce)
    assert wire.parse_probe(wire.build_probe_reply(nonce)) == wire.Probe(True, nonce)
    is_reply, got = wire.parse_probe(memoryview(wire.build_probe_reply(nonce)))
    assert is_reply and got == nonce and isinstance(got, bytes)
    for bad in (b"\x01" + bytes(7), b"\x01" + bytes(9), b"\x03" + bytes(8), b""):
        with pytest.raises(wire.Malformed):
            wire.parse_probe(bad)


def test_ipv6_src_dst() -> None:
    src, dst = bytes.fromhex("fc94" + "11" * 14), bytes.fromhex("fc94" + "22" * 14)
    pkt = b"\x60" + bytes(7) + src + dst + b"payload"
    assert wire.ipv6_src_dst(pkt) == (src, dst)
    with pytest.raises(wire.Malformed):
        wire.ipv6_src_dst(pkt[:39])
    with pytest.raises(wire.Malformed):
        wire.ipv6_src_dst(b"\x45" + pkt[1:])
