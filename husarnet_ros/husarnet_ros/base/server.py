"""The base server: rendezvous and relay for husarnet_ros nodes (``husarnet-base``).

Every node<->base channel is an ordinary Noise IK session, exactly like peer
traffic: the node initiates over TCP (datagrams framed with a 2-byte
big-endian length), the base answers every valid identity (its "whitelist"
is anyone who holds a valid key), challenges the node to sign a fresh nonce
(LOGIN) and only then registers it under its fc94 address.  The same session
keys are then used over UDP, which is how the base learns each node's public
UDP mapping (needed for hole punching).  Control messages are
``core/base_proto.py``.

What the base does for logged-in nodes:

* QUERY(B) from A: PEER_INFO(B) to A and PEER_INFO(A, punch) to B at once,
  so both probe each other simultaneously (hole punching);
* RELAY(B, datagram) from A: RELAYED(A, datagram) to B.  The source is
  stamped from A's authenticated session, never taken from the message.  The
  datagram is end-to-end sealed between A and B and is never decrypted here.
  UDP is preferred (B's last authenticated UDP endpoint, if seen within
  ``udp_fresh`` seconds), else TCP.  Per-node token buckets limit relay bytes
  and control messages; TCP write buffers are bounded.

Per-node state is a few small objects (one TCP transport, up to three
keypairs, two token buckets), so 10,000 nodes fit easily on one core; the
handshake (four X25519 operations) dominates login cost.

Test-only hooks (off by default, loudly logged), for the relay-tampering tests:
``HUSARNET_BASE_TEST_FLIP_BITS=1`` flips one bit in every relayed datagram;
``HUSARNET_BASE_TEST_TAMPER`` does what else a malicious base could do to each
relayed datagram: ``header`` flips a bit of its header (the receiver index),
``truncate`` cuts it to half its length, and ``stamp=<fc94 address>`` stamps it
as coming from that node (so a node's frames can claim to be another's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import base_proto as bp
from ..core import handshake as hs
from ..core.constants import (
    DEFAULT_BASE_TCP_PORT,
    DEFAULT_BASE_UDP_PORT,
    KEEPALIVE_TIMEOUT,
    MAX_DATAGRAM,
    Timers,
)
from ..core.counters import Counters
from ..core.fsutil import StateFileError, atomic_write_json, ensure_state_dir
from ..core.identity import Identity, format_address, parse_address, verify_signature
from ..core.session import Keypair, SessionDrop, random_index
from ..core.wire import (
    DATA_MIN_LEN,
    MSG_DATA,
    MSG_HANDSHAKE_INIT,
    MSG_HELLO,
    Malformed,
    build_hello,
    parse_hello,
)

log = logging.getLogger("husarnet_ros.base")

Endpoint = tuple[str, int]

ENV_FLIP_BITS = "HUSARNET_BASE_TEST_FLIP_BITS"
ENV_TAMPER = "HUSARNET_BASE_TEST_TAMPER"
_FRAME = struct.Struct(">H")
_U32 = struct.Struct("<I")

#: Server counters beyond the core's per-reason drops.
BASE_COUNTERS = (
    "logins",
    "logouts",
    "login_failed",
    "superseded",
    "queries",
    "peer_info_sent",
    "relayed_packets",
    "relayed_bytes",
    "relayed_udp",
    "relayed_tcp",
    "relay_no_peer",
    "tcp_backpressure",
    "udp_backpressure",
    "udp_endpoint_moved",
    "udp_pings",
    "hellos",
    "unexpected",
    "timeouts",
    "connections",
)


@dataclass
class BaseConfig:
    """Everything the base server can be told; defaults are production values."""

    state_dir: Path
    bind: str = ""  # "" = every address, IPv4 and IPv6
    tcp_port: int = DEFAULT_BASE_TCP_PORT
    udp_port: int = DEFAULT_BASE_UDP_PORT
    relay_rate: float = 8_000_000.0  # bytes/s per node
    relay_burst: float = 2_000_000.0  # bytes
    control_rate: float = 50.0  # control messages/s per node (QUERY, ENDPOINTS, UDP_PING)
    control_burst: float = 200.0
    udp_fresh: float = 30.0  # relay over UDP only to an endpoint authenticated this recently
    login_timeout: float = 10.0
    idle_timeout: float = 3 * 25.0 + KEEPALIVE_TIMEOUT  # no authenticated message for this long: drop
    max_tcp_buffer: int = 1 << 20  # per node; beyond this, datagrams for it are dropped
    max_udp_buffer: int = 4 << 20  # whole server, when the UDP socket would block
    max_connections: int = 200_000
    handshake_rate: float = 1200.0  # hellos + handshakes per second, whole server (a login costs ~1.2 ms)
    stats_file: Path | None = None
    stats_interval: float = 10.0
    sweep_interval: float = 2.0
    timers: Timers = field(default_factory=Timers)
    flip_bits: bool = False  # test hook, see module docstring
    tamper: str = ""  # test hook, see module docstring: "", "header", "truncate" or "stamp=<fc94 address>"


class _Bucket:
    """Token bucket; ``take`` refills lazily from the elapsed time."""

    __slots__ = ("last", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.last = now

    def take(self, n: float, rate: float, burst: float, now: float) -> bool:
        tokens = self.tokens + (now - self.last) * rate
        self.tokens = burst if tokens > burst else tokens
        self.last = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


def normalize_endpoint(addr: Any) -> Endpoint:
    """``(host, port)`` with IPv4-mapped IPv6 turned into dotted IPv4 and no flow/scope fields."""
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


class NodeConn(asyncio.Protocol):
    """One node's TCP connection and, once logged in, its registration."""

    __slots__ = (
        "_buf",
        "address",
        "created",
        "ctrl_bucket",
        "hellos",
        "hostname",
        "keypairs",
        "lan_endpoints",
        "last_rx",
        "last_ts",
        "nonce",
        "peer",
        "public_key",
        "relay_bucket",
        "send_kp",
        "server",
        "state",
        "transport",
        "udp_endpoint",
        "udp_seen",
    )

    def __init__(self, server: BaseServer) -> None:
        self.server = server
        now = server.clock()
        self.created = now
        self.last_rx = now
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint = ("", 0)
        self.state = "new"  # new -> login -> up -> closed
        self.address = b""
        self.public_key = b""
        self.hostname = ""
        self.nonce = b""
        self.hellos = 0
        self.last_ts = b""
        self.keypairs: list[Keypair] = []  # oldest first, at most 3
        self.send_kp: Keypair | None = None
        self.lan_endpoints: list[Endpoint] = []
        self.udp_endpoint: Endpoint | None = None
        self.udp_seen = 0.0
        self.relay_bucket = _Bucket(server.config.relay_burst, now)
        self.ctrl_bucket = _Bucket(server.config.control_burst, now)
        self._buf = bytearray()

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = normalize_endpoint(transport.get_extra_info("peername") or ("?", 0))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.on_connection(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.on_disconnect(self)
        self.state = "closed"
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        off = 0
        n = len(buf)
        while n - off >= 2:
            size = (buf[off] << 8) | buf[off + 1]
            if size == 0:
                self.server.counters.inc("malformed")
                self.close("empty frame")
                return
            if n - off - 2 < size:
                break
            frame = bytes(buf[off + 2 : off + 2 + size])
            off += 2 + size
            self.server.handle_tcp_frame(self, frame)
            if self.state == "closed" or self.transport is None:
                return
        if off:
            del buf[:off]

    # --- helpers --------------------------------------------------------------------------
    def close(self, why: str = "") -> None:
        if why:
            log.debug("closing %s: %s", self.describe(), why)
        if self.transport is not None:
            self.transport.close()

    def describe(self) -> str:
        who = format_address(self.address) if self.address else "?"
        return f"{who} ({self.hostname or '-'}) tcp {self.peer[0]}:{self.peer[1]}"

    def send_frame(self, datagram: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() > self.server.config.max_tcp_buffer:
            self.server.counters.inc("tcp_backpressure")
            return False
        t.write(_FRAME.pack(len(datagram)) + datagram)
        return True

    def seal(self, plaintext: bytes) -> bytes | None:
        kp = self.send_kp
        if kp is None:
            return None
        try:
            return kp.seal(plaintext)
        except SessionDrop as drop:
            self.server.counters.inc(drop.reason)
            return None

    def send_tcp(self, plaintext: bytes) -> bool:
        sealed = self.seal(plaintext)
        return sealed is not None and self.send_frame(sealed)

    def udp_fresh(self, now: float) -> bool:
        return self.udp_endpoint is not None and now - self.udp_seen <= self.server.config.udp_fresh

    def endpoints(self, now: float) -> list[Endpoint]:
        """What peers should probe: the public UDP mapping (if recently seen) then the LAN endpoints."""
        eps: list[Endpoint] = []
        if self.udp_endpoint is not None and now - self.udp_seen <= 2 * self.server.config.udp_fresh:
            eps.append(self.udp_endpoint)
        return bp.usable_endpoints(eps + self.lan_endpoints)

    def add_keypair(self, kp: Keypair) -> None:
        self.keypairs.append(kp)
        while len(self.keypairs) > 3:
            old = self.keypairs.pop(0)
            self.server.index.pop(old.local_index, None)
            if self.send_kp is old:
                self.send_kp = self.keypairs[0]


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: BaseServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.handle_udp(data, normalize_endpoint(addr))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)


class _LruTimestamps:
    """Last handshake timestamp per node address, bounded (replayed initiations are refused)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._d: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, addr: bytes) -> bytes | None:
        return self._d.get(addr)

    def set(self, addr: bytes, ts: bytes) -> None:
        self._d[addr] = ts
        self._d.move_to_end(addr)
        if len(self._d) > self.limit:
            self._d.popitem(last=False)


class BaseServer:
    """Rendezvous + relay.  Create, ``await start()``, then ``await close()``; all on one asyncio loop."""

    def __init__(self, config: BaseConfig, *, identity: Identity | None = None, clock: Any = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.counters = Counters()
        for name in BASE_COUNTERS:
            self.counters.inc(name, 0)
        self.identity = identity
        self.nodes: dict[bytes, NodeConn] = {}
        self.conns: set[NodeConn] = set()
        self.index: dict[int, Keypair] = {}
        self.timestamps = _LruTimestamps(max(1024, 2 * config.max_connections))
        self.features = hs.local_features()
        self.tcp_server: asyncio.base_events.Server | None = None
        self.udp_transport: asyncio.DatagramTransport | None = None
        self.tcp_port = 0
        self.udp_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.time()
        self.flip_bits = config.flip_bits
        self.tamper, _, stamp = config.tamper.partition("=")
        if self.tamper not in ("", "header", "truncate", "stamp") or bool(stamp) != (self.tamper == "stamp"):
            raise ValueError(f"{ENV_TAMPER} must be header, truncate or stamp=<fc94 address>, not {config.tamper!r}")
        self.tamper_stamp = parse_address(stamp) if stamp else b""
        self._hs_bucket = _Bucket(config.handshake_rate, clock())

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Load or create the identity, open TCP and UDP, start the housekeeping tasks."""
        state_dir = ensure_state_dir(self.config.state_dir)
        if self.identity is None:
            self.identity = Identity.load_or_create(state_dir / "id")
        loop = asyncio.get_running_loop()
        host = self.config.bind or None
        self.tcp_server = await loop.create_server(
            lambda: NodeConn(self), host=host, port=self.config.tcp_port, reuse_address=True, backlog=4096
        )
        self.tcp_port = self.tcp_server.sockets[0].getsockname()[1]
        usock = self._udp_socket()
        self.udp_transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=usock)
        self.udp_port = usock.getsockname()[1]
        self._tasks.append(loop.create_task(self._sweeper()))
        if self.config.stats_file is not None:
            self._tasks.append(loop.create_task(self._stats_writer()))
        if self.flip_bits:
            log.warning("TEST HOOK %s is on: every relayed datagram gets a bit flipped", ENV_FLIP_BITS)
        if self.tamper:
            log.warning(
                "TEST HOOK %s=%s is on: every relayed datagram is tampered with", ENV_TAMPER, self.config.tamper
            )
        log.info(
            "base %s listening tcp %s:%d udp %s:%d",
            self.identity.address_str,
            self.config.bind or "*",
            self.tcp_port,
            self.config.bind or "*",
            self.udp_port,
        )

    def _udp_socket(self) -> socket.socket:
        bind = self.config.bind
        family = socket.AF_INET if bind and ":" not in bind else socket.AF_INET6
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and not bind:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.bind((bind or "::", self.config.udp_port))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    async def close(self) -> None:
        """Stop listening, drop every node, stop tasks; idempotent."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.tcp_server is not None:
            self.tcp_server.close()
        for conn in list(self.conns):
            conn.close()
        if self.tcp_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.tcp_server.wait_closed(), 5)
            self.tcp_server = None
        if self.udp_transport is not None:
            self.udp_transport.close()
            self.udp_transport = None
        if self.config.stats_file is not None:
            with contextlib.suppress(OSError):
                self.write_stats()

    @property
    def public_key(self) -> bytes:
        assert self.identity is not None
        return self.identity.public_key

    # --- stats ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Gauges and counters, for the stats file, SIGUSR1 and tests."""
        return {
            "time": time.time(),
            "uptime": time.time() - self._started,
            "address": self.identity.address_str if self.identity else "",
            "public_key": self.identity.public_key.hex() if self.identity else "",
            "tcp_port": self.tcp_port,
            "udp_port": self.udp_port,
            "nodes": len(self.nodes),
            "connections": len(self.conns),
            "sessions": len(self.index),
            "counters": self.counters.snapshot(),
        }

    def write_stats(self) -> None:
        if self.config.stats_file is not None:
            atomic_write_json(self.config.stats_file, self.stats(), 0o644)

    async def _stats_writer(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.write_stats()
            await asyncio.sleep(self.config.stats_interval)

    async def _sweeper(self) -> None:
        """Login and idle timeouts, expired keys: one pass over all connections every few seconds."""
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.sweep_interval)
            now = self.clock()
            for conn in list(self.conns):
                if conn.state in ("new", "login"):
                    if now - conn.created > cfg.login_timeout:
                        self.counters.inc("timeouts")
                        conn.close("login timeout")
                    continue
                if now - conn.last_rx > cfg.idle_timeout:
                    self.counters.inc("timeouts")
                    conn.close("idle")
                    continue
                live = [kp for kp in conn.keypairs if not kp.expired(now, cfg.timers)]
                if len(live) != len(conn.keypairs):
                    for kp in conn.keypairs:
                        if kp not in live:
                            self.index.pop(kp.local_index, None)
                    conn.keypairs = live
                    if conn.send_kp not in live:
                        conn.send_kp = live[-1] if live else None
                    if not live:
                        self.counters.inc("expired")
                        conn.close("session expired (node did not rekey)")

    # --- connections ----------------------------------------------------------------------
    def on_connection(self, conn: NodeConn) -> None:
        if len(self.conns) >= self.config.max_connections:
            self.counters.inc("rate_limited")
            conn.close("too many connections")
            return
        self.conns.add(conn)
        self.counters.inc("connections")

    def on_disconnect(self, conn: NodeConn) -> None:
        self.conns.discard(conn)
        for kp in conn.keypairs:
            if self.index.get(kp.local_index) is kp:
                del self.index[kp.local_index]
        conn.keypairs = []
        conn.send_kp = None
        if conn.address and self.nodes.get(conn.address) is conn:
            del self.nodes[conn.address]
            self.counters.inc("logouts")
            log.info("logout %s", conn.describe())

    # --- TCP ---------------------------------------------------------------------------------
    def handle_tcp_frame(self, conn: NodeConn, frame: bytes) -> None:
        if len(frame) < 4:
            self.counters.inc("malformed")
            conn.close("short frame")
            return
        word = _U32.unpack_from(frame)[0]
        if word == MSG_DATA:
            self._tcp_data(conn, frame)
        elif word == MSG_HANDSHAKE_INIT:
            self._handshake(conn, frame)
        elif word == MSG_HELLO:
            self._hello(conn, frame)
        else:
            self.counters.inc("malformed")
            conn.close("unknown frame type")

    def _expensive_ok(self, conn: NodeConn) -> bool:
        """Global budget for public-key work, so a connection flood cannot starve logged-in nodes."""
        rate = self.config.handshake_rate
        if self._hs_bucket.take(1, rate, rate, self.clock()):
            return True
        self.counters.inc("rate_limited")
        conn.close("handshake rate limit")
        return False

    def _hello(self, conn: NodeConn, frame: bytes) -> None:
        """Key discovery for trust-on-first-use: answer a node's signed Hello with ours, addressed to it."""
        if not self._expensive_ok(conn):
            return
        conn.hellos += 1
        if conn.state != "new" or conn.hellos > 2:
            self.counters.inc("unexpected")
            conn.close("hello out of place")
            return
        try:
            hello = parse_hello(frame)
        except Malformed as exc:
            self.counters.inc(exc.reason)
            conn.close("bad hello")
            return
        self.counters.inc("hellos")
        assert self.identity is not None
        conn.send_frame(build_hello(self.identity, hello.address, int(time.time() * 1000)))

    def _handshake(self, conn: NodeConn, frame: bytes) -> None:
        assert self.identity is not None
        if not self._expensive_ok(conn):
            return
        self.counters.inc("handshakes_received")
        if not hs.check_mac1(self.identity, frame):
            self.counters.inc("bad_mac")
            conn.close("bad mac1")
            return
        try:
            st = hs.consume_initiation(self.identity, frame)
        except hs.HandshakeError as exc:
            self.counters.inc(exc.reason)
            conn.close("bad initiation")
            return
        except Exception:  # hostile input must never escape as a crash
            self.counters.inc("malformed")
            conn.close("bad initiation")
            return
        if conn.state == "new":
            last = self.timestamps.get(st.peer_address)
        else:
            if st.peer_public_key != conn.public_key:
                self.counters.inc("bad_id")
                conn.close("rekey with another key")
                return
            last = conn.last_ts
        if last is not None and st.timestamp <= last:
            self.counters.inc("replay")
            conn.close("replayed initiation")
            return
        idx = random_index()
        while idx == 0 or idx in self.index:
            idx = random_index()
        resp, km = hs.create_response(st, idx, self.features)
        now = self.clock()
        kp = Keypair(km, now, conn, timers=self.config.timers, clock=self.clock)
        self.index[idx] = kp
        self.timestamps.set(st.peer_address, st.timestamp)
        conn.last_ts = st.timestamp
        conn.add_keypair(kp)
        conn.send_frame(resp)
        self.counters.inc("handshakes_completed")
        if conn.state == "new":
            conn.state = "login"
            conn.public_key = st.peer_public_key
            conn.address = st.peer_address
            conn.send_kp = kp
            conn.nonce = os.urandom(bp.NONCE_LEN)
            conn.send_tcp(bp.build_login_challenge(conn.nonce))
        # On a rekey the new keypair is used for sending only once the node has sent on it (key confirmation).

    def _tcp_data(self, conn: NodeConn, frame: bytes) -> None:
        kp = self.index.get(_U32.unpack_from(frame, 4)[0]) if len(frame) >= DATA_MIN_LEN else None
        if kp is None or kp.owner is not conn:
            self.counters.inc("unknown_peer")
            return
        plaintext = self._open(conn, kp, frame)
        if plaintext is not None:
            self._dispatch(conn, plaintext, None)

    def _open(self, conn: NodeConn, kp: Keypair, datagram: bytes) -> bytes | None:
        """Authenticate one Data datagram of ``conn``'s session; None (and a drop counter) if it is not genuine."""
        try:
            plaintext = kp.open(datagram)
        except SessionDrop as drop:
            self.counters.inc(drop.reason)
            return None
        conn.last_rx = self.clock()
        if kp is not conn.send_kp and conn.send_kp is not None and kp.created > conn.send_kp.created:
            conn.send_kp = kp  # key confirmation of a rekey
        return plaintext

    # --- UDP ---------------------------------------------------------------------------------
    def handle_udp(self, data: bytes, src: Endpoint) -> None:
        if len(data) < DATA_MIN_LEN or _U32.unpack_from(data)[0] != MSG_DATA:
            self.counters.inc("malformed")
            return
        kp = self.index.get(_U32.unpack_from(data, 4)[0])
        if kp is None:
            self.counters.inc("unknown_peer")
            return
        conn: NodeConn = kp.owner  # type: ignore[assignment]
        if conn.state != "up":
            self.counters.inc("no_session")
            return
        plaintext = self._open(conn, kp, data)
        if plaintext is None:
            return
        # Authenticated and fresh: only now may the node's UDP endpoint move (roaming / NAT rebinding).
        moved = conn.udp_endpoint is not None and conn.udp_endpoint != src
        conn.udp_endpoint = src
        conn.udp_seen = conn.last_rx
        if moved:
            self.counters.inc("udp_endpoint_moved")
            conn.send_tcp(bp.build_observed(src))
        self._dispatch(conn, plaintext, src)

    def send_udp(self, datagram: bytes, endpoint: Endpoint) -> bool:
        t = self.udp_transport
        if t is None:
            return False
        if t.get_write_buffer_size() > self.config.max_udp_buffer:
            self.counters.inc("udp_backpressure")  # the kernel queue is full: drop rather than buffer unboundedly
            return False
        try:
            t.sendto(datagram, endpoint)
        except OSError:
            return False
        return True

    # --- control messages ---------------------------------------------------------------------
    def _dispatch(self, conn: NodeConn, plaintext: bytes, udp_src: Endpoint | None) -> None:
        if not plaintext:
            return  # keepalive
        try:
            mtype = bp.message_type(plaintext)
            if conn.state == "login":
                if mtype == bp.LOGIN and udp_src is None:
                    self._login(conn, bp.parse_login(plaintext))
                else:
                    self.counters.inc("unexpected")
                return
            if conn.state != "up":
                return
            if mtype == bp.RELAY:
                self._relay(conn, plaintext)
                return
            now = self.clock()
            if not conn.ctrl_bucket.take(1, self.config.control_rate, self.config.control_burst, now):
                self.counters.inc("rate_limited")
                return
            if mtype == bp.QUERY:
                self._query(conn, bp.parse_query(plaintext), now)
            elif mtype == bp.ENDPOINTS:
                conn.lan_endpoints = bp.usable_endpoints(bp.parse_endpoints(plaintext))
            elif mtype == bp.UDP_PING and udp_src is not None:
                nonce = bp.parse_udp_ping(plaintext)
                self.counters.inc("udp_pings")
                sealed = conn.seal(bp.build_udp_pong(nonce, udp_src))
                if sealed is not None:
                    self.send_udp(sealed, udp_src)
            else:
                self.counters.inc("unexpected")
        except Malformed:
            self.counters.inc("malformed")

    def _login(self, conn: NodeConn, login: bp.Login) -> None:
        msg = bp.login_message(self.public_key, conn.nonce)
        if not verify_signature(conn.public_key, login.signature, msg):
            self.counters.inc("login_failed")
            log.info("login refused (bad signature) %s", conn.describe())
            conn.close("bad login signature")
            return
        conn.nonce = b""
        conn.hostname = login.hostname
        conn.lan_endpoints = bp.usable_endpoints(login.endpoints)
        old = self.nodes.get(conn.address)
        if old is not None and old is not conn:
            self.counters.inc("superseded")
            old.address = b""  # its disconnect must not unregister the new connection
            old.state = "closed"
            old.close("superseded by a new login")
        conn.state = "up"
        self.nodes[conn.address] = conn
        self.counters.inc("logins")
        log.info("login %s", conn.describe())
        conn.send_tcp(bp.build_login_ok(conn.udp_endpoint))

    def _query(self, conn: NodeConn, address: bytes, now: float) -> None:
        self.counters.inc("queries")
        target = self.nodes.get(address)
        if target is None or target is conn or target.state != "up":
            conn.send_tcp(bp.build_peer_info(address, None, 0, []))
            return
        conn.send_tcp(bp.build_peer_info(target.address, target.public_key, bp.FLAG_ONLINE, target.endpoints(now)))
        # Hole punching: the target probes the asker at the same moment the asker probes the target.
        target.send_tcp(
            bp.build_peer_info(conn.address, conn.public_key, bp.FLAG_ONLINE | bp.FLAG_PUNCH, conn.endpoints(now))
        )
        self.counters.inc("peer_info_sent", 2)

    def _relay(self, conn: NodeConn, plaintext: bytes) -> None:
        dst_addr, datagram = bp.parse_relay(plaintext)
        now = self.clock()
        cfg = self.config
        if not conn.relay_bucket.take(len(datagram), cfg.relay_rate, cfg.relay_burst, now):
            self.counters.inc("rate_limited")
            return
        dst = self.nodes.get(dst_addr)
        if dst is None or dst.state != "up":
            self.counters.inc("relay_no_peer")
            return
        if self.flip_bits:
            tampered = bytearray(datagram)
            tampered[min(len(tampered) - 1, 20)] ^= 0x01
            datagram = bytes(tampered)
        src = conn.address
        if self.tamper:
            datagram, src = self._tamper(datagram, src)
        # The source is the sender's authenticated address, never anything it wrote.
        sealed = dst.seal(bp.build_relayed(src, datagram))
        if sealed is None:
            return
        if dst.udp_fresh(now) and len(sealed) <= MAX_DATAGRAM - 48:
            assert dst.udp_endpoint is not None
            if not self.send_udp(sealed, dst.udp_endpoint):
                return
            self.counters.inc("relayed_udp")
        elif dst.send_frame(sealed):
            self.counters.inc("relayed_tcp")
        else:
            return
        self.counters.inc("relayed_packets")
        self.counters.inc("relayed_bytes", len(datagram))

    def _tamper(self, datagram: bytes, src: bytes) -> tuple[bytes, bytes]:
        """Test hook (``HUSARNET_BASE_TEST_TAMPER``): one relayed datagram and its source, as a malicious base."""
        if self.tamper == "stamp":
            return datagram, self.tamper_stamp
        if self.tamper == "truncate":
            return datagram[: len(datagram) // 2], src
        tampered = bytearray(datagram)  # "header": bytes 4-7 are a Data or handshake message's first index
        tampered[min(len(tampered) - 1, 4)] ^= 0x01
        return bytes(tampered), src


# --- command line ----------------------------------------------------------------------------
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="husarnet-base", description="husarnet_ros base server (rendezvous + relay)")
    p.add_argument("--state-dir", default="/var/lib/husarnet_ros_base", help="directory for the base's id file")
    p.add_argument("--bind", default="", help="address to listen on (default: every IPv4 and IPv6 address)")
    p.add_argument("--tcp-port", type=int, default=DEFAULT_BASE_TCP_PORT, help="TCP port (default 443; 0 = any)")
    p.add_argument("--udp-port", type=int, default=DEFAULT_BASE_UDP_PORT, help="UDP port (default 5582; 0 = any)")
    p.add_argument("--stats-file", default=None, help="write counters as JSON here periodically and on SIGUSR1")
    p.add_argument("--stats-interval", type=float, default=10.0, help="seconds between stats file writes")
    p.add_argument("--relay-rate", type=float, default=8_000_000.0, help="relay bytes/s per node")
    p.add_argument("--relay-burst", type=float, default=2_000_000.0, help="relay burst bytes per node")
    p.add_argument("--timers-scale", type=float, default=1.0, help="scale protocol timers (tests)")
    p.add_argument("--print-key", action="store_true", help="create/load the id, print the public key, exit")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p


