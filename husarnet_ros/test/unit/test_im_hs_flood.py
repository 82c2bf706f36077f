"""TESTPLAN row 17 (IM variant): a flood of handshake initiations from random keys and spoofed sources.

Expected: no handshake reply to anything that is not allowed; under load
only cookie replies (64 bytes for 168), never larger than the requests;
peer and index tables bounded; and a legitimate peer, known or a newcomer
that proves its source address with a cookie, still completes its handshake
*during* the flood, within a few rekey-timeouts, while one real source that
floods with valid cookies is held to its own per-source limit.

Random keys are cheap here because the address derivation's validity rule
(``h[0] == 0 and h[1] < 50``, ~1300 tries per key) is replaced by "every key
is valid" with the same formula; the shared real identities keep their
addresses.  The initiations are real Noise initiations with a valid mac1
(B's public key is public), so B must do the Diffie-Hellman work to learn
they are from strangers.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time

import pytest
from test_im_common import EP_A, EP_B, EP_C, Lab, connect, identity, msg_type, pair, spec, wait_for

from husarnet_ros.core import cookie as cookie_mod
from husarnet_ros.core import engine as engine_mod
from husarnet_ros.core import handshake as hs
from husarnet_ros.core import identity as identity_mod
from husarnet_ros.core import wire as wire_mod
from husarnet_ros.core.identity import Identity

FLOOD_KEYS = 300
#: Legitimate handshake must complete within this while the flood runs.
LEGIT_DEADLINE = 3.0


def _any_key_valid(pub: bytes) -> bytes | None:
    if len(pub) != 32:
        return None
    return bytes.fromhex("fc94") + hashlib.sha256(pub).digest()[3:17]


@pytest.fixture
def cheap_keys(monkeypatch):
    # Generate the shared identities first, under the real rule (their addresses do not change).
    for i in range(3):
        identity(i)
    for mod in (identity_mod, hs, wire_mod):
        monkeypatch.setattr(mod, "address_from_pubkey", _any_key_valid)


def flood_initiations(target: Identity, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ident = Identity.from_seed(rng.randbytes(32))
        msg, _ = hs.create_initiation(ident, target.public_key, i + 1, hs.tai64n(time.time()), 0)
        out.append(msg)
    return out


class Flood:
    """Injects initiations from random spoofed 198.19.x.y sources as fast as the memnet takes them."""

    def __init__(self, lb: Lab, msgs: list[bytes], dst, seed: int) -> None:
        self.lb, self.msgs, self.dst = lb, msgs, dst
        self.rng = random.Random(seed)
        self.count = 0
        self.bytes = 0
        self.sources: set = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _run(self) -> None:
        rng = self.rng
        net = self.lb.net
        while not self._stop.is_set():
            # Saturate without building an unbounded queue in the in-memory network (a real socket buffer is
            # bounded too): legitimate datagrams are never stuck behind seconds of flood in the "wire".
            while len(net._heap) > 1024 and not self._stop.is_set():
                time.sleep(0.0005)
            for _ in range(100):
                msg = self.msgs[self.count % len(self.msgs)]
                src = (f"198.19.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1024, 65535))
                self.sources.add(src)
                self.lb.net.inject(msg, src, self.dst)
                self.count += 1
                self.bytes += len(msg)
            time.sleep(0)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def settle_idle(sender, receiver) -> None:
    """``sender`` speaks last and ``receiver`` acknowledges with a keepalive: nothing of the receiver's is pending."""
    sender.send(receiver, b"last-word")
    assert wait_for(lambda: receiver.payloads(b"last-word"))
    p = receiver.peer(sender)
    assert wait_for(lambda: p.last_tx > p.last_rx_data > p.last_tx_data, 3)


def bytes_sent_to(node, sources: set) -> int:
    return sum(len(d) for ep, d in list(node.transport.sent_log) if ep in sources)


def send_until_delivered(sender, receiver, payload: bytes, starved: str) -> float:
    """Send ``payload`` until the receiver has it; seconds taken.  Fails after LEGIT_DEADLINE with ``starved``."""
    t0 = time.monotonic()
    while not receiver.payloads(payload):
        assert time.monotonic() - t0 < LEGIT_DEADLINE, (
            f"{starved}: A {sender.engine.counters.snapshot()} B {receiver.engine.counters.snapshot()}"
        )
        sender.send(receiver, payload)
        wait_for(lambda: receiver.payloads(payload), 0.1)
    return time.monotonic() - t0


