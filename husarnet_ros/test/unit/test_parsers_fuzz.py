"""Fuzz every parser of the crypto core: only the documented exception types may escape, round trips hold.

Inputs: random bytes, truncations/extensions of valid messages, and bit flips of valid messages.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from husarnet_ros.core import handshake as hs
from husarnet_ros.core import wire
from husarnet_ros.core.identity import Identity
from husarnet_ros.core.session import CIPHER_AES, CIPHER_CHACHA, Keypair, SessionDrop

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SESSION_REASONS = {"malformed", "too_old", "replay", "bad_mac", "expired"}
HANDSHAKE_REASONS = {"malformed", "bad_mac", "bad_id", "decrypt", "replay"}
TS = hs.tai64n(1_700_000_000.0)

ALICE = Identity.generate()
BOB = Identity.generate()
INIT, INIT_STATE = hs.create_initiation(ALICE, BOB.public_key, 11, TS, 3)
RESP, _ = hs.create_response(hs.consume_initiation(BOB, INIT), 22, 3)
HELLO = wire.build_hello(ALICE, BOB.address, 123456, 1)
DATA = wire.build_data_header(5, 9) + os.urandom(40)
PROBE = wire.build_probe(os.urandom(8))
IPV6 = b"\x60" + bytes(7) + os.urandom(32) + b"payload"
COOKIE = wire.build_cookie_reply(7, os.urandom(wire.COOKIE_NONCE_LEN), os.urandom(wire.MAC_LEN + wire.TAG_LEN))
SUPER = wire.build_super_fragments(5, 9, os.urandom(100), 64)[0]  # a first fragment: index 0 of 2
REPORT = wire.build_super_report(True, 3, 1, 4, 5)
VALID = [INIT, RESP, HELLO, DATA, COOKIE, SUPER]

u32 = st.integers(min_value=0, max_value=2**32 - 1)
u64 = st.integers(min_value=0, max_value=2**64 - 1)


def flips(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid message with 1-3 distinct bits flipped (never the message itself)."""

    def apply(positions: list[int]) -> bytes:
        out = bytearray(valid)
        for p in positions:
            out[p // 8] ^= 1 << (p % 8)
        return bytes(out)

    return st.lists(st.integers(0, len(valid) * 8 - 1), min_size=1, max_size=3, unique=True).map(apply)


def reshaped(valid: bytes) -> st.SearchStrategy[bytes]:
    """Truncations and extensions of a valid message."""
    return st.one_of(
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
        st.binary(min_size=1, max_size=64).map(lambda tail: valid + tail),
    )


def any_input(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), flips(valid), reshaped(valid))


ALL_INPUTS = st.one_of(*(any_input(v) for v in VALID), any_input(PROBE), any_input(IPV6), any_input(REPORT))


# --- wire parsers: Malformed or a value, never anything else -----------------------------------
PARSERS = [
    wire.message_type,
    wire.parse_handshake_init,
    wire.parse_handshake_resp,
    wire.parse_cookie_reply,
    wire.data_header,
    wire.parse_super_fragment,
    wire.parse_hello,
    wire.inner_kind,
    wire.parse_probe,
    wire.parse_super_report,
    wire.ipv6_src_dst,
]


@pytest.mark.parametrize("parse", PARSERS, ids=lambda f: f.__name__)
@FUZZ
@given(data=ALL_INPUTS)
def test_wire_parsers_raise_only_malformed(parse, data: bytes) -> None:
    for form in (data, bytearray(data), memoryview(data)):
        try:
            parse(form)
        except wire.Malformed as exc:
            assert exc.reason in ("malformed", "bad_sig", "bad_id")


@FUZZ
@given(data=st.one_of(flips(HELLO), reshaped(HELLO)))
def test_modified_hello_never_verifies(data: bytes) -> None:
    with pytest.raises(wire.Malformed):
        wire.parse_hello(data)


# --- round trips --------------------------------------------------------------------------------
@FUZZ
@given(idx=u32, eph=st.binary(min_size=32, max_size=32), s=st.binary(min_size=48, max_size=48),
       p=st.binary(min_size=64, max_size=64), mac=st.binary(min_size=16, max_size=16))  # fmt: skip
def test_handshake_init_round_trip(idx: int, eph: bytes, s: bytes, p: bytes, mac: bytes) -> None:
    raw = wire.build_handshake_init(idx, eph, s, p, mac)
    assert wire.parse_handshake_init(raw) == wire.HandshakeInit(idx, eph, s, p, mac)
    assert wire.build_handshake_init(*vars_of(wire.parse_handshake_init(raw))) == raw


@FUZZ
@given(si=u32, ri=u32, eph=st.binary(min_size=32, max_size=32), p=st.binary(min_size=20, max_size=20),
       mac=st.binary(min_size=16, max_size=16))  # fmt: skip
def test_handshake_resp_round_trip(si: int, ri: int, eph: bytes, p: bytes, mac: bytes) -> None:
    raw = wire.build_handshake_resp(si, ri, eph, p, mac)
    assert wire.parse_handshake_resp(raw) == wire.HandshakeResp(si, ri, eph, p, mac)
    assert wire.build_handshake_resp(*vars_of(wire.parse_handshake_resp(raw))) == raw


@FUZZ
@given(idx=u32, nonce=st.binary(min_size=24, max_size=24), enc=st.binary(min_size=32, max_size=32))
def test_cookie_reply_round_trip(idx: int, nonce: bytes, enc: bytes) -> None:
    raw = wire.build_cookie_reply(idx, nonce, enc)
    assert wire.parse_cookie_reply(raw) == wire.CookieReply(idx, nonce, enc)
    assert wire.build_cookie_reply(*wire.parse_cookie_reply(raw)) == raw


