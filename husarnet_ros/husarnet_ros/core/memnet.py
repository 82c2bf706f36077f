"""An in-memory underlay for deterministic protocol and fault tests (no root, no sockets).

A :class:`MemoryNetwork` hands out transports bound to made-up endpoints
(``("198.18.0.1", 5582)`` ...).  Every datagram goes through one delivery
thread that applies a seeded :class:`Impairment` (drop, delay, jitter,
reorder, duplicate, corrupt) and optional NAT mappings, so a fault test is
reproducible from its seed.  Every delivered datagram can be captured and
re-injected later, from any source, to test replay protection.

The delivery thread calls each transport's ``on_datagram`` callback, exactly
like the real UDP transport's receive thread does.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .threads import NamedThread
from .transport import Endpoint, OnDatagram

log = logging.getLogger(__name__)


@dataclass
class Impairment:
    """Per-datagram faults, each a probability or a duration in seconds.

    ``reorder`` is the probability that a datagram is held back by an extra
    ``reorder_delay`` (so later ones overtake it).  ``corrupt`` flips one
    random bit.  ``duplicate`` delivers a second copy.
    """

    drop: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.02
    duplicate: float = 0.0
    corrupt: float = 0.0


@dataclass(order=True)
class _Item:
    when: float
    seq: int
    src: Endpoint = field(compare=False)
    dst: Endpoint = field(compare=False)
    data: bytes = field(compare=False)


@dataclass(frozen=True)
class Captured:
    """One datagram as it was delivered: (apparent) source, destination and bytes."""

    src: Endpoint
    dst: Endpoint
    data: bytes


class MemoryTransport:
    """A :class:`~husarnet_ros.core.transport.Transport` bound to one endpoint of a :class:`MemoryNetwork`."""

    def __init__(self, net: MemoryNetwork, endpoint: Endpoint) -> None:
        self._net = net
        self.endpoint = endpoint
        self.local_port = endpoint[1]
        self.sent = 0  # datagrams this transport handed to the network (tests assert silence on it)
        self.sent_log: list[tuple[Endpoint, bytes]] = []
        self._on_datagram: OnDatagram | None = None
        self.closed = False

    def send(self, datagram: bytes, endpoint: Endpoint) -> None:
        if self.closed:
            return
        self.sent += 1
        if self._net.log_sent:
            self.sent_log.append((endpoint, bytes(datagram)))
        self._net._submit(self.endpoint, endpoint, bytes(datagram))

    def send_many(self, datagrams: list[bytes], endpoint: Endpoint) -> None:
        for d in datagrams:
            self.send(d, endpoint)

    def start(self, on_datagram: OnDatagram) -> None:
        self._on_datagram = on_datagram

    def close(self) -> None:
        self.closed = True
        self._on_datagram = None
        self._net._detach(self)


class MemoryNetwork:
    """A seeded, impairable datagram network between :class:`MemoryTransport` endpoints."""

    def __init__(self, seed: int = 0, *, capture: bool = False, log_sent: bool = False) -> None:
        self.rng = random.Random(seed)
        self.capture = capture
        self.log_sent = log_sent
        self.captured: list[Captured] = []
        self.default = Impairment()
        self._links: dict[tuple[Endpoint | None, Endpoint | None], Impairment] = {}
        self._transports: dict[Endpoint, MemoryTransport] = {}
        # NAT: inside endpoint -> public endpoint (and back)
        self._nat_out: dict[Endpoint, Endpoint] = {}
        self._nat_in: dict[Endpoint, Endpoint] = {}
        self._blocked: set[tuple[str, str]] = set()
        self._heap: list[_Item] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self.delivered = 0
        self.dropped = 0
        self._thread = NamedThread(target=self._run, name="memnet", daemon=True)
        self._thread.start()

    # --- topology -----------------------------------------------------------
    def transport(self, endpoint: Endpoint) -> MemoryTransport:
        """A new transport bound to ``endpoint`` (which must be free)."""
        with self._cond:
            if endpoint in self._transports:
                raise ValueError(f"endpoint {endpoint} already in use")
            t = MemoryTransport(self, endpoint)
            self._transports[endpoint] = t
            return t

    def _detach(self, t: MemoryTransport) -> None:
        with self._cond:
            if self._transports.get(t.endpoint) is t:
                del self._transports[t.endpoint]

    def set_impairment(self, imp: Impairment, src: Endpoint | None = None, dst: Endpoint | None = None) -> None:
        """Impair datagrams from ``src`` to ``dst`` (None = any); the most specific rule wins."""
        with self._cond:
            if src is None and dst is None:
                self.default = imp
            else:
                self._links[(src, dst)] = imp

    def set_nat(self, inside: Endpoint, public: Endpoint) -> None:
        """Datagrams from ``inside`` appear to come from ``public``; datagrams to ``public`` reach ``inside``.

        Calling it again with a new ``public`` is a NAT rebinding: the old mapping stops working.
        """
        with self._cond:
            old = self._nat_out.pop(inside, None)
            if old is not None:
                self._nat_in.pop(old, None)
            self._nat_out[inside] = public
            self._nat_in[public] = inside

    def block(self, host_a: str, host_b: str) -> None:
        """Drop everything between two hosts (both directions), e.g. to force the relay."""
        with self._cond:
            self._blocked.add((host_a, host_b))
            self._blocked.add((host_b, host_a))

    def unblock(self, host_a: str, host_b: str) -> None:
        with self._cond:
            self._blocked.discard((host_a, host_b))
            self._blocked.discard((host_b, host_a))

    def inject(self, data: bytes, src: Endpoint, dst: Endpoint) -> None:
        """Deliver raw bytes as if sent from ``src`` (spoofing and replay), bypassing NAT and impairment."""
        with self._cond:
            heapq.heappush(self._heap, _Item(time.monotonic(), next(self._seq), src, dst, bytes(data)))
            self._cond.notify()

    def replay(self, match: Callable[[Captured], bool], *, src: Endpoint | None = None, times: int = 1) -> int:
        """Re-inject every captured datagram that ``match`` accepts; returns how many were injected."""
        picked = [c for c in list(self.captured) if match(c)]
        for c in picked:
            for _ in range(times):
                self.inject(c.data, src or c.src, c.dst)
        return len(picked) * times

    # --- delivery -----------------------------------------------------------
    def _impairment(self, src: Endpoint, dst: Endpoint) -> Impairment:
        links = self._links
        return links.get((src, dst)) or links.get((src, None)) or links.get((None, dst)) or self.default

    def _submit(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        with self._cond:
            if self._closed:
                return
            src_pub = self._nat_out.get(src, src)
            imp = self._impairment(src, dst)
            rng = self.rng
            if (src[0], dst[0]) in self._blocked or (imp.drop and rng.random() < imp.drop):
                self.dropped += 1
                return
            copies = 2 if imp.duplicate and rng.random() < imp.duplicate else 1
            now = time.monotonic()
            for _ in range(copies):
                delay = imp.delay + (rng.uniform(0, imp.jitter) if imp.jitter else 0.0)
                if imp.reorder and rng.random() < imp.reorder:
                    delay += imp.reorder_delay
                payload = data
                if imp.corrupt and rng.random() < imp.corrupt and data:
                    buf = bytearray(data)
                    bit = rng.randrange(len(buf) * 8)
                    buf[bit // 8] ^= 1 << (bit % 8)
                    payload = bytes(buf)
                heapq.heappush(self._heap, _Item(now + delay, next(self._seq), src_pub, dst, payload))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0].when > time.monotonic()):
                    timeout = None if not self._heap else max(0.0, self._heap[0].when - time.monotonic())
                    self._cond.wait(timeout)
                if self._closed:
                    return
                item = heapq.heappop(self._heap)
                dst = self._nat_in.get(item.dst, item.dst)
                t = self._transports.get(dst)
                cb = t._on_datagram if t is not None else None
                if cb is not None:
                    self.delivered += 1
                    if self.capture:
                        self.captured.append(Captured(item.src, item.dst, item.data))
            if cb is not None:
                try:
                    cb(item.data, item.src)
                except Exception:  # mirror the UDP transport: a handler bug must not stop delivery
                    log.exception("memnet handler failed")

    def quiesce(self, timeout: float = 5.0) -> bool:
        """Wait until no datagram is in flight (handlers may still be running their last one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._heap:
                    return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        """Stop the delivery thread; pending datagrams are discarded."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
