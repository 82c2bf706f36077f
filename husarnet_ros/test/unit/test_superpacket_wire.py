"""DataSuper fragments and SuperReport: build/parse round trips, strict parsing, and the session's super seal/open."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from husarnet_ros.core import handshake as hs
from husarnet_ros.core import wire
from husarnet_ros.core.session import Keypair, SessionDrop, open_super, seal_super


def pair() -> tuple[Keypair, Keypair]:
    k1, k2 = os.urandom(32), os.urandom(32)
    common = {"cipher": "aes-256-gcm", "peer_public_key": b"", "peer_address": b""}
    a = Keypair(hs.KeyMaterial(k1, k2, local_index=7, remote_index=9, is_initiator=True, **common), 0.0)
    b = Keypair(hs.KeyMaterial(k2, k1, local_index=9, remote_index=7, is_initiator=False, **common), 0.0)
    return a, b


@given(st.binary(min_size=16, max_size=20000), st.integers(1, 2048), st.integers(0, 2**64 - 1))
def test_fragments_round_trip(sealed: bytes, size: int, counter: int) -> None:
    if -(-len(sealed) // size) > wire.SUPER_MAX_FRAGMENTS:
        with pytest.raises(ValueError):
            wire.build_super_fragments(5, counter, sealed, size)
        return
    frags = wire.build_super_fragments(5, counter, sealed, size)
    heads = [wire.parse_super_fragment(f) for f in frags]
    assert [h.index for h in heads] == list(range(len(frags)))
    assert {(h.receiver_index, h.counter, h.count) for h in heads} == {(5, counter, len(frags))}
    assert b"".join(f[wire.DATA_SUPER_HEADER_LEN :] for f in frags) == sealed
    assert len({len(f) for f in frags[:-1]}) <= 1 and len(frags[-1]) <= len(frags[0])


def test_fragment_parser_is_strict() -> None:
    good = wire.build_super_fragments(5, 1, bytes(40), 16)
    assert wire.parse_super_fragment(good[0]).count == 3
    bad_cases = [
        good[0][: wire.DATA_SUPER_HEADER_LEN],  # no slice
        good[0] + bytes(wire.SUPER_MAX_FRAGMENT),  # slice too long
        b"\x04" + good[0][1:],  # not type 6
        good[0][:1] + b"\x01" + good[0][2:],  # reserved type byte
        good[0][:16] + b"\x03" + good[0][17:],  # index == count
        good[0][:17] + b"\x41" + good[0][18:],  # count > 64
        good[0][:18] + b"\x01\x00" + good[0][20:],  # reserved trailer
    ]
    for bad in bad_cases:
        with pytest.raises(wire.Malformed):
            wire.parse_super_fragment(bad)


@given(st.booleans(), *(st.integers(0, 2**32 - 1) for _ in range(4)))
def test_report_round_trip(accept: bool, rec: int, miss: int, msgs: int, span: int) -> None:
    raw = wire.build_super_report(accept, rec, miss, msgs, span)
    assert len(raw) == wire.SUPER_REPORT_LEN
    assert wire.inner_kind(raw) == wire.KIND_SUPER_REPORT
    assert wire.parse_super_report(raw) == wire.SuperReport(accept, rec, miss, msgs, span)


def test_report_parser_is_strict() -> None:
    raw = wire.build_super_report(True, 1, 2, 3, 4)
    for bad in (raw[:-1], raw + b"\0", raw[:1] + b"\x02" + raw[2:], raw[:2] + b"\x01" + raw[3:], b"\x05" + raw[1:]):
        with pytest.raises(wire.Malformed):
            wire.parse_super_report(bad)
    assert wire.parse_super_report(wire.build_super_report(False, 2**40, 0)).received == 2**32 - 1  # saturates


def test_super_seal_open_and_no_confusion_with_data() -> None:
    a, b = pair()
    pt = os.urandom(3000)
    n, sealed = seal_super(a, pt)
    assert open_super(b, n, sealed) == pt
    with pytest.raises(SessionDrop, match="replay"):
        open_super(b, n, sealed)  # the whole message replayed
    # A Data ciphertext re-framed as a super message (same key, nonce) fails: the type is authenticated.
    d = a.seal(pt)
    ctr = int.from_bytes(d[8:16], "little")
    with pytest.raises(SessionDrop, match="bad_mac"):
        open_super(b, ctr, d[16:])
    assert b.open(d) == pt  # the failed attempt did not burn the counter
    # And a super ciphertext framed as Data fails too.
    n2, sealed2 = seal_super(a, pt)
    with pytest.raises(SessionDrop, match="bad_mac"):
        b.open(wire.build_data_header(9, n2) + sealed2)
    assert n2 == ctr + 1  # one counter sequence for both kinds
    with pytest.raises(ValueError):
        seal_super(a, bytes(wire.SUPER_MAX_PLAINTEXT + 1))


def reference_fragments(receiver: int, counter: int, sealed: bytes, size: int) -> list[bytes]:
    """Fragment by fragment, the obvious way: the builders' C-call tricks must give exactly this."""
    count = -(-len(sealed) // size)
    return [
        wire.DATA_SUPER_HEADER.pack(wire.MSG_DATA_SUPER, receiver, counter, i, count, 0)
        + sealed[i * size : (i + 1) * size]
        for i in range(count)
    ]


@given(
    st.binary(min_size=16, max_size=9000),
    st.integers(1, 2048),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=50),
    st.binary(max_size=50),
)
def test_a_run_is_the_reference_fragments_back_to_back_and_its_payloads_join_back(
    sealed: bytes, size: int, receiver: int, counter: int, before: bytes, after: bytes
) -> None:
    if -(-len(sealed) // size) > wire.SUPER_MAX_FRAGMENTS:
        with pytest.raises(ValueError):
            wire.super_fragment_run(receiver, counter, sealed, size)
        return
    frags = reference_fragments(receiver, counter, sealed, size)
    run = wire.super_fragment_run(receiver, counter, sealed, size)
    assert run == b"".join(frags)
    seg = wire.DATA_SUPER_HEADER_LEN + size
    # As in a GRO buffer: anything may come before the run; after it only when its last fragment is full.
    data = before + bytes(run) + (after if len(frags[-1]) == seg else b"")
    assert wire.super_run_payloads(data, len(before), len(frags), seg) == sealed


def test_run_payloads_refuse_what_does_not_fit() -> None:
    run = bytes(wire.super_fragment_run(5, 1, bytes(100), 40))  # 3 fragments of 60 bytes, the last 40
    assert wire.super_run_payloads(run, 0, 3, 60) == bytes(100)
    bad = [
        (run, 0, 4, 60),  # one fragment more than the buffer holds
        (run[:-20], 0, 3, 60),  # the last fragment has a header and no slice
        (run, -1, 3, 60),  # negative offset
        (run, 0, 0, 60),  # no fragment
        (run, 0, wire.SUPER_MAX_FRAGMENTS + 1, 60),
        (run, 0, 3, wire.DATA_SUPER_HEADER_LEN),  # fragments with no room for a slice
        (run, 0, 3, wire.DATA_SUPER_HEADER_LEN + wire.SUPER_MAX_FRAGMENT + 1),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            wire.super_run_payloads(*args)
