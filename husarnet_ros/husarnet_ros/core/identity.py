"""Node identity: an Ed25519 key whose hash is the node's fc94 address.

Addresses are self-certifying and identical to Husarnet's for the same key:
``h = SHA-256(pub)`` is valid only if ``h[0] == 0`` and ``h[1] < 50``, and the
address is ``fc94`` followed by ``h[3:17]``.  Anyone can check a presented key
against an address, so keys may travel over untrusted channels (base server,
LAN beacons) and be verified on arrival.

The ``id`` file uses Husarnet's format, ``<ipv6> <hex pubkey> <hex secret>``,
where the secret is libsodium's 64-byte ``seed || pub`` form, so existing
Husarnet ids can be imported unchanged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass, field

from nacl.bindings import (
    crypto_sign_ed25519_pk_to_curve25519,
    crypto_sign_ed25519_sk_to_curve25519,
)
from nacl.signing import SigningKey, VerifyKey

from .constants import ADDRESS_LEN, OVERLAY_PREFIX
from .fsutil import StateFileError, atomic_write, read_private_file


class IdentityError(StateFileError):
    """An identity file is corrupt, unsafe or does not match its own key."""


def address_from_pubkey(pub: bytes) -> bytes | None:
    """Return the 16-byte fc94 address of an Ed25519 public key, or None if the key is not valid."""
    if len(pub) != 32:
        return None
    h = hashlib.sha256(pub).digest()
    if h[0] != 0 or h[1] >= 50:
        return None
    return OVERLAY_PREFIX + h[3:17]


def format_address(addr: bytes) -> str:
    """Canonical (RFC 5952) text of a 16-byte address."""
    if len(addr) != ADDRESS_LEN:
        raise ValueError(f"address must be {ADDRESS_LEN} bytes, got {len(addr)}")
    return str(ipaddress.IPv6Address(addr))


def parse_address(text: str) -> bytes:
    """Parse an overlay address; anything outside fc94::/16 is an error with a reason."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("address must be a short string such as 'fc94:...'")
    try:
        addr = ipaddress.IPv6Address(text.strip())
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an IPv6 address: {exc}") from None
    packed = addr.packed
    if packed[:2] != OVERLAY_PREFIX:
        raise ValueError(f"{text!r} is not an overlay address (must be inside fc94::/16)")
    return packed


def ed25519_pub_to_x25519(pub: bytes) -> bytes:
    """The X25519 static key that a peer's Ed25519 identity maps to (for the Noise handshake)."""
    return crypto_sign_ed25519_pk_to_curve25519(pub)


def verify_signature(pub: bytes, signature: bytes, message: bytes) -> bool:
    """True only for a valid Ed25519 signature; never raises on malformed input."""
    if len(pub) != 32 or len(signature) != 64:
        return False
    try:
        VerifyKey(pub).verify(message, signature)
    except Exception:  # BadSignatureError, or libsodium refusing a key that is not a point
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A node's long-term keys; the private parts never leave this object except to the id file."""

    seed: bytes = field(repr=False)
    public_key: bytes
    address: bytes
    x25519_private: bytes = field(repr=False)
    x25519_public: bytes

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Rebuild an identity from its 32-byte Ed25519 seed; raises if the key has no valid address."""
        if len(seed) != 32:
            raise IdentityError("Ed25519 seed must be 32 bytes")
        sk = SigningKey(seed)
        pub = bytes(sk.verify_key)
        addr = address_from_pubkey(pub)
        if addr is None:
            raise IdentityError("this key does not hash to a valid fc94 address")
        x_priv = crypto_sign_ed25519_sk_to_curve25519(seed + pub)
        return cls(seed, pub, addr, x_priv, ed25519_pub_to_x25519(pub))

    @classmethod
    def generate(cls) -> Identity:
        """New random identity; loops (about 1300 tries on average) until the hash rule holds."""
        while True:
            seed = os.urandom(32)
            pub = bytes(SigningKey(seed).verify_key)
            if address_from_pubkey(pub) is not None:
                return cls.from_seed(seed)

    @property
    def address_str(self) -> str:
        """The fc94 address as text."""
        return format_address(self.address)

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes)."""
        return SigningKey(self.seed).sign(message).signature

    # --- Husarnet id file ---------------------------------------------------
    def serialize(self) -> bytes:
        """Husarnet's ``id`` file text: address, public key, 64-byte secret key."""
        return f"{self.address_str} {self.public_key.hex()} {(self.seed + self.public_key).hex()}\n".encode()

    @classmethod
    def parse(cls, text: bytes | str) -> Identity:
        """Parse Husarnet's ``id`` format strictly; every field is cross-checked against the key."""
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError:
                raise IdentityError("identity file is not ASCII text") from None
        fields = text.split()
        if len(fields) != 3:
            raise IdentityError(f"identity file must have 3 fields (address pubkey secret), found {len(fields)}")
        addr_text, pub_hex, sec_hex = fields
        try:
            pub = bytes.fromhex(pub_hex)
            secret = bytes.fromhex(sec_hex)
        except ValueError:
            raise IdentityError("identity file has a key that is not hex") from None
        if len(pub) != 32 or len(secret) not in (32, 64):
            raise IdentityError("identity file keys have the wrong length")
        ident = cls.from_seed(secret[:32])
        if ident.public_key != pub or (len(secret) == 64 and secret[32:] != pub):
            raise IdentityError("identity file's public key does not match its secret key")
        try:
            stated = ipaddress.IPv6Address(addr_text).packed
        except ValueError:
            raise IdentityError(f"identity file address {addr_text!r} is not IPv6") from None
        if stated != ident.address:
            raise IdentityError("identity file's address does not match its key")
        return ident

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the id file atomically with mode 0600."""
        atomic_write(path, self.serialize(), 0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Load an id file, refusing one that others can read."""
        return cls.parse(read_private_file(path, limit=4096))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the id file, creating one only if none exists; a bad file is an error, never overwritten."""
        if os.path.lexists(path):
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident
