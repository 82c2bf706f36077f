"""Control messages between a node and its base server, carried inside their Noise session.

The node<->base channel is an ordinary Noise IK session (same handshake and
Data format as peer traffic), so every message below is authenticated and
encrypted by the session before it is parsed: a message that did not come out
of ``Keypair.open`` on the base session is never looked at.  The first
plaintext byte is the message type (0x10-0x2f, see ``wire.inner_kind``).

All integers are little-endian like the rest of the wire formats.  Parsers
are strict and bounded: every length is checked before use, lists have a
maximum length, trailing bytes are an error, and anything wrong raises
``wire.Malformed``.  Every ``parse_*`` has a ``build_*``.

Endpoints are encoded as ``kind(1) addr(4|16) port(2)`` with kind 4 or 6.
IPv4-mapped IPv6 addresses are encoded as IPv4; IPv6 scope ids are not sent
(a link-local address means nothing on another host).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .constants import ADDRESS_LEN, MAX_HOSTNAME_LEN
from .wire import Malformed

Endpoint = tuple[str, int]

# --- Message types (inner plaintext first byte) ------------------------------
LOGIN_CHALLENGE = 0x10  # base -> node: nonce(32), sent right after the handshake
LOGIN = 0x11  # node -> base: signature(64) hostname endpoints
LOGIN_OK = 0x12  # base -> node: optional observed UDP endpoint
ENDPOINTS = 0x13  # node -> base: LAN endpoints (replaces the previous list)
QUERY = 0x14  # node -> base: address(16)
PEER_INFO = 0x15  # base -> node: address pubkey flags endpoints
RELAY = 0x16  # node -> base: dst(16) datagram
RELAYED = 0x17  # base -> node: src(16) datagram, src stamped by the base
UDP_PING = 0x18  # node -> base (over UDP): nonce(8)
UDP_PONG = 0x19  # base -> node (over UDP): nonce(8) observed endpoint
OBSERVED = 0x1A  # base -> node: the node's public UDP endpoint as the base sees it

MESSAGE_NAMES = {
    LOGIN_CHALLENGE: "LOGIN_CHALLENGE",
    LOGIN: "LOGIN",
    LOGIN_OK: "LOGIN_OK",
    ENDPOINTS: "ENDPOINTS",
    QUERY: "QUERY",
    PEER_INFO: "PEER_INFO",
    RELAY: "RELAY",
    RELAYED: "RELAYED",
    UDP_PING: "UDP_PING",
    UDP_PONG: "UDP_PONG",
    OBSERVED: "OBSERVED",
}

NONCE_LEN = 32
PING_NONCE_LEN = 8
SIGNATURE_LEN = 64
PUBKEY_LEN = 32
MAX_ENDPOINTS = 16
MAX_RELAYED = 65535 - 64  # a relayed datagram must still fit a 2-byte TCP frame with our headers

# PEER_INFO flags
FLAG_ONLINE = 0x01  # the peer is logged in to this base now
FLAG_PUNCH = 0x02  # someone wants to reach you: probe these endpoints now (hole punching)
_KNOWN_FLAGS = FLAG_ONLINE | FLAG_PUNCH

LOGIN_DOMAIN = b"husarnet_ros login\n"

_PORT = struct.Struct("<H")


def login_message(base_public_key: bytes, nonce: bytes) -> bytes:
    """What a node signs to log in: domain, the base's key and the base's fresh nonce.

    Binding the base key stops a malicious base from relaying the challenge of
    another base; the nonce stops replay of an old login.
    """
    if len(base_public_key) != PUBKEY_LEN or len(nonce) != NONCE_LEN:
        raise ValueError("login message needs a 32-byte base key and a 32-byte nonce")
    return LOGIN_DOMAIN + base_public_key + nonce


# --- Endpoints ---------------------------------------------------------------
def encode_endpoint(ep: Endpoint) -> bytes:
    """``kind(1) addr port(2)``; raises ValueError for anything that is not a concrete IP endpoint."""
    host, port = ep
    if not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise ValueError(f"endpoint port out of range: {port!r}")
    ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"endpoint address not usable: {ip}")
    kind = 4 if ip.version == 4 else 6
    return bytes((kind,)) + ip.packed + _PORT.pack(port)


def _decode_endpoint(buf: memoryview, off: int) -> tuple[Endpoint, int]:
    if off >= len(buf):
        raise Malformed("endpoint truncated")
    kind = buf[off]
    if kind == 4:
        alen = 4
    elif kind == 6:
        alen = 16
    else:
        raise Malformed(f"unknown endpoint kind {kind}")
    end = off + 1 + alen + 2
    if end > len(buf):
        raise Malformed("endpoint truncated")
    raw = bytes(buf[off + 1 : off + 1 + alen])
    ip = ipaddress.IPv4Address(raw) if alen == 4 else ipaddress.IPv6Address(raw)
    if ip.is_unspecified or ip.is_multicast:
        raise Malformed("endpoint address not usable")
    if alen == 16 and ip.ipv4_mapped is not None:
        raise Malformed("IPv4-mapped address must be sent as IPv4")
    port = _PORT.unpack_from(buf, off + 1 + alen)[0]
    if port == 0:
        raise Malformed("endpoint port 0")
    return (str(ip), port), end


def encode_endpoints(eps: list[Endpoint]) -> bytes:
    """``count(1)`` then each endpoint; at most MAX_ENDPOINTS."""
    if len(eps) > MAX_ENDPOINTS:
        raise ValueError(f"at most {MAX_ENDPOINTS} endpoints")
    return bytes((len(eps),)) + b"".join(encode_endpoint(ep) for ep in eps)


def _decode_endpoints(buf: memoryview, off: int) -> tuple[list[Endpoint], int]:
    if off >= len(buf):
        raise Malformed("endpoint list truncated")
    count = buf[off]
    if count > MAX_ENDPOINTS:
        raise Malformed(f"endpoint list longer than {MAX_ENDPOINTS}")
    off += 1
    eps: list[Endpoint] = []
    for _ in range(count):
        ep, off = _decode_endpoint(buf, off)
        eps.append(ep)
    return eps, off


def usable_endpoints(eps: list[Endpoint]) -> list[Endpoint]:
    """The subset of ``eps`` that can be encoded (drops link-local scope ids, wildcards, duplicates), bounded."""
    out: list[Endpoint] = []
    seen: set[bytes] = set()
    for ep in eps:
        try:
            enc = encode_endpoint(ep)
        except (ValueError, TypeError):
            continue
        if enc in seen:
            continue
        seen.add(enc)
        out.append(_decode_endpoint(memoryview(enc), 0)[0])
        if len(out) == MAX_ENDPOINTS:
            break
    return out


def _view(buf: bytes | bytearray | memoryview, mtype: int, minimum: int) -> memoryview:
    mv = memoryview(buf)
    if len(mv) < minimum:
        raise Malformed(f"{MESSAGE_NAMES.get(mtype, hex(mtype))} shorter than {minimum} bytes")
    if mv[0] != mtype:
        raise Malformed(f"not a {MESSAGE_NAMES.get(mtype, hex(mtype))} message")
    return mv


def _done(mv: memoryview, off: int, mtype: int) -> None:
    if off != len(mv):
        raise Malformed(f"trailing bytes after {MESSAGE_NAMES[mtype]}")


def _build_fixed(mtype: int, value: bytes, size: int) -> bytes:
    """``type value`` for the messages whose only field has a fixed length."""
    if len(value) != size:
        raise ValueError(f"{MESSAGE_NAMES[mtype]} takes exactly {size} bytes")
    return bytes((mtype,)) + bytes(value)


def _parse_fixed(buf: bytes | bytearray | memoryview, mtype: int, size: int) -> bytes:
    mv = _view(buf, mtype, 1 + size)
    _done(mv, 1 + size, mtype)
    return bytes(mv[1:])


def message_type(buf: bytes | bytearray | memoryview) -> int:
    """Type of a base control plaintext; Malformed if empty or not a known base message."""
    if len(buf) == 0:
        raise Malformed("empty base message")
    t = buf[0]
    if t not in MESSAGE_NAMES:
        raise Malformed(f"unknown base message type 0x{t:02x}")
    return t


# --- LOGIN_CHALLENGE -------------------------------------------------------------
def build_login_challenge(nonce: bytes) -> bytes:
    """Base -> node: the fresh nonce the node must sign."""
    return _build_fixed(LOGIN_CHALLENGE, nonce, NONCE_LEN)


def parse_login_challenge(buf: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte nonce."""
    return _parse_fixed(buf, LOGIN_CHALLENGE, NONCE_LEN)


