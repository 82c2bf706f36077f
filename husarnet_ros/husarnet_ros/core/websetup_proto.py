"""Websetup message format (DESIGN.md 4.8): build and parse, strictly bounded, HMAC-SHA256 authenticated.

All integers are big-endian (network order)::

    request: version(1)=1 | counter(8) | command(1)      | args_len(2) | args                 | mac(32)
    reply:   version(1)=1 | counter(8) | 0x80|command(1) | body_len(2) | status(1) fields     | mac(32)

    field  = len(2) | UTF-8 bytes           (at most 8 fields; args_len <= 1024; reply body <= 8192)
    mac    = HMAC-SHA256(secret, client_address(16) || every byte before the mac)

The reply echoes the request's counter, so a client matches replies to its
request and a reply cannot be replayed into a later exchange.  The reply flag
(bit 7 of the command byte) keeps a reply from ever parsing as a request.

The client's 16-byte overlay address is bound into the MAC without being
sent (like AEAD associated data).  The node keeps one replay counter per
sender; without the binding, a message that sender A got accepted could be
sent again from sender B whose counter is still lower.  The address is the
source address the node sees, which the overlay authenticates.

Parsers check every length before use, verify the MAC (``hmac.compare_digest``)
before looking at the arguments, and raise only :class:`WebsetupError`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

VERSION = 1
SECRET_LEN = 32
MAC_LEN = 32
ADDRESS_LEN = 16
HEADER = struct.Struct(">BQBH")  # version, counter, command, length
HEADER_LEN = HEADER.size  # 12
MAX_ARGS_LEN = 1024
MAX_REPLY_BODY = 8192
MAX_FIELDS = 8
MAX_REPLY_FIELDS = 512
MAX_COUNTER = (1 << 64) - 1
REPLY_FLAG = 0x80
MIN_REQUEST = HEADER_LEN + MAC_LEN
MAX_REQUEST = HEADER_LEN + MAX_ARGS_LEN + MAC_LEN
MAX_REPLY = HEADER_LEN + MAX_REPLY_BODY + MAC_LEN

STATUS_OK = 0
STATUS_ERROR = 1

COMMANDS: dict[str, int] = {
    "ping": 1,
    "whitelist-add": 2,
    "whitelist-rm": 3,
    "whitelist-ls": 4,
    "whitelist-enable": 5,
    "whitelist-disable": 6,
    "host-add": 7,
    "host-rm": 8,
    "get-version": 9,
    "get-latency": 10,
    "change-secret": 11,
    "cleanup": 12,
}
COMMAND_NAMES: dict[int, str] = {v: k for k, v in COMMANDS.items()}

# (minimum, maximum) number of arguments of each command; the server checks their content.
ARG_COUNTS: dict[str, tuple[int, int]] = {
    "ping": (0, 0),
    "whitelist-add": (1, 2),
    "whitelist-rm": (1, 1),
    "whitelist-ls": (0, 1),
    "whitelist-enable": (0, 0),
    "whitelist-disable": (0, 0),
    "host-add": (2, 2),
    "host-rm": (1, 1),
    "get-version": (0, 0),
    "get-latency": (0, 0),
    "change-secret": (1, 1),
    "cleanup": (0, 0),
}


class WebsetupError(Exception):
    """A websetup message or exchange failed; ``reason`` is a counter name such as 'malformed' or 'bad_mac'."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


@dataclass(frozen=True)
class Command:
    counter: int
    command: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reply:
    counter: int
    command: str
    ok: bool
    fields: tuple[str, ...] = ()


