"""The lone-packet paths of the data plane (issue #6 latency) keep every rule of the batch paths.

A single datagram (or TUN read) takes :meth:`Datapath.receive_lone` / :meth:`Datapath._send_lone`;
two or more take the batch loops.  Each scenario runs both ways (``lone``: the datagram alone;
``batch``: the same datagram followed by a junk one that is only counted as ``unknown_peer``) and
must give the same verdict: what is delivered or sent, which drop counter moves, where the path goes.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from types import SimpleNamespace

import pytest

from husarnet_ros.core.constants import Timers
from husarnet_ros.core.counters import Counters
from husarnet_ros.core.datapath import Datapath
from husarnet_ros.core.peer import IndexTable, Peer
from husarnet_ros.core.session import Keypair
from husarnet_ros.core.wire import INNER_PROBE, INNER_PROBE_REPLY, MSG_DATA, PROBE_LEN

ME = bytes.fromhex("fc940000000000000000000000000001")
PEER = bytes.fromhex("fc940000000000000000000000000002")
OTHER = bytes.fromhex("fc940000000000000000000000000003")
EP = ("198.18.0.2", 5582)
EP_NEW = ("198.18.0.9", 40000)
JUNK = struct.pack("<IIQ", MSG_DATA, 0xDEAD, 0) + bytes(16)  # unknown receiver index: counted, nothing else


def ip6(src: bytes, dst: bytes, payload: bytes = b"ping", next_header: int = 59) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + src + dst + payload


def echo_request(src: bytes, dst: bytes, payload: bytes = b"ping") -> bytes:
    """An ICMPv6 echo request (type 128): a packet the kernel answers while it is written to the TUN."""
    return ip6(src, dst, bytes((128, 0, 0, 0)) + payload, next_header=58)


class Hooks:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []
        self.allowed = {PEER}
        self.probe_replies: list[bytes] = []
        self.handshakes: list[bytes] = []

    def send_datagrams(self, datagrams: list[bytes], endpoint: object) -> None:
        self.sent.extend((d, endpoint) for d in datagrams)

    def send_control(self, datagram: bytes, endpoint: object) -> None:
        self.sent.append((datagram, endpoint))

    def need_handshake(self, address: bytes, packet: bytes | None) -> None:
        self.handshakes.append(address)

    def keypair_confirmed(self, peer: Peer) -> None:
        pass

    def probe_reply(self, peer: Peer, endpoint: object, nonce: bytes, now: float) -> None:
        self.probe_replies.append(nonce)

    def base_plaintext(self, *args: object) -> None:
        raise AssertionError("no base in these tests")

    def path_kind(self, endpoint: object) -> str:
        return "direct"

    def is_allowed(self, address: bytes) -> bool:
        return address in self.allowed


def keypair(local: int, remote: int, send: bytes, recv: bytes, peer_address: bytes, owner: object) -> Keypair:
    km = SimpleNamespace(
        cipher="aes-256-gcm",
        local_index=local,
        remote_index=remote,
        is_initiator=True,
        peer_public_key=bytes(32),
        peer_address=peer_address,
        send_key=send,
        recv_key=recv,
    )
    return Keypair(km, time.monotonic(), owner)


class Side:
    """Our datapath with one peer whose keypair is ``kp``; ``remote`` is the peer's side of the same keys."""

    def __init__(self) -> None:
        self.hooks = Hooks()
        self.delivered: list[bytes] = []
        self.counters = Counters()
        self.index = IndexTable()
        self.peers: dict[bytes, Peer] = {}
        self.dp = Datapath(
            ME,
            self.peers,
            self.index,
            self.counters,
            self.hooks,
            self.delivered.extend,
            timers=Timers(),
            clock=time.monotonic,
            wallclock=time.time,
        )
        self.peer = Peer(PEER)
        self.peers[PEER] = self.peer
        self.kp, self.remote = self.new_keys(1, 2)
        self.peer.current = self.kp
        self.peer.paths.add_candidate(EP, "direct", "static", 0.0)
        self.peer.paths.on_authenticated(EP, "direct", time.monotonic())

    def new_keys(self, local: int, remote: int) -> tuple[Keypair, Keypair]:
        k1, k2 = bytes([local]) * 32, bytes([remote]) * 32
        ours = keypair(local, remote, k1, k2, PEER, self.peer)
        self.index.set(local, ours)
        return ours, keypair(remote, local, k2, k1, ME, None)

    def receive(self, datagram: bytes, mode: str, src: object = EP) -> None:
        batch = [(datagram, src)]
        if mode == "batch":
            batch.append((JUNK, src))
        self.dp.receive_many(batch)

    def drops(self) -> dict[str, int]:
        traffic = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")
        return {k: v for k, v in self.counters.snapshot().items() if v and k not in traffic}


