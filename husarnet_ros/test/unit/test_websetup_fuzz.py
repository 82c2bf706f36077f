"""Websetup format: build/parse round trips and fuzzing (only WebsetupError may escape a parser)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from husarnet_ros.core import websetup_proto as wp
from husarnet_ros.core.identity import parse_address
from husarnet_ros.core.websetup import WebsetupServer
from husarnet_ros.core.whitelist import Whitelist

SECRET = bytes(range(32))
CLIENT = parse_address("fc94::10")
OTHER = parse_address("fc94::11")

commands = st.sampled_from(sorted(wp.COMMANDS))
counters = st.integers(min_value=0, max_value=wp.MAX_COUNTER)
short_text = st.text(max_size=100)
args_st = st.lists(short_text, max_size=wp.MAX_FIELDS).filter(lambda a: sum(2 + len(x.encode()) for x in a) <= 1024)


@given(counter=counters, command=commands, args=args_st)
def test_command_round_trip(counter: int, command: str, args: list[str]) -> None:
    msg = wp.build_command(SECRET, CLIENT, counter, command, args)
    assert wp.parse_command(msg, SECRET, CLIENT) == wp.Command(counter, command, tuple(args))
    assert len(msg) <= wp.MAX_REQUEST


@given(counter=counters, command=commands, ok=st.booleans(), fields=st.lists(short_text, max_size=40))
def test_reply_round_trip(counter: int, command: str, ok: bool, fields: list[str]) -> None:
    msg = wp.build_reply(SECRET, CLIENT, counter, command, ok, fields)
    assert wp.parse_reply(msg, SECRET, CLIENT) == wp.Reply(counter, command, ok, tuple(fields))


def test_layout_is_big_endian_and_documented() -> None:
    msg = wp.build_command(SECRET, CLIENT, 0x0102030405060708, "host-add", ["fc94::a", "r1"])
    assert msg[0] == 1
    assert msg[1:9] == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert msg[9] == wp.COMMANDS["host-add"]
    assert struct.unpack(">H", msg[10:12])[0] == len(msg) - 12 - 32
    assert msg[12:14] == b"\x00\x07" and msg[14:21] == b"fc94::a"
    assert msg[-32:] == wp.compute_mac(SECRET, CLIENT, msg[:-32])
    reply = wp.build_reply(SECRET, CLIENT, 5, "ping", True, ["pong"])
    assert reply[9] == 0x80 | wp.COMMANDS["ping"] and reply[12] == wp.STATUS_OK


@given(data=st.binary(max_size=1200))
def test_random_bytes_only_websetup_errors(data: bytes) -> None:
    for parse in (wp.parse_command, wp.parse_reply):
        with pytest.raises(wp.WebsetupError):
            parse(data, SECRET, CLIENT)


@given(
    args=args_st,
    pos=st.integers(min_value=0, max_value=2000),
    flip=st.integers(min_value=1, max_value=255),
    cut=st.integers(min_value=0, max_value=2000),
    extra=st.binary(max_size=64),
)
def test_mutated_messages_rejected(args: list[str], pos: int, flip: int, cut: int, extra: bytes) -> None:
    msg = wp.build_command(SECRET, CLIENT, 7, "whitelist-add", args)
    flipped = bytearray(msg)
    flipped[pos % len(msg)] ^= flip
    for bad in (bytes(flipped), msg[: cut % len(msg)], msg + (extra or b"\x00")):
        with pytest.raises(wp.WebsetupError):
            wp.parse_command(bad, SECRET, CLIENT)
    # Bound to the client address and the secret.
    with pytest.raises(wp.WebsetupError, match="bad_mac"):
        wp.parse_command(msg, SECRET, OTHER)
    with pytest.raises(wp.WebsetupError, match="bad_mac"):
        wp.parse_command(msg, bytes(32), CLIENT)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: wp.build_command(SECRET, CLIENT, 1, "ping")[:-1], "malformed"),  # truncated MAC
        (lambda: b"\x02" + wp.build_command(SECRET, CLIENT, 1, "ping")[1:], "bad_version"),
        (lambda: wp.build_reply(SECRET, CLIENT, 1, "ping", True), "malformed"),  # reply is not a request
        (lambda: b"", "malformed"),
        (lambda: bytes(wp.MAX_REQUEST + 1), "malformed"),
    ],
)
def test_specific_rejections(build, reason: str) -> None:
    with pytest.raises(wp.WebsetupError) as info:
        wp.parse_command(build(), SECRET, CLIENT)
    assert info.value.reason == reason


def _raw(counter: int, code: int, payload: bytes, secret: bytes = SECRET) -> bytes:
    body = wp.HEADER.pack(wp.VERSION, counter, code, len(payload)) + payload
    return body + wp.compute_mac(secret, CLIENT, body)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00",  # half a length
        b"\x00\x05ab",  # field runs past the end
        b"\x00\x01\xff",  # not UTF-8
        b"\x00\x00" * 9,  # too many fields
    ],
)
def test_authenticated_but_malformed_fields(payload: bytes) -> None:
    with pytest.raises(wp.WebsetupError, match="malformed"):
        wp.parse_command(_raw(1, 1, payload), SECRET, CLIENT)


def test_unknown_command_id_and_reply_status() -> None:
    with pytest.raises(wp.WebsetupError, match="unknown command"):
        wp.parse_command(_raw(1, 99, b""), SECRET, CLIENT)
    with pytest.raises(wp.WebsetupError, match="unknown status"):
        wp.parse_reply(_raw(1, 0x81, b"\x07"), SECRET, CLIENT)


def test_builders_refuse_what_parsers_refuse() -> None:
    with pytest.raises(ValueError):
        wp.build_command(SECRET, CLIENT, 1, "format-disk")
    with pytest.raises(ValueError):
        wp.build_command(SECRET, CLIENT, 1, "host-add", ["fc94::a", "x" * 10_000])
    with pytest.raises(ValueError):
        wp.build_command(SECRET, CLIENT, 1, "ping", ["a"] * 9)
    with pytest.raises(ValueError):
        wp.build_command(SECRET, CLIENT, -1, "ping")
    with pytest.raises(ValueError):
        wp.build_command(SECRET[:16], CLIENT, 1, "ping")
    with pytest.raises(ValueError):
        wp.build_command(SECRET, CLIENT[:4], 1, "ping")


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=1200))
def test_server_handle_survives_garbage(tmp_path: Path, data: bytes) -> None:
    server = _fuzz_server(tmp_path)
    assert server.handle(data, ("fc94::10", 40000, 0, 0)) is None
    assert server.whitelist.entries() == {}
    assert server.counters.get("rate_limited") == 0


_servers: dict[Path, WebsetupServer] = {}


class _FastClock:
    """Each reading is 100 s later, so the failure limiter never hides the parser from the fuzzer."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 100.0
        return self.now