def config_from_args(args: argparse.Namespace) -> BaseConfig:
    for name in ("tcp_port", "udp_port"):
        v = getattr(args, name)
        if not 0 <= v <= 65535:
            raise SystemExit(f"husarnet-base: --{name.replace('_', '-')} must be 0..65535")
    try:
        timers = Timers().scaled(args.timers_scale)
    except ValueError:
        raise SystemExit("husarnet-base: --timers-scale must be in (0, 100]") from None
    return BaseConfig(
        state_dir=Path(args.state_dir),
        bind=args.bind,
        tcp_port=args.tcp_port,
        udp_port=args.udp_port,
        relay_rate=args.relay_rate,
        relay_burst=args.relay_burst,
        stats_file=Path(args.stats_file) if args.stats_file else None,
        stats_interval=args.stats_interval,
        idle_timeout=BaseConfig.idle_timeout * args.timers_scale,
        timers=timers,
        flip_bits=os.environ.get(ENV_FLIP_BITS, "") == "1",
        tamper=os.environ.get(ENV_TAMPER, ""),
    )


async def serve(config: BaseConfig, ready: Any = None) -> int:
    """Run until SIGTERM/SIGINT; SIGUSR1 logs and writes the stats."""
    server = BaseServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def dump() -> None:
        log.info("stats %s", json.dumps(server.stats(), sort_keys=True))
        with contextlib.suppress(OSError):
            server.write_stats()

    loop.add_signal_handler(signal.SIGUSR1, dump)
    if ready is not None:
        ready(server)
    await stop.wait()
    log.info("shutting down")
    await server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``husarnet-base`` entry point."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = config_from_args(args)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # one fd per node: take everything we are allowed
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.print_key:
        try:
            ident = Identity.load_or_create(ensure_state_dir(config.state_dir) / "id")
        except (OSError, StateFileError) as exc:
            log.error("cannot load the base identity: %s", exc)
            return 1
        print(ident.public_key.hex())
        return 0
    try:
        return asyncio.run(serve(config))
    except (OSError, StateFileError) as exc:
        log.error("cannot start the base server: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
