"""Base control messages: round trips, strictness and fuzzing of every parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from husarnet_ros.core import base_proto as bp
from husarnet_ros.core.wire import Malformed

ADDR = bytes.fromhex("fc94") + bytes(range(14))
PUB = bytes(range(32))
EPS = [("198.18.0.1", 5582), ("fd00::2", 443), ("fc94::1", 1)]

ALL_PARSERS = [
    bp.parse_login_challenge,
    bp.parse_login,
    bp.parse_login_ok,
    bp.parse_endpoints,
    bp.parse_query,
    bp.parse_peer_info,
    bp.parse_relay,
    bp.parse_relayed,
    bp.parse_udp_ping,
    bp.parse_udp_pong,
    bp.parse_observed,
]


def test_login_challenge_round_trip() -> None:
    nonce = bytes(range(32))
    msg = bp.build_login_challenge(nonce)
    assert msg[0] == bp.LOGIN_CHALLENGE
    assert bp.parse_login_challenge(msg) == nonce
    with pytest.raises(Malformed):
        bp.parse_login_challenge(msg + b"x")
    with pytest.raises(Malformed):
        bp.parse_login_challenge(msg[:-1])


def test_login_round_trip() -> None:
    sig = bytes(range(64))
    msg = bp.build_login(sig, "robot-1", EPS)
    got = bp.parse_login(msg)
    assert got == bp.Login(sig, "robot-1", EPS)
    assert bp.parse_login(bp.build_login(sig, "", [])) == bp.Login(sig, "", [])
    with pytest.raises(ValueError):
        bp.build_login(sig, "bad name", [])
    with pytest.raises(ValueError):
        bp.build_login(sig, "x" * 64, [])
    with pytest.raises(ValueError):
        bp.build_login(sig, "robot\u00e9", [])


def test_login_rejects_bad_hostname_bytes_and_trailing() -> None:
    sig = bytes(64)
    msg = bytearray(bp.build_login(sig, "abc", []))
    msg[66] = 0x0A  # newline inside the hostname
    with pytest.raises(Malformed):
        bp.parse_login(bytes(msg))
    with pytest.raises(Malformed):
        bp.parse_login(bp.build_login(sig, "abc", []) + b"\x00")
    bad_len = bytearray(bp.build_login(sig, "abc", []))
    bad_len[65] = 200
    with pytest.raises(Malformed):
        bp.parse_login(bytes(bad_len))


def test_login_ok_round_trip() -> None:
    assert bp.parse_login_ok(bp.build_login_ok(None)) is None
    assert bp.parse_login_ok(bp.build_login_ok(("198.18.5.6", 40000))) == ("198.18.5.6", 40000)
    with pytest.raises(Malformed):
        bp.parse_login_ok(bytes((bp.LOGIN_OK, 2)))


def test_endpoints_round_trip_and_bounds() -> None:
    assert bp.parse_endpoints(bp.build_endpoints(EPS)) == EPS
    assert bp.parse_endpoints(bp.build_endpoints([])) == []
    many = [("198.18.0.1", p) for p in range(1, bp.MAX_ENDPOINTS + 2)]
    with pytest.raises(ValueError):
        bp.build_endpoints(many)
    # A count above the bound is refused before any endpoint is read.
    with pytest.raises(Malformed):
        bp.parse_endpoints(bytes((bp.ENDPOINTS, bp.MAX_ENDPOINTS + 1)) + bytes(7 * 17))
    # Count says 2, only one present.
    one = bp.encode_endpoint(("198.18.0.1", 1))
    with pytest.raises(Malformed):
        bp.parse_endpoints(bytes((bp.ENDPOINTS, 2)) + one)


def test_endpoint_encoding_rules() -> None:
    assert bp.encode_endpoint(("::ffff:198.18.0.1", 7)) == bp.encode_endpoint(("198.18.0.1", 7))
    assert bp.encode_endpoint(("fe80::1%eth0", 7)) == bp.encode_endpoint(("fe80::1", 7))
    for bad in [("0.0.0.0", 1), ("::", 1), ("224.3.252.148", 1), ("198.18.0.1", 0), ("198.18.0.1", 70000)]:
        with pytest.raises(ValueError):
            bp.encode_endpoint(bad)
    with pytest.raises(Malformed):  # mapped IPv6 on the wire is not canonical
        bp.parse_observed(bytes((bp.OBSERVED, 6)) + bytes(10) + b"\xff\xff" + bytes(4) + b"\x01\x00")
    with pytest.raises(Malformed):  # unknown kind
        bp.parse_observed(bytes((bp.OBSERVED, 5)) + bytes(6))
    got = bp.usable_endpoints([("0.0.0.0", 1), ("198.18.0.1", 5), ("198.18.0.1", 5), ("fe80::1%eth0", 9)])
    assert got == [("198.18.0.1", 5), ("fe80::1", 9)]


def test_query_round_trip() -> None:
    assert bp.parse_query(bp.build_query(ADDR)) == ADDR
    with pytest.raises(Malformed):
        bp.parse_query(bp.build_query(ADDR)[:-1])


def test_peer_info_round_trip() -> None:
    msg = bp.build_peer_info(ADDR, PUB, bp.FLAG_ONLINE | bp.FLAG_PUNCH, EPS)
    got = bp.parse_peer_info(msg)
    assert got == bp.PeerInfoMsg(ADDR, PUB, bp.FLAG_ONLINE | bp.FLAG_PUNCH, EPS)
    assert got.online and got.punch
    off = bp.parse_peer_info(bp.build_peer_info(ADDR, None, 0, []))
    assert not off.online and not off.punch and off.public_key == bytes(32) and off.endpoints == []


def test_peer_info_strictness() -> None:
    with pytest.raises(ValueError):
        bp.build_peer_info(ADDR, PUB, 0, EPS)  # offline with endpoints
    with pytest.raises(ValueError):
        bp.build_peer_info(ADDR, None, bp.FLAG_ONLINE, [])  # online without key
    with pytest.raises(ValueError):
        bp.build_peer_info(ADDR, PUB, 0x80, [])
    msg = bytearray(bp.build_peer_info(ADDR, PUB, bp.FLAG_ONLINE, []))
    msg[49] = 0x80
    with pytest.raises(Malformed):
        bp.parse_peer_info(bytes(msg))
    offline_with_key = bytearray(bp.build_peer_info(ADDR, None, 0, []))
    offline_with_key[20] = 1
    with pytest.raises(Malformed):
        bp.parse_peer_info(bytes(offline_with_key))


def test_relay_and_relayed_round_trip() -> None:
    dg = b"\x04\x00\x00\x00" + bytes(40)
    assert bp.parse_relay(bp.build_relay(ADDR, dg)) == (ADDR, dg)
    assert bp.parse_relayed(bp.build_relayed(ADDR, dg)) == (ADDR, dg)
    with pytest.raises(Malformed):
        bp.parse_relay(bp.build_relay(ADDR, dg)[:17])  # empty datagram
    with pytest.raises(Malformed):
        bp.parse_relayed(bp.build_relay(ADDR, dg))  # wrong type
    with pytest.raises(ValueError):
        bp.build_relay(ADDR, b"")
    with pytest.raises(ValueError):
        bp.build_relay(ADDR, bytes(bp.MAX_RELAYED + 1))


def test_udp_ping_pong_observed_round_trip() -> None:
    n = b"12345678"
    assert bp.parse_udp_ping(bp.build_udp_ping(n)) == n
    assert bp.parse_udp_pong(bp.build_udp_pong(n, ("fd00::5", 5582))) == (n, ("fd00::5", 5582))
    assert bp.parse_observed(bp.build_observed(("198.18.9.9", 1234))) == ("198.18.9.9", 1234)
    with pytest.raises(Malformed):
        bp.parse_udp_pong(bp.build_udp_pong(n, ("fd00::5", 5582)) + b"\x00")


def test_login_message_is_domain_separated() -> None:
    m = bp.login_message(PUB, bytes(32))
    assert m.startswith(b"husarnet_ros login\n") and m.endswith(PUB + bytes(32))
    with pytest.raises(ValueError):
        bp.login_message(PUB[:31], bytes(32))


def test_message_type() -> None:
    assert bp.message_type(bp.build_query(ADDR)) == bp.QUERY
    with pytest.raises(Malformed):
        bp.message_type(b"")
    with pytest.raises(Malformed):
        bp.message_type(b"\x2f")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(sorted(bp.MESSAGE_NAMES)))
def test_fuzz_parsers_only_raise_malformed(data: bytes, first: int) -> None:
    """Random bytes (with a plausible type byte) either parse or raise Malformed, never anything else."""
    for buf in (data, bytes((first,)) + data):
        for parse in ALL_PARSERS:
            with contextlib.suppress(Malformed):
                parse(buf)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.ip_addresses(v=4).filter(lambda a: not (a.is_unspecified or a.is_multicast)),
                st.ip_addresses(v=6).filter(
                    lambda a: not (a.is_unspecified or a.is_multicast or a.ipv4_mapped is not None)
                ),
            ).map(str),
            st.integers(1, 65535),
        ),
        max_size=bp.MAX_ENDPOINTS,
    ),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=32, max_size=32),
    st.sampled_from([bp.FLAG_ONLINE, bp.FLAG_ONLINE | bp.FLAG_PUNCH]),
)
def test_property_peer_info_round_trip(eps, addr, pub, flags) -> None:
    assert bp.parse_peer_info(bp.build_peer_info(addr, pub, flags, eps)) == bp.PeerInfoMsg(addr, pub, flags, eps)
    assert bp.parse_endpoints(bp.build_endpoints(eps)) == eps
