"""Transport keypairs: seal and open Data datagrams (DESIGN.md 4.3, WireGuard's transport messages).

A :class:`Keypair` holds the two directional keys that one handshake
produced, already wrapped in AEAD objects so the per-packet cost is one AEAD
call plus a header pack/unpack.  The nonce is WireGuard's and Noise's:
4 zero bytes followed by the 64-bit little-endian message counter, which also
travels in the clear in the Data header.

Receive order matters for security and for DoS resistance:

1. parse the 16-byte header (receiver index must be ours);
2. replay window *check* (too old / already seen): no AEAD work for junk;
3. decrypt and verify the tag;
4. *commit* the counter to the window only now, so a forged packet can never
   move the window and lock out genuine traffic.  Two threads opening copies
   of the same datagram race at step 4 and exactly one wins.
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .constants import Timers
from .replay import ReplayFilter
from .wire import DATA_HEADER, DATA_HEADER_LEN, DATA_MIN_LEN, MSG_DATA, SUPER_MAX_PLAINTEXT, TAG_LEN, super_aad

if TYPE_CHECKING:
    from .handshake import KeyMaterial

CIPHER_CHACHA = "chacha20-poly1305"
CIPHER_AES = "aes-256-gcm"
_AEADS: dict[str, type[ChaCha20Poly1305] | type[AESGCM]] = {CIPHER_CHACHA: ChaCha20Poly1305, CIPHER_AES: AESGCM}

_NONCE = struct.Struct("<4xQ")  # 4 zero bytes || 64-bit little-endian counter

DROP_REASONS = ("malformed", "too_old", "replay", "bad_mac", "expired")


class SessionDrop(Exception):  # noqa: N818 - name fixed by the module contract
    """A datagram (or a send) refused by a keypair; ``reason`` is the drop counter to increment."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@functools.cache
