"""Noise_IK_25519_ChaChaPoly_BLAKE2s handshake, laid out like WireGuard's (DESIGN.md 4.2).

Pattern IK::

    <- s
    ...
    -> e, es, s, ss      (HandshakeInit: the initiator's static key travels encrypted)
    <- e, ee, se         (HandshakeResp)

Both static keys are the X25519 forms of the nodes' Ed25519 identities.  The
initiator's Ed25519 public key travels inside the encrypted init payload and
the responder checks that it converts to the static key Noise just
authenticated, then derives the fc94 address from it; the caller (engine)
decides whitelist and timestamp freshness before answering, so a stranger
learns nothing and gets no reply.

``mac1`` (WireGuard's) is a keyed BLAKE2s-128 over the message, keyed with a
hash of the *receiver's* public key: it costs one hash, runs before any
Diffie-Hellman, and drops junk sent by anyone who does not know who they are
talking to.

The responder picks the data cipher (AES-256-GCM only if both ends report AES
hardware and accept it, otherwise ChaCha20-Poly1305) and sends the choice in
the encrypted, transcript-bound response payload, so it cannot be downgraded
in flight.  The primitives are the ``cryptography`` package's X25519 and
ChaCha20-Poly1305 and ``hashlib``'s BLAKE2s; only the Noise state machine
(MixHash, MixKey, HKDF, Split) is written here, exactly as the Noise spec
(revision 34) defines it, and it is interop-tested against ``noiseprotocol``.

Known property of the Ed25519 -> X25519 binding: the conversion ignores the
sign of the Edwards x coordinate, so the key ``-A`` maps to the same static as
``A``.  The holder of ``A`` could therefore also present ``-A``, which hashes to
a different address (valid with probability ~1/1300) that nobody else can own,
because no one knows a seed for ``-A``.  It cannot take over anyone else's
address; closing it fully would need an Ed25519 signature in the payload.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import wire
from .constants import LABEL_MAC1, NOISE_PROLOGUE, NOISE_PROTOCOL_NAME
from .identity import Identity, address_from_pubkey, ed25519_pub_to_x25519
from .session import CIPHER_AES, CIPHER_CHACHA, has_aes_hardware

HASH_LEN = 32

# --- Feature bits (init and response payloads) -------------------------------
FEATURE_AES_HW = 1 << 0  # "I have AES hardware"
FEATURE_ACCEPT_AES = 1 << 1  # "I accept AES-256-GCM"
FEATURE_OFFLOAD = 1 << 2  # offload-capable (set by the engine, not here)
FEATURE_CIPHER_SHIFT = 8  # bits 8-15 of the response: chosen cipher
FEATURE_CIPHER_MASK = 0xFF << FEATURE_CIPHER_SHIFT
CIPHER_IDS = {CIPHER_CHACHA: 0, CIPHER_AES: 1}
_CIPHER_NAMES = {v: k for k, v in CIPHER_IDS.items()}
_AES_BOTH = FEATURE_AES_HW | FEATURE_ACCEPT_AES

ENV_CIPHER = "HUSARNET_ROS_CIPHER"

_U32 = struct.Struct("<I")
_NONCE = struct.Struct("<4xQ")
_TAI64_BASE = 0x400000000000000A  # 2**62 + 10 s (TAI - UTC offset as in TAI64 / WireGuard)
_WHITENER_MASK = 0x1000000 - 1  # round nanoseconds down to ~16.7 ms: do not leak a fine clock


class HandshakeError(Exception):
    """A handshake message was refused.

    ``reason`` is the drop counter ('malformed', 'bad_mac', 'bad_id', 'decrypt', or 'replay' for a response
    to an already completed initiation).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- Noise symmetric state -----------------------------------------------------
