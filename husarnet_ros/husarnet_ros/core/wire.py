"""Every peer-to-peer datagram format, built and parsed in one place.

Layouts follow WireGuard (docs/ARCHITECTURE.md "Wire formats"): byte 0 is the
message type, bytes 1-3 are reserved and must be zero (room for versions), all
integers are little-endian.  Because type and reserved bytes are read together
as one little-endian 32-bit word, "type is X and reserved is zero" is a single
integer comparison, which keeps the data-packet hot path cheap.

Parsers are strict and bounded: every length is checked before use and any
deviation raises :class:`Malformed` (a ``ValueError``) carrying a counter
``reason``.  Nothing here touches keys except Hello, whose Ed25519 signature
and self-certifying address are verified on parse, so a Hello object that
exists is always authentic (freshness is the caller's job).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

from .constants import ADDRESS_LEN
from .identity import Identity, address_from_pubkey, verify_signature

# --- Message types ----------------------------------------------------------
MSG_HANDSHAKE_INIT = 1
MSG_HANDSHAKE_RESP = 2
MSG_COOKIE_REPLY = 3
MSG_DATA = 4
MSG_HELLO = 5
MSG_DATA_SUPER = 6
MESSAGE_TYPES = frozenset(
    (MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP, MSG_COOKIE_REPLY, MSG_DATA, MSG_HELLO, MSG_DATA_SUPER)
)

KEY_LEN = 32
TAG_LEN = 16
MAC_LEN = 16
TAI64N_LEN = 12
FEATURES_LEN = 4

# --- Layouts (type and reserved bytes form the first little-endian uint32) --
_WORD = struct.Struct("<I")
#: type(1) res(3) sender_index(4) ephemeral(32) enc_static(48) enc_payload(64) mac1(16)
HANDSHAKE_INIT = struct.Struct("<II32s48s64s16s")
#: type(1) res(3) sender_index(4) receiver_index(4) ephemeral(32) enc_payload(20) mac1(16)
HANDSHAKE_RESP = struct.Struct("<III32s20s16s")
#: type(1) res(3) receiver_index(4) nonce(24) enc_cookie(32): the cookie, sealed with XChaCha20-Poly1305.
COOKIE_REPLY = struct.Struct("<II24s32s")
#: type(1) res(3) receiver_index(4) counter(8); the ciphertext follows.
DATA_HEADER = struct.Struct("<IIQ")
#: type(1) res(3) flags(4) pubkey(32) timestamp_ms(8) target(16) signature(64)
HELLO = struct.Struct("<II32sQ16s64s")

HANDSHAKE_INIT_LEN = HANDSHAKE_INIT.size  # 168
HANDSHAKE_RESP_LEN = HANDSHAKE_RESP.size  # 80
#: An initiation with WireGuard's mac2 appended (sent only to a responder that gave us a cookie).
HANDSHAKE_INIT_MAC2_LEN = HANDSHAKE_INIT_LEN + MAC_LEN  # 184
COOKIE_REPLY_LEN = COOKIE_REPLY.size  # 64
COOKIE_NONCE_LEN = 24
DATA_HEADER_LEN = DATA_HEADER.size  # 16
DATA_MIN_LEN = DATA_HEADER_LEN + TAG_LEN  # 32: an empty (keepalive) plaintext
HELLO_LEN = HELLO.size  # 128
HELLO_SIGNED_LEN = HELLO_LEN - 64

INIT_PAYLOAD_LEN = KEY_LEN + TAI64N_LEN + FEATURES_LEN  # 48 = ed25519_pub || tai64n || features
RESP_PAYLOAD_LEN = FEATURES_LEN  # 4
#: Noise part of the messages, for interop with other Noise implementations.
INIT_NOISE_SLICE = slice(8, 8 + 32 + 48 + 64)
RESP_NOISE_SLICE = slice(12, 12 + 32 + 20)

HELLO_DOMAIN = b"husarnet_ros hello\n"
BROADCAST_TARGET = bytes(ADDRESS_LEN)

_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF


class Malformed(ValueError):  # noqa: N818 - name fixed by the module contract
    """An input that does not parse; ``reason`` names the drop counter to increment."""

    reason: str = "malformed"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class BadSignature(Malformed):
    """A well-formed message whose signature does not verify."""

    reason = "bad_sig"


class BadIdentity(Malformed):
    """A public key that does not hash to a valid fc94 address."""

    reason = "bad_id"


def _need_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def _need_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} must fit in 32 bits unsigned")


def message_type(buf: bytes | bytearray | memoryview) -> int:
    """The message type of a datagram; Malformed if too short, reserved bytes set or the type is unknown."""
    if len(buf) < 4:
        raise Malformed("datagram shorter than the 4-byte type header")
    word = _WORD.unpack_from(buf)[0]
    if word not in MESSAGE_TYPES:
        if word >> 8:
            raise Malformed("reserved header bytes are not zero")
        raise Malformed(f"unknown message type {word}")
    return word


# --- Handshake initiation ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class HandshakeInit:
    """Fields of a HandshakeInit datagram (type 1)."""

    sender_index: int
    ephemeral: bytes
    enc_static: bytes
    enc_payload: bytes
    mac1: bytes


def build_handshake_init(
    sender_index: int, ephemeral: bytes, enc_static: bytes, enc_payload: bytes, mac1: bytes = bytes(MAC_LEN)
) -> bytes:
    """Serialise a HandshakeInit; ``mac1`` is normally filled in afterwards by the handshake."""
    _need_u32("sender_index", sender_index)
    _need_len("ephemeral", ephemeral, 32)
    _need_len("enc_static", enc_static, 48)
    _need_len("enc_payload", enc_payload, 64)
    _need_len("mac1", mac1, MAC_LEN)
    return HANDSHAKE_INIT.pack(MSG_HANDSHAKE_INIT, sender_index, ephemeral, enc_static, enc_payload, mac1)


def parse_handshake_init(buf: bytes | bytearray | memoryview) -> HandshakeInit:
    """Parse a HandshakeInit of exactly 168 bytes."""
    if len(buf) != HANDSHAKE_INIT_LEN:
        raise Malformed(f"handshake initiation must be {HANDSHAKE_INIT_LEN} bytes, got {len(buf)}")
    word, sender, eph, enc_static, enc_payload, mac1 = HANDSHAKE_INIT.unpack(buf)
    if word != MSG_HANDSHAKE_INIT:
        raise Malformed("not a handshake initiation (type or reserved bytes)")
    return HandshakeInit(sender, eph, enc_static, enc_payload, mac1)


# --- Handshake response --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HandshakeResp:
    """Fields of a HandshakeResp datagram (type 2)."""

    sender_index: int
    receiver_index: int
    ephemeral: bytes
    enc_payload: bytes
    mac1: bytes


def build_handshake_resp(
    sender_index: int, receiver_index: int, ephemeral: bytes, enc_payload: bytes, mac1: bytes = bytes(MAC_LEN)
) -> bytes:
    """Serialise a HandshakeResp; ``mac1`` is normally filled in afterwards by the handshake."""
    _need_u32("sender_index", sender_index)
    _need_u32("receiver_index", receiver_index)
    _need_len("ephemeral", ephemeral, 32)
    _need_len("enc_payload", enc_payload, 20)
    _need_len("mac1", mac1, MAC_LEN)
    return HANDSHAKE_RESP.pack(MSG_HANDSHAKE_RESP, sender_index, receiver_index, ephemeral, enc_payload, mac1)


def parse_handshake_resp(buf: bytes | bytearray | memoryview) -> HandshakeResp:
    """Parse a HandshakeResp of exactly 80 bytes."""
    if len(buf) != HANDSHAKE_RESP_LEN:
        raise Malformed(f"handshake response must be {HANDSHAKE_RESP_LEN} bytes, got {len(buf)}")
    word, sender, receiver, eph, enc_payload, mac1 = HANDSHAKE_RESP.unpack(buf)
    if word != MSG_HANDSHAKE_RESP:
        raise Malformed("not a handshake response (type or reserved bytes)")
    return HandshakeResp(sender, receiver, eph, enc_payload, mac1)


# --- Cookie reply (WireGuard's type 3) ----------------------------------------------
class CookieReply(NamedTuple):
    """Fields of a CookieReply datagram: the initiation it answers (our sender index) and the sealed cookie."""

    receiver_index: int
    nonce: bytes
    enc_cookie: bytes


def build_cookie_reply(receiver_index: int, nonce: bytes, enc_cookie: bytes) -> bytes:
    """Serialise a CookieReply (64 bytes: smaller than the 168-byte initiation it answers)."""
    _need_u32("receiver_index", receiver_index)
    _need_len("nonce", nonce, COOKIE_NONCE_LEN)
    _need_len("enc_cookie", enc_cookie, MAC_LEN + TAG_LEN)
    return COOKIE_REPLY.pack(MSG_COOKIE_REPLY, receiver_index, nonce, enc_cookie)


def parse_cookie_reply(buf: bytes | bytearray | memoryview) -> CookieReply:
    """Parse a CookieReply of exactly 64 bytes."""
    if len(buf) != COOKIE_REPLY_LEN:
        raise Malformed(f"cookie reply must be {COOKIE_REPLY_LEN} bytes, got {len(buf)}")
    word, receiver, nonce, enc = COOKIE_REPLY.unpack(buf)
    if word != MSG_COOKIE_REPLY:
        raise Malformed("not a cookie reply (type or reserved bytes)")
    return CookieReply(receiver, nonce, enc)


def split_mac2(buf: bytes) -> tuple[bytes, bytes | None]:
    """An initiation as ``(the 168-byte message, mac2)``; mac2 is None when the datagram carries none.

    Any other length is returned whole (with None), for the initiation parser to refuse.
    """
    if len(buf) == HANDSHAKE_INIT_MAC2_LEN:
        return buf[:HANDSHAKE_INIT_LEN], buf[HANDSHAKE_INIT_LEN:]
    return buf, None


# --- Data ---------------------------------------------------------------------
def build_data_header(receiver_index: int, counter: int) -> bytes:
    """The 16-byte header of a Data datagram (the session packs it in place on the hot path)."""
    _need_u32("receiver_index", receiver_index)
    if not 0 <= counter <= _U64_MAX:
        raise ValueError("counter must fit in 64 bits unsigned")
    return DATA_HEADER.pack(MSG_DATA, receiver_index, counter)


def data_header(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(receiver_index, counter)`` of a Data datagram; Malformed if it cannot hold a header and a tag."""
    if len(buf) < DATA_MIN_LEN:
        raise Malformed("data message shorter than header + tag")
    word, receiver, counter = DATA_HEADER.unpack_from(buf)
    if word != MSG_DATA:
        raise Malformed("not a data message (type or reserved bytes)")
    return receiver, counter


def data_receiver_index(buf: bytes | bytearray | memoryview) -> int:
    """Receiver index of a Data datagram, for the lookup that picks its session."""
    return data_header(buf)[0]


# --- DataSuper: one sealed TSO/USO super-packet in path-MTU-sized fragments ------
#: type(1) res(3) receiver_index(4) counter(8) fragment_index(1) fragment_count(1) res(2); a slice of
#: the ciphertext follows.  The counter is the keypair's Data counter (one nonce space, one replay window).
DATA_SUPER_HEADER = struct.Struct("<IIQBBH")
DATA_SUPER_HEADER_LEN = DATA_SUPER_HEADER.size  # 20
#: What the AEAD authenticates besides the ciphertext: type word, receiver index and counter, so a Data
#: ciphertext can never be passed off as a super-packet (or the other way round).
DATA_SUPER_AAD = struct.Struct("<IIQ")
#: One super message is at most this many fragments (one UDP GSO sendmsg carries 64 segments).
SUPER_MAX_FRAGMENTS = 64
#: Bound on one fragment's ciphertext slice: a fragment never makes the receiver hold more than this.
SUPER_MAX_FRAGMENT = 2048
#: Plaintext: virtio-net header (10) + one IPv6 packet of at most 40 + 65535 bytes.
SUPER_MAX_PLAINTEXT = 10 + 40 + 65535
SUPER_MAX_SEALED = SUPER_MAX_PLAINTEXT + TAG_LEN