def _fuzz_server(tmp_path: Path) -> WebsetupServer:
    if tmp_path not in _servers:
        _servers[tmp_path] = WebsetupServer(
            tmp_path, Whitelist(tmp_path / "whitelist.json"), websetup_whitelist=["fc94::10"], clock=_FastClock()
        )
    return _servers[tmp_path]


_arg_text = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["fc94::a", "fc94::b", "fd00::1", "robot1", "Robot1", "bad name", "0", "99999", "ab" * 32]),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=commands, args=st.lists(_arg_text, max_size=3))
def test_authenticated_random_arguments_always_get_a_reply(tmp_path: Path, command: str, args: list[str]) -> None:
    """Whatever an authenticated sender puts in the arguments, the answer is a reply, never an exception."""
    server = _fuzz_server(tmp_path)
    if command == "change-secret":
        return  # would change the key under the other examples; covered in test_websetup.py
    counter = _next_counter(tmp_path)
    msg = wp.build_command(server.secret, CLIENT, counter, command, args)
    out = server.handle(msg, ("fc94::10", 40000, 0, 0))
    assert out is not None
    reply = wp.parse_reply(out, server.secret, CLIENT)
    assert reply.counter == counter and reply.command == command
    assert all(len(a) == 16 and a[:2] == b"\xfc\x94" for a in server.whitelist.entries())


_counters: dict[Path, int] = {}


def _next_counter(tmp_path: Path) -> int:
    _counters[tmp_path] = _counters.get(tmp_path, 0) + 1
    return _counters[tmp_path]
