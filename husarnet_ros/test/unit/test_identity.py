"""Identity: Husarnet-compatible addresses, id file format and safe storage."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from husarnet_ros.core.fsutil import StateFileError
from husarnet_ros.core.identity import (
    Identity,
    IdentityError,
    address_from_pubkey,
    ed25519_pub_to_x25519,
    format_address,
    parse_address,
    verify_signature,
)


def _husarnet_reference_address(pub: bytes) -> bytes | None:
    """Husarnet's pubkeyToDeviceId, written out independently of the module under test."""
    digest = hashlib.sha256(pub).digest()
    if not (digest[0] == 0 and digest[1] < 50):
        return None
    return b"\xfc\x94" + digest[3 : 3 + 14]


def test_generated_identity_satisfies_the_husarnet_rule() -> None:
    ident = Identity.generate()
    h = hashlib.sha256(ident.public_key).digest()
    assert h[0] == 0 and h[1] < 50
    assert ident.address == b"\xfc\x94" + h[3:17]
    assert ident.address == _husarnet_reference_address(ident.public_key)
    assert ident.address_str.startswith("fc94:")


@settings(max_examples=300)
@given(st.binary(min_size=32, max_size=32))
def test_address_matches_reference_for_any_key(pub: bytes) -> None:
    assert address_from_pubkey(pub) == _husarnet_reference_address(pub)


def test_address_rejects_wrong_length_keys() -> None:
    assert address_from_pubkey(b"\x00" * 31) is None
    assert address_from_pubkey(b"\x00" * 33) is None


def test_id_file_round_trip_is_husarnet_format(tmp_path) -> None:
    ident = Identity.generate()
    path = tmp_path / "id"
    ident.save(path)
    text = path.read_text()
    fields = text.split()
    assert fields[0] == ident.address_str
    assert bytes.fromhex(fields[1]) == ident.public_key
    assert bytes.fromhex(fields[2]) == ident.seed + ident.public_key  # libsodium 64-byte secret key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load(path) == ident


def test_imports_an_existing_husarnet_id_written_by_hand(tmp_path) -> None:
    # Build an id file the way Husarnet does (libsodium keypair: 64-byte sk = seed || pk).
    while True:
        sk = SigningKey.generate()
        pub = bytes(sk.verify_key)
        addr = _husarnet_reference_address(pub)
        if addr is not None:
            break
    import ipaddress

    line = f"{ipaddress.IPv6Address(addr)} {pub.hex()} {(bytes(sk) + pub).hex()}\n"
    path = tmp_path / "id"
    path.write_text(line)
    path.chmod(0o600)
    ident = Identity.load(path)
    assert ident.address == addr
    assert ident.public_key == pub
    message = b"proof"
    assert verify_signature(pub, ident.sign(message), message)


def test_refuses_id_file_readable_by_others_and_keeps_it(tmp_path) -> None:
    ident = Identity.generate()
    path = tmp_path / "id"
    ident.save(path)
    path.chmod(0o644)
    before = path.read_bytes()
    with pytest.raises(StateFileError, match="chmod 600"):
        Identity.load_or_create(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: ["fc94::1", f[1], f[2]],  # address does not match the key
        lambda f: [f[0], f[1][:-2] + "00", f[2]],  # public key does not match the secret
        lambda f: [f[0], f[1], "zz" + f[2][2:]],  # not hex
        lambda f: [f[0], f[1]],  # truncated
        lambda f: [f[0], f[1], f[2][:40]],  # short secret
    ],
)
def test_corrupt_id_file_is_an_error_and_never_overwritten(tmp_path, mutate) -> None:
    ident = Identity.generate()
    fields = ident.serialize().decode().split()
    path = tmp_path / "id"
    path.write_text(" ".join(mutate(fields)) + "\n")
    path.chmod(0o600)
    before = path.read_bytes()
    with pytest.raises(IdentityError):
        Identity.load_or_create(path)
    assert path.read_bytes() == before


def test_load_or_create_creates_once_then_reuses(tmp_path) -> None:
    path = tmp_path / "state" / "id"
    first = Identity.load_or_create(path)
    second = Identity.load_or_create(path)
    assert first == second


def test_x25519_keys_agree_between_two_identities() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    a, b = Identity.generate(), Identity.generate()
    assert ed25519_pub_to_x25519(a.public_key) == a.x25519_public
    ab = X25519PrivateKey.from_private_bytes(a.x25519_private).exchange(
        X25519PublicKey.from_public_bytes(b.x25519_public)
    )
    ba = X25519PrivateKey.from_private_bytes(b.x25519_private).exchange(
        X25519PublicKey.from_public_bytes(a.x25519_public)
    )
    assert ab == ba


def test_signatures_verify_and_reject_tampering() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify_signature(ident.public_key, sig, b"hello")
    assert not verify_signature(ident.public_key, sig, b"hellO")
    assert not verify_signature(ident.public_key, sig[:-1] + bytes([sig[-1] ^ 1]), b"hello")
    assert not verify_signature(b"\x01" * 31, sig, b"hello")
    assert not verify_signature(ident.public_key, b"\x00" * 10, b"hello")


def test_parse_address_accepts_only_overlay() -> None:
    assert parse_address("fc94::1") == b"\xfc\x94" + b"\x00" * 13 + b"\x01"
    with pytest.raises(ValueError, match="fc94::/16"):
        parse_address("fd00::1")
    with pytest.raises(ValueError, match="not an IPv6"):
        parse_address("fc94::zz")
    with pytest.raises(ValueError):
        parse_address("a" * 200)
    assert format_address(parse_address("FC94:0:0::1")) == "fc94::1"