class SuperFragment(NamedTuple):
    """Header fields of one DataSuper fragment."""

    receiver_index: int
    counter: int
    index: int
    count: int


def parse_super_fragment(buf: bytes | bytearray | memoryview) -> SuperFragment:
    """Header of a DataSuper fragment; Malformed unless index < count <= 64 and the slice is 1..2048 bytes."""
    n = len(buf)
    if n <= DATA_SUPER_HEADER_LEN or n > DATA_SUPER_HEADER_LEN + SUPER_MAX_FRAGMENT:
        raise Malformed("super fragment length out of range")
    word, receiver, counter, index, count, reserved = DATA_SUPER_HEADER.unpack_from(buf)
    if word != MSG_DATA_SUPER or reserved:
        raise Malformed("not a super fragment (type or reserved bytes)")
    if not 0 <= index < count <= SUPER_MAX_FRAGMENTS:
        raise Malformed("super fragment index/count out of range")
    return SuperFragment(receiver, counter, index, count)


def _super_header(receiver_index: int, counter: int, sealed_len: int, fragment_size: int) -> tuple[bytes, int]:
    """Fragment 0's DataSuper header and the fragment count, after the size checks of a fragment run."""
    _need_u32("receiver_index", receiver_index)
    if not 0 < fragment_size <= SUPER_MAX_FRAGMENT:
        raise ValueError("fragment_size out of range")
    if not TAG_LEN <= sealed_len <= SUPER_MAX_SEALED:
        raise ValueError("sealed super-packet size out of range")
    count = -(-sealed_len // fragment_size)
    if count > SUPER_MAX_FRAGMENTS:
        raise ValueError("super-packet needs too many fragments for this fragment size")
    return DATA_SUPER_HEADER.pack(MSG_DATA_SUPER, receiver_index, counter, 0, count, 0), count


@functools.lru_cache(maxsize=256)
def _slices(size: int, gap: int, count: int) -> struct.Struct:
    """A Struct that takes ``count`` slices of ``size`` bytes, ``gap`` bytes apart, in one C call.

    A bulk transfer cuts, joins or checks ~48 fragments per super-packet; a Python loop of slices
    cost more than the AEAD (issue #6).  Cached per (size, gap, count): one path MTU gives a handful.
    """
    return struct.Struct(f"{size}s" + f"{gap}x{size}s" * (count - 1) if count else "")


#: Byte ``i`` is ``i``: the fragment index column of a run (written, or checked, in one strided slice).
SUPER_INDEXES = bytes(range(SUPER_MAX_FRAGMENTS))


def build_super_fragments(receiver_index: int, counter: int, sealed: bytes, fragment_size: int) -> list[bytes]:
    """Cut ``sealed`` (ciphertext + tag) into DataSuper fragments of ``fragment_size`` bytes (the last shorter).

    Every fragment but the last has the same length, so the list leaves in one UDP GSO sendmsg.
    ValueError if the message would need more than :data:`SUPER_MAX_FRAGMENTS` fragments.
    """
    run = super_fragment_run(receiver_index, counter, sealed, fragment_size)
    seg = DATA_SUPER_HEADER_LEN + fragment_size
    return [bytes(run[off : off + seg]) for off in range(0, len(run), seg)]


def super_fragment_run(receiver_index: int, counter: int, sealed: bytes, fragment_size: int) -> bytearray:
    """The fragments of :func:`build_super_fragments` back to back in one buffer: one UDP GSO ``sendmsg``.

    Every fragment is ``DATA_SUPER_HEADER_LEN + fragment_size`` bytes but the last.  Built with a few
    C calls whatever the fragment count: the full slices cut at once, joined with fragment 0's
    header between them, then the index byte of every header set in one strided assignment.
    """
    header, count = _super_header(receiver_index, counter, len(sealed), fragment_size)
    full = count - 1
    run = bytearray(header).join(
        [b"", *_slices(fragment_size, 0, full).unpack_from(sealed), sealed[full * fragment_size :]]
    )
    run[16 :: DATA_SUPER_HEADER_LEN + fragment_size] = SUPER_INDEXES[:count]
    return run


def _check_run(data: bytes, off: int, count: int, seg: int, last_needs: int) -> None:
    """ValueError unless ``count`` fragments of ``seg`` bytes fit ``data`` from ``off`` (the last: ``last_needs``).

    The receive helpers' shared bounds: a GRO buffer's length comes from the network.
    """
    if (
        not 0 < count <= SUPER_MAX_FRAGMENTS
        or not DATA_SUPER_HEADER_LEN < seg <= DATA_SUPER_HEADER_LEN + SUPER_MAX_FRAGMENT
    ):
        raise ValueError("fragment count or size out of range")
    if off < 0 or off + (count - 1) * seg + last_needs > len(data):
        raise ValueError("the run does not fit the buffer")


def super_run_headers(data: bytes, off: int, count: int, seg: int) -> bytearray:
    """The headers of ``count`` fragments of ``seg`` bytes at ``data[off:]``, back to back, in two C calls.

    For the receiver's check of a GRO run (every header but its index byte alike) without a Python
    loop over the fragments.  ValueError unless the last header lies inside ``data``.
    """
    _check_run(data, off, count, seg, DATA_SUPER_HEADER_LEN)
    heads = _slices(DATA_SUPER_HEADER_LEN, seg - DATA_SUPER_HEADER_LEN, count).unpack_from(data, off)
    return bytearray().join(heads)


def super_run_payloads(data: bytes, off: int, count: int, seg: int) -> bytes:
    """The ciphertext of ``count`` DataSuper fragments of ``seg`` bytes at ``data[off:]``, headers left out.

    The receive twin of :func:`super_fragment_run` for a GRO buffer; the caller has checked the
    headers.  The last fragment may be shorter: it ends at ``off + count * seg`` or at the buffer's end.
    """
    _check_run(data, off, count, seg, DATA_SUPER_HEADER_LEN + 1)
    full = count - 1
    last = off + full * seg
    size = seg - DATA_SUPER_HEADER_LEN
    chunks = _slices(size, DATA_SUPER_HEADER_LEN, full).unpack_from(data, off + DATA_SUPER_HEADER_LEN)
    return b"".join([*chunks, data[last + DATA_SUPER_HEADER_LEN : last + seg]])


def super_aad(receiver_index: int, counter: int) -> bytes:
    """Associated data of a super message (see :data:`DATA_SUPER_AAD`)."""
    return DATA_SUPER_AAD.pack(MSG_DATA_SUPER, receiver_index, counter)


# --- Hello: signed key announcement -----------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """A verified Hello: the sender's key, its address (derived, never sent) and what it signed."""

    flags: int
    public_key: bytes
    timestamp_ms: int
    target: bytes
    signature: bytes
    address: bytes

    @property
    def is_broadcast(self) -> bool:
        """True if the Hello is addressed to no one in particular."""
        return self.target == BROADCAST_TARGET


def _hello_signed_message(signed_part: bytes | bytearray | memoryview) -> bytes:
    return HELLO_DOMAIN + bytes(signed_part)


def build_hello(identity: Identity, target: bytes | None, timestamp_ms: int, flags: int = 0) -> bytes:
    """A Hello signed by ``identity``; ``target`` is the addressee's fc94 address or None/zeros for anyone."""
    target = BROADCAST_TARGET if target is None else target
    _need_len("target", target, ADDRESS_LEN)
    _need_u32("flags", flags)
    if not 0 <= timestamp_ms <= _U64_MAX:
        raise ValueError("timestamp_ms must fit in 64 bits unsigned")
    head = HELLO.pack(MSG_HELLO, flags, identity.public_key, timestamp_ms, target, bytes(64))[:HELLO_SIGNED_LEN]
    return head + identity.sign(_hello_signed_message(head))


def parse_hello(buf: bytes | bytearray | memoryview) -> Hello:
    """Parse and authenticate a Hello.

    Raises Malformed (layout), BadIdentity (key has no valid fc94 address) or
    BadSignature (signature does not verify), each with a ``reason``.
    """
    if len(buf) != HELLO_LEN:
        raise Malformed(f"hello must be {HELLO_LEN} bytes, got {len(buf)}")
    word, flags, pub, ts, target, sig = HELLO.unpack(buf)
    if word != MSG_HELLO:
        raise Malformed("not a hello (type or reserved bytes)")
    address = address_from_pubkey(pub)
    if address is None:
        raise BadIdentity("hello key does not hash to a valid fc94 address")
    if not verify_signature(pub, sig, _hello_signed_message(memoryview(buf)[:HELLO_SIGNED_LEN])):
        raise BadSignature("hello signature does not verify")
    return Hello(flags, pub, ts, target, sig, address)


# --- Inner plaintext of a Data message ---------------------------------------
INNER_PROBE = 0x01
INNER_PROBE_REPLY = 0x02
INNER_BASE_FIRST = 0x10
INNER_BASE_LAST = 0x2F
PROBE_NONCE_LEN = 8
PROBE_LEN = 1 + PROBE_NONCE_LEN
IPV6_HEADER_LEN = 40
#: Super-packet status (both directions, in-session): "I accept DataSuper on this session", the
#: DataSuper fragments the reporter received / found missing, and the messages (Data and DataSuper) it
#: received on the session against the span of counters they cover, all since its previous report.
INNER_SUPER_REPORT = 0x04
#: kind, flags, reserved, fragments received, fragments missing, messages received, counter span
SUPER_REPORT = struct.Struct("<BBHIIII")
SUPER_REPORT_LEN = SUPER_REPORT.size  # 20
SUPER_FLAG_ACCEPT = 0x01

KIND_KEEPALIVE = "keepalive"
KIND_IPV6 = "ipv6"
KIND_PROBE = "probe"
KIND_PROBE_REPLY = "probe_reply"
KIND_BASE = "base"
KIND_SUPER_REPORT = "super_report"


def inner_kind(plaintext: bytes | bytearray | memoryview) -> str:
    """Classify a decrypted Data payload by its first byte (ARCHITECTURE.md "Inner plaintext").

    IPv4 (high nibble 4) and unknown first bytes raise Malformed: the overlay is IPv6-only.
    """
    if not plaintext:
        return KIND_KEEPALIVE
    first = plaintext[0]
    if first >> 4 == 6:
        return KIND_IPV6
    if first == INNER_PROBE:
        return KIND_PROBE
    if first == INNER_PROBE_REPLY:
        return KIND_PROBE_REPLY
    if first == INNER_SUPER_REPORT:
        return KIND_SUPER_REPORT
    if INNER_BASE_FIRST <= first <= INNER_BASE_LAST:
        return KIND_BASE
    if first >> 4 == 4:
        raise Malformed("IPv4 packet inside the overlay")
    raise Malformed(f"unknown inner payload type 0x{first:02x}")


class Probe(NamedTuple):
    """A path probe or its reply; the nonce ties a reply to the probe it answers."""

    is_reply: bool
    nonce: bytes


def build_probe(nonce: bytes) -> bytes:
    """Plaintext of an authenticated path probe."""
    _need_len("nonce", nonce, PROBE_NONCE_LEN)
    return bytes((INNER_PROBE,)) + nonce


def build_probe_reply(nonce: bytes) -> bytes:
    """Plaintext of the reply to the probe carrying ``nonce``."""
    _need_len("nonce", nonce, PROBE_NONCE_LEN)
    return bytes((INNER_PROBE_REPLY,)) + nonce


def parse_probe(plaintext: bytes | bytearray | memoryview) -> Probe:
    """Parse a Probe or ProbeReply plaintext (exactly 9 bytes)."""
    if len(plaintext) != PROBE_LEN:
        raise Malformed(f"probe must be {PROBE_LEN} bytes, got {len(plaintext)}")
    first = plaintext[0]
    if first not in (INNER_PROBE, INNER_PROBE_REPLY):
        raise Malformed("not a probe")
    return Probe(first == INNER_PROBE_REPLY, bytes(plaintext[1:]))


class SuperReport(NamedTuple):
    """Super-packet status: whether the reporter accepts DataSuper, its reassembly and message counts."""

    accept: bool
    received: int  # DataSuper fragments received
    missing: int  # DataSuper fragments of messages that never completed
    messages: int = 0  # messages (any kind) received on the session
    span: int = 0  # counters the report covers: span - messages were lost (negative: late ones made up)


def build_super_report(accept: bool, received: int, missing: int, messages: int = 0, span: int = 0) -> bytes:
    """Plaintext of a super-packet status report (counts saturate at 2**32 - 1)."""
    return SUPER_REPORT.pack(
        INNER_SUPER_REPORT,
        SUPER_FLAG_ACCEPT if accept else 0,
        0,
        *(min(v, _U32_MAX) for v in (received, missing, messages, span)),
    )


def parse_super_report(plaintext: bytes | bytearray | memoryview) -> SuperReport:
    """Parse a super-packet status report (exactly 12 bytes, unknown flags and reserved bytes zero)."""
    if len(plaintext) != SUPER_REPORT_LEN:
        raise Malformed(f"super report must be {SUPER_REPORT_LEN} bytes, got {len(plaintext)}")
    kind, flags, reserved, received, missing, messages, span = SUPER_REPORT.unpack(plaintext)
    if kind != INNER_SUPER_REPORT or reserved or flags & ~SUPER_FLAG_ACCEPT:
        raise Malformed("not a super report")
    return SuperReport(bool(flags & SUPER_FLAG_ACCEPT), received, missing, messages, span)


def ipv6_src_dst(packet: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """Source and destination of an inner IPv6 packet, for the inner-source and outbound-source checks."""
    if len(packet) < IPV6_HEADER_LEN:
        raise Malformed("IPv6 packet shorter than its header")
    if packet[0] >> 4 != 6:
        raise Malformed("not an IPv6 packet")
    return bytes(packet[8:24]), bytes(packet[24:40])