# --- LOGIN ---------------------------------------------------------------------
@dataclass(frozen=True)
class Login:
    """Node -> base: proof of key possession plus what the node wants others to know."""

    signature: bytes
    hostname: str
    endpoints: list[Endpoint]


def _check_hostname(hostname: str) -> bytes:
    raw = hostname.encode("ascii", "strict") if hostname.isascii() else None
    if raw is None or len(raw) > MAX_HOSTNAME_LEN or any(c < 0x21 or c > 0x7E for c in raw):
        raise ValueError(f"hostname must be printable ASCII, at most {MAX_HOSTNAME_LEN} bytes")
    return raw


def build_login(signature: bytes, hostname: str, endpoints: list[Endpoint]) -> bytes:
    """``type signature(64) hostname_len(1) hostname endpoints``."""
    if len(signature) != SIGNATURE_LEN:
        raise ValueError("signature must be 64 bytes")
    raw = _check_hostname(hostname)
    return bytes((LOGIN,)) + signature + bytes((len(raw),)) + raw + encode_endpoints(endpoints)


def parse_login(buf: bytes | bytearray | memoryview) -> Login:
    """Parse a LOGIN; the caller verifies the signature against the session's peer key."""
    mv = _view(buf, LOGIN, 1 + SIGNATURE_LEN + 1 + 1)
    sig = bytes(mv[1:65])
    hlen = mv[65]
    if hlen > MAX_HOSTNAME_LEN or 66 + hlen > len(mv):
        raise Malformed("login hostname too long or truncated")
    raw = bytes(mv[66 : 66 + hlen])
    if any(c < 0x21 or c > 0x7E for c in raw):
        raise Malformed("login hostname is not printable ASCII")
    eps, off = _decode_endpoints(mv, 66 + hlen)
    _done(mv, off, LOGIN)
    return Login(sig, raw.decode("ascii"), eps)


