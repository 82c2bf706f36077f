"""Where datagrams leave and enter the node: the transport interface and the real UDP socket.

The engine never touches a socket directly; it talks to a :class:`Transport`.
The real one is a single dual-stack UDP socket used for peers *and* for the base
server's UDP side, so the base sees the same public NAT mapping that peers
will use (this is what makes hole punching work).  Tests swap in the in-memory
transport from :mod:`memnet`.

Endpoints are plain ``(host, port)`` tuples with IPv4 hosts in dotted form
(never ``::ffff:``-mapped), so the same peer always has the same key in the
engine's tables whichever way the address reached us.  A relayed path is a
:class:`RelayEndpoint`; datagrams for it go through the base client, never
through the transport.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .threads import NamedThread

log = logging.getLogger(__name__)

#: Receive errors in a row back off from RECV_BACKOFF_FIRST, doubling, to RECV_BACKOFF_MAX seconds.
RECV_BACKOFF_FIRST = 0.001
RECV_BACKOFF_MAX = 1.0

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class RelayEndpoint:
    """A path through base server ``base_key`` (its "host:port" text) to the node ``peer_address``."""

    base_key: str
    peer_address: bytes

    def __str__(self) -> str:
        return f"relay:{self.base_key}"


AnyEndpoint = Endpoint | RelayEndpoint

OnDatagram = Callable[[bytes, Endpoint], None]
#: A receive batch; an item's datagram is a :class:`~.udp.DatagramRun` for a GRO buffer of DataSuper fragments.
OnBatch = Callable[[list[tuple[Any, Endpoint]]], None]


@runtime_checkable
class Transport(Protocol):
    """What the engine needs from the underlay: send one datagram, and be called for each received one."""

    local_port: int

    def send(self, datagram: bytes, endpoint: Endpoint) -> None: ...

    def start(self, on_datagram: OnDatagram) -> None: ...

    def close(self) -> None: ...


def send_many(transport: Transport, datagrams: Iterable[bytes], endpoint: Endpoint) -> None:
    """Send several datagrams to one endpoint, with the transport's batch call when it has one (UDP GSO)."""
    batch = getattr(transport, "send_many", None)
    if batch is not None:
        batch(list(datagrams), endpoint)
        return
    for d in datagrams:
        transport.send(d, endpoint)


