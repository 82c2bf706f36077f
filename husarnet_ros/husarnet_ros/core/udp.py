"""The data plane's UDP socket: one dual-stack socket with batched send (GSO) and receive (GRO).

Why: Python pays per system call, not per byte.  With ``UDP_SEGMENT`` a run of
equal-size datagrams to one endpoint leaves in one ``sendmsg`` (the kernel, or
the NIC, cuts it into datagrams that each fit the path); with ``UDP_GRO`` the
kernel hands us many datagrams from one sender as one buffer plus their size.
Both are plain Linux socket options (4.18 / 5.0), used the same way by
wireguard-go and quic-go.  Where they are missing or refused, the socket falls
back to one call per datagram, silently and permanently only for the features
the kernel lacks.

Endpoints are ``(host, port)`` tuples; IPv4 peers reach the dual-stack socket
as ``::ffff:a.b.c.d`` and are reported as plain ``a.b.c.d`` so the rest of the
code (and the user) sees one spelling per peer.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from .waiter import FdWaiter
from .wire import MSG_DATA, MSG_DATA_SUPER

Endpoint = tuple[str, int]
log = logging.getLogger(__name__)


class DatagramRun:
    """Datagrams of one flow that arrived as one GRO buffer: ``seg`` bytes each, the last possibly shorter.

    Kept whole for DataSuper fragments, which the data path joins into their message anyway: cutting
    a 64 kB buffer into ~46 datagrams only to join them again cost more than opening the message.
    """

    __slots__ = ("data", "seg")

    def __init__(self, data: bytes, seg: int) -> None:
        if not 0 < seg < len(data):
            raise ValueError("a run holds at least two datagrams")
        self.data = data
        self.seg = seg


SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
UDP_MAX_SEGMENTS = 64  # kernel limit per GSO send (raised to 128 only in recent kernels)
MAX_GSO_BYTES = 65507  # largest UDP payload of one send on IPv4; IPv6 allows a little more
RECV_BUFSIZE = 65536 + 2048  # one GRO buffer (up to 64 kB) with slack
# How long a send may wait for room in a full socket buffer before the datagram is dropped.  The data
# path waits longer (back-pressure towards TCP beats loss); control datagrams come from the asyncio
# loop, which must never stall behind a saturated data path.
DATA_SEND_WAIT = 1.0
CONTROL_SEND_WAIT = 0.05
_CMSG_SPACE = socket.CMSG_SPACE(4)
# The socket's file is blocking, so that the receive thread can sleep inside recvmsg (issue #6); every
# other call on it passes this flag and so never waits.
_DONTWAIT = socket.MSG_DONTWAIT
_DATA_TYPES = bytes((MSG_DATA, MSG_DATA_SUPER))
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")


def normalize_host(host: str) -> str:
    """``::ffff:198.18.0.1`` -> ``198.18.0.1``; any other address unchanged."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def scoped_host(host: str, scope_id: int) -> str:
    """``fe80::1`` received on interface index 3 -> ``fe80::1%eth0`` (the spelling beacons and users use).

    Why: without its scope a link-local address names no interface, so a reply to it (and the
    peer's path) would fail or go out of the wrong one.  Other addresses ignore ``scope_id``.
    """
    if not scope_id or "%" in host:
        return host
    try:
        if not ipaddress.ip_address(host).is_link_local:
            return host
    except ValueError:
        return host
    try:
        name = socket.if_indextoname(scope_id)
    except OSError:
        name = str(scope_id)
    return f"{host}%{name}"


def _sockaddr(endpoint: Endpoint) -> tuple[str, int, int, int]:
    """Destination for the AF_INET6 socket: IPv4 as a mapped address, IPv6 with its %scope resolved."""
    host, port = endpoint
    if not 0 < port < 65536:
        raise ValueError(f"bad port in endpoint {endpoint!r}")
    addr, _, scope = host.partition("%")
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return (f"::ffff:{ip}", port, 0, 0)
    scope_id = 0
    if scope:
        scope_id = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
    return (str(ip), port, 0, scope_id)