# --- LOGIN_OK --------------------------------------------------------------------
def build_login_ok(observed: Endpoint | None) -> bytes:
    """``type has_endpoint(1) [endpoint]``: the UDP endpoint the base has seen for this node, if any."""
    if observed is None:
        return bytes((LOGIN_OK, 0))
    return bytes((LOGIN_OK, 1)) + encode_endpoint(observed)


def parse_login_ok(buf: bytes | bytearray | memoryview) -> Endpoint | None:
    """The observed endpoint or None."""
    mv = _view(buf, LOGIN_OK, 2)
    has = mv[1]
    if has == 0:
        _done(mv, 2, LOGIN_OK)
        return None
    if has != 1:
        raise Malformed("LOGIN_OK flag must be 0 or 1")
    ep, off = _decode_endpoint(mv, 2)
    _done(mv, off, LOGIN_OK)
    return ep


# --- ENDPOINTS -------------------------------------------------------------------
def build_endpoints(endpoints: list[Endpoint]) -> bytes:
    """Node -> base: the node's current LAN endpoints."""
    return bytes((ENDPOINTS,)) + encode_endpoints(endpoints)


def parse_endpoints(buf: bytes | bytearray | memoryview) -> list[Endpoint]:
    """The endpoint list (at most MAX_ENDPOINTS)."""
    mv = _view(buf, ENDPOINTS, 2)
    eps, off = _decode_endpoints(mv, 1)
    _done(mv, off, ENDPOINTS)
    return eps


# --- QUERY -------------------------------------------------------------------------
def build_query(address: bytes) -> bytes:
    """Node -> base: tell me how to reach ``address`` (and tell it to probe me)."""
    return _build_fixed(QUERY, address, ADDRESS_LEN)