MODES = ["lone", "batch"]


def expected_drops(mode: str, **drops: int) -> dict[str, int]:
    if mode == "batch":
        drops["unknown_peer"] = drops.get("unknown_peer", 0) + 1
    return drops


@pytest.fixture
def side() -> Side:
    return Side()


@pytest.mark.parametrize("mode", MODES)
def test_a_genuine_packet_is_delivered_once_and_a_replay_is_dropped(side: Side, mode: str) -> None:
    pkt = ip6(PEER, ME)
    d = side.remote.seal(pkt)
    side.receive(d, mode)
    side.receive(d, mode)
    assert side.delivered == [pkt]
    assert side.counters.get("rx_packets") == 1
    assert side.drops() == ({"replay": 1} if mode == "lone" else {"replay": 1, "unknown_peer": 2})
    assert side.peer.rx_bytes == len(pkt)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("src", "dst", "reason"),
    [(OTHER, ME, "bad_inner_src"), (PEER, OTHER, "bad_inner_dst"), (ME, ME, "bad_inner_src")],
)
def test_inner_addresses_are_checked(side: Side, mode: str, src: bytes, dst: bytes, reason: str) -> None:
    side.receive(side.remote.seal(ip6(src, dst)), mode)
    assert side.delivered == []
    assert side.drops() == expected_drops(mode, **{reason: 1})


@pytest.mark.parametrize("mode", MODES)
def test_a_tampered_datagram_moves_nothing(side: Side, mode: str) -> None:
    pkt = ip6(PEER, ME)
    d = bytearray(side.remote.seal(pkt))
    d[-1] ^= 1
    side.receive(bytes(d), mode)
    assert side.delivered == []
    assert side.drops() == expected_drops(mode, bad_mac=1)
    # The window was not moved by the forgery: the genuine datagram with the same counter still counts.
    d[-1] ^= 1
    side.receive(bytes(d), mode)
    assert side.delivered == [pkt]


@pytest.mark.parametrize("mode", MODES)
def test_a_peer_removed_from_the_whitelist_is_dropped(side: Side, mode: str) -> None:
    side.hooks.allowed.clear()
    side.receive(side.remote.seal(ip6(PEER, ME)), mode)
    assert side.delivered == []
    assert side.drops() == expected_drops(mode, not_whitelisted=1)


@pytest.mark.parametrize("mode", MODES)
def test_a_keepalive_refreshes_the_peer_and_delivers_nothing(side: Side, mode: str) -> None:
    side.peer.last_rx = 0.0
    side.receive(side.remote.seal(b""), mode)
    assert side.delivered == []
    assert side.peer.last_rx > 0.0
    assert side.drops() == expected_drops(mode)


@pytest.mark.parametrize("mode", MODES)
def test_an_authenticated_packet_from_a_new_endpoint_moves_the_path(side: Side, mode: str) -> None:
    pkt = ip6(PEER, ME)
    side.peer.paths.current.last_auth_rx -= 5.0  # the old path went quiet (a live one is kept: no flapping)
    side.receive(side.remote.seal(pkt), mode, src=EP_NEW)
    assert side.delivered == [pkt]
    assert side.peer.paths.endpoint == EP_NEW
    # A forgery from yet another endpoint does not.
    forged = bytearray(side.remote.seal(pkt))
    forged[-1] ^= 1
    side.receive(bytes(forged), mode, src=("198.18.0.66", 1))
    assert side.peer.paths.endpoint == EP_NEW


@pytest.mark.parametrize("mode", MODES)
def test_the_previous_keypair_still_opens_during_a_rekey(side: Side, mode: str) -> None:
    old_remote = side.remote
    side.peer.previous = side.kp
    side.peer.current, side.remote = side.new_keys(3, 4)
    pkt = ip6(PEER, ME, b"late")
    side.receive(old_remote.seal(pkt), mode)
    assert side.delivered == [pkt]


@pytest.mark.parametrize("mode", MODES)
def test_a_probe_is_answered_on_the_path_it_came_in_on(side: Side, mode: str) -> None:
    nonce = bytes(range(PROBE_LEN - 1))
    side.receive(side.remote.seal(bytes([INNER_PROBE]) + nonce), mode, src=EP_NEW)
    assert len(side.hooks.sent) == 1
    reply, endpoint = side.hooks.sent[0]
    assert endpoint == EP_NEW
    assert side.remote.open(reply) == bytes([INNER_PROBE_REPLY]) + nonce
    side.receive(side.remote.seal(bytes([INNER_PROBE_REPLY]) + nonce), mode)
    assert side.hooks.probe_replies == [nonce]


