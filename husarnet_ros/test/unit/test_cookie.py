"""Cookies (core/cookie.py) and the cookie reply's wire format: what a valid mac2 proves, and what it does not."""

from __future__ import annotations

import pytest

from husarnet_ros.core import cookie as ck
from husarnet_ros.core import handshake as hs
from husarnet_ros.core import wire
from husarnet_ros.core.identity import Identity

SRC = ("198.18.0.1", 5582)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def keys() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def initiation(initiator: Identity, responder: Identity, index: int = 7) -> bytes:
    msg, _ = hs.create_initiation(initiator, responder.public_key, index, hs.tai64n(1.0e9), 0)
    return msg


def test_reply_is_smaller_than_the_initiation_and_carries_a_cookie_only_the_initiator_can_use(keys):
    a, b = keys
    clock = FakeClock()
    checker = ck.CookieChecker(b.x25519_public, clock)
    init = initiation(a, b)
    reply = checker.reply(init, SRC)
    assert len(reply) == wire.COOKIE_REPLY_LEN == 64 < len(init) == wire.HANDSHAKE_INIT_LEN
    parsed = wire.parse_cookie_reply(reply)
    assert parsed.receiver_index == 7  # the initiation's sender index: how the initiator finds its attempt
    cookie = ck.open_cookie_reply(parsed, b.x25519_public, init[-wire.MAC_LEN :])
    proven = ck.with_mac2(init, cookie)
    assert len(proven) == wire.HANDSHAKE_INIT_MAC2_LEN
    body, mac2 = wire.split_mac2(proven)
    assert body == init
    assert checker.check_mac2(body, mac2, SRC)
    # The cookie is bound to the source: the same mac2 from another address or port proves nothing.
    assert not checker.check_mac2(body, mac2, ("198.18.0.9", 5582))
    assert not checker.check_mac2(body, mac2, ("198.18.0.1", 5583))
    # ... and mac2 to the message: it cannot be moved to another initiation.
    other = initiation(a, b, index=8)
    assert not checker.check_mac2(other, mac2, SRC)


def test_reply_opens_only_with_the_mac1_it_answers_and_the_responders_key(keys):
    a, b = keys
    checker = ck.CookieChecker(b.x25519_public, FakeClock())
    init = initiation(a, b)
    parsed = wire.parse_cookie_reply(checker.reply(init, SRC))
    with pytest.raises(ck.CookieError):
        ck.open_cookie_reply(parsed, b.x25519_public, bytes(wire.MAC_LEN))  # not an answer to our initiation
    with pytest.raises(ck.CookieError):
        ck.open_cookie_reply(parsed, a.x25519_public, init[-wire.MAC_LEN :])  # not from the responder we asked
    forged = parsed._replace(enc_cookie=bytes([parsed.enc_cookie[0] ^ 1]) + parsed.enc_cookie[1:])
    with pytest.raises(ck.CookieError):
        ck.open_cookie_reply(forged, b.x25519_public, init[-wire.MAC_LEN :])


def test_cookies_expire_with_the_responders_secret(keys):
    a, b = keys
    clock = FakeClock()
    checker = ck.CookieChecker(b.x25519_public, clock)
    init = initiation(a, b)
    cookie = ck.open_cookie_reply(wire.parse_cookie_reply(checker.reply(init, SRC)), b.x25519_public, init[-16:])
    body, mac2 = wire.split_mac2(ck.with_mac2(init, cookie))
    clock.t += ck.COOKIE_SECRET_LIFETIME - 1
    assert checker.check_mac2(body, mac2, SRC)
    clock.t += 2
    assert not checker.check_mac2(body, mac2, SRC)  # a captured cookie is worth two minutes at most


def test_wire_parsers_are_strict():
    good = wire.build_cookie_reply(5, bytes(24), bytes(32))
    assert wire.parse_cookie_reply(good) == wire.CookieReply(5, bytes(24), bytes(32))
    for bad in (good[:-1], good + b"\0", b""):
        with pytest.raises(wire.Malformed):
            wire.parse_cookie_reply(bad)
    for word in (wire.MSG_HANDSHAKE_INIT, wire.MSG_COOKIE_REPLY | 0x100):  # wrong type, reserved byte set
        with pytest.raises(wire.Malformed):
            wire.parse_cookie_reply(word.to_bytes(4, "little") + good[4:])
    with pytest.raises(ValueError):
        wire.build_cookie_reply(5, bytes(23), bytes(32))
    with pytest.raises(ValueError):
        wire.build_cookie_reply(2**32, bytes(24), bytes(32))
    # split_mac2: only the one longer size carries mac2; anything else goes whole to the initiation parser.
    for n in (0, wire.HANDSHAKE_INIT_LEN, wire.HANDSHAKE_INIT_LEN + 1, wire.HANDSHAKE_INIT_MAC2_LEN + 1):
        assert wire.split_mac2(bytes(n)) == (bytes(n), None)


def test_source_limiter_limits_each_source_and_stays_bounded():
    lim = ck.SourceLimiter(rate=5.0, max_sources=3)
    now = 10.0
    assert [lim.take("x", now) for _ in range(7)] == [True] * 5 + [False] * 2
    assert lim.take("y", now)  # another source has a bucket of its own
    assert lim.take("x", now + 0.25)  # refills at the rate: one token per 0.2 s
    assert not lim.take("x", now + 0.25)
    for i in range(10):
        lim.take(i, now)
    assert len(lim) == 3