def test_flood_from_strangers_gets_silence_and_a_restarting_peer_still_gets_in(tmp_path, cheap_keys, monkeypatch):
    # A smaller DH budget than the default 200/s changes nothing in what is required - the legitimate peer
    # must not have to win a lottery against the flood for the same budget - but it makes the outcome
    # deterministic on a slow or a fast machine alike (the flood always exceeds the budget many times over).
    monkeypatch.setattr(engine_mod, "INITIATION_RATE", 20.0)
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = pair(lb)
        connect(a, b)
        settle_idle(a, b)  # so only A's own initiations (not a renegotiation by B) can bring it back
        msgs = flood_initiations(b.id, FLOOD_KEYS, seed=17)
        with Flood(lb, msgs, EP_B, seed=18) as flood:
            assert wait_for(lambda: flood.count > 3000, 5)
            # A restarts (loses its keys) in the middle of the flood and must get back in.
            a2 = lb.restart(a, state_dir=tmp_path / "a2")
            took = send_until_delivered(a2, b, b"through-the-flood", "legitimate peer starved by the flood")
        lb.net.quiesce()
        time.sleep(0.05)
        assert took < LEGIT_DEADLINE
        # Silence towards every flood source (cookie replies are off by default); tables hold only the real peer.
        assert bytes_sent_to(b, flood.sources) == 0
        assert b.counter("cookie_replies_sent") == 0
        assert set(b.engine._peers) == {a.address}
        assert len(b.engine._index) <= 4
        # Every flood initiation was refused and counted (not_whitelisted after the DH work, or rate_limited
        # before it), and the DH work was capped: most of the flood never cost a Diffie-Hellman.
        c = b.engine.counters
        assert wait_for(lambda: c.get("not_whitelisted") + c.get("rate_limited") >= flood.count, 5)
        assert c.get("not_whitelisted") < flood.count / 2


def test_flood_with_whitelist_disabled_is_bounded_and_replies_are_smaller(tmp_path, cheap_keys, monkeypatch):
    """Anyone valid may connect, so B answers - but each answer is smaller than its request, state is capped,
    and the established session keeps carrying data."""
    monkeypatch.setattr(engine_mod, "MAX_PEERS", 32)
    with Lab(tmp_path, log_sent=True) as lb:
        ia, ib = identity(0), identity(1)
        a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib])
        b = lb.node(ib, EP_B, whitelist=[], whitelist_enabled=False)
        lb.start()
        connect(a, b)
        settle_idle(a, b)
        msgs = flood_initiations(b.id, FLOOD_KEYS, seed=27)
        kp_b = b.current(a)
        with Flood(lb, msgs, EP_B, seed=28) as flood:
            assert wait_for(lambda: flood.count > 3000, 5)
            # The live session is untouched by the flood: data both ways, same keys.
            for i in range(50):
                a.send(b, b"fl%03d" % i)
                b.send(a, b"fl%03d" % i)
                time.sleep(0.002)
            assert wait_for(lambda: len(b.payloads(b"fl")) == 50 and len(a.payloads(b"fl")) == 50, 5)
            assert b.current(a) is kp_b
        lb.net.quiesce()
        assert len(b.engine._peers) <= 32
        assert len(b.engine._index) <= 2 * 32 + 4
        # Replies to the flood: never more bytes than the requests, to any source.
        per_src_out: dict = {}
        for ep, d in list(b.transport.sent_log):
            if ep in flood.sources:
                per_src_out[ep] = per_src_out.get(ep, 0) + len(d)
        assert per_src_out, "B answered no stranger at all, although its whitelist is disabled"
        assert all(v <= len(msgs[0]) for v in per_src_out.values())  # one request each, at most one smaller reply
        assert sum(per_src_out.values()) <= flood.bytes


def test_a_new_peer_still_gets_in_after_a_flood_filled_the_peer_table(tmp_path, cheap_keys, monkeypatch):
    """Whitelist disabled: junk identities that never completed a handshake must not lock out a real newcomer."""
    monkeypatch.setattr(engine_mod, "MAX_PEERS", 32)
    with Lab(tmp_path, log_sent=True) as lb:
        ib, ic = identity(1), identity(2)
        b = lb.node(ib, EP_B, whitelist=[], whitelist_enabled=False, start=True)
        msgs = flood_initiations(b.id, 100, seed=37)
        with Flood(lb, msgs, EP_B, seed=38) as flood:
            assert wait_for(lambda: len(b.engine._peers) >= 32 or flood.count > 3000, 5)
        lb.net.quiesce()
        assert len(b.engine._peers) <= 32
        c = lb.node(ic, EP_C, peers=[spec(ib, EP_B)], whitelist=[ib], start=True)
        send_until_delivered(c, b, b"newcomer", "newcomer locked out by half-open junk peers")
        assert len(b.engine._peers) <= 32