@pytest.mark.parametrize("mode", MODES)
def test_an_unknown_inner_type_is_malformed(side: Side, mode: str) -> None:
    side.receive(side.remote.seal(b"\x01junk"), mode)
    assert side.delivered == []
    assert side.drops() == expected_drops(mode, malformed=1)


# --- send side ------------------------------------------------------------------------------------------


def send(side: Side, packet: bytes, mode: str) -> None:
    """``lone``: one packet; ``batch``: the packet and a second one to an unknown peer (dropped and counted)."""
    packets = [packet] if mode == "lone" else [packet, ip6(ME, bytes.fromhex("fd00" + "00" * 14))]
    side.dp.send_packets(packets)


def send_drops(side: Side, mode: str, **drops: int) -> dict[str, int]:
    if mode == "batch":
        drops["unknown_peer"] = drops.get("unknown_peer", 0) + 1
    return {k: v for k, v in drops.items() if v}


@pytest.mark.parametrize("mode", MODES)
def test_a_packet_to_a_live_peer_is_sealed_to_its_path(side: Side, mode: str) -> None:
    pkt = ip6(ME, PEER)
    send(side, pkt, mode)
    assert [(side.remote.open(d), ep) for d, ep in side.hooks.sent] == [(pkt, EP)]
    assert side.counters.get("tx_packets") == 1
    assert side.counters.get("tx_bytes") == len(pkt)
    assert side.peer.tx_bytes == len(pkt)
    assert side.peer.last_tx_data > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (ip6(OTHER, PEER), "bad_local_src"),  # someone else's overlay address: never sent
        (ip6(bytes.fromhex("fd00" + "00" * 14), PEER), "not_overlay"),
        (ip6(ME, OTHER), "not_whitelisted"),
        (b"\x60short", "malformed"),
    ],
)
def test_what_may_not_leave_does_not(side: Side, mode: str, pkt: bytes, reason: str) -> None:
    side.peers[OTHER] = Peer(OTHER)
    send(side, pkt, mode)
    assert side.hooks.sent == []
    assert {k: v for k, v in side.counters.snapshot().items() if v} == send_drops(side, mode, **{reason: 1})


@pytest.mark.parametrize("mode", MODES)
def test_without_a_keypair_the_packet_waits_for_a_handshake(side: Side, mode: str) -> None:
    side.peer.current = None
    pkt = ip6(ME, PEER)
    send(side, pkt, mode)
    assert side.hooks.sent == []
    assert list(side.peer.staged) == [pkt]
    assert side.hooks.handshakes == [PEER]


def test_a_small_tun_read_with_a_zero_header_is_sent_as_is(side: Side) -> None:
    pkt = ip6(ME, PEER)
    side.dp.send_reads([bytes(10) + pkt])
    assert [side.remote.open(d) for d, _ in side.hooks.sent] == [pkt]


