"""Noise IK handshake: key agreement, identity binding, mac1 before DH, cipher choice that cannot be downgraded."""

from __future__ import annotations

import struct

import pytest

from husarnet_ros.core import handshake as hs
from husarnet_ros.core import wire
from husarnet_ros.core.identity import Identity
from husarnet_ros.core.session import CIPHER_AES, CIPHER_CHACHA, Keypair

AES = hs.FEATURE_AES_HW | hs.FEATURE_ACCEPT_AES
TS = hs.tai64n(1_700_000_000.0)


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity, Identity]:
    return Identity.generate(), Identity.generate(), Identity.generate()


def handshake(a: Identity, b: Identity, fa: int = 0, fb: int = 0) -> tuple[hs.KeyMaterial, hs.KeyMaterial]:
    init, ist = hs.create_initiation(a, b.public_key, 101, TS, fa)
    rst = hs.consume_initiation(b, init)
    resp, kb = hs.create_response(rst, 202, fb)
    ka = hs.consume_response(ist, resp)
    return ka, kb


def _remac(receiver: Identity, msg: bytes | bytearray) -> bytes:
    body = bytes(msg[:-16])
    return body + hs.compute_mac1(receiver.x25519_public, body)


@pytest.mark.parametrize(
    ("fa", "fb", "cipher"), [(0, 0, CIPHER_CHACHA), (AES, 0, CIPHER_CHACHA), (AES, AES, CIPHER_AES)]
)
def test_handshake_agrees_on_keys_and_cipher(ids, fa: int, fb: int, cipher: str) -> None:
    a, b, _ = ids
    ka, kb = handshake(a, b, fa, fb)
    assert ka.send_key == kb.recv_key and ka.recv_key == kb.send_key and ka.send_key != ka.recv_key
    assert ka.cipher == kb.cipher == cipher
    assert (ka.local_index, ka.remote_index, kb.local_index, kb.remote_index) == (101, 202, 202, 101)
    assert ka.is_initiator and not kb.is_initiator
    assert ka.peer_public_key == b.public_key and ka.peer_address == b.address
    assert kb.peer_public_key == a.public_key and kb.peer_address == a.address
    assert ka.handshake_hash == kb.handshake_hash and len(ka.handshake_hash) == 32
    pa, pb = Keypair(ka, 0.0), Keypair(kb, 0.0)
    assert pb.open(pa.seal(b"ping")) == b"ping" and pa.open(pb.seal(b"pong")) == b"pong"
    assert "send_key" not in repr(ka) and ka.send_key.hex() not in repr(ka)


def test_each_handshake_has_fresh_keys(ids) -> None:
    a, b, _ = ids
    k1, _ = handshake(a, b)
    k2, _ = handshake(a, b)
    assert k1.send_key != k2.send_key


def test_responder_state_exposes_verified_identity(ids) -> None:
    a, b, _ = ids
    init, _ = hs.create_initiation(a, b.public_key, 7, TS, AES | hs.FEATURE_OFFLOAD)
    st = hs.consume_initiation(b, init)
    assert (st.peer_public_key, st.peer_address, st.timestamp, st.sender_index) == (a.public_key, a.address, TS, 7)
    assert st.features == AES | hs.FEATURE_OFFLOAD


def test_mac1(ids) -> None:
    a, b, c = ids
    init, _ = hs.create_initiation(a, b.public_key, 1, TS, 0)
    assert hs.check_mac1(b, init) and not hs.check_mac1(c, init) and not hs.check_mac1(a, init)
    assert not hs.check_mac1(b, init[:-1]) and not hs.check_mac1(b, b"")
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_initiation(c, init)  # addressed to someone else
    assert exc.value.reason == "bad_mac"


def test_mac1_is_checked_before_any_diffie_hellman(ids, monkeypatch) -> None:
    a, b, _ = ids
    init, _ = hs.create_initiation(a, b.public_key, 1, TS, 0)
    bad = bytearray(init)
    bad[-1] ^= 1

    def no_dh(*_args):
        raise AssertionError("DH ran before mac1 was checked")

    monkeypatch.setattr(hs, "_dh", no_dh)
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_initiation(b, bytes(bad))
    assert exc.value.reason == "bad_mac"