def test_a_peer_the_responder_forgot_proves_its_address_with_a_cookie_and_gets_in_during_the_flood(
    tmp_path, cheap_keys, monkeypatch
):
    """B restarts during the flood and knows no endpoint any more: A's initiations come from a stranger's source.

    The strangers' budget is the flood's, so without a budget of its own A would have to win a lottery
    against thousands of initiations a second.  A cookie reply lets it prove its address and get one.
    """
    monkeypatch.setattr(engine_mod, "INITIATION_RATE", 20.0)
    with Lab(tmp_path, log_sent=True) as lb:
        ia, ib = identity(0), identity(1)
        a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib], start=True)
        b = lb.node(ib, EP_B, whitelist=[ia], start=True, handshake_cookies=True)  # B learns A's endpoint from A
        connect(a, b)
        msgs = flood_initiations(b.id, FLOOD_KEYS, seed=47)
        with Flood(lb, msgs, EP_B, seed=48) as flood:
            assert wait_for(lambda: flood.count > 3000, 5)
            b2 = lb.restart(b)
            assert wait_for(lambda: b2.counter("cookie_replies_sent") > 0, 5)  # under load, before A is back
            assert EP_A not in b2.engine._known_sources
            send_until_delivered(a, b2, b"after-restart", "A starved by the flood")
        # A got in because it proved its address: a cookie reply came back, the initiation B answered
        # carried mac2 (184 bytes), and B's answer went to A's real address.  Towards the flood sources only
        # cookie replies, each smaller than the initiation it answers: no handshake, no amplification.
        assert a.counter("cookie_replies_received") >= 1
        init_sizes = {len(d) for d in a.sent_of_type(wire_mod.MSG_HANDSHAKE_INIT, EP_B)}
        assert wire_mod.HANDSHAKE_INIT_MAC2_LEN in init_sizes
        assert b2.sent_of_type(wire_mod.MSG_HANDSHAKE_RESP, EP_A)
        to_flood = [d for ep, d in list(b2.transport.sent_log) if ep in flood.sources]
        assert all(msg_type(d) == wire_mod.MSG_COOKIE_REPLY and len(d) == 64 < len(msgs[0]) for d in to_flood)
        assert 0 < len(to_flood) <= b2.counter("cookie_replies_sent") <= flood.count


def test_one_source_with_valid_cookies_is_held_to_its_own_limit(tmp_path, cheap_keys, monkeypatch):
    """A real (unspoofed) source can learn its cookie, but mac2 only buys it PROVEN_SOURCE_RATE handshakes a second."""
    monkeypatch.setattr(engine_mod, "INITIATION_RATE", 20.0)
    attacker = ("198.19.7.7", 4444)
    with Lab(tmp_path, log_sent=True) as lb:
        b = lb.node(identity(1), EP_B, whitelist=[identity(2)], start=True, handshake_cookies=True)
        # Empty the strangers' budget from spoofed sources, then ask for a cookie from the attacker's real one.
        for i, msg in enumerate(flood_initiations(b.id, 40, seed=57)):
            lb.net.inject(msg, (f"198.19.8.{i + 1}", 1000 + i), EP_B)
        assert wait_for(lambda: b.counter("cookie_replies_sent") >= 1)
        [probe] = flood_initiations(b.id, 1, seed=58)
        lb.net.inject(probe, attacker, EP_B)
        assert wait_for(lambda: b.sent_of_type(wire_mod.MSG_COOKIE_REPLY, attacker))
        [reply] = b.sent_of_type(wire_mod.MSG_COOKIE_REPLY, attacker)
        cookie = cookie_mod.open_cookie_reply(wire_mod.parse_cookie_reply(reply), b.id.x25519_public, probe[-16:])
        before = b.counter("not_whitelisted") + b.counter("rate_limited")
        dh_before = b.counter("not_whitelisted")
        proven = [cookie_mod.with_mac2(m, cookie) for m in flood_initiations(b.id, 60, seed=59)]
        t0 = time.monotonic()
        for m in proven:
            lb.net.inject(m, attacker, EP_B)
        assert wait_for(lambda: b.counter("not_whitelisted") + b.counter("rate_limited") - before >= 60)
        elapsed = time.monotonic() - t0
        # Each admitted initiation cost a Diffie-Hellman and ended as not_whitelisted (random keys).
        admitted = b.counter("not_whitelisted") - dh_before
        assert 1 <= admitted <= cookie_mod.PROVEN_SOURCE_RATE * (1 + elapsed) + 1


