"""Keypair seal/open: layout, nonce, replay order (check before decrypt, commit after the tag), limits."""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass, replace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from husarnet_ros.core import wire
from husarnet_ros.core.constants import REPLAY_WINDOW_SIZE, Timers
from husarnet_ros.core.session import CIPHER_AES, CIPHER_CHACHA, Keypair, SessionDrop, has_aes_hardware, random_index

CIPHERS = [CIPHER_CHACHA, CIPHER_AES]


@dataclass
class FakeKM:
    """Same attributes as handshake.KeyMaterial (the real one is exercised in test_handshake.py)."""

    send_key: bytes
    recv_key: bytes
    cipher: str
    local_index: int
    remote_index: int
    is_initiator: bool
    peer_public_key: bytes = bytes(32)
    peer_address: bytes = bytes(16)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pair(cipher: str, timers: Timers | None = None, clock=None) -> tuple[Keypair, Keypair]:
    k1, k2 = os.urandom(32), os.urandom(32)
    a = FakeKM(k1, k2, cipher, local_index=0x11111111, remote_index=0x22222222, is_initiator=True)
    b = FakeKM(k2, k1, cipher, local_index=0x22222222, remote_index=0x11111111, is_initiator=False)
    kw = {"timers": timers} if timers else {}
    if clock is not None:
        kw["clock"] = clock
    return Keypair(a, 0.0, owner="peer-b", **kw), Keypair(b, 0.0, owner="peer-a", **kw)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_round_trip_both_directions(cipher: str) -> None:
    a, b = pair(cipher)
    assert a.cipher == cipher and a.owner == "peer-b" and a.is_initiator and not b.is_initiator
    for size in (0, 1, 40, 1400, 9000):
        pt = os.urandom(size)
        assert b.open(a.seal(pt)) == pt
        assert a.open(memoryview(b.seal(pt))) == pt
    assert a.send_counter == 5 and b.send_counter == 5
    assert a.last_tx is not None and a.last_rx is not None


@pytest.mark.parametrize(("cipher", "aead"), [(CIPHER_CHACHA, ChaCha20Poly1305), (CIPHER_AES, AESGCM)])
def test_datagram_layout_and_nonce(cipher: str, aead) -> None:
    key = os.urandom(32)
    km = FakeKM(key, os.urandom(32), cipher, 1, 0xA0B0C0D0, True)
    kp = Keypair(km, 0.0)
    for expected_counter in range(3):
        dgram = kp.seal(b"hello")
        assert len(dgram) == 16 + 5 + 16
        assert wire.data_header(dgram) == (0xA0B0C0D0, expected_counter)
        assert dgram[:4] == b"\x04\x00\x00\x00"
        nonce = bytes(4) + struct.pack("<Q", expected_counter)
        assert aead(key).decrypt(nonce, dgram[16:], None) == b"hello"


@pytest.mark.parametrize("cipher", CIPHERS)
def test_same_datagram_twice_is_a_replay(cipher: str) -> None:
    a, b = pair(cipher)
    d = a.seal(b"x")
    assert b.open(d) == b"x"
    with pytest.raises(SessionDrop) as exc:
        b.open(d)
    assert exc.value.reason == "replay"


def test_reordering_within_the_window_is_accepted() -> None:
    a, b = pair(CIPHER_CHACHA)
    dgrams = [a.seal(i.to_bytes(4, "little")) for i in range(REPLAY_WINDOW_SIZE + 1)]
    # newest first, then every older one: the oldest is exactly REPLAY_WINDOW_SIZE behind
    assert b.open(dgrams[-1]) == REPLAY_WINDOW_SIZE.to_bytes(4, "little")
    for i in range(REPLAY_WINDOW_SIZE - 1, -1, -1):
        assert b.open(dgrams[i]) == i.to_bytes(4, "little")


def test_older_than_the_window_is_too_old() -> None:
    a, b = pair(CIPHER_CHACHA)
    first = a.seal(b"old")
    for _ in range(REPLAY_WINDOW_SIZE):
        a.seal(b"")
    newest = a.seal(b"new")  # counter REPLAY_WINDOW_SIZE + 1
    assert b.open(newest) == b"new"
    with pytest.raises(SessionDrop) as exc:
        b.open(first)
    assert exc.value.reason == "too_old"


@pytest.mark.parametrize("cipher", CIPHERS)
def test_bit_flip_is_bad_mac_and_does_not_advance_the_window(cipher: str) -> None:
    a, b = pair(cipher)
    d = a.seal(b"genuine payload")
    for pos in (16, 20, len(d) - 1):  # ciphertext and tag
        bad = bytearray(d)
        bad[pos] ^= 0x01
        with pytest.raises(SessionDrop) as exc:
            b.open(bytes(bad))
        assert exc.value.reason == "bad_mac"
    # forged counter far in the future: must not slide the window past the genuine packets
    forged = bytearray(d)
    forged[8:16] = struct.pack("<Q", 10**9)
    with pytest.raises(SessionDrop) as exc:
        b.open(bytes(forged))
    assert exc.value.reason == "bad_mac"
    assert b.open(d) == b"genuine payload"


