"""TESTPLAN row 4 (IM variant): address collision and truncation.

The fc94 address is 112 bits of a hash, so nobody can find a second key for
someone else's address.  To test what the engine does *if* that happened, the
address derivation is replaced (in every module that derives addresses) by a
16-bit one, where a collision takes a few hundred keys, or by one that makes
two keys share 15 of 16 bytes (the same *printed prefix*).  Expected: the
whitelist compares the full 16-byte address; once a peer's key is known, a
second key claiming the same address is refused (``bad_id``) with no reply,
and the existing session is never hijacked or disturbed.
"""

from __future__ import annotations

import hashlib
import random
import time

import pytest
from nacl.signing import SigningKey
from test_im_common import EP_A, EP_B, MALLORY, Lab, connect, spec, wait_for

from husarnet_ros.core import handshake as hs_mod
from husarnet_ros.core import identity as identity_mod
from husarnet_ros.core import wire as wire_mod
from husarnet_ros.core.identity import Identity, format_address


def _patch_derivation(monkeypatch, derive) -> None:
    for mod in (identity_mod, hs_mod, wire_mod):
        monkeypatch.setattr(mod, "address_from_pubkey", derive)


def _pub(seed: bytes) -> bytes:
    return bytes(SigningKey(seed).verify_key)


def _short_hash(pub: bytes) -> bytes | None:
    """A 16-bit "hash" address: fc94 + 2 hash bytes + zeros (collisions are cheap)."""
    if len(pub) != 32:
        return None
    return bytes.fromhex("fc94") + hashlib.sha256(pub).digest()[:2] + bytes(12)


@pytest.fixture
def colliding(monkeypatch):
    """(A, M, B, C): M's key differs from A's but maps to the same 16-byte address; B and C do not collide."""
    _patch_derivation(monkeypatch, _short_hash)
    rng = random.Random(4)
    seen: dict[bytes, bytes] = {}
    while True:
        seed = rng.randbytes(32)
        addr = _short_hash(_pub(seed))
        if addr in seen:
            a_seed, m_seed = seen[addr], seed
            break
        seen[addr] = seed
    ia, im = Identity.from_seed(a_seed), Identity.from_seed(m_seed)
    assert ia.address == im.address and ia.public_key != im.public_key
    others = []
    while len(others) < 2:
        idt = Identity.from_seed(rng.randbytes(32))
        if idt.address != ia.address and all(idt.address != o.address for o in others):
            others.append(idt)
    return ia, im, others[0], others[1]


def test_colliding_key_cannot_hijack_an_established_session(tmp_path, colliding):
    ia, im, ib, _ = colliding
    with Lab(tmp_path, log_sent=True) as lb:
        a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib])
        b = lb.node(ib, EP_B, whitelist=[ia])  # allows "the address", i.e. both keys by address alone
        lb.start()
        connect(a, b)
        kp_b = b.current(a)
        peer = b.peer(a)
        assert peer.public_key == ia.public_key
        # Mallory runs a real engine with the colliding key and tries every way in.
        m = lb.node(im, MALLORY, peers=[spec(ib, EP_B)], whitelist=[ib], start=True)
        m.engine.add_candidates(ib.address, [EP_B], public_key=ib.public_key, source="base")
        assert wait_for(lambda: m.counter("handshakes_sent") >= 3, 5)
        assert wait_for(lambda: b.counter("bad_id") >= 3, 5)
        for _ in range(3):
            m.send(b, b"hijack")
        time.sleep(0.2)
        lb.net.quiesce()
        # No reply of any kind to mallory, no session for mallory, nothing from mallory delivered.
        assert b.sent_to(MALLORY) == []
        assert not m.secure_with(b) and m.counter("handshakes_completed") == 0
        assert not b.payloads(b"hijack")
        # A's session is untouched: same key, same keypair, same endpoint, and it still carries traffic.
        assert peer.public_key == ia.public_key and b.peer(a) is peer
        assert b.current(a) is kp_b and peer.paths.endpoint == EP_A
        assert MALLORY not in peer.paths.paths
        a.send(b, b"still-a")
        b.send(a, b"to-a")
        assert wait_for(lambda: b.payloads(b"still-a") and a.payloads(b"to-a"))
        assert not m.payloads(b"to-a")
        assert all(p[8:24] == ia.address for p in b.got)


def test_colliding_key_refused_when_the_key_is_known_before_any_session(tmp_path, colliding):
    """B learned A's key from a trusted source (base, beacon) but never talked to A; mallory comes first."""
    ia, im, ib, _ = colliding
    with Lab(tmp_path, log_sent=True) as lb:
        b = lb.node(ib, EP_B, whitelist=[ia], start=True)
        b.engine.add_candidates(ia.address, [EP_A], public_key=ia.public_key, source="base")
        assert wait_for(lambda: getattr(b.engine._peers.get(ia.address), "public_key", None) == ia.public_key)
        m = lb.node(im, MALLORY, peers=[spec(ib, EP_B)], whitelist=[ib], start=True)
        m.engine.add_candidates(ib.address, [EP_B], public_key=ib.public_key, source="base")
        assert wait_for(lambda: b.counter("bad_id") >= 2, 5)
        lb.net.quiesce()
        assert b.sent_to(MALLORY) == []
        assert not m.secure_with(b)
        assert b.engine._peers[ia.address].public_key == ia.public_key
        # The genuine owner of the address still gets in.
        a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib], start=True)
        connect(a, b)
        assert b.current(a).peer_public_key == ia.public_key


def test_whitelist_compares_the_full_address_not_a_printed_prefix(tmp_path, monkeypatch):
    """M's address shares 15 of 16 bytes (and its printed prefix) with the whitelisted A: refused, silence."""
    rng = random.Random(5)
    seeds = [rng.randbytes(32) for _ in range(3)]
    pubs = [_pub(s) for s in seeds]
    base_addr = bytes.fromhex("fc94") + hashlib.sha256(pubs[0]).digest()[3:17]
    table = {
        pubs[0]: base_addr,
        pubs[1]: base_addr[:15] + bytes([base_addr[15] ^ 0x01]),  # M: last bit differs
        pubs[2]: bytes.fromhex("fc94") + hashlib.sha256(pubs[2]).digest()[3:17],  # B
    }
    _patch_derivation(monkeypatch, lambda pub: table.get(bytes(pub)))
    ia, im, ib = (Identity.from_seed(s) for s in seeds)
    assert ia.address != im.address and ia.address[:15] == im.address[:15]
    assert format_address(ia.address)[:30] == format_address(im.address)[:30]
    with Lab(tmp_path, log_sent=True) as lb:
        b = lb.node(ib, EP_B, whitelist=[ia], start=True)
        assert b.engine.whitelist.is_allowed(ia.address) and not b.engine.whitelist.is_allowed(im.address)
        m = lb.node(im, MALLORY, peers=[spec(ib, EP_B)], whitelist=[ib], start=True)
        m.engine.add_candidates(ib.address, [EP_B], public_key=ib.public_key, source="base")
        assert wait_for(lambda: b.counter("not_whitelisted") >= 3, 5)
        m.send(b, b"near-miss")
        time.sleep(0.2)
        lb.net.quiesce()
        assert b.sent_to(MALLORY) == []
        assert im.address not in b.engine._peers
        assert not m.secure_with(b) and not b.payloads(b"near-miss")
        # The real A is let in.
        a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib], start=True)
        connect(a, b)
        assert b.secure_with(a) and not any(p.address == im.address for p in b.engine.peers())