def ones_sum(data: bytes) -> int:
    """The Internet checksum's one's complement sum of 16-bit words (odd length padded with a zero)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_a_small_tun_read_whose_checksum_is_left_to_us_takes_the_lone_path(side: Side, monkeypatch) -> None:
    """UDP and TCP from local sockets (DDS, service calls) come with NEEDS_CSUM: completed, then sent alone."""
    from husarnet_ros.core import offload as o

    body = struct.pack(">HHHH", 7400, 7401, 13, 0) + b"hello"
    pkt = bytearray(ip6(ME, PEER, body))
    pkt[6] = 17  # UDP
    pseudo = ME + PEER + struct.pack(">I", len(body)) + b"\0\0\0\x11"
    pkt[46:48] = struct.pack(">H", ones_sum(pseudo))  # what the kernel leaves in the field: the pseudo-header sum
    buf = o.build_vnet_hdr(o.VnetHdr(o.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 40, 6)) + bytes(pkt)
    taken: list[bool] = []
    real = side.dp._send_lone
    monkeypatch.setattr(side.dp, "_send_lone", lambda *a: taken.append(real(*a)) or taken[-1])
    side.dp.send_reads([buf])
    assert taken == [True]
    [sent] = [side.remote.open(d) for d, _ in side.hooks.sent]
    assert sent == o.split_for_send(buf, True, 1371)[0]
    # The completed checksum verifies: the one's complement sum over pseudo-header and datagram is 0xFFFF.
    assert ones_sum(pseudo + sent[40:]) == 0xFFFF


def test_a_tun_read_too_short_for_its_header_is_malformed(side: Side) -> None:
    side.dp.send_reads([b"\x00\x00\x00"])
    assert side.hooks.sent == []
    assert side.counters.get("malformed") == 1


def test_the_lone_paths_take_the_common_case_and_leave_the_rest(side: Side, monkeypatch) -> None:
    """The lone paths really run (else the tests above would only test the batch loops twice)."""
    taken: list[tuple[str, bool]] = []
    for name in ("receive_lone", "_send_lone"):
        real = getattr(side.dp, name)

        def spy(*args, _real=real, _name=name):
            result = _real(*args)
            taken.append((_name, result))
            return result

        monkeypatch.setattr(side.dp, name, spy)
    side.receive(side.remote.seal(ip6(PEER, ME)), "lone")  # common case
    side.receive(side.remote.seal(ip6(PEER, ME)), "lone", src=EP_NEW)  # roaming: the batch loop's
    side.dp.send_packets([ip6(ME, PEER)])  # common case
    side.dp.send_packets([ip6(ME, OTHER)])  # not whitelisted: the batch loop counts it
    assert taken == [("receive_lone", True), ("receive_lone", False), ("_send_lone", True), ("_send_lone", False)]


def test_a_batch_settles_each_session_and_endpoint_once_and_still_checks_each_packet(side: Side) -> None:
    """Datagrams after the first of a session+endpoint reuse its verdicts; the per-packet checks still run."""
    good, forged = ip6(PEER, ME, b"one"), ip6(OTHER, ME, b"two")
    side.dp.receive_many([(side.remote.seal(good), EP), (side.remote.seal(forged), EP), (side.remote.seal(good), EP)])
    assert side.delivered == [good, good]
    assert side.drops() == {"bad_inner_src": 1}
    # A second endpoint in the same batch is judged on its own (the path may move to it).
    side.peer.paths.current.last_auth_rx -= 5.0
    side.dp.receive_many([(side.remote.seal(good), EP_NEW), (side.remote.seal(good), EP_NEW)])
    assert side.peer.paths.endpoint == EP_NEW
    # Not whitelisted: every datagram of the batch is refused and counted, none settles a verdict.
    side.hooks.allowed.clear()
    side.dp.receive_many([(side.remote.seal(good), EP_NEW), (side.remote.seal(good), EP_NEW)])
    assert side.counters.get("not_whitelisted") == 2 and len(side.delivered) == 4


def test_a_batch_looks_up_a_run_of_one_receiver_index_once_and_judges_every_datagram(side: Side, monkeypatch) -> None:
    """The keypair is looked up once per run of datagrams to the same receiver index; each still stands alone."""
    old_kp, old_remote = side.kp, side.remote
    side.kp, side.remote = side.new_keys(3, 4)  # a rekey: datagrams on the old and the new keypair interleave
    side.peer.previous, side.peer.current = old_kp, side.kp
    lookups: list[int] = []
    get = side.index.get
    monkeypatch.setattr(side.index, "get", lambda i: lookups.append(i) or get(i))
    p1, p2, p3 = (ip6(PEER, ME, bytes([i]) * 8) for i in (1, 2, 3))
    not_data = bytes([MSG_DATA + 1]) + side.remote.seal(p3)[1:]  # another type word, the same receiver index
    replayed = side.remote.seal(p2)
    tampered = bytearray(side.remote.seal(p1))
    tampered[-1] ^= 1
    batch = [
        (side.remote.seal(p1), EP),
        (replayed, EP),
        (replayed, EP),  # a replay inside the run
        (not_data, EP),
        (old_remote.seal(p3), EP),  # the run ends: the old keypair
        (JUNK, EP),  # an unknown index between two runs
        (side.remote.seal(p3), EP),
        (bytes(tampered), EP),  # a broken tag inside a run
    ]
    side.dp.receive_many(batch)
    assert side.delivered == [p1, p2, p3, p3]
    assert side.drops() == {"replay": 1, "malformed": 1, "unknown_peer": 1, "bad_mac": 1}
    assert lookups == [3, 1, 0xDEAD, 3]


def sockaddr(endpoint: tuple[str, int]) -> tuple[str, int, int, int]:
    """What a dual-stack socket takes and reports for an IPv4 endpoint (UdpSocket.sockaddr)."""
    return ("::ffff:" + endpoint[0], endpoint[1], 0, 0)


def wire_socket(side: Side) -> list[tuple[bytes, object]]:
    """The engine's wiring for a UDP socket: the bare sendto (never waiting) and the address form it takes."""
    bare: list[tuple[bytes, object]] = []

    def sendto(d: bytes, flags: int, addr: object) -> None:
        assert flags & socket.MSG_DONTWAIT, "the socket is blocking for its receiver: a lone send must not wait"
        bare.append((d, addr))

    side.dp.sendto = sendto
    side.dp.sockaddr = sockaddr
    return bare