def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF (HMAC-BLAKE2s), two or three outputs."""
    prk = _hmac(chaining_key, ikm)
    out1 = _hmac(prk, b"\x01")
    out2 = _hmac(prk, out1 + b"\x02")
    if outputs == 2:
        return out1, out2
    return out1, out2, _hmac(prk, out2 + b"\x03")


# The protocol name is longer than HASHLEN, so h = HASH(name); ck = h; then MixHash(prologue).
_INITIAL_CK = (
    _hash(NOISE_PROTOCOL_NAME) if len(NOISE_PROTOCOL_NAME) > HASH_LEN else NOISE_PROTOCOL_NAME.ljust(32, b"\0")
)
_INITIAL_H = _hash(_INITIAL_CK, NOISE_PROLOGUE)


class _SymmetricState:
    """Noise SymmetricState + CipherState (ChaChaPoly), one per handshake."""

    __slots__ = ("ck", "h", "k", "n")

    def __init__(self, ck: bytes = _INITIAL_CK, h: bytes = _INITIAL_H) -> None:
        self.ck = ck
        self.h = h
        self.k: bytes | None = None
        self.n = 0

    def copy(self) -> _SymmetricState:
        s = _SymmetricState(self.ck, self.h)
        s.k, s.n = self.k, self.n
        return s

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h, data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm, 2)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None  # IK always has a key before its first encryption
        ct = ChaCha20Poly1305(self.k).encrypt(_NONCE.pack(self.n), plaintext, self.h)
        self.n += 1
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        try:
            pt = ChaCha20Poly1305(self.k).decrypt(_NONCE.pack(self.n), ciphertext, self.h)
        except InvalidTag:
            raise HandshakeError("decrypt", "AEAD tag in handshake did not verify") from None
        self.n += 1
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1, k2


def _dh(private: X25519PrivateKey | bytes, public: bytes) -> bytes:
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # low-order point: all-zero shared secret
        raise HandshakeError("malformed", "low-order X25519 public key") from None


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


# --- mac1 ----------------------------------------------------------------------
def _mac1_key(receiver_x25519_pub: bytes) -> bytes:
    return _hash(LABEL_MAC1, receiver_x25519_pub)


def compute_mac1(receiver_x25519_pub: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """WireGuard's mac1 over ``data`` (the message up to the mac1 field) for the given receiver."""
    return hashlib.blake2s(data, digest_size=wire.MAC_LEN, key=_mac1_key(receiver_x25519_pub)).digest()


def check_mac1(local: Identity, msg: bytes | bytearray | memoryview) -> bool:
    """True if ``msg`` is a handshake message carrying a valid mac1 for ``local``; cheap, no DH."""
    if len(msg) not in (wire.HANDSHAKE_INIT_LEN, wire.HANDSHAKE_RESP_LEN):
        return False
    buf = bytes(msg)
    expected = compute_mac1(local.x25519_public, buf[: -wire.MAC_LEN])
    return hmac.compare_digest(expected, buf[-wire.MAC_LEN :])


def _with_mac1(receiver_x25519_pub: bytes, msg: bytes) -> bytes:
    body = msg[: -wire.MAC_LEN]
    return body + compute_mac1(receiver_x25519_pub, body)


# --- Features and timestamps ----------------------------------------------------
def tai64n(now: float) -> bytes:
    """12-byte TAI64N timestamp (big-endian, so byte order = time order), nanoseconds whitened as WireGuard."""
    secs = int(now)
    nanos = int((now - secs) * 1e9) & ~_WHITENER_MASK
    return struct.pack(">QI", _TAI64_BASE + secs, nanos)


def local_features() -> int:
    """Cipher feature bits for this machine.

    ``HUSARNET_ROS_CIPHER=chacha`` offers nothing (ChaCha20-Poly1305 is always
    used); ``=aes`` claims AES hardware and acceptance (tests, benchmarks);
    unset, AES is accepted and hardware is read from /proc/cpuinfo.
    """
    choice = os.environ.get(ENV_CIPHER, "").strip().lower()
    if choice in ("chacha", "chacha20", CIPHER_CHACHA):
        return 0
    if choice in ("aes", "aesgcm", CIPHER_AES):
        return _AES_BOTH
    if choice not in ("", "auto"):
        raise ValueError(f"{ENV_CIPHER} must be 'chacha', 'aes' or unset, not {choice!r}")
    return (FEATURE_AES_HW if has_aes_hardware() else 0) | FEATURE_ACCEPT_AES


def choose_cipher(initiator_features: int, responder_features: int) -> str:
    """AES-256-GCM iff both sides have AES hardware and accept it; otherwise ChaCha20-Poly1305."""
    if initiator_features & _AES_BOTH == _AES_BOTH and responder_features & _AES_BOTH == _AES_BOTH:
        return CIPHER_AES
    return CIPHER_CHACHA