def test_header_errors_are_malformed() -> None:
    a, b = pair(CIPHER_CHACHA)
    d = a.seal(b"x")
    cases = [
        d[:31],
        b"",
        b"\x05" + d[1:],  # wrong type
        d[:2] + b"\x01" + d[3:],  # reserved byte set
        d[:4] + struct.pack("<I", 0x33333333) + d[8:],  # not our receiver index
    ]
    for bad in cases:
        with pytest.raises(SessionDrop) as exc:
            b.open(bad)
        assert exc.value.reason == "malformed"
    with pytest.raises(SessionDrop) as exc:
        a.open(d)  # a's own datagram is addressed to b's index
    assert exc.value.reason == "malformed"
    assert b.open(d) == b"x"


def test_cross_cipher_and_cross_key_fail_closed() -> None:
    _, b = pair(CIPHER_CHACHA)
    c, _ = pair(CIPHER_CHACHA)
    d = c.seal(b"x")  # same indices, different keys
    with pytest.raises(SessionDrop) as exc:
        b.open(d)
    assert exc.value.reason == "bad_mac"
    key = os.urandom(32)
    chacha = Keypair(FakeKM(key, key, CIPHER_CHACHA, 1, 1, True), 0.0)
    aes = Keypair(FakeKM(key, key, CIPHER_AES, 1, 1, False), 0.0)
    with pytest.raises(SessionDrop) as exc:
        aes.open(chacha.seal(b"same key, other cipher"))
    assert exc.value.reason == "bad_mac"
    with pytest.raises(ValueError):
        Keypair(FakeKM(bytes(32), bytes(32), "rot13", 1, 2, True), 0.0)


def test_seal_refuses_after_reject_after_messages() -> None:
    a, b = pair(CIPHER_CHACHA, timers=Timers(reject_after_messages=3))
    for _ in range(3):
        b.open(a.seal(b""))
    with pytest.raises(SessionDrop) as exc:
        a.seal(b"")
    assert exc.value.reason == "expired"
    assert a.expired(0.0, Timers(reject_after_messages=3))


def test_time_backstop_in_seal_and_open() -> None:
    clock = FakeClock()
    timers = Timers(reject_after_time=10.0)
    a, b = pair(CIPHER_CHACHA, timers=timers, clock=clock)
    d = a.seal(b"early")
    assert a.last_tx == 1000.0
    clock.t += 10.0
    for call in (lambda: a.seal(b""), lambda: b.open(d)):
        with pytest.raises(SessionDrop) as exc:
            call()
        assert exc.value.reason == "expired"


def test_expired_and_needs_rekey() -> None:
    t = Timers(rekey_after_time=120.0, reject_after_time=180.0, rekey_after_messages=5, reject_after_messages=100)
    a, b = pair(CIPHER_CHACHA, timers=t)
    assert not a.expired(179.9, t) and a.expired(180.0, t)
    assert not a.needs_rekey(119.9, t) and a.needs_rekey(120.0, t)
    assert not b.needs_rekey(170.0, t)  # the responder does not rekey on time
    for _ in range(5):
        b.seal(b"")
    assert b.needs_rekey(0.0, t)  # but it does on message count
    assert not b.expired(0.0, t)
    assert not b.expired(0.0, replace(t, reject_after_messages=6)) and b.expired(
        0.0, replace(t, reject_after_messages=5)
    )


def test_concurrent_seal_never_reuses_a_counter() -> None:
    a, b = pair(CIPHER_CHACHA)
    out: list[bytes] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [a.seal(b"p") for _ in range(2000)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters = sorted(wire.data_header(d)[1] for d in out)
    assert counters == list(range(8000))
    assert all(b.open(d) == b"p" for d in out)


def test_concurrent_open_of_copies_delivers_once() -> None:
    a, b = pair(CIPHER_CHACHA)
    dgrams = [a.seal(i.to_bytes(2, "little")) for i in range(500)]
    delivered: list[bytes] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        for d in dgrams:
            try:
                pt = b.open(d)
            except SessionDrop as exc:
                assert exc.reason == "replay"
                continue
            with lock:
                delivered.append(pt)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(delivered) == sorted(i.to_bytes(2, "little") for i in range(500))


def test_helpers() -> None:
    assert isinstance(has_aes_hardware(), bool)
    idx = {random_index() for _ in range(50)}
    assert all(0 <= i < 2**32 for i in idx) and len(idx) > 40