def test_lone_packets_use_the_bare_socket_and_tun_calls_when_wired(side: Side) -> None:
    """With a UDP socket and a TUN (the engine wires them) the lone paths skip the general hook calls."""
    bare = wire_socket(side)
    written: list[bytes] = []
    side.dp.write_direct = written.append
    out = ip6(ME, PEER)
    side.dp.send_packets([out])
    assert [(side.remote.open(d), addr) for d, addr in bare] == [(out, sockaddr(EP))]
    assert side.hooks.sent == []
    assert side.counters.get("tx_packets") == 1 and side.counters.get("tx_bytes") == len(out)
    inbound = ip6(PEER, ME)
    # The receive thread reports the sender in the socket's form: the lane's address.
    assert side.dp.receive_lone(side.remote.seal(inbound), sockaddr(EP)) is True
    assert written == [inbound] and side.delivered == []
    assert side.counters.get("rx_packets") == 1 and side.counters.get("rx_bytes") == len(inbound)
    # Another sender (roaming) is the batch path's: declined before any AEAD work.
    assert side.dp.receive_lone(side.remote.seal(inbound), sockaddr(EP_NEW)) is False
    assert side.counters.get("rx_packets") == 1 and side.drops() == {}


def test_a_bare_send_that_fails_is_retried_the_careful_way(side: Side) -> None:
    """A full socket buffer or a path error: the hooks' send (UdpTransport.send_many) waits or counts a loss."""

    def full(d: bytes, flags: int, addr: object) -> None:
        raise BlockingIOError

    side.dp.sendto = full
    side.dp.sockaddr = sockaddr
    out = ip6(ME, PEER)
    side.dp.send_packets([out])
    assert [(side.remote.open(d), ep) for d, ep in side.hooks.sent] == [(out, EP)]
    assert side.counters.get("tx_packets") == 1


# --- lanes: the checks made once, and what makes them again ----------------------------------------------


def count_lanes_made(side: Side, monkeypatch) -> list[object]:
    made: list[object] = []
    real = side.dp._make_lane

    def spy(peer):
        lane = real(peer)
        made.append(lane)
        return lane

    monkeypatch.setattr(side.dp, "_make_lane", spy)
    return made


def test_a_lane_is_made_once_and_serves_both_directions(side: Side, monkeypatch) -> None:
    made = count_lanes_made(side, monkeypatch)
    for _ in range(3):
        side.dp.send_packets([ip6(ME, PEER)])
        side.receive(side.remote.seal(ip6(PEER, ME)), "lone")
    assert len(made) == 1 and made[0] is side.peer.lane
    assert len(side.hooks.sent) == 3 and len(side.delivered) == 3


def test_a_whitelist_change_drops_every_lane_at_once(side: Side) -> None:
    """The engine calls drop_lanes from the whitelist listener: the next packet meets the full rules."""
    side.dp.send_packets([ip6(ME, PEER)])
    assert side.peer.lane is not None
    side.hooks.allowed.clear()
    side.dp.drop_lanes()
    assert side.peer.lane is None
    side.dp.send_packets([ip6(ME, PEER)])
    side.receive(side.remote.seal(ip6(PEER, ME)), "lone")
    assert len(side.hooks.sent) == 1 and side.delivered == []
    assert side.drops() == {"not_whitelisted": 2}


def test_a_lane_made_while_the_whitelist_changed_is_not_kept(side: Side) -> None:
    """The verdict may be read just before a removal lands: the generation tells, and the lane is dropped."""
    real = side.hooks.is_allowed

    def allowed_then_removed(address: bytes) -> bool:
        verdict = real(address)
        side.hooks.allowed.clear()
        side.dp.drop_lanes()  # the removal lands between the verdict and the lane
        return verdict

    side.hooks.is_allowed = allowed_then_removed
    assert side.dp._make_lane(side.peer) is None
    assert side.peer.lane is None
    side.hooks.is_allowed = real
    side.dp.send_packets([ip6(ME, PEER)])
    assert side.hooks.sent == [] and side.drops() == {"not_whitelisted": 1}


def test_a_new_keypair_or_path_makes_a_new_lane(side: Side) -> None:
    bare = wire_socket(side)
    side.dp.send_packets([ip6(ME, PEER)])
    first = side.peer.lane
    side.peer.previous = side.kp
    side.peer.current, new_remote = side.new_keys(5, 6)
    side.dp.send_packets([ip6(ME, PEER, b"new key")])
    assert new_remote.open(bare[-1][0]) == ip6(ME, PEER, b"new key")
    second = side.peer.lane
    assert second is not first and second.kp is side.peer.current
    # The path moves (roaming, seen by the batch path): the lane follows it.
    side.peer.paths.current.last_auth_rx -= 5.0
    side.dp.receive_many([(new_remote.seal(ip6(PEER, ME)), EP_NEW)])
    side.dp.send_packets([ip6(ME, PEER, b"new path")])
    assert bare[-1][1] == sockaddr(EP_NEW)
    assert side.peer.lane is not second