def test_malformed_messages(ids) -> None:
    a, b, _ = ids
    init, ist = hs.create_initiation(a, b.public_key, 1, TS, 0)
    for bad in (init[:-1], init + b"\0", b"\x02" + init[1:], init[:1] + b"\x01" + init[2:]):
        with pytest.raises(hs.HandshakeError) as exc:
            hs.consume_initiation(b, bad)
        assert exc.value.reason == "malformed"  # layout is checked first, before mac1
    resp, _ = hs.create_response(hs.consume_initiation(b, init), 2, 0)
    other_index = bytearray(resp)
    other_index[8:12] = struct.pack("<I", 999)
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_response(ist, _remac(a, other_index))
    assert exc.value.reason == "malformed"
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_response(ist, resp[:-1])
    assert exc.value.reason == "malformed"


def test_low_order_ephemeral_is_refused(ids) -> None:
    a, b, _ = ids
    init, _ = hs.create_initiation(a, b.public_key, 1, TS, 0)
    forged = bytearray(init)
    forged[8:40] = bytes(32)  # u = 0: all-zero shared secret
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_initiation(b, _remac(b, forged))
    assert exc.value.reason == "malformed"


def test_every_bit_flip_in_the_noise_part_breaks_the_initiation(ids) -> None:
    a, b, _ = ids
    init, _ = hs.create_initiation(a, b.public_key, 1, TS, AES)
    for pos in range(8, 152, 3):
        bad = bytearray(init)
        bad[pos] ^= 0x04
        with pytest.raises(hs.HandshakeError) as exc:
            hs.consume_initiation(b, bytes(bad))
        assert exc.value.reason == "bad_mac"  # mac1 catches the naive attacker
        with pytest.raises(hs.HandshakeError) as exc:
            hs.consume_initiation(b, _remac(b, bad))  # mac1 is public knowledge: AEAD catches the rest
        assert exc.value.reason in ("decrypt", "malformed"), pos


def test_features_cannot_be_downgraded_in_flight(ids) -> None:
    """An attacker who flips the encrypted feature bits (init or response) breaks the handshake."""
    a, b, _ = ids
    # initiation: the features are the last 4 plaintext bytes of enc_payload (before its 16-byte tag)
    init, ist = hs.create_initiation(a, b.public_key, 1, TS, AES)
    for pos in range(8 + 32 + 48 + 44, 8 + 32 + 48 + 48):
        bad = bytearray(init)
        bad[pos] ^= AES
        with pytest.raises(hs.HandshakeError) as exc:
            hs.consume_initiation(b, _remac(b, bad))
        assert exc.value.reason == "decrypt"
    # response: enc_payload is 4 encrypted feature bytes + tag; flip the chosen-cipher byte
    resp, _ = hs.create_response(hs.consume_initiation(b, init), 2, AES)
    for pos in (12 + 32, 12 + 32 + 1):
        bad = bytearray(resp)
        bad[pos] ^= 0x01
        with pytest.raises(hs.HandshakeError) as exc:
            hs.consume_response(ist, _remac(a, bad))
        assert exc.value.reason == "decrypt"
    km = hs.consume_response(ist, resp)  # the genuine response still completes: forgeries did not consume state
    assert km.cipher == CIPHER_AES


def test_initiator_refuses_a_cipher_its_features_do_not_allow(ids, monkeypatch) -> None:
    a, b, _ = ids
    init, ist = hs.create_initiation(a, b.public_key, 1, TS, 0)
    st = hs.consume_initiation(b, init)
    monkeypatch.setattr(hs, "choose_cipher", lambda _i, _r: CIPHER_AES)  # a responder that ignores our features
    resp, _ = hs.create_response(st, 2, AES)
    monkeypatch.undo()
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_response(ist, resp)
    assert exc.value.reason == "malformed"


def test_responses_and_states_are_single_use(ids) -> None:
    a, b, _ = ids
    init, ist = hs.create_initiation(a, b.public_key, 1, TS, 0)
    st = hs.consume_initiation(b, init)
    resp, _ = hs.create_response(st, 2, 0)
    with pytest.raises(hs.HandshakeError) as exc:
        hs.create_response(st, 3, 0)
    assert exc.value.reason == "replay"
    hs.consume_response(ist, resp)
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_response(ist, resp)  # a replayed response must not reinstall keys
    assert exc.value.reason == "replay"