@FUZZ
@given(idx=u32, ctr=u64, sealed=st.binary(min_size=16, max_size=3000), size=st.integers(48, 2048))
def test_super_fragment_round_trip(idx: int, ctr: int, sealed: bytes, size: int) -> None:
    frags = wire.build_super_fragments(idx, ctr, sealed, size)
    heads = [wire.parse_super_fragment(f) for f in frags]
    assert heads == [wire.SuperFragment(idx, ctr, i, len(frags)) for i in range(len(frags))]
    assert b"".join(f[wire.DATA_SUPER_HEADER_LEN :] for f in frags) == sealed


def vars_of(obj) -> list:
    return [getattr(obj, f) for f in obj.__slots__]


@FUZZ
@given(idx=u32, ctr=u64, body=st.binary(min_size=16, max_size=100))
def test_data_header_round_trip(idx: int, ctr: int, body: bytes) -> None:
    assert wire.data_header(wire.build_data_header(idx, ctr) + body) == (idx, ctr)


@settings(max_examples=40, deadline=None)
@given(target=st.one_of(st.none(), st.binary(min_size=16, max_size=16)), ts=u64, flags=u32)
def test_hello_round_trip(target: bytes | None, ts: int, flags: int) -> None:
    h = wire.parse_hello(wire.build_hello(ALICE, target, ts, flags))
    assert (h.public_key, h.address, h.timestamp_ms, h.flags) == (ALICE.public_key, ALICE.address, ts, flags)
    assert h.target == (target if target is not None else bytes(16))
    assert wire.build_hello(ALICE, h.target, h.timestamp_ms, h.flags) == wire.build_hello(ALICE, target, ts, flags)


@FUZZ
@given(nonce=st.binary(min_size=8, max_size=8), reply=st.booleans())
def test_probe_round_trip(nonce: bytes, reply: bool) -> None:
    raw = wire.build_probe_reply(nonce) if reply else wire.build_probe(nonce)
    assert wire.parse_probe(raw) == wire.Probe(reply, nonce)
    assert wire.inner_kind(raw) == (wire.KIND_PROBE_REPLY if reply else wire.KIND_PROBE)


# --- handshake consumers: HandshakeError only; check_mac1 never raises --------------------------
@FUZZ
@given(data=st.one_of(any_input(INIT), any_input(RESP)))
def test_handshake_consumers_raise_only_handshake_error(data: bytes) -> None:
    assert isinstance(hs.check_mac1(BOB, data), bool)
    assert isinstance(hs.check_mac1(ALICE, data), bool)
    try:
        hs.consume_initiation(BOB, data)
    except hs.HandshakeError as exc:
        assert exc.reason in HANDSHAKE_REASONS
    else:
        assert data == INIT  # only the genuine message passes
    try:
        hs.consume_response(INIT_STATE, data)
    except hs.HandshakeError as exc:
        assert exc.reason in HANDSHAKE_REASONS
    else:
        assert data == RESP
        INIT_STATE.completed = False  # keep the shared state reusable for later examples


@FUZZ
@given(data=st.one_of(flips(INIT), reshaped(INIT)))
def test_modified_initiation_noise_part_never_accepted_even_with_valid_mac1(data: bytes) -> None:
    if len(data) >= 16:
        data = data[:-16] + hs.compute_mac1(BOB.x25519_public, data[:-16])
    try:
        state = hs.consume_initiation(BOB, data)
    except hs.HandshakeError as exc:
        assert exc.reason in HANDSHAKE_REASONS
        return
    # Only the unauthenticated framing may differ (sender index, mac1 that we recomputed): the Noise part
    # and everything the responder learns are the genuine ones. A changed sender index only misroutes
    # the reply, which the initiator then drops: no worse than dropping the packet.
    assert data[wire.INIT_NOISE_SLICE] == INIT[wire.INIT_NOISE_SLICE]
    assert (state.peer_public_key, state.timestamp, state.features) == (ALICE.public_key, TS, 3)


# --- session open: SessionDrop only, forgeries never delivered ------------------------------------
class _KM:
    def __init__(self, send: bytes, recv: bytes, cipher: str, local: int, remote: int) -> None:
        self.send_key, self.recv_key, self.cipher = send, recv, cipher
        self.local_index, self.remote_index, self.is_initiator = local, remote, True
        self.peer_public_key, self.peer_address = bytes(32), bytes(16)


@pytest.mark.parametrize("cipher", [CIPHER_CHACHA, CIPHER_AES])
@FUZZ
@given(data=st.data())
def test_session_open_raises_only_session_drop(cipher: str, data) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    tx = Keypair(_KM(k1, k2, cipher, 1, 2), 0.0)  # type: ignore[arg-type]
    rx = Keypair(_KM(k2, k1, cipher, 2, 1), 0.0)  # type: ignore[arg-type]
    genuine = tx.seal(data.draw(st.binary(max_size=64)))
    candidate = data.draw(any_input(genuine))
    try:
        rx.open(candidate)
    except SessionDrop as exc:
        assert exc.reason in SESSION_REASONS
    else:
        assert candidate == genuine  # nothing else may ever decrypt
    # whatever happened, the genuine datagram is still delivered unless it was the one accepted
    if candidate != genuine:
        rx.open(genuine)
