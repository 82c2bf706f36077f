"""Conformance: our Noise IK against the independent `noiseprotocol` implementation, in both roles.

Only the Noise part of our messages (ephemeral || enc_static || enc_payload, and
ephemeral || enc_payload) is Noise; the type/index header and mac1 are
WireGuard-style framing, which these tests add or strip around noiseprotocol.
"""

from __future__ import annotations

import os
import struct

import pytest

from husarnet_ros.testing.ci import require

noise_connection = require("noise.connection", "noiseprotocol (pinned in scripts/requirements-dev.txt) missing")
NoiseConnection = noise_connection.NoiseConnection
NoiseKeypair = noise_connection.Keypair

from husarnet_ros.core import handshake as hs  # noqa: E402
from husarnet_ros.core import wire  # noqa: E402
from husarnet_ros.core.constants import NOISE_PROLOGUE, NOISE_PROTOCOL_NAME  # noqa: E402
from husarnet_ros.core.identity import Identity  # noqa: E402
from husarnet_ros.core.session import CIPHER_CHACHA, Keypair  # noqa: E402

TS = hs.tai64n(1_700_000_000.5)


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


def _noise(initiator: bool, static_private: bytes, remote_static: bytes | None = None) -> NoiseConnection:
    conn = NoiseConnection.from_name(NOISE_PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(NOISE_PROLOGUE)
    conn.set_keypair_from_private_bytes(NoiseKeypair.STATIC, static_private)
    if remote_static is not None:
        conn.set_keypair_from_public_bytes(NoiseKeypair.REMOTE_STATIC, remote_static)
    conn.start_handshake()
    return conn


def _frame_init(noise_msg: bytes, sender_index: int, responder: Identity) -> bytes:
    assert len(noise_msg) == 32 + 48 + 64
    msg = wire.build_handshake_init(sender_index, noise_msg[:32], noise_msg[32:80], noise_msg[80:])
    return msg[:-16] + hs.compute_mac1(responder.x25519_public, msg[:-16])


def _frame_resp(noise_msg: bytes, sender_index: int, receiver_index: int, initiator: Identity) -> bytes:
    assert len(noise_msg) == 32 + 20
    msg = wire.build_handshake_resp(sender_index, receiver_index, noise_msg[:32], noise_msg[32:])
    return msg[:-16] + hs.compute_mac1(initiator.x25519_public, msg[:-16])


def _check_transport(ours: Keypair, theirs: NoiseConnection) -> None:
    """Both directions, several messages, so the counter/nonce layout is exercised beyond 0."""
    for i in range(5):
        pt = os.urandom(100 + i)
        dgram = ours.seal(pt)
        assert wire.data_header(dgram)[1] == i
        assert theirs.decrypt(dgram[16:]) == pt
        reply = os.urandom(60 + i)
        ct = theirs.encrypt(reply)
        assert ours.open(struct.pack("<IIQ", wire.MSG_DATA, ours.local_index, i) + ct) == reply


def test_identity_x25519_keys_are_consistent_for_noiseprotocol(alice: Identity) -> None:
    conn = _noise(True, alice.x25519_private, alice.x25519_public)
    # noiseprotocol derives the public half itself; it must be the converted Ed25519 key
    assert conn.noise_protocol.keypairs["s"].public_bytes == alice.x25519_public


def test_our_initiator_their_responder(alice: Identity, bob: Identity) -> None:
    features = 0  # ChaCha only: Noise transport messages are ChaChaPoly
    msg, state = hs.create_initiation(alice, bob.public_key, 0x1234, TS, features)
    theirs = _noise(False, bob.x25519_private)
    payload = theirs.read_message(msg[wire.INIT_NOISE_SLICE])
    assert payload == alice.public_key + TS + struct.pack("<I", features)
    assert theirs.noise_protocol.handshake_state.rs.public_bytes == alice.x25519_public
    resp_noise = theirs.write_message(struct.pack("<I", 0))  # chosen cipher 0 = ChaCha20-Poly1305
    assert theirs.handshake_finished
    km = hs.consume_response(state, _frame_resp(resp_noise, 0x5678, 0x1234, alice))
    assert km.cipher == CIPHER_CHACHA and km.is_initiator
    assert (km.local_index, km.remote_index) == (0x1234, 0x5678)
    assert km.peer_address == bob.address
    assert km.handshake_hash == theirs.get_handshake_hash()
    _check_transport(Keypair(km, 0.0), theirs)


def test_their_initiator_our_responder(alice: Identity, bob: Identity) -> None:
    theirs = _noise(True, alice.x25519_private, bob.x25519_public)
    payload = alice.public_key + TS + struct.pack("<I", 0)
    init = _frame_init(theirs.write_message(payload), 0xAAAA, bob)
    assert hs.check_mac1(bob, init)
    state = hs.consume_initiation(bob, init)
    assert state.peer_public_key == alice.public_key
    assert state.peer_address == alice.address
    assert state.timestamp == TS and state.features == 0 and state.sender_index == 0xAAAA
    resp, km = hs.create_response(state, 0xBBBB, hs.FEATURE_AES_HW | hs.FEATURE_ACCEPT_AES)
    got = theirs.read_message(resp[wire.RESP_NOISE_SLICE])
    assert theirs.handshake_finished
    chosen = struct.unpack("<I", got)[0] >> 8 & 0xFF
    assert chosen == 0  # the initiator offered no AES, so ChaCha was chosen
    assert km.cipher == CIPHER_CHACHA and not km.is_initiator
    assert km.handshake_hash == theirs.get_handshake_hash()
    _check_transport(Keypair(km, 0.0), theirs)


def test_their_initiator_with_a_foreign_ed25519_key_is_bad_id(alice: Identity, bob: Identity) -> None:
    mallory = Identity.generate()
    # mallory authenticates with her own static key but claims alice's Ed25519 identity
    theirs = _noise(True, mallory.x25519_private, bob.x25519_public)
    init = _frame_init(theirs.write_message(alice.public_key + TS + bytes(4)), 1, bob)
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_initiation(bob, init)
    assert exc.value.reason == "bad_id"


def test_their_initiator_with_a_key_that_has_no_address_is_bad_id(bob: Identity) -> None:
    from nacl.bindings import crypto_sign_ed25519_sk_to_curve25519
    from nacl.signing import SigningKey

    from husarnet_ros.core.identity import address_from_pubkey

    seed = next(
        s
        for s in (i.to_bytes(32, "little") for i in range(1000))
        if address_from_pubkey(bytes(SigningKey(s).verify_key)) is None
    )
    pub = bytes(SigningKey(seed).verify_key)
    theirs = _noise(True, crypto_sign_ed25519_sk_to_curve25519(seed + pub), bob.x25519_public)
    init = _frame_init(theirs.write_message(pub + TS + bytes(4)), 1, bob)
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_initiation(bob, init)
    assert exc.value.reason == "bad_id"


def test_wrong_prologue_does_not_interoperate(alice: Identity, bob: Identity) -> None:
    conn = NoiseConnection.from_name(NOISE_PROTOCOL_NAME)
    conn.set_as_initiator()
    conn.set_prologue(b"some other protocol")
    conn.set_keypair_from_private_bytes(NoiseKeypair.STATIC, alice.x25519_private)
    conn.set_keypair_from_public_bytes(NoiseKeypair.REMOTE_STATIC, bob.x25519_public)
    conn.start_handshake()
    init = _frame_init(conn.write_message(alice.public_key + TS + bytes(4)), 1, bob)
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_initiation(bob, init)
    assert exc.value.reason == "decrypt"


def test_negated_ed25519_key_cannot_claim_the_original_address(alice: Identity, bob: Identity) -> None:
    """Ed25519->X25519 ignores the x sign, so -A shares A's static; it must still never yield A's address."""
    from husarnet_ros.core.identity import address_from_pubkey, ed25519_pub_to_x25519

    negated = alice.public_key[:31] + bytes([alice.public_key[31] ^ 0x80])
    assert ed25519_pub_to_x25519(negated) == alice.x25519_public
    theirs = _noise(True, alice.x25519_private, bob.x25519_public)
    init = _frame_init(theirs.write_message(negated + TS + bytes(4)), 1, bob)
    try:
        state = hs.consume_initiation(bob, init)
    except hs.HandshakeError as exc:
        assert exc.reason == "bad_id"
        assert address_from_pubkey(negated) is None
    else:  # about 1 in 1300 keys: a second address that only alice can use, never alice's own
        assert state.peer_address == address_from_pubkey(negated) != alice.address