def test_no_lane_on_the_relay_or_without_a_keypair(side: Side) -> None:
    side.peer.current = None
    assert side.dp._make_lane(side.peer) is None
    side.peer.current = side.kp
    side.peer.paths.invalidate()
    assert side.dp._make_lane(side.peer) is None


def test_a_relayed_path_never_takes_the_direct_socket_call(side: Side) -> None:
    from husarnet_ros.core.transport import RelayEndpoint

    relay = RelayEndpoint("198.18.0.100:443", PEER)
    side.peer.paths.remove(EP)
    side.peer.paths.add_candidate(relay, "relay", "base", 0.0)
    side.peer.paths.on_authenticated(relay, "relay", time.monotonic())
    assert side.peer.paths.endpoint == relay
    bare = wire_socket(side)
    side.dp.send_packets([ip6(ME, PEER)])
    assert bare == [] and side.peer.lane is None
    assert [ep for _, ep in side.hooks.sent] == [relay]


@pytest.mark.parametrize("word", [1, 2, 3, 5, 6, 0x104])
def test_the_lone_receive_declines_anything_but_a_data_message(side: Side, word: int) -> None:
    """The UDP thread offers every lone datagram to receive_lone first: handshakes and the rest pass untouched."""
    d = bytearray(side.remote.seal(ip6(PEER, ME)))
    d[:4] = word.to_bytes(4, "little")
    assert side.dp.receive_lone(bytes(d), EP) is False
    assert side.delivered == [] and side.drops() == {}
    assert side.counters.get("rx_packets") == 0


class FakeTun:
    """What the data path needs of a TUN device for _write_and_answer and the TUN loop: queued reads, waits that
    end at once when something is queued, a clock that moves only while a wait sleeps, a way to fail after close."""

    vnet_hdr = False
    mtu = 1371
    name = "fake0"

    def __init__(self, *queued: bytes, bursts: list[list[bytes]] | None = None) -> None:
        self.queued = list(queued)
        self.closed = False
        self.asked: list[int] = []
        self.bursts = bursts or []
        self.now = 0.0  # the data path's clock while the TUN loop runs (see run_tun_loop)
        self.naps = 0  # waits that slept
        self.looked = 0  # zero-timeout waits that found nothing

    def read_ready(self, max_packets: int = 64) -> list[bytes]:
        if self.closed:
            raise RuntimeError("closed")  # TunError in the real device
        self.asked.append(max_packets)
        out, self.queued = self.queued[:max_packets], self.queued[max_packets:]
        return out

    def read_one(self) -> bytes | None:
        out = self.read_ready(1)
        return out[0] if out else None

    def wait_readable(self, timeout: float | None = None) -> bool:
        """A packet already queued ends the wait at once (as poll does); else it sleeps (10 ms of the
        clock) until the next scripted burst arrives; with none left the device is closed.  A wait of 0
        only looks (poll with a zero timeout)."""
        if self.queued:
            return True
        if timeout == 0:
            self.looked += 1
            return False
        if not self.bursts:
            self.closed = True
            raise RuntimeError("closed")
        self.queued += self.bursts.pop(0)
        self.now += 0.010
        self.naps += 1
        return True


def run_tun_loop(side: Side, tun: FakeTun) -> list[Exception]:
    """Run the data path's TUN loop over ``tun`` until the fake device closes; the failures it reported."""
    side.dp._tun = tun
    side.dp.clock = lambda: tun.now
    failures: list[Exception] = []
    side.dp.on_tun_failure = failures.append
    side.dp._tun_loop()
    return failures


def wire_tun(side: Side, tun: FakeTun) -> list[bytes]:
    written: list[bytes] = []
    side.dp.write_direct = written.append
    side.dp._tun = tun
    return written


def test_the_answer_the_kernel_queued_leaves_from_the_receive_thread(side: Side) -> None:
    """A lone packet written to the TUN, then the one answer already queued there is sealed and sent at once."""
    answer, later = ip6(ME, PEER, b"answer"), ip6(ME, PEER, b"later")
    tun = FakeTun(answer, later)
    written = wire_tun(side, tun)
    request = echo_request(PEER, ME, b"request")
    assert side.dp.receive_lone(side.remote.seal(request), EP) is True
    assert written == [request]
    assert [side.remote.open(d) for d, _ in side.hooks.sent] == [answer]
    assert tun.queued == [later]  # one packet at most: the TUN thread takes the rest