def test_under_load_a_token_that_refilled_goes_to_no_stranger_until_the_load_has_passed(
    tmp_path, cheap_keys, monkeypatch
):
    """WireGuard's under-load hold: once the strangers' budget ran dry, a stranger gets a cookie reply and no
    Diffie-Hellman even when a token has refilled since, until UNDER_LOAD_HOLD passed without running dry.

    Without the hold a newcomer in a flood gets in only if it proves its address *or* happens to come
    first after a token refilled: a lottery that let a spoofed initiation cost a Diffie-Hellman too.
    """
    monkeypatch.setattr(engine_mod, "INITIATION_RATE", 20.0)
    monkeypatch.setattr(engine_mod, "UNDER_LOAD_HOLD", 0.6)
    with Lab(tmp_path, log_sent=True) as lb:
        b = lb.node(identity(1), EP_B, whitelist=[identity(2)], start=True, handshake_cookies=True)
        msgs = flood_initiations(b.id, 33, seed=77)
        for i, msg in enumerate(msgs[:30]):  # the budget's 20 tokens, then load
            lb.net.inject(msg, (f"198.19.11.{i + 1}", 1000), EP_B)
        assert wait_for(lambda: b.counter("cookie_replies_sent") >= 1)
        lb.net.quiesce()
        dry_at = time.monotonic()

        def answer_to(msg: bytes, src) -> tuple[int, list[bytes]]:
            """Diffie-Hellmans B did for ``msg`` from ``src`` (0 or 1), and what B sent back."""
            dh = b.counter("not_whitelisted")
            lb.net.inject(msg, src, EP_B)
            assert wait_for(lambda: b.counter("not_whitelisted") > dh or b.sent_to(src), 3)
            lb.net.quiesce()
            return b.counter("not_whitelisted") - dh, b.sent_to(src)

        time.sleep(0.15)  # three tokens refilled, still within the hold
        dh, sent = answer_to(msgs[30], ("198.19.12.1", 1000))
        assert time.monotonic() - dry_at < 0.45, "the machine was too slow to test within the hold"
        assert dh == 0 and [msg_type(d) for d in sent] == [wire_mod.MSG_COOKIE_REPLY]
        time.sleep(max(0.0, dry_at + 0.8 - time.monotonic()))  # the hold has passed, the budget refilled
        dh, sent = answer_to(msgs[31], ("198.19.12.2", 1000))
        assert dh == 1 and sent == []  # a stranger's turn again: Diffie-Hellman, then silence (not listed)


def test_a_short_initiation_with_a_valid_mac1_is_malformed_under_load(tmp_path, cheap_keys, monkeypatch):
    """An 80-byte type-1 datagram passes a mac1 check (it has a response's length); under load it must be counted
    as malformed, not crash the cookie reply (which reads the 168-byte layout) nor get an answer."""
    monkeypatch.setattr(engine_mod, "INITIATION_RATE", 1.0)  # one stranger's token: the next one meets load
    sender = ("198.19.9.9", 4444)
    with Lab(tmp_path, log_sent=True) as lb:
        b = lb.node(identity(1), EP_B, whitelist=[identity(2)], start=True, handshake_cookies=True)
        for i, msg in enumerate(flood_initiations(b.id, 3, seed=67)):
            lb.net.inject(msg, (f"198.19.10.{i + 1}", 1000), EP_B)
        assert wait_for(lambda: b.counter("cookie_replies_sent") >= 1)  # under load now
        body = wire_mod.MSG_HANDSHAKE_INIT.to_bytes(4, "little") + bytes(wire_mod.HANDSHAKE_RESP_LEN - 20)
        short = body + hs.compute_mac1(b.id.x25519_public, body)
        assert len(short) == wire_mod.HANDSHAKE_RESP_LEN and hs.check_mac1(b.id, short)
        before = b.counter("malformed")
        lb.net.inject(short, sender, EP_B)
        assert wait_for(lambda: b.counter("malformed") == before + 1)
        lb.net.quiesce()
        assert b.sent_to(sender) == []