def has_aes_hardware() -> bool:
    """True if the CPU advertises AES instructions (x86 ``aes`` flag, Arm ``aes`` feature).

    AES-GCM without hardware support is slower than ChaCha20-Poly1305 and
    prone to cache-timing leaks, so the handshake only offers it with hardware.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() in ("flags", "features") and "aes" in value.split():
                    return True
    except OSError:
        return False
    return False


class Keypair:
    """One direction pair of transport keys, from one completed handshake.

    ``created`` and the ``now`` passed to :meth:`expired`/:meth:`needs_rekey`
    are in the caller's clock.  ``clock`` (default ``time.monotonic``) stamps
    ``last_rx``/``last_tx`` and enforces the reject-after-time limit inside
    :meth:`seal`/:meth:`open` as a backstop; pass the engine's clock if the
    engine compares those stamps with its own ``now``.
    """

    __slots__ = (
        "_clock",
        "_deadline",
        "_next_counter",
        "_open_aead",
        "_reject_after_messages",
        "_replay",
        "_seal_aead",
        "cipher",
        "created",
        "is_initiator",
        "last_rx",
        "last_tx",
        "local_index",
        "owner",
        "peer_address",
        "peer_public_key",
        "remote_index",
        "send_counter",
    )

    def __init__(
        self,
        km: KeyMaterial,
        created: float,
        owner: object = None,
        *,
        timers: Timers | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        aead = _AEADS.get(km.cipher)
        if aead is None:
            raise ValueError(f"unknown cipher {km.cipher!r}")
        timers = timers or Timers()
        self.local_index: int = km.local_index
        self.remote_index: int = km.remote_index
        self.cipher: str = km.cipher
        self.is_initiator: bool = km.is_initiator
        self.peer_public_key: bytes = km.peer_public_key
        self.peer_address: bytes = km.peer_address
        self.created = created
        self.owner = owner
        self._seal_aead = aead(km.send_key)
        self._open_aead = aead(km.recv_key)
        self._replay = ReplayFilter()
        # next() on itertools.count is atomic under the GIL: concurrent seals never reuse a nonce.
        self._next_counter = itertools.count()
        self._reject_after_messages = timers.reject_after_messages
        self._clock = clock
        self._deadline = clock() + timers.reject_after_time
        self.send_counter = 0
        self.last_rx: float | None = None
        self.last_tx: float | None = None

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return f"<Keypair {self.local_index:#010x}->{self.remote_index:#010x} {self.cipher} {role}>"

    # --- hot path -------------------------------------------------------------
    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``plaintext`` into a whole Data datagram (header + ciphertext + tag).

        Raises SessionDrop('expired') once the key is past its message or time limit.
        """
        n = self._take_counter()
        return DATA_HEADER.pack(MSG_DATA, self.remote_index, n) + self._seal_aead.encrypt(
            _NONCE.pack(n), plaintext, None
        )

    def _take_counter(self) -> int:
        """The send rule in one place: the next nonce counter, refused once the key is past its limits."""
        n = next(self._next_counter)
        now = self._clock()
        if n >= self._reject_after_messages or now >= self._deadline:
            raise SessionDrop("expired")
        self.send_counter = n + 1
        self.last_tx = now
        return n

    def open(self, datagram: bytes | bytearray | memoryview) -> bytes:
        """Authenticate and decrypt a Data datagram addressed to this keypair; return the plaintext.

        Raises SessionDrop with reason 'malformed', 'too_old', 'replay', 'bad_mac' or 'expired'.
        """
        if len(datagram) < DATA_MIN_LEN:
            raise SessionDrop("malformed")
        word, receiver, n = DATA_HEADER.unpack_from(datagram)
        if word != MSG_DATA or receiver != self.local_index:
            raise SessionDrop("malformed")
        return self.authenticate(n, memoryview(datagram)[DATA_HEADER_LEN:], None)

    def authenticate(self, n: int, ciphertext: bytes | bytearray | memoryview, aad: bytes | None) -> bytes:
        """The receive rule in one place: window check before the AEAD, window commit only after the tag.

        For callers that parsed the header themselves: :meth:`open`, :func:`open_super`, and the data
        path's lone receive, which found this keypair by the header's receiver index (issue #6: on a cold
        CPU every layer counts).  ``n`` is the message counter, ``ciphertext`` what follows the header.
        """
        verdict = self._replay.check(n)
        if verdict is not None:
            raise SessionDrop(verdict)
        now = self._clock()
        if now >= self._deadline:
            raise SessionDrop("expired")
        try:
            plaintext = self._open_aead.decrypt(_NONCE.pack(n), ciphertext, aad)
        except InvalidTag:
            raise SessionDrop("bad_mac") from None
        if not self._replay.commit(n):
            raise SessionDrop("replay")
        self.last_rx = now
        return plaintext

    # --- lifetime ---------------------------------------------------------------
    def expired(self, now: float, timers: Timers) -> bool:
        """True once the key must not be used any more (REJECT_AFTER_TIME or REJECT_AFTER_MESSAGES)."""
        return now - self.created >= timers.reject_after_time or self.send_counter >= timers.reject_after_messages

    def needs_rekey(self, now: float, timers: Timers) -> bool:
        """True when a new handshake should start.

        As in WireGuard, only the initiator rekeys on age (so both ends do not
        race to rekey at the same moment); either end rekeys on message count.
        """
        if self.send_counter >= timers.rekey_after_messages:
            return True
        return self.is_initiator and now - self.created >= timers.rekey_after_time


# --- DataSuper (one seal per TSO/USO super-packet) -------------------------------
def seal_super(kp: Keypair, plaintext: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    """Seal a super-packet plaintext on ``kp``; returns ``(counter, ciphertext + tag)``.

    The counter comes from the same sequence as :meth:`Keypair.seal` (one nonce space per key) and
    the type word, receiver index and counter are authenticated as associated data, so a super
    ciphertext cannot be replayed as Data or vice versa.  Raises SessionDrop('expired') like seal.
    """
    if len(plaintext) > SUPER_MAX_PLAINTEXT:
        raise ValueError("super-packet plaintext too large")
    n = kp._take_counter()
    return n, kp._seal_aead.encrypt(_NONCE.pack(n), plaintext, super_aad(kp.remote_index, n))


def check_super(kp: Keypair, counter: int) -> str | None:
    """Replay-window verdict for a super message's counter *before* any fragment is kept (None = acceptable)."""
    return kp._replay.check(counter)


def open_super(kp: Keypair, counter: int, sealed: bytes | bytearray | memoryview) -> bytes:
    """Authenticate and decrypt a reassembled super message: window check, AEAD, then commit.

    Raises SessionDrop with reason 'malformed', 'too_old', 'replay', 'bad_mac' or 'expired'.
    """
    if len(sealed) < TAG_LEN:
        raise SessionDrop("malformed")
    return kp.authenticate(counter, sealed, super_aad(kp.local_index, counter))


def random_index() -> int:
    """A random 32-bit session index (WireGuard picks them at random so they reveal nothing)."""
    return int.from_bytes(os.urandom(4), "little")