@pytest.mark.parametrize(
    ("next_header", "first", "looked"),
    [
        (58, 128, True),  # an echo request: the kernel queues the reply during the write
        (6, 0x50, True),  # TCP: an ACK, a SYN-ACK or a reset may come at once
        (60, 58, True),  # an extension header (destination options): not told apart, so looked for
        (17, 0x30, False),  # UDP (DDS, a service call): a process answers, after the write returned
        (58, 129, False),  # an echo reply: nothing answers it
        (59, 0, False),  # no next header
    ],
)
def test_an_answer_is_looked_for_only_after_a_packet_the_kernel_may_answer(
    side: Side, next_header: int, first: int, looked: bool
) -> None:
    """After writing a UDP datagram the read for an answer would fail, and on a cold CPU cost ~30 us."""
    tun = FakeTun(ip6(ME, PEER, b"queued"))
    locked_at_write: list[bool] = []
    side.dp._tun = tun
    side.dp.write_direct = lambda p: locked_at_write.append(side.dp._tun_send_lock.locked())
    packet = ip6(PEER, ME, bytes((first, 0, 0, 0)) + b"data", next_header=next_header)
    assert side.dp.receive_lone(side.remote.seal(packet), EP) is True
    assert locked_at_write == [looked]  # looking for an answer holds the TUN thread's lock over the write
    assert tun.asked == ([1] if looked else [])
    assert len(side.hooks.sent) == (1 if looked else 0)  # else the TUN thread sends what is queued
    assert side.counters.get("rx_packets") == 1 and side.drops() == {}


def test_no_answer_is_taken_while_the_tun_thread_reads_and_sends(side: Side) -> None:
    tun = FakeTun(ip6(ME, PEER, b"answer"))
    written = wire_tun(side, tun)
    with side.dp._tun_send_lock:  # the TUN thread holds it while it reads and sends (order on the wire)
        assert side.dp.receive_lone(side.remote.seal(ip6(PEER, ME)), EP) is True
    assert len(written) == 1  # delivered all the same
    assert side.hooks.sent == [] and len(tun.queued) == 1


def test_the_write_is_made_holding_the_tun_threads_lock(side: Side) -> None:
    """The answer wakes the TUN thread during our write: holding its lock, it cannot take the answer first."""
    tun = FakeTun(ip6(ME, PEER, b"answer"))
    locked_at_write: list[bool] = []
    side.dp._tun = tun
    side.dp.write_direct = lambda p: locked_at_write.append(side.dp._tun_send_lock.locked())
    assert side.dp.receive_lone(side.remote.seal(echo_request(PEER, ME)), EP) is True
    assert locked_at_write == [True] and len(side.hooks.sent) == 1
    assert not side.dp._tun_send_lock.locked()


def test_a_failing_write_is_reported_and_releases_the_lock(side: Side, caplog: pytest.LogCaptureFixture) -> None:
    tun = FakeTun(ip6(ME, PEER, b"answer"))
    side.dp._tun = tun

    def broken(packet: bytes) -> None:
        raise OSError(5, "Input/output error")

    side.dp.write_direct = broken
    with caplog.at_level(logging.ERROR):
        assert side.dp.receive_lone(side.remote.seal(ip6(PEER, ME)), EP) is True
    assert "delivering a packet failed" in caplog.text
    assert not side.dp._tun_send_lock.locked()
    assert side.hooks.sent == [] and len(tun.queued) == 1  # no answer to a packet that was not written


def test_nothing_queued_or_a_closed_tun_only_delivers(side: Side) -> None:
    tun = FakeTun()
    written = wire_tun(side, tun)
    assert side.dp.receive_lone(side.remote.seal(ip6(PEER, ME, b"one")), EP) is True
    tun.closed = True
    assert side.dp.receive_lone(side.remote.seal(ip6(PEER, ME, b"two")), EP) is True
    assert len(written) == 2 and side.hooks.sent == []
    assert side.counters.get("rx_packets") == 2 and side.drops() == {}
    assert not side.dp._tun_send_lock.locked()


def test_an_answer_to_a_peer_that_is_not_whitelisted_is_dropped_and_counted(side: Side) -> None:
    """The answer goes through the same send rules as any TUN read."""
    tun = FakeTun(ip6(ME, OTHER, b"answer"))
    wire_tun(side, tun)
    assert side.dp.receive_lone(side.remote.seal(echo_request(PEER, ME)), EP) is True
    assert side.hooks.sent == []
    assert tun.queued == []
    assert sum(side.drops().values()) == 1


