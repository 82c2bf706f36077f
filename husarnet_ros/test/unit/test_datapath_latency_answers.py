"""The receive thread sends what the kernel queued on the TUN in answer to a delivery (issue #6).

Why: an echo reply or TCP ACK is queued inside the very TUN write that delivered the request; sending
it from the receive path saves the TUN reader's wake-up on every round trip.  These tests check the
behaviour (which thread sends, and that the same send-side checks apply), never timing.
"""

from __future__ import annotations

import threading
import time

from husarnet_ros.core.constants import Timers
from husarnet_ros.core.counters import Counters
from husarnet_ros.core.datapath import Datapath
from husarnet_ros.core.handshake import KeyMaterial
from husarnet_ros.core.peer import IndexTable, Peer
from husarnet_ros.core.session import CIPHER_CHACHA, Keypair

ME = bytes.fromhex("fc94" + "11" * 14)
PEER = bytes.fromhex("fc94" + "22" * 14)
OTHER = bytes.fromhex("fc94" + "33" * 14)
EP = ("198.18.0.2", 5582)
K1, K2 = b"\x01" * 32, b"\x02" * 32


def ipv6(src: bytes, dst: bytes, payload: bytes) -> bytes:
    """A minimal IPv6 packet (next header ICMPv6) around ``payload``."""
    return bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([58, 64]) + src + dst + payload


class FakeTun:
    """What Datapath uses of a TunDevice: a queue the 'kernel' fills, a blocking reader, read_ready."""

    name = "fake0"
    mtu = 1371
    vnet_hdr = False

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.closed = threading.Event()
        self.ready_calls = 0

    def wait_readable(self, timeout: float | None = None) -> bool:
        self.closed.wait()  # the reader thread never competes in these tests
        raise OSError("closed")

    def read_ready(self, max_packets: int = 64) -> list[bytes]:
        self.ready_calls += 1
        out, self.queue[:] = self.queue[:max_packets], self.queue[max_packets:]
        return out

    def close(self) -> None:
        self.closed.set()


class Hooks:
    def __init__(self) -> None:
        self.sent: list[tuple[list[bytes], object, str]] = []

    def send_datagrams(self, datagrams, endpoint) -> None:
        self.sent.append((list(datagrams), endpoint, threading.current_thread().name))

    def send_control(self, datagram, endpoint) -> None:
        self.send_datagrams([datagram], endpoint)

    def need_handshake(self, address, packet) -> None:
        pass

    def keypair_confirmed(self, peer) -> None:
        pass

    def probe_reply(self, peer, endpoint, nonce, now) -> None:
        pass

    def base_plaintext(self, owner, keypair, plaintext, endpoint) -> None:
        pass

    def path_kind(self, endpoint) -> str:
        return "direct"

    def is_allowed(self, address: bytes) -> bool:
        return True


def make_node(answer: bytes | None):
    """Our datapath with a session to PEER; ``answer`` is queued on the TUN by each delivery."""
    index = IndexTable()
    counters = Counters()
    hooks = Hooks()
    tun = FakeTun()
    delivered: list[bytes] = []

    def deliver(packets: list[bytes]) -> None:
        delivered.extend(packets)
        if answer is not None:
            tun.queue.append(answer)  # the kernel answers inside the write

    dp = Datapath(ME, {}, index, counters, hooks, deliver, timers=Timers(), clock=time.monotonic, wallclock=time.time)
    peer = Peer(PEER)
    ours = Keypair(KeyMaterial(K2, K1, CIPHER_CHACHA, 7, 9, False, b"\0" * 32, PEER), time.monotonic(), peer)
    theirs = Keypair(KeyMaterial(K1, K2, CIPHER_CHACHA, 9, 7, True, b"\0" * 32, ME), time.monotonic())
    peer.current = ours
    dp.peers[PEER] = peer
    index.set(7, ours)
    dp.start_tun(tun)
    return dp, tun, hooks, counters, delivered, theirs


def test_answer_queued_by_delivery_leaves_from_the_receive_thread() -> None:
    request = ipv6(PEER, ME, b"\x80\x00" + b"q" * 30)
    reply = ipv6(ME, PEER, b"\x81\x00" + b"r" * 30)
    dp, tun, hooks, counters, delivered, theirs = make_node(reply)
    try:
        dp.receive_many([(theirs.seal(request), EP)])
        assert delivered == [request]
        assert tun.queue == []  # taken at once, not left for the reader
        assert len(hooks.sent) == 1
        datagrams, endpoint, thread = hooks.sent[0]
        assert endpoint == EP
        assert thread == threading.current_thread().name  # the receiving thread sent it
        assert [theirs.open(d) for d in datagrams] == [reply]
        assert counters.get("tx_packets") == 1
    finally:
        dp.stop_tun()


def test_answers_pass_the_same_send_checks() -> None:
    """A queued packet that does not come from our address is dropped, as on the reader path."""
    spoofed = ipv6(OTHER, PEER, b"\x81\x00" + b"s" * 30)
    dp, tun, hooks, counters, delivered, theirs = make_node(spoofed)
    try:
        dp.receive_many([(theirs.seal(ipv6(PEER, ME, b"\x80\x00")), EP)])
        assert len(delivered) == 1
        assert tun.queue == []  # taken by the receive path ...
        assert hooks.sent == []  # ... and refused there
        assert counters.get("bad_local_src") == 1
        assert counters.get("tx_packets") == 0
    finally:
        dp.stop_tun()


def test_nothing_delivered_reads_nothing() -> None:
    """Keepalives, forged and spoofed datagrams deliver nothing, so the TUN is not read for answers."""
    dp, tun, hooks, counters, delivered, theirs = make_node(ipv6(ME, PEER, b"\x81\x00"))
    try:
        forged = bytearray(theirs.seal(ipv6(PEER, ME, b"\x80\x00")))
        forged[-1] ^= 1
        keepalive = theirs.seal(b"")
        spoofed = theirs.seal(ipv6(OTHER, ME, b"\x80\x00"))
        dp.receive_many([(bytes(forged), EP), (keepalive, EP), (spoofed, EP)])
        assert delivered == []
        assert tun.ready_calls == 0
        assert hooks.sent == []
        assert counters.get("bad_mac") == 1
        assert counters.get("bad_inner_src") == 1
    finally:
        dp.stop_tun()


def test_no_answers_taken_while_the_reader_sends() -> None:
    """While the reader thread holds the TUN lock, the receive path leaves the queue alone (no reordering)."""
    reply = ipv6(ME, PEER, b"\x81\x00")
    dp, tun, hooks, _counters, delivered, theirs = make_node(reply)
    try:
        with dp._tun_lock:
            dp.receive_many([(theirs.seal(ipv6(PEER, ME, b"\x80\x00")), EP)])
        assert len(delivered) == 1
        assert tun.queue == [reply]  # left for the reader, which sends it after what it holds
        assert hooks.sent == []
        assert not dp._tun_lock.locked()
    finally:
        dp.stop_tun()
