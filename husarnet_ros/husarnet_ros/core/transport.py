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

import contextlib
import ipaddress
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .constants import MAX_DATAGRAM

log = logging.getLogger(__name__)

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
    """One dual-stack UDP socket bound to ``[::]:port`` with a receive thread.

    The receive thread drains the socket in batches and calls ``on_datagram``
    for each datagram; it never blocks on anything but the socket, and
    :meth:`close` wakes it through a pipe so shutdown is immediate.
    """

    def __init__(self, port: int, *, bind_host: str = "::", rcvbuf: int = 4 << 20, sndbuf: int = 4 << 20) -> None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            # An IPv4 bind address goes through the dual-stack socket as IPv4-mapped.
            sock.bind((f"::ffff:{bind_host}" if "." in bind_host else bind_host, port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind UDP port {port}: {exc.strerror}") from None
        self._sock = sock
        self.local_port: int = sock.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._sock.fileno()

    @staticmethod
    def _sockaddr(endpoint: Endpoint) -> tuple[str, int]:
        host, port = endpoint
        if ":" not in host:  # IPv4 through the dual-stack socket
            return (f"::ffff:{host}", port)
        return (host, port)

    def send(self, datagram: bytes, endpoint: Endpoint) -> None:
        """Send one datagram; a full socket buffer or an unreachable network is a drop, not an error."""
        if self._closed:
            return
        try:
            self._sock.sendto(datagram, self._sockaddr(endpoint))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            log.debug("send to %s failed: %s", endpoint, exc)

    def send_many(self, datagrams: list[bytes], endpoint: Endpoint) -> None:
        """Send a batch to one endpoint (a later UDP GSO implementation slots in here)."""
        addr = self._sockaddr(endpoint)
        sendto = self._sock.sendto
        for d in datagrams:
            try:
                sendto(d, addr)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                log.debug("send to %s failed: %s", endpoint, exc)
                return

    def start(self, on_datagram: OnDatagram) -> None:
        """Start the receive thread; ``on_datagram(data, (host, port))`` runs on it."""
        if self._thread is not None:
            raise RuntimeError("transport already started")
        self._thread = threading.Thread(
            target=self._run, args=(on_datagram,), name=f"udp-rx:{self.local_port}", daemon=True
        )
        self._thread.start()

    def _run(self, on_datagram: OnDatagram) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        recvfrom = self._sock.recvfrom
        cache: dict[tuple, Endpoint] = {}
        while not self._closed:
            try:
                poller.poll()
            except InterruptedError:
                continue
            for _ in range(256):
                if self._closed:
                    return
                try:
                    data, addr = recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ICMP errors surface here (ECONNREFUSED); ignore them
                    log.debug("recv error: %s", exc)
                    continue
                key = addr[:2] if addr[3] == 0 else addr
                ep = cache.get(key)
                if ep is None:
                    host = addr[0] if addr[3] == 0 or "%" in addr[0] else f"{addr[0]}%{addr[3]}"
                    try:
                        ep = normalize_endpoint(host, addr[1])
                    except ValueError:
                        continue
                    if len(cache) > 4096:
                        cache.clear()
                    cache[key] = ep
                try:
                    on_datagram(data, ep)
                except Exception:  # a bug in one handler must not kill the receive thread
                    log.exception("datagram handler failed")

    def close(self) -> None:
        """Stop the receive thread and close the socket; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