def normalize_endpoint(host: str, port: int) -> Endpoint:
    """Canonical endpoint: IPv4-mapped IPv6 becomes dotted IPv4; IPv6 is compressed (scope kept)."""
    if not 0 < int(port) < 65536:
        raise ValueError(f"port {port} out of range")
    scope = ""
    if "%" in host:
        host, scope = host.split("%", 1)
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), int(port))
    text = str(ip)
    if scope and isinstance(ip, ipaddress.IPv6Address):
        text = f"{text}%{scope}"
    return (text, int(port))


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``1.2.3.4:5582`` or ``[fd00::2]:5582`` (or ``[fe80::1%eth0]:5582``) strictly."""
    text = text.strip()
    if len(text) > 128:
        raise ValueError("endpoint text too long")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{text!r}: expected [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: expected host:port (bracket IPv6 addresses)")
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: port is not a number")
    try:
        return normalize_endpoint(host, int(port_text))
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def format_endpoint(endpoint: AnyEndpoint | None) -> str:
    """Human text of an endpoint ('' for none)."""
    if endpoint is None:
        return ""
    if isinstance(endpoint, RelayEndpoint):
        return str(endpoint)
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UdpTransport:
    """The real underlay: one dual-stack UDP socket (:class:`~husarnet_ros.core.udp.UdpSocket`) and a receive thread.

    Sending uses the socket's batch call (UDP GSO where the kernel has it);
    the receive thread takes GRO batches and hands them to ``on_batch`` (or
    each datagram to ``on_datagram``).  :meth:`close` wakes the thread, so
    shutdown is immediate.
    """

    def __init__(self, port: int, *, bind_host: str = "::") -> None:
        from .udp import UdpSocket

        # An IPv4 bind address goes through the dual-stack socket as IPv4-mapped.
        host = f"::ffff:{bind_host}" if "." in bind_host else bind_host
        try:
            self._sock = UdpSocket(port, host)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot bind UDP port {port}: {exc.strerror or exc}") from None
        self.local_port: int = self._sock.local_port
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, datagram: bytes, endpoint: Endpoint) -> None:
        """Send one datagram; an unreachable network or a bad endpoint is a drop, not an error."""
        if self._closed:
            return
        try:
            self._sock.send(datagram, endpoint)
        except (OSError, ValueError) as exc:
            log.debug("send to %s failed: %s", endpoint, exc)

    def send_many(self, datagrams: list[bytes], endpoint: Endpoint) -> None:
        """Send a batch to one endpoint (equal-size runs leave in one GSO call)."""
        if self._closed:
            return
        try:
            self._sock.send_many(datagrams, endpoint)
        except (OSError, ValueError) as exc:
            log.debug("send to %s failed: %s", endpoint, exc)

    def sockaddr(self, endpoint: Endpoint) -> Any:
        """The socket's form of ``endpoint``: what :meth:`raw_sendto` takes and ``on_lone`` is given."""
        return self._sock.sockaddr(endpoint)

    @property
    def raw_sendto(self) -> Callable[[bytes, int, Any], object]:
        """The socket's bare ``sendto(datagram, flags, sockaddr)``: raises on a full buffer or a path error.

        For the data path's lone packets, which fall back to :meth:`send_many` when it raises.  The
        socket is blocking (its receive thread waits inside ``recvmsg``), so ``flags`` must hold
        ``socket.MSG_DONTWAIT``.
        """
        return self._sock.sock.sendto

    def send_segmented(self, parts: list[bytes | memoryview], segment: int, endpoint: Endpoint) -> None:
        """Buffers that are datagrams of ``segment`` bytes back to back (the last shorter): one GSO send."""
        if self._closed:
            return
        try:
            self._sock.send_segmented(parts, segment, endpoint)
        except (OSError, ValueError) as exc:
            log.debug("send to %s failed: %s", endpoint, exc)

    def start(
        self,
        on_datagram: OnDatagram,
        on_batch: OnBatch | None = None,
        on_lone: Callable[[bytes, Any], bool] | None = None,
    ) -> None:
        """Start the receive thread; it calls ``on_batch(list)`` if given, else ``on_datagram(data, ep)``.

        ``on_lone(data, sockaddr)`` is offered a datagram that arrived alone first (light traffic), with
        the sender in the form :meth:`sockaddr` gives; when it returns False the datagram goes the usual
        way.  On a CPU gone cold between packets every call layer costs latency (issue #6), so the
        socket's receive loop calls the data path's lone-datagram check directly.
        """
        if self._thread is not None:
            raise RuntimeError("transport already started")
        self._thread = NamedThread(
            target=self._run, args=(on_datagram, on_batch, on_lone), name=f"udp-rx:{self.local_port}", daemon=True
        )
        self._thread.start()

    def _run(
        self, on_datagram: OnDatagram, on_batch: OnBatch | None, on_lone: Callable[[bytes, Any], bool] | None
    ) -> None:
        recv_batch = self._sock.recv_batch
        runs = on_batch is not None  # a batch handler takes DataSuper GRO buffers whole (DatagramRun)
        failures = 0
        while not self._closed:
            try:
                batch = recv_batch(None, runs=runs, lone=on_lone)
            except OSError as exc:
                if self._closed:
                    return
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.warning("UDP receive failed (%d in a row): %s", failures, exc)
                # An error that persists must neither spin a core nor flood the log: back off, up to 1 s.
                time.sleep(min(RECV_BACKOFF_MAX, RECV_BACKOFF_FIRST * 2 ** min(failures - 1, 16)))
                continue
            failures = 0
            if not batch:
                continue
            try:
                if on_batch is not None:
                    on_batch(batch)
                else:
                    for data, ep in batch:
                        on_datagram(data, ep)
            except Exception:  # a bug in one handler must not kill the receive thread
                log.exception("datagram handler failed")

    def close(self) -> None:
        """Stop the receive thread and close the socket; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._sock.close()  # wakes the receiver
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