class UdpSocket:
    """A dual-stack UDP socket (``[::]:port``) with ``send_many`` (GSO) and ``recv_batch`` (GRO).

    One thread may send while another receives.  ``close`` wakes a receiver blocked in
    ``recv_batch``.

    The receiver waits for a datagram inside ``recvmsg`` itself, not in ``poll`` followed by
    ``recvmsg``: on light traffic every datagram ends a wait, and the second system call (with the
    Python around it) was a measurable part of each hop on a CPU gone cold since the last packet
    (issue #6).  So the socket is blocking and every call that must not wait says so with
    ``MSG_DONTWAIT``; ``close`` ends a wait with ``shutdown``.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "::",
        *,
        gso: bool = True,
        gro: bool = True,
        bufsize: int = 4 << 20,
    ) -> None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, bufsize)
            for opt in (33, 32):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE: above rmem_max when privileged
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, bufsize)
            sock.bind((host, port))
            sock.setblocking(True)  # see the class docstring: only the receive thread's wait blocks
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.local_port: int = sock.getsockname()[1]
        self.gso = gso and self._probe_gso()
        self.gro = False
        if gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        self._addr_cache: dict[Endpoint, tuple[str, int, int, int]] = {}
        self._peer_cache: dict[tuple[str, int], Endpoint] = {}
        self._waiter = FdWaiter(sock.fileno())
        self._closed = False
        self._lock = threading.Lock()

    def _probe_gso(self) -> bool:
        try:
            self.sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)  # accepted iff the kernel knows UDP_SEGMENT
            return True
        except OSError:
            return False

    def fileno(self) -> int:
        return self.sock.fileno()

    # --- send -------------------------------------------------------------------

    def sockaddr(self, endpoint: Endpoint) -> tuple[str, int, int, int]:
        """The address the socket's ``sendto`` takes for ``endpoint`` (and reports for a datagram from it)."""
        addr = self._addr_cache.get(endpoint)
        if addr is None:
            addr = _sockaddr(endpoint)
            if len(self._addr_cache) > 4096:
                self._addr_cache.clear()
            self._addr_cache[endpoint] = addr
        return addr

    def _retry_full(self, op: Callable[[], object], wait: float) -> bool:
        """Run a non-blocking send, waiting at most ``wait`` seconds in total while the buffer is full.

        Returns False when the buffer stayed full (the datagram is dropped, like a full NIC queue would):
        a bounded wait keeps back-pressure on the data path without ever stalling the control loop.
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                op()
                return True
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                select.select([], [self.sock], [], left)

    def send(self, datagram: bytes, endpoint: Endpoint) -> None:
        """One (control) datagram; waits at most CONTROL_SEND_WAIT when full, never raises on network errors."""
        self._sendto(datagram, self.sockaddr(endpoint), CONTROL_SEND_WAIT)

    def send_many(self, datagrams: list[bytes], endpoint: Endpoint) -> None:
        """Send datagrams in order; runs of equal size (the last of a run may be shorter) leave in one sendmsg.

        Network errors that concern the path (unreachable, refused, ...) are swallowed like lost packets:
        the protocol above recovers.  A datagram never becomes larger on the wire than it was given, and
        GSO segments that do not fit the path are refused by the kernel (EINVAL), then sent one by one.
        """
        if not datagrams:
            return
        addr = self.sockaddr(endpoint)
        if not self.gso or len(datagrams) == 1:
            for d in datagrams:
                self._sendto(d, addr)
            return
        i = 0
        n = len(datagrams)
        while i < n:
            size = len(datagrams[i])
            j = i + 1
            total = size
            limit = min(UDP_MAX_SEGMENTS, MAX_GSO_BYTES // max(size, 1))
            while j < n and j - i < limit:
                dl = len(datagrams[j])
                if dl > size:
                    break
                j += 1
                total += dl
                if dl < size:
                    break  # a shorter datagram ends the run
            if j - i == 1:
                self._sendto(datagrams[i], addr)
            else:
                self._send_gso(datagrams[i:j], size, addr)
            i = j

    def send_segmented(self, parts: list[bytes | memoryview], segment: int, endpoint: Endpoint) -> None:
        """Datagrams of ``segment`` bytes (the last may be shorter) given as buffers back to back.

        With GSO they leave in one ``sendmsg`` whose buffers the kernel gathers (no join in Python);
        without it, or when they are too many for one send, they are cut and sent like :meth:`send_many`.
        """
        total = sum(map(len, parts))
        if self.gso and segment < total <= min(MAX_GSO_BYTES, segment * UDP_MAX_SEGMENTS):
            self._send_gso(parts, segment, self.sockaddr(endpoint))
            return
        buf = b"".join(parts)
        self.send_many([buf[off : off + segment] for off in range(0, len(buf), segment)], endpoint)

    def _sendto(self, d: bytes, addr: tuple[str, int, int, int], wait: float = DATA_SEND_WAIT) -> None:
        try:
            try:
                self.sock.sendto(d, _DONTWAIT, addr)  # the usual case first: no closure, no clock read
            except BlockingIOError:
                self._retry_full(lambda: self.sock.sendto(d, _DONTWAIT, addr), wait)
        except OSError as e:
            if not (self._closed or e.errno in _TRANSIENT):
                raise

    def _send_gso(self, run: list[bytes | memoryview], size: int, addr: tuple[str, int, int, int]) -> None:
        """One GSO send of buffers that are ``size``-byte datagrams back to back (datagrams, or pieces of them)."""
        cmsg = [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
        try:
            # The buffers go as one iovec each: the kernel gathers them, no 64 kB join in Python.
            self._retry_full(lambda: self.sock.sendmsg(run, cmsg, _DONTWAIT, addr), DATA_SEND_WAIT)
            return
        except OSError as e:
            if self._closed:
                return
            if e.errno == errno.EIO:
                # The route's device cannot checksum GSO segments: never try again on this socket.
                self.gso = False
            elif e.errno not in (errno.EINVAL, errno.EMSGSIZE):
                if e.errno in _TRANSIENT:
                    return
                raise
        # EIO/EINVAL/EMSGSIZE: segments the path refuses as a run; let IP decide per datagram.
        buf = b"".join(run)
        for off in range(0, len(buf), size):
            self._sendto(buf[off : off + size], addr)

    # --- receive ----------------------------------------------------------------

    def _peer(self, raw: tuple) -> Endpoint:  # type: ignore[type-arg]
        """The sender as an endpoint we can send back to: a link-local source keeps its scope (``%ifname``)."""
        scope = raw[3] if len(raw) > 3 else 0
        key = (raw[0], raw[1], scope)
        ep = self._peer_cache.get(key)
        if ep is None:
            ep = (scoped_host(normalize_host(raw[0]), scope), raw[1])
            if len(self._peer_cache) > 4096:
                self._peer_cache.clear()
            self._peer_cache[key] = ep
        return ep

    def recv_batch(
        self,
        timeout: float | None = None,
        max_calls: int = 32,
        *,
        runs: bool = False,
        lone: Callable[[bytes, tuple], bool] | None = None,  # type: ignore[type-arg]
    ) -> list[tuple[bytes | DatagramRun, Endpoint]]:
        """Wait up to ``timeout`` (None: for ever) for data, then drain up to ``max_calls`` receives without waiting.

        GRO buffers are cut back into the datagrams the sender sent; with ``runs`` a buffer of
        DataSuper fragments comes whole, as a :class:`DatagramRun`.  Returns [] on timeout, after
        :meth:`close`, and when ``lone`` took all of ``max_calls`` datagrams.  A datagram that ended a
        wait and came alone is first offered to ``lone(data, sockaddr)`` with the sender as the socket
        reports it (:meth:`sockaddr`'s form; a link-local sender as ``(host, port, 0, scope_id)``):
        when it takes it, the wait starts again (with the whole ``timeout``).  On light traffic that
        is every datagram, and each layer between the socket and the data path costs latency on a
        cold CPU (issue #6).  Without a timeout the wait is the ``recvmsg`` itself, and after a datagram
        ``lone`` took the thread goes straight back to it: no receive that fails, no exception, before
        it sleeps.  Each call still starts with a receive that does not wait, so under load (data
        already queued) datagrams are gathered into batches as before.
        """
        if self._closed:
            return []
        out: list[tuple[bytes, Endpoint]] = []
        sock = self.sock
        recvmsg = sock.recvmsg
        gro = self.gro
        calls = 0
        waited = False
        wait_in_kernel = timeout is None
        flags = _DONTWAIT
        while calls < max_calls:
            try:
                if gro:
                    data, anc, _flags, raw = recvmsg(RECV_BUFSIZE, _CMSG_SPACE, flags)
                else:
                    data, raw = sock.recvfrom(RECV_BUFSIZE, flags)
                    anc = None
            except BlockingIOError:
                if out or waited:
                    return out
                if wait_in_kernel:
                    flags = 0
                    continue
                if not self._wait_readable(timeout):
                    return out
                waited = True
                continue
            except OSError as e:
                if self._closed:
                    return out
                if e.errno in _TRANSIENT:  # ICMP error from an earlier send: not about this receive
                    continue
                raise
            if not flags:  # this receive could wait: the next ones of this call must not
                if self._closed:  # close() ended the wait (shutdown)
                    return out
                flags = _DONTWAIT
                waited = True
            calls += 1
            if waited and lone is not None and not anc:
                try:
                    taken = lone(data, raw)
                except Exception:  # a bug in the handler must not end the receiver
                    log.exception("lone datagram handler failed")
                    taken = True
                if taken:
                    waited = False
                    if wait_in_kernel:
                        flags = 0
                    continue
            ep = self._peer(raw)
            seg = 0
            if anc:
                for level, kind, value in anc:
                    if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                        seg = _INT.unpack_from(value)[0]
            n = len(data)
            if 0 < seg < n:
                if runs and data[0] == MSG_DATA_SUPER and not data[::seg].translate(None, _DATA_TYPES):
                    # Fragments of super messages are joined again right away: the buffer stays whole,
                    # but only when every datagram in it is data (the first byte of each, one strided
                    # slice); a buffer that also holds a control message is cut up as usual.
                    out.append((DatagramRun(data, seg), ep))
                else:
                    out += [(data[off : off + seg], ep) for off in range(0, n, seg)]
            else:
                out.append((data, ep))
            if waited:
                # The datagram that ended a wait comes back alone: after idle it almost always is, and the
                # drain attempt (a failing receive) would sit on its path on a cold CPU (issue #6).
                return out
        return out

    def _wait_readable(self, timeout: float | None) -> bool:
        return self._waiter.wait(timeout) and not self._closed

    def close(self) -> None:
        """Close the socket and wake any receiver; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._waiter.wake()
            # A receiver waiting inside recvmsg wakes on shutdown (an unconnected socket reports ENOTCONN
            # but is shut down all the same); closing alone would leave it asleep.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)
            self.sock.close()
            self._waiter.close()

    def __enter__(self) -> UdpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Errors about the network path, not about our code: the datagram is as good as lost.
_TRANSIENT = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EPERM,  # nftables/iptables reject on output
        errno.EACCES,
        errno.EADDRNOTAVAIL,
        errno.ENOBUFS,
        errno.EMSGSIZE,
    }
)