# --- Results and states ---------------------------------------------------------
@dataclass(frozen=True)
class KeyMaterial:
    """What a completed handshake hands to :class:`session.Keypair`."""

    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    cipher: str
    local_index: int
    remote_index: int
    is_initiator: bool
    peer_public_key: bytes
    peer_address: bytes
    handshake_hash: bytes = b""  # Noise h after the handshake: a channel binding both ends share
    peer_features: int = 0  # the feature bits the peer sent in this (authenticated) handshake


@dataclass(eq=False)
class InitiatorState:
    """An initiation in flight; keep it (by ``sender_index``) until its response or a timeout."""

    local: Identity = field(repr=False)
    peer_public_key: bytes
    peer_address: bytes
    sender_index: int
    features: int
    timestamp: bytes
    _ephemeral: X25519PrivateKey = field(repr=False)
    _peer_static: bytes = field(repr=False)
    _symmetric: _SymmetricState = field(repr=False)
    completed: bool = False

    @property
    def peer_static(self) -> bytes:
        """The responder's X25519 static public key (what its cookie replies are sealed to)."""
        return self._peer_static


@dataclass(eq=False)
class ResponderState:
    """A verified initiation: the engine checks whitelist and timestamp, then calls :func:`create_response`."""

    local: Identity = field(repr=False)
    sender_index: int  # the initiator's index (our remote_index)
    peer_public_key: bytes  # Ed25519, verified to convert to the Noise static
    peer_address: bytes  # derived from peer_public_key
    timestamp: bytes  # TAI64N, compare bytewise with the last one from this peer
    features: int
    _peer_static: bytes = field(repr=False)
    _peer_ephemeral: bytes = field(repr=False)
    _symmetric: _SymmetricState = field(repr=False)
    completed: bool = False


def _peer_static_of(peer_public_key: bytes) -> tuple[bytes, bytes]:
    """(x25519 static, address) of an Ed25519 key, or HandshakeError('bad_id')."""
    address = address_from_pubkey(peer_public_key)
    if address is None:
        raise HandshakeError("bad_id", "key does not hash to a valid fc94 address")
    try:
        static = ed25519_pub_to_x25519(peer_public_key)
    except Exception:  # libsodium refuses non-points with several error types
        raise HandshakeError("bad_id", "key is not a valid Ed25519 point") from None
    return static, address


# --- Initiator -------------------------------------------------------------------
def create_initiation(
    local: Identity, peer_public_key: bytes, sender_index: int, timestamp: bytes, features: int
) -> tuple[bytes, InitiatorState]:
    """Build a HandshakeInit to the peer with Ed25519 key ``peer_public_key``."""
    if len(timestamp) != wire.TAI64N_LEN:
        raise ValueError("timestamp must be 12 bytes of TAI64N")
    rs, peer_address = _peer_static_of(peer_public_key)
    ss = _SymmetricState()
    ss.mix_hash(rs)
    e = X25519PrivateKey.generate()
    e_pub = _public_bytes(e)
    ss.mix_hash(e_pub)
    ss.mix_key(_dh(e, rs))  # es
    enc_static = ss.encrypt_and_hash(local.x25519_public)
    ss.mix_key(_dh(local.x25519_private, rs))  # ss
    payload = local.public_key + timestamp + _U32.pack(features & 0xFFFFFFFF)
    enc_payload = ss.encrypt_and_hash(payload)
    msg = _with_mac1(rs, wire.build_handshake_init(sender_index, e_pub, enc_static, enc_payload))
    state = InitiatorState(local, peer_public_key, peer_address, sender_index, features, timestamp, e, rs, ss)
    return msg, state