def _check_keys(secret: bytes, client_address: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_LEN:
        raise ValueError(f"websetup secret must be {SECRET_LEN} bytes")
    if not isinstance(client_address, (bytes, bytearray)) or len(client_address) != ADDRESS_LEN:
        raise ValueError(f"client address must be {ADDRESS_LEN} bytes")


def compute_mac(secret: bytes, client_address: bytes, body: bytes) -> bytes:
    """HMAC-SHA256 over the client address and the message body (everything before the mac)."""
    mac = hmac.new(bytes(secret), bytes(client_address), hashlib.sha256)
    mac.update(body)
    return mac.digest()


def _encode_fields(fields: Sequence[str], limit: int, max_fields: int) -> bytes:
    if isinstance(fields, (str, bytes)):
        raise ValueError("fields must be a sequence of strings")
    if len(fields) > max_fields:
        raise ValueError(f"at most {max_fields} fields")
    out = bytearray()
    for f in fields:
        if not isinstance(f, str):
            raise ValueError("every field must be a string")
        raw = f.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise ValueError("field too long")
        out += struct.pack(">H", len(raw)) + raw
    if len(out) > limit:
        raise ValueError(f"fields take {len(out)} bytes; at most {limit} are allowed")
    return bytes(out)


def _decode_fields(data: bytes, max_fields: int) -> tuple[str, ...]:
    fields: list[str] = []
    pos = 0
    while pos < len(data):
        if len(fields) >= max_fields:
            raise WebsetupError("malformed", "too many fields")
        if pos + 2 > len(data):
            raise WebsetupError("malformed", "truncated field length")
        (n,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if pos + n > len(data):
            raise WebsetupError("malformed", "field runs past the end")
        try:
            fields.append(data[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise WebsetupError("malformed", "field is not UTF-8") from None
        pos += n
    return tuple(fields)


def _build(secret: bytes, client_address: bytes, counter: int, code: int, payload: bytes) -> bytes:
    if not isinstance(counter, int) or not 0 <= counter <= MAX_COUNTER:
        raise ValueError("counter must fit in 64 bits")
    body = HEADER.pack(VERSION, counter, code, len(payload)) + payload
    return body + compute_mac(secret, client_address, body)


def _split(datagram: bytes, secret: bytes, client_address: bytes, min_len: int, max_len: int) -> tuple[int, int, bytes]:
    """Check lengths, version and MAC; return (counter, command byte, payload)."""
    _check_keys(secret, client_address)
    if not isinstance(datagram, (bytes, bytearray, memoryview)):
        raise WebsetupError("malformed", "not bytes")
    data = bytes(datagram)
    if len(data) < min_len:
        raise WebsetupError("malformed", f"{len(data)} bytes is shorter than the minimum {min_len}")
    if len(data) > max_len:
        raise WebsetupError("malformed", f"{len(data)} bytes is longer than the maximum {max_len}")
    version, counter, code, length = HEADER.unpack_from(data, 0)
    if version != VERSION:
        raise WebsetupError("bad_version", f"version {version} is not supported (expected {VERSION})")
    if HEADER_LEN + length + MAC_LEN != len(data):
        raise WebsetupError("malformed", "length field does not match the datagram (truncated MAC?)")
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(compute_mac(secret, client_address, body), mac):
        raise WebsetupError("bad_mac", "message authentication failed")
    return counter, code, body[HEADER_LEN:]


def build_command(secret: bytes, client_address: bytes, counter: int, command: str, args: Sequence[str] = ()) -> bytes:
    """An authenticated request datagram; raises ``ValueError`` for anything the parser would refuse."""
    _check_keys(secret, client_address)
    if command not in COMMANDS:
        raise ValueError(f"unknown websetup command {command!r}; known: {', '.join(COMMANDS)}")
    return _build(secret, client_address, counter, COMMANDS[command], _encode_fields(args, MAX_ARGS_LEN, MAX_FIELDS))


def parse_command(datagram: bytes, secret: bytes, client_address: bytes) -> Command:
    """Parse and authenticate a request from ``client_address``; raises only :class:`WebsetupError`."""
    counter, code, payload = _split(datagram, secret, client_address, MIN_REQUEST, MAX_REQUEST)
    if code & REPLY_FLAG:
        raise WebsetupError("malformed", "a reply where a request was expected")
    name = COMMAND_NAMES.get(code)
    if name is None:
        raise WebsetupError("malformed", f"unknown command id {code}")
    return Command(counter, name, _decode_fields(payload, MAX_FIELDS))


def build_reply(
    secret: bytes, client_address: bytes, counter: int, command: str, ok: bool, fields: Sequence[str] = ()
) -> bytes:
    """An authenticated reply to ``client_address``'s request number ``counter``."""
    _check_keys(secret, client_address)
    if command not in COMMANDS:
        raise ValueError(f"unknown websetup command {command!r}")
    payload = bytes([STATUS_OK if ok else STATUS_ERROR]) + _encode_fields(fields, MAX_REPLY_BODY - 1, MAX_REPLY_FIELDS)
    return _build(secret, client_address, counter, COMMANDS[command] | REPLY_FLAG, payload)


def parse_reply(datagram: bytes, secret: bytes, client_address: bytes) -> Reply:
    """Parse and authenticate a reply addressed to ``client_address``; raises only :class:`WebsetupError`."""
    counter, code, payload = _split(datagram, secret, client_address, MIN_REQUEST + 1, MAX_REPLY)
    if not code & REPLY_FLAG:
        raise WebsetupError("malformed", "a request where a reply was expected")
    name = COMMAND_NAMES.get(code & ~REPLY_FLAG)
    if name is None:
        raise WebsetupError("malformed", f"unknown command id {code & ~REPLY_FLAG}")
    status = payload[0]
    if status not in (STATUS_OK, STATUS_ERROR):
        raise WebsetupError("malformed", f"unknown status {status}")
    return Reply(counter, name, status == STATUS_OK, _decode_fields(payload[1:], MAX_REPLY_FIELDS))