def parse_query(buf: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte address asked about."""
    return _parse_fixed(buf, QUERY, ADDRESS_LEN)


# --- PEER_INFO -----------------------------------------------------------------------
@dataclass(frozen=True)
class PeerInfoMsg:
    """Base -> node: what the base knows about ``address``.

    When FLAG_ONLINE is not set the peer is unknown/offline: the key is all
    zeros and there are no endpoints.  The receiver must still check that the
    key hashes to the address (the base is trusted to route, not to vouch).
    """

    address: bytes
    public_key: bytes
    flags: int
    endpoints: list[Endpoint]

    @property
    def online(self) -> bool:
        return bool(self.flags & FLAG_ONLINE)

    @property
    def punch(self) -> bool:
        return bool(self.flags & FLAG_PUNCH)


def build_peer_info(address: bytes, public_key: bytes | None, flags: int, endpoints: list[Endpoint]) -> bytes:
    """``type address(16) pubkey(32) flags(1) endpoints``."""
    if len(address) != ADDRESS_LEN:
        raise ValueError("address must be 16 bytes")
    if flags & ~_KNOWN_FLAGS or not 0 <= flags <= 0xFF:
        raise ValueError("unknown PEER_INFO flags")
    if flags & FLAG_ONLINE:
        if public_key is None or len(public_key) != PUBKEY_LEN:
            raise ValueError("an online peer needs its 32-byte key")
    else:
        if public_key not in (None, bytes(PUBKEY_LEN)) or endpoints or flags:
            raise ValueError("an offline peer has no key, flags or endpoints")
        public_key = bytes(PUBKEY_LEN)
    return bytes((PEER_INFO,)) + address + public_key + bytes((flags,)) + encode_endpoints(endpoints)


def parse_peer_info(buf: bytes | bytearray | memoryview) -> PeerInfoMsg:
    """Parse PEER_INFO; offline entries must have a zero key, no flags and no endpoints."""
    mv = _view(buf, PEER_INFO, 1 + ADDRESS_LEN + PUBKEY_LEN + 1 + 1)
    address = bytes(mv[1:17])
    pub = bytes(mv[17:49])
    flags = mv[49]
    if flags & ~_KNOWN_FLAGS:
        raise Malformed("unknown PEER_INFO flags")
    eps, off = _decode_endpoints(mv, 50)
    _done(mv, off, PEER_INFO)
    if not flags & FLAG_ONLINE and (flags or eps or pub != bytes(PUBKEY_LEN)):
        raise Malformed("offline PEER_INFO with a key, flags or endpoints")
    return PeerInfoMsg(address, pub, flags, eps)


# --- RELAY / RELAYED -------------------------------------------------------------------
def _build_addr_datagram(mtype: int, address: bytes, datagram: bytes | bytearray | memoryview) -> bytes:
    if len(address) != ADDRESS_LEN:
        raise ValueError("address must be 16 bytes")
    if not 0 < len(datagram) <= MAX_RELAYED:
        raise ValueError(f"relayed datagram must be 1..{MAX_RELAYED} bytes")
    return bytes((mtype,)) + address + bytes(datagram)


def _parse_addr_datagram(buf: bytes | bytearray | memoryview, mtype: int) -> tuple[bytes, bytes]:
    mv = _view(buf, mtype, 1 + ADDRESS_LEN + 1)
    if len(mv) - 1 - ADDRESS_LEN > MAX_RELAYED:
        raise Malformed("relayed datagram too long")
    return bytes(mv[1:17]), bytes(mv[17:])


def build_relay(dst: bytes, datagram: bytes | bytearray | memoryview) -> bytes:
    """Node -> base: forward this opaque (end-to-end sealed) datagram to ``dst``."""
    return _build_addr_datagram(RELAY, dst, datagram)


def parse_relay(buf: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """``(dst, datagram)``."""
    return _parse_addr_datagram(buf, RELAY)


def build_relayed(src: bytes, datagram: bytes | bytearray | memoryview) -> bytes:
    """Base -> node: ``datagram`` came from ``src`` (stamped from the sender's login, never from its message)."""
    return _build_addr_datagram(RELAYED, src, datagram)


def parse_relayed(buf: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """``(src, datagram)``."""
    return _parse_addr_datagram(buf, RELAYED)


# --- UDP_PING / UDP_PONG / OBSERVED -----------------------------------------------------
def build_udp_ping(nonce: bytes) -> bytes:
    """Node -> base over UDP: lets the base learn (and confirm) the node's public UDP mapping."""
    return _build_fixed(UDP_PING, nonce, PING_NONCE_LEN)


def parse_udp_ping(buf: bytes | bytearray | memoryview) -> bytes:
    """The 8-byte nonce."""
    return _parse_fixed(buf, UDP_PING, PING_NONCE_LEN)


def build_udp_pong(nonce: bytes, observed: Endpoint) -> bytes:
    """Base -> node over UDP: echo of the ping nonce plus the source endpoint the base saw."""
    if len(nonce) != PING_NONCE_LEN:
        raise ValueError("ping nonce must be 8 bytes")
    return bytes((UDP_PONG,)) + nonce + encode_endpoint(observed)


def parse_udp_pong(buf: bytes | bytearray | memoryview) -> tuple[bytes, Endpoint]:
    """``(nonce, observed endpoint)``."""
    mv = _view(buf, UDP_PONG, 1 + PING_NONCE_LEN + 7)
    ep, off = _decode_endpoint(mv, 1 + PING_NONCE_LEN)
    _done(mv, off, UDP_PONG)
    return bytes(mv[1 : 1 + PING_NONCE_LEN]), ep


def build_observed(observed: Endpoint) -> bytes:
    """Base -> node: your public UDP endpoint (sent over TCP when it changes)."""
    return bytes((OBSERVED,)) + encode_endpoint(observed)


def parse_observed(buf: bytes | bytearray | memoryview) -> Endpoint:
    """The observed endpoint."""
    mv = _view(buf, OBSERVED, 8)
    ep, off = _decode_endpoint(mv, 1)
    _done(mv, off, OBSERVED)
    return ep