def consume_response(state: InitiatorState, msg: bytes | bytearray | memoryview) -> KeyMaterial:
    """Verify a HandshakeResp to ``state`` and derive the transport keys.

    A failed attempt leaves ``state`` usable (a forged response must not kill
    the genuine one); a second success is refused as 'replay' so a replayed
    response can never reinstall keys and reset the receive window.
    """
    try:
        resp = wire.parse_handshake_resp(msg)
    except wire.Malformed as exc:
        raise HandshakeError("malformed", str(exc)) from None
    if resp.receiver_index != state.sender_index:
        raise HandshakeError("malformed", "response is for another initiation")
    if not check_mac1(state.local, msg):
        raise HandshakeError("bad_mac", "mac1 does not match")
    if state.completed:
        raise HandshakeError("replay", "initiation already completed")
    ss = state._symmetric.copy()
    ss.mix_hash(resp.ephemeral)
    ss.mix_key(_dh(state._ephemeral, resp.ephemeral))  # ee
    ss.mix_key(_dh(state.local.x25519_private, resp.ephemeral))  # se
    payload = ss.decrypt_and_hash(resp.enc_payload)
    their = _U32.unpack(payload)[0]
    chosen = _CIPHER_NAMES.get((their & FEATURE_CIPHER_MASK) >> FEATURE_CIPHER_SHIFT)
    if chosen is None or chosen != choose_cipher(state.features, their):
        raise HandshakeError("malformed", "responder chose a cipher the features do not allow")
    send, recv = ss.split()
    state.completed = True
    return KeyMaterial(
        send_key=send,
        recv_key=recv,
        cipher=chosen,
        local_index=state.sender_index,
        remote_index=resp.sender_index,
        is_initiator=True,
        peer_public_key=state.peer_public_key,
        peer_address=state.peer_address,
        handshake_hash=ss.h,
        peer_features=their,
    )


# --- Responder -------------------------------------------------------------------
def consume_initiation(local: Identity, msg: bytes | bytearray | memoryview) -> ResponderState:
    """Verify a HandshakeInit addressed to ``local``; nothing is sent and no state is kept on failure."""
    try:
        init = wire.parse_handshake_init(msg)
    except wire.Malformed as exc:
        raise HandshakeError("malformed", str(exc)) from None
    if not check_mac1(local, msg):
        raise HandshakeError("bad_mac", "mac1 does not match")
    ss = _SymmetricState()
    ss.mix_hash(local.x25519_public)
    ss.mix_hash(init.ephemeral)
    ss.mix_key(_dh(local.x25519_private, init.ephemeral))  # es
    rs = ss.decrypt_and_hash(init.enc_static)
    ss.mix_key(_dh(local.x25519_private, rs))  # ss
    payload = ss.decrypt_and_hash(init.enc_payload)
    ed_pub, timestamp, features = payload[:32], payload[32:44], _U32.unpack(payload[44:48])[0]
    expected_static, address = _peer_static_of(ed_pub)
    if not hmac.compare_digest(expected_static, rs):
        raise HandshakeError("bad_id", "Ed25519 key does not match the authenticated static key")
    return ResponderState(local, init.sender_index, ed_pub, address, timestamp, features, rs, init.ephemeral, ss)


def create_response(state: ResponderState, sender_index: int, local_features: int) -> tuple[bytes, KeyMaterial]:
    """Answer a verified initiation (call only after whitelist and timestamp checks); single use."""
    if state.completed:
        raise HandshakeError("replay", "initiation already answered")
    ss = state._symmetric.copy()
    e = X25519PrivateKey.generate()
    e_pub = _public_bytes(e)
    ss.mix_hash(e_pub)
    ss.mix_key(_dh(e, state._peer_ephemeral))  # ee
    ss.mix_key(_dh(e, state._peer_static))  # se
    cipher = choose_cipher(state.features, local_features)
    features = (local_features & ~FEATURE_CIPHER_MASK & 0xFFFFFFFF) | (CIPHER_IDS[cipher] << FEATURE_CIPHER_SHIFT)
    enc_payload = ss.encrypt_and_hash(_U32.pack(features))
    msg = wire.build_handshake_resp(sender_index, state.sender_index, e_pub, enc_payload)
    msg = _with_mac1(state._peer_static, msg)
    recv, send = ss.split()
    state.completed = True
    km = KeyMaterial(
        send_key=send,
        recv_key=recv,
        cipher=cipher,
        local_index=sender_index,
        remote_index=state.sender_index,
        is_initiator=False,
        peer_public_key=state.peer_public_key,
        peer_address=state.peer_address,
        handshake_hash=ss.h,
        peer_features=state.features,
    )
    return msg, km