def test_the_tun_loop_takes_a_read_that_ended_a_wait_alone_and_drains_a_backlog(side: Side) -> None:
    """After idle the first packet leaves at once (no drain attempt on its path); what queued behind it
    leaves as one batch; order on the wire is TUN order; a closed device ends the loop."""
    pkts = [ip6(ME, PEER, b"p%d" % i) for i in range(5)]
    tun = FakeTun(pkts[0], bursts=[[pkts[1], pkts[2], pkts[3]], [pkts[4]]])
    failures = run_tun_loop(side, tun)  # returns when the fake device closes
    assert failures == []  # closed by us: the normal end, nothing to report
    # The backlog in batches, the first read after each sleep alone, and a wait (not a read) after it:
    # a packet queued behind it ends that wait at once, and the next read is a batch again.
    assert tun.asked == [64, 64, 1, 64, 64, 1]
    assert [side.remote.open(d) for d, _ in side.hooks.sent] == pkts
    assert not side.dp._tun_send_lock.locked()


def test_a_lone_packet_is_followed_by_a_wait_not_by_a_failing_read(side: Side) -> None:
    """Light traffic: each packet wakes the loop, leaves alone, and the loop sleeps again at once."""
    pkts = [ip6(ME, PEER, b"p%d" % i) for i in range(3)]
    tun = FakeTun(bursts=[[p] for p in pkts])
    assert run_tun_loop(side, tun) == []
    assert tun.asked == [64, 1, 1, 1]  # the first look at start, then one read per packet, none empty
    assert tun.naps == 3
    assert [side.remote.open(d) for d, _ in side.hooks.sent] == pkts


class AnsweringLock:
    """The TUN thread's lock as the receive thread holds it while answering: the first try fails, and by the
    time the lock is had, the receive thread has read the answer that woke the TUN thread."""

    def __init__(self, tun: FakeTun) -> None:
        self.tun = tun
        self.contended = 0
        self.held = False

    def acquire(self, blocking: bool = True) -> bool:
        if not blocking and self.tun.queued and not self.contended:
            self.contended += 1
            return False
        if blocking:
            self.tun.queued.clear()  # the receive thread took it (and sent it) meanwhile
        self.held = True
        return True

    def release(self) -> None:
        assert self.held
        self.held = False


def test_a_wake_up_for_an_answer_the_receive_thread_took_does_not_read_in_vain(side: Side) -> None:
    """Woken by an answer queued during the receive thread's write, the TUN thread waits for the lock, then
    finds the answer gone: it looks (a zero wait) instead of a read that raises, ~30 us on a cold CPU."""
    pkts = [ip6(ME, PEER, b"p0"), ip6(ME, PEER, b"p1")]
    tun = FakeTun(bursts=[[pkts[0]], [pkts[1]]])
    lock = AnsweringLock(tun)
    side.dp._tun_send_lock = lock  # type: ignore[assignment]
    assert run_tun_loop(side, tun) == []
    assert lock.contended == 1 and not lock.held
    assert tun.looked == 1  # the look found nothing ...
    assert tun.asked == [64, 1]  # ... so no read for p0; p1 (no contention) is read and sent as usual
    assert [side.remote.open(d) for d, _ in side.hooks.sent] == [pkts[1]]


def test_a_packet_the_lone_path_declines_is_followed_by_a_drain(side: Side) -> None:
    """A read the lone path does not take (here: to an unknown peer) goes the batch way, and so does the
    next read: bulk traffic (TSO super-packets, which the lone path never takes) keeps its batches."""
    stranger = bytes.fromhex("fc94" + "ab" * 14)
    pkts = [ip6(ME, stranger, b"x"), ip6(ME, PEER, b"p1"), ip6(ME, PEER, b"p2")]
    tun = FakeTun(bursts=[[pkts[0]], pkts[1:]])
    assert run_tun_loop(side, tun) == []
    # declined: a drain (64) follows; p1 leaves alone and p2, already queued behind it, in a batch
    assert tun.asked == [64, 1, 64, 1, 64, 64]
    assert [side.remote.open(d) for d, _ in side.hooks.sent] == pkts[1:]


class DeletedTun(FakeTun):
    """A device that fails while open, as a TUN deleted under the daemon does (EBADFD): not closed by us."""

    def wait_readable(self, timeout: float | None = None) -> bool:
        raise OSError(77, "File descriptor in bad state")


def test_a_tun_failing_while_open_is_reported_once_and_ends_the_loop(side: Side) -> None:
    """Without the report the overlay would go deaf while looking healthy (the engine exits or raises ERROR)."""
    tun = DeletedTun()
    side.dp._tun = tun
    failures: list[Exception] = []
    side.dp.on_tun_failure = failures.append
    side.dp._tun_loop()
    assert [type(e) for e in failures] == [OSError] and failures[0].errno == 77
    assert not side.dp._tun_send_lock.locked()


def test_a_failing_failure_report_does_not_escape_the_tun_thread(side: Side) -> None:
    side.dp._tun = DeletedTun()

    def broken(exc: Exception) -> None:
        raise RuntimeError("listener bug")

    side.dp.on_tun_failure = broken
    side.dp._tun_loop()  # logs, returns
