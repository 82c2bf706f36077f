"""A hand-driven peer for attack tests: real wire protocol, none of a node's self-restraint.

Why: a correct node never sends a packet with a forged inner source, a handshake whose key does not
match its claimed identity, or a replay; to prove that the *receiving* node rejects them, the test must
play the attacker. :class:`RoguePeer` owns an identity and a UDP socket inside a lab namespace and uses
the project's own handshake and session code, so everything it sends is protocol-valid except for the
one property under attack.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519, crypto_sign_ed25519_sk_to_curve25519
from nacl.signing import SigningKey

from ..core import handshake as hs
from ..core import wire
from ..core.identity import Identity, address_from_pubkey
from ..core.session import Keypair
from .netns import Lab, Netns


def forged_identity(claimed: Identity, actual: Identity) -> Identity:
    """An identity that *claims* ``claimed``'s Ed25519 key and address but holds ``actual``'s X25519 static.

    An initiation built from it carries the whitelisted key in its payload while the Noise static proves a
    different key: the responder must notice the mismatch (bad_id) and stay silent.
    """
    return Identity(actual.seed, claimed.public_key, claimed.address, actual.x25519_private, actual.x25519_public)


def impostor_identity(claimed: Identity, actual: Identity) -> Identity:
    """``claimed``'s whole public identity (Ed25519 key, address, X25519 static) with ``actual``'s secrets.

    What someone who knows a whitelisted node's public key but not its private key can build: an
    initiation from it carries the genuine static key, but its ``ss`` Diffie-Hellman is computed with the
    wrong secret, so the payload's AEAD tag (Noise's proof of the static key) does not verify; a Hello from
    it carries the genuine key and an Ed25519 signature that does not verify.
    """
    return Identity(actual.seed, claimed.public_key, claimed.address, actual.x25519_private, claimed.x25519_public)


def invalid_identity(rng: random.Random | None = None) -> Identity:
    """A self-consistent key whose SHA-256 does not satisfy the address rule (h[0]==0, h[1]<50)."""
    rng = rng or random.Random()
    while True:
        seed = rng.randbytes(32)
        pub = bytes(SigningKey(seed).verify_key)
        if address_from_pubkey(pub) is None:
            x_priv = crypto_sign_ed25519_sk_to_curve25519(seed + pub)
            fake_addr = bytes.fromhex("fc94") + rng.randbytes(14)
            return Identity(seed, pub, fake_addr, x_priv, crypto_sign_ed25519_pk_to_curve25519(pub))


@dataclass
class RogueSession:
    keypair: Keypair
    endpoint: tuple[str, int]


class RoguePeer:
    """An identity plus a UDP socket in a namespace, speaking the wire protocol by hand."""

    def __init__(self, lab: Lab, ns: Netns, identity: Identity | None = None, *, bind: str = "0.0.0.0", port: int = 0):
        self.identity = identity or Identity.generate()
        fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.sock = lab.socket(ns, fam, socket.SOCK_DGRAM)
        self.sock.bind((bind, port))
        self.sock.settimeout(0.2)
        lab.on_cleanup(self.close)

    @property
    def address(self) -> str:
        return self.identity.address_str

    def initiation(
        self, responder_public_key: bytes, identity: Identity | None = None, timestamp: float | None = None
    ) -> tuple[bytes, hs.InitiatorState]:
        """A HandshakeInit to the responder, from ``identity`` (default: our own)."""
        ident = identity or self.identity
        index = int.from_bytes(os.urandom(4), "little")
        return hs.create_initiation(
            ident, responder_public_key, index, hs.tai64n(time.time() if timestamp is None else timestamp), 0
        )

    def random_key_initiations(self, responder_public_key: bytes, count: int, rng: random.Random) -> Iterator[bytes]:
        """``count`` initiations to the responder, each claiming a fresh random Ed25519 key (a flood).

        A random 32-byte key hashes to a valid fc94 address with probability ~1/1300 and even then does not
        match the Noise static, so the responder refuses every one as ``bad_id`` after its Diffie-Hellman
        (or as ``rate_limited`` before it, once its budget for strangers is spent). They all share our X25519
        static, which the responder cannot tell from the payload, so no key pair is generated per message.
        Lazy: a caller that sends each one as it comes is paced by building them (~0.3 ms each).
        """
        ident = self.identity
        for _ in range(count):
            claimed = Identity(ident.seed, rng.randbytes(32), ident.address, ident.x25519_private, ident.x25519_public)
            yield self.initiation(responder_public_key, identity=claimed)[0]

    def send(self, datagram: bytes, endpoint: tuple[str, int]) -> None:
        self.sock.sendto(datagram, endpoint)

    def receive(self, timeout: float) -> list[tuple[bytes, tuple]]:
        """Everything that arrives within ``timeout`` seconds."""
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                out.append(self.sock.recvfrom(65535))
            except TimeoutError:
                continue
        return out

    def handshake(self, responder_public_key: bytes, endpoint: tuple[str, int], timeout: float = 5.0) -> RogueSession:
        """Complete a handshake as initiator and confirm it with a keepalive; raise TimeoutError if unanswered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg, state = self.initiation(responder_public_key)
            self.send(msg, endpoint)
            until = min(deadline, time.monotonic() + 1.0)
            while time.monotonic() < until:
                try:
                    data, _ = self.sock.recvfrom(65535)
                except TimeoutError:
                    continue
                if wire.message_type(data) != wire.MSG_HANDSHAKE_RESP:
                    continue
                try:
                    km = hs.consume_response(state, data)
                except (hs.HandshakeError, ValueError):
                    continue
                kp = Keypair(km, time.monotonic())
                session = RogueSession(kp, endpoint)
                self.send(kp.seal(b""), endpoint)  # keepalive: the responder confirms the session on it
                return session
        raise TimeoutError(f"no handshake response from {endpoint}")

    def send_inner(self, session: RogueSession, plaintext: bytes) -> bytes:
        """Seal ``plaintext`` (an IPv6 packet, say) on the session and send it; return the datagram."""
        datagram = session.keypair.seal(plaintext)
        self.send(datagram, session.endpoint)
        return datagram

    def close(self) -> None:
        self.sock.close()
