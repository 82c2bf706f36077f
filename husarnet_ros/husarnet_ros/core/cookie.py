"""WireGuard's cookies (cookie.go): under load, a source proves its address before it costs a Diffie-Hellman.

Why: a responder's handshake budget is shared by every source it has never seen. A flood of initiations
from spoofed addresses empties that budget, and then a genuine newcomer (a new robot, or a known one that
moved to another network) waits for the flood to stop. When the strangers' budget is empty (or was within
the last second: the engine's UNDER_LOAD_HOLD), an initiation with a valid mac1 gets a cookie reply
instead of silence: a 16-byte cookie that is a MAC of the source address under a secret that changes
every two minutes, sealed to the initiation's mac1. Only an initiator that receives datagrams at its
source address learns the cookie; it repeats the initiation with ``mac2 = MAC(cookie, initiation)``, and
a valid mac2 admits it to a budget of its own, limited per source, that spoofed floods cannot touch.

The reply (64 bytes) is smaller than the initiation it answers (168), so it cannot amplify, and it
costs one BLAKE2s and one XChaCha20-Poly1305, no Diffie-Hellman.  It is only sent to initiations
that carry a valid mac1, i.e. from senders that already know our public key.

Sending cookie replies is the operator's choice (``EngineConfig.handshake_cookies``, off by default):
the reply goes out before we can know who asks, so it breaks DESIGN.md's "a responder answers
nothing" towards senders that know our key.  Receiving them is always on.

Nodes without cookies stay compatible: an initiation carries mac2 (184 bytes instead of 168) only
after a cookie reply from that responder, and only cookie-aware responders send those.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt, crypto_aead_xchacha20poly1305_ietf_encrypt
from nacl.exceptions import CryptoError

from . import wire
from .constants import LABEL_COOKIE

#: WireGuard's CookieRefreshTime: the responder's secret changes this often, and an initiator
#: stops using a cookie this long after it arrived.
COOKIE_SECRET_LIFETIME = 120.0
COOKIE_LEN = 16
#: Initiations a cookie-proven source may start per second (burst: as many), and how many sources
#: are tracked; the oldest is forgotten first (it may then start a fresh burst).
PROVEN_SOURCE_RATE = 5.0
MAX_PROVEN_SOURCES = 4096


class CookieError(ValueError):
    """A cookie reply that does not open: not for our initiation, or forged."""


def _reply_key(x25519_public: bytes) -> bytes:
    return hashlib.blake2s(LABEL_COOKIE + x25519_public).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=wire.MAC_LEN, key=key).digest()


def source_key(src: Hashable) -> bytes:
    """The bytes a cookie binds: the source exactly as the socket (or the relay) reported it."""
    return repr(src).encode()


class CookieChecker:
    """The responder's side: checks mac2 and makes cookie replies.  Safe from any thread."""

    def __init__(self, local_x25519_public: bytes, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._key = _reply_key(local_x25519_public)
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self._secret_at = clock()

    def _cookie(self, src: Hashable) -> bytes:
        now = self._clock()
        with self._lock:
            if now - self._secret_at >= COOKIE_SECRET_LIFETIME:
                self._secret = secrets.token_bytes(32)
                self._secret_at = now
            secret = self._secret
        return _mac(secret, source_key(src))

    def check_mac2(self, initiation: bytes, mac2: bytes, src: Hashable) -> bool:
        """True when ``mac2`` is the MAC of the 168-byte ``initiation`` under the cookie of ``src``."""
        return hmac.compare_digest(_mac(self._cookie(src), initiation), mac2)

    def reply(self, initiation: bytes, src: Hashable) -> bytes:
        """The cookie reply to a (mac1-valid) 168-byte initiation from ``src``."""
        sender_index = wire.HANDSHAKE_INIT.unpack_from(initiation)[1]
        mac1 = initiation[-wire.MAC_LEN :]
        nonce = secrets.token_bytes(wire.COOKIE_NONCE_LEN)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(self._cookie(src), mac1, nonce, self._key)
        return wire.build_cookie_reply(sender_index, nonce, sealed)


def open_cookie_reply(reply: wire.CookieReply, responder_x25519_public: bytes, mac1_sent: bytes) -> bytes:
    """The cookie in a reply to our initiation whose mac1 was ``mac1_sent``; CookieError if it does not open."""
    try:
        cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
            reply.enc_cookie, mac1_sent, reply.nonce, _reply_key(responder_x25519_public)
        )
    except CryptoError:
        raise CookieError("cookie reply does not open") from None
    if len(cookie) != COOKIE_LEN:
        raise CookieError("cookie of the wrong length")
    return cookie


def with_mac2(initiation: bytes, cookie: bytes) -> bytes:
    """The 168-byte ``initiation`` with its mac2 under ``cookie`` appended (184 bytes)."""
    return initiation + _mac(cookie, initiation)


class SourceLimiter:
    """Token buckets per source (``rate`` per second, burst ``rate``), at most ``max_sources`` of them.

    Used on the event loop only.  Forgetting the least recently used source when the table is full
    bounds memory; the forgotten source merely starts with a full bucket again.
    """

    def __init__(self, rate: float = PROVEN_SOURCE_RATE, max_sources: int = MAX_PROVEN_SOURCES) -> None:
        self.rate = rate
        self.max_sources = max_sources
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def take(self, src: Hashable, now: float) -> bool:
        """Spend one token of ``src``'s bucket; False when it is empty."""
        tokens, at = self._buckets.pop(src, (self.rate, now))
        tokens = min(self.rate, tokens + (now - at) * self.rate)
        ok = tokens >= 1
        self._buckets[src] = (tokens - 1 if ok else tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._buckets)
