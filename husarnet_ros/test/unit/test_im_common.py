"""Shared lab for the in-memory (IM) security and fault tests (TESTPLAN.md rows 4-26, IM variants).

This module holds no tests; the ``test_im_*`` files import it (pytest puts
this folder on ``sys.path`` because test folders have no ``__init__.py``).

Every node is a real :class:`~husarnet_ros.core.engine.Engine` with
``use_tun=False`` on a seeded :class:`~husarnet_ros.core.memnet.MemoryNetwork`:
IPv6 packets go in through ``inject_packet`` and come out through
``on_packet``.  Tests assert on delivered packets, counters, peer/path state
and the datagrams each transport sent, never on log text.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from husarnet_ros.core.constants import Timers
from husarnet_ros.core.engine import Engine, EngineConfig
from husarnet_ros.core.identity import Identity, format_address
from husarnet_ros.core.memnet import MemoryNetwork, MemoryTransport
from husarnet_ros.core.wire import MSG_DATA, MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP, MSG_HELLO

__all__ = [
    "EP_A",
    "EP_B",
    "EP_C",
    "FAST",
    "MALLORY",
    "MSG_DATA",
    "MSG_HANDSHAKE_INIT",
    "MSG_HANDSHAKE_RESP",
    "MSG_HELLO",
    "Clock",
    "Lab",
    "Node",
    "WallClock",
    "connect",
    "identity",
    "msg_type",
    "packet",
    "pair",
    "spec",
    "wait_for",
]

EP_A = ("198.18.0.1", 5582)
EP_B = ("198.18.0.2", 5582)
EP_C = ("198.18.0.3", 5582)
MALLORY = ("198.18.0.66", 5582)

#: WireGuard's timers shrunk so that retries, keepalives and probes play out in well under a second.
FAST = Timers(
    rekey_after_time=120.0,
    reject_after_time=180.0,
    rekey_attempt_time=20.0,
    rekey_timeout=0.2,
    keepalive_timeout=0.5,
    probe_interval=0.5,
    path_timeout=1.5,
)

_IDS: list[Identity] = []
_IDS_LOCK = threading.Lock()


def identity(i: int) -> Identity:
    """Cached real identities (each costs ~1300 key generations, so every test file shares them)."""
    with _IDS_LOCK:
        while len(_IDS) <= i:
            _IDS.append(Identity.generate())
        return _IDS[i]


def packet(src: bytes, dst: bytes, payload: bytes) -> bytes:
    """A minimal IPv6 packet (next header 59: no next header) carrying ``payload``."""
    return struct.pack(">IHBB", 6 << 28, len(payload), 59, 64) + src + dst + payload


def msg_type(datagram: bytes) -> int:
    """The message type of a peer-to-peer datagram (first little-endian word)."""
    return int.from_bytes(datagram[:4], "little") if len(datagram) >= 4 else -1


def wait_for(cond: Callable[[], object], timeout: float = 5.0, step: float = 0.01) -> bool:
    """Poll ``cond`` until it is true or ``timeout`` passes (no fixed sleeps in the tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def spec(ident: Identity, ep: tuple[str, int]) -> str:
    """A static peer spec ``fc94:...@host:port``."""
    return f"{format_address(ident.address)}@{ep[0]}:{ep[1]}"


class Clock:
    """A monotonic clock that tests can move forward (the engine, datapath and keypairs all read it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class WallClock:
    """A wall clock with a settable offset (initiation timestamps and Hello timestamps read it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Node:
    """One engine plus what it delivered (``got``) and its transport (datagrams it sent)."""

    def __init__(self, engine: Engine, transport: MemoryTransport, ident: Identity, ep: tuple[str, int]) -> None:
        self.engine = engine
        self.transport = transport
        self.id = ident
        self.ep = ep
        self.address = ident.address
        self.got: list[bytes] = []
        self.got_at: list[float] = []  # time.monotonic() of each delivery, parallel to ``got``
        self._got_lock = threading.Lock()
        engine.on_packet = self._on_packet

    def _on_packet(self, p: bytes) -> None:
        with self._got_lock:
            self.got.append(bytes(p))
            self.got_at.append(time.monotonic())

    def send(self, dst: Node, payload: bytes) -> None:
        self.engine.inject_packet(packet(self.address, dst.address, payload))

    def payloads(self, prefix: bytes = b"") -> list[bytes]:
        with self._got_lock:
            return [p[40:] for p in self.got if p[40:].startswith(prefix)]

    def delivered_after(self, t: float, prefix: bytes = b"") -> list[bytes]:
        """Payloads delivered at or after monotonic time ``t``."""
        with self._got_lock:
            return [
                p[40:] for p, at in zip(self.got, self.got_at, strict=True) if at >= t and p[40:].startswith(prefix)
            ]

    def counter(self, name: str) -> int:
        return self.engine.counters.get(name)

    def peer(self, other: Node):
        return self.engine._peers.get(other.address)

    def current(self, other: Node):
        """The keypair this node sends to ``other`` with (None if no session)."""
        p = self.peer(other)
        return p.current if p is not None else None

    def secure_with(self, other: Node) -> bool:
        return any(p.address == other.address and p.is_secure for p in self.engine.peers())

    def sent_of_type(self, mtype: int, to: tuple[str, int] | None = None) -> list[bytes]:
        """Datagrams of one type this node sent (needs ``Lab(log_sent=True)``)."""
        return [d for ep, d in list(self.transport.sent_log) if msg_type(d) == mtype and (to is None or ep == to)]

    def sent_to(self, to: tuple[str, int]) -> list[bytes]:
        return [d for ep, d in list(self.transport.sent_log) if ep == to]


class Lab:
    """A seeded memnet and the engines on it; a context manager that stops everything it started."""

    def __init__(
        self,
        tmp: Path,
        *,
        seed: int = 1,
        timers: Timers = FAST,
        capture: bool = False,
        log_sent: bool = False,
    ) -> None:
        self.tmp = tmp
        self.net = MemoryNetwork(seed, capture=capture, log_sent=log_sent)
        self.timers = timers
        self.nodes: list[Node] = []
        self._count = 0

    def node(
        self,
        ident: Identity,
        ep: tuple[str, int],
        *,
        peers: Iterable[str] = (),
        whitelist: Iterable[Identity | bytes] = (),
        whitelist_enabled: bool = True,
        timers: Timers | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        state_dir: Path | None = None,
        start: bool = False,
        handshake_cookies: bool = False,
    ) -> Node:
        self._count += 1
        wl = [format_address(w.address if isinstance(w, Identity) else w) for w in whitelist]
        cfg = EngineConfig(
            state_dir=state_dir or self.tmp / f"n{self._count}",
            use_tun=False,
            lan_discovery=False,
            websetup_enabled=False,
            peers=list(peers),
            whitelist=wl,
            whitelist_enabled=whitelist_enabled,
            timers=timers or self.timers,
            handshake_cookies=handshake_cookies,
        )
        t = self.net.transport(ep)
        n = Node(Engine(cfg, identity=ident, transport=t, clock=clock, wallclock=wallclock), t, ident, ep)
        self.nodes.append(n)
        if start:
            n.engine.start()
        return n

    def start(self) -> None:
        for n in self.nodes:
            if n.engine._state == "new":
                n.engine.start()

    def restart(self, node: Node, **changes) -> Node:
        """Stop ``node`` (its session keys are lost) and start a fresh engine with the same key and endpoint."""
        node.engine.stop()
        node.transport.close()
        cfg = dataclasses.replace(node.engine.config, **changes)
        t = self.net.transport(node.ep)
        kw = {"clock": node.engine._clock, "wallclock": node.engine._wallclock}
        n = Node(Engine(cfg, identity=node.id, transport=t, **kw), t, node.id, node.ep)
        self.nodes.append(n)
        n.engine.start()
        return n

    def close(self) -> None:
        for n in self.nodes:
            n.engine.stop()
        self.net.close()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pair(lb: Lab, *, a_id: int = 0, b_id: int = 1, **kw) -> tuple[Node, Node]:
    """A knows B's endpoint (static peer); B learns A's from the handshake. Each whitelists the other."""
    ia, ib = identity(a_id), identity(b_id)
    a = lb.node(ia, EP_A, peers=[spec(ib, EP_B)], whitelist=[ib], **kw)
    b = lb.node(ib, EP_B, whitelist=[ia], **kw)
    lb.start()
    return a, b


def connect(a: Node, b: Node, timeout: float = 5.0) -> None:
    """Send A->B until delivered, then B->A until delivered (the session is confirmed both ways)."""
    deadline = time.monotonic() + timeout
    while not b.payloads(b"conn-a"):
        assert time.monotonic() < deadline, f"A->B never delivered: {a.engine.counters.snapshot()}"
        a.send(b, b"conn-a")
        wait_for(lambda: b.payloads(b"conn-a"), 0.2)
    while not a.payloads(b"conn-b"):
        assert time.monotonic() < deadline, f"B->A never delivered: {b.engine.counters.snapshot()}"
        b.send(a, b"conn-b")
        wait_for(lambda: a.payloads(b"conn-b"), 0.2)
