"""Simulated nodes for the base server: a real :class:`BaseClient` plus a UDP socket, no engine.

Used by the base server's tests, by :mod:`husarnet_ros.base.loadgen` and by
anyone who wants to poke a base without a full node.  A :class:`SimNode`
records what the base told it (PEER_INFO, RELAYED) so tests can assert on it.
Many nodes can share one UDP socket (:class:`SharedUdp`): datagrams are then
routed by their receiver index, exactly as the engine's datapath does with
its index table.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.base_client import BaseClient
from ..core.constants import Timers
from ..core.counters import Counters
from ..core.identity import Identity
from ..core.peer import IndexTable
from ..core.session import Keypair

Endpoint = tuple[str, int]


#: The engine's own index table: simulated nodes route base datagrams by receiver index exactly as the engine does.
SimIndex = IndexTable


class SharedUdp(asyncio.DatagramProtocol):
    """One UDP socket for many simulated nodes; base datagrams go to the owner of their receiver index."""

    def __init__(self, index: SimIndex) -> None:
        self.index = index
        self.transport: asyncio.DatagramTransport | None = None
        self.other: list[tuple[bytes, Endpoint]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        src = (addr[0], addr[1])
        if len(data) >= 8:
            owner = self.index.get(int.from_bytes(data[4:8], "little"))
            if isinstance(owner, Keypair) and isinstance(owner.owner, BaseClient):
                owner.owner.handle_udp(data, src)
                return
        if len(self.other) < 10000:
            self.other.append((data, src))

    def send(self, data: bytes, ep: Endpoint) -> None:
        if self.transport is not None:
            self.transport.sendto(data, ep)

    @classmethod
    async def open(cls, index: SimIndex, host: str = "127.0.0.1") -> SharedUdp:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(lambda: cls(index), local_addr=(host, 0))
        return proto

    @property
    def local_port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class SimNode:
    """A node that only talks to the base: records PEER_INFO and RELAYED, can relay and query.

    ``udp_blocked=True`` drops everything the node would send over UDP, so its
    base connection stays on TCP (for relay-over-TCP tests).
    """

    def __init__(
        self,
        spec: str,
        state_dir: str | Path,
        *,
        identity: Identity | None = None,
        timers: Timers | None = None,
        hostname: str = "",
        lan_endpoints: list[Endpoint] | None = None,
        udp: SharedUdp | None = None,
        index: SimIndex | None = None,
        udp_blocked: bool = False,
        host: str = "127.0.0.1",
        on_relayed: Callable[[bytes, bytes], None] | None = None,
        **client_kwargs: Any,
    ) -> None:
        self.identity = identity or Identity.generate()
        self.spec = spec
        self.state_dir = Path(state_dir)
        self.timers = timers or Timers()
        self.hostname = hostname
        self.lan = list(lan_endpoints or [])
        self.udp = udp
        self._own_udp = udp is None
        self.index = index if index is not None else (SimIndex() if udp is None else udp.index)
        self.udp_blocked = udp_blocked
        self.host = host
        self.counters = Counters()
        self.peer_infos: list[tuple[bytes, bytes, list[Endpoint], bool]] = []
        self.relayed: list[tuple[bytes, bytes]] = []
        self._on_relayed = on_relayed
        self.client: BaseClient | None = None
        self.task: asyncio.Task[None] | None = None
        self.client_kwargs = client_kwargs
        self._changed: asyncio.Event | None = None

    @property
    def address(self) -> bytes:
        return self.identity.address

    @property
    def local_port(self) -> int:
        assert self.udp is not None
        return self.udp.local_port

    def _send_udp(self, data: bytes, ep: Endpoint) -> None:
        if not self.udp_blocked and self.udp is not None:
            self.udp.send(data, ep)

    def _peer_info(self, addr: bytes, pub: bytes, eps: list[Endpoint], punch: bool) -> None:
        self.peer_infos.append((addr, pub, eps, punch))

    def _relayed(self, src: bytes, datagram: bytes) -> None:
        if self._on_relayed is not None:
            self._on_relayed(src, datagram)
        else:
            self.relayed.append((src, datagram))

    def _on_state(self, _state: str) -> None:
        if self._changed is not None:
            self._changed.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        if self.udp is None:
            self.udp = await SharedUdp.open(self.index, self.host)
        self.client = BaseClient(
            self.identity,
            self.spec,
            self.state_dir,
            loop=loop,
            timers=self.timers,
            counters=self.counters,
            send_udp=self._send_udp,
            on_peer_info=self._peer_info,
            on_relayed=self._relayed,
            lan_endpoints=lambda: self.lan,
            hostname=self.hostname,
            index=self.index,
            on_state=self._on_state,
            **self.client_kwargs,
        )
        self.task = loop.create_task(self.client.run())

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Poll ``predicate`` until true or ``timeout``; returns its final value."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not predicate():
            if loop.time() >= end:
                return predicate()
            await asyncio.sleep(0.01)
        return True

    async def wait_state(self, *states: str, timeout: float = 10.0) -> bool:
        """Wait (without polling) until the client's state is one of ``states``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not (self.client is not None and self.client.state in states):
            left = end - loop.time()
            if left <= 0 or self._changed is None:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self._own_udp and self.udp is not None:
            self.udp.close()