def test_response_from_an_impostor_fails(ids) -> None:
    a, b, c = ids
    init, ist = hs.create_initiation(a, b.public_key, 1, TS, 0)
    # c cannot read an initiation meant for b even with a correct mac1 for itself
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_initiation(c, _remac(c, init))
    assert exc.value.reason == "decrypt"
    # c answers a's initiation to c, then replays that response into a's initiation to b
    init_c, _ = hs.create_initiation(a, c.public_key, 1, TS, 0)
    resp_c, _ = hs.create_response(hs.consume_initiation(c, init_c), 2, 0)
    with pytest.raises(hs.HandshakeError) as exc:
        hs.consume_response(ist, resp_c)
    assert exc.value.reason == "decrypt"


def test_initiating_to_a_key_without_address_is_bad_id(ids) -> None:
    from nacl.signing import SigningKey

    from husarnet_ros.core.identity import address_from_pubkey

    pub = next(
        p
        for p in (bytes(SigningKey(i.to_bytes(32, "little")).verify_key) for i in range(1000))
        if address_from_pubkey(p) is None
    )
    with pytest.raises(hs.HandshakeError) as exc:
        hs.create_initiation(ids[0], pub, 1, TS, 0)
    assert exc.value.reason == "bad_id"
    with pytest.raises(ValueError):
        hs.create_initiation(ids[0], ids[1].public_key, 1, b"short", 0)


def test_tai64n() -> None:
    assert hs.tai64n(0.0) == bytes.fromhex("400000000000000a") + bytes(4)
    t = hs.tai64n(1_700_000_000.999)
    assert len(t) == 12 and struct.unpack(">QI", t) == (0x400000000000000A + 1_700_000_000, 998244352 & ~0xFFFFFF)
    # byte order is time order, at the whitened (16.7 ms) granularity
    samples = [hs.tai64n(1_700_000_000 + i * 0.02) for i in range(200)]
    assert samples == sorted(samples) and len(set(samples)) == 200
    assert hs.tai64n(5.001) == hs.tai64n(5.0)  # finer than 2**24 ns is hidden


def test_choose_cipher_table() -> None:
    for fi in range(4):
        for fr in range(4):
            expected = CIPHER_AES if fi == 3 and fr == 3 else CIPHER_CHACHA
            assert hs.choose_cipher(fi, fr) == expected, (fi, fr)


def test_local_features_env_override(monkeypatch) -> None:
    monkeypatch.setenv(hs.ENV_CIPHER, "chacha")
    assert hs.local_features() == 0
    monkeypatch.setenv(hs.ENV_CIPHER, "aes")
    assert hs.local_features() == AES
    monkeypatch.setenv(hs.ENV_CIPHER, "rot13")
    with pytest.raises(ValueError):
        hs.local_features()
    monkeypatch.delenv(hs.ENV_CIPHER)
    auto = hs.local_features()
    assert auto & hs.FEATURE_ACCEPT_AES
    assert bool(auto & hs.FEATURE_AES_HW) == hs.has_aes_hardware()


def test_message_sizes(ids) -> None:
    a, b, _ = ids
    init, _ = hs.create_initiation(a, b.public_key, 1, TS, 0)
    resp, _ = hs.create_response(hs.consume_initiation(b, init), 2, 0)
    assert len(init) == wire.HANDSHAKE_INIT_LEN and len(resp) == wire.HANDSHAKE_RESP_LEN
    assert len(resp) < len(init)  # a responder never amplifies


def test_each_end_learns_the_features_the_other_sent(ids) -> None:
    """Both roles know the peer's feature bits from the handshake alone (e.g. super-packet offload)."""
    a, b, _ = ids
    ka, kb = handshake(a, b, hs.FEATURE_OFFLOAD | AES, 0)
    assert kb.peer_features & hs.FEATURE_OFFLOAD  # the responder reads the initiator's payload
    assert not ka.peer_features & hs.FEATURE_OFFLOAD  # the initiator reads the response's: no offload offered
    ka, kb = handshake(a, b, 0, hs.FEATURE_OFFLOAD)
    assert ka.peer_features & hs.FEATURE_OFFLOAD and not kb.peer_features & hs.FEATURE_OFFLOAD
