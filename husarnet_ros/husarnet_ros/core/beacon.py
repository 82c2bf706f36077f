r"""LAN discovery: signed multicast beacons that let robots find each other with no base server.

A beacon says "the node with this key listens on UDP port P of the host that
sent this packet".  It is only a *hint*: the engine probes the candidate with
an authenticated handshake before using it, so a forged beacon can at worst
cause a failed probe, never redirect a session.  Still, beacons are checked
so that hints are cheap to trust and hard to abuse:

* the Ed25519 signature (domain-separated, over every field) verifies and the
  key hashes to the claimed fc94 address;
* the timestamp is within ``max_skew`` of our clock and newer than the last
  accepted beacon of that address on the same interface and IP family (no
  replay of old beacons; one beacon legitimately arrives once per path);
* the *source* address is on a directly connected subnet of the interface the
  packet arrived on (learned with IP_PKTINFO / IPV6_RECVPKTINFO; subnets from
  pyroute2), or is IPv6 link-local, which is then scoped to that interface.
  Routed or spoofed-from-elsewhere beacons are dropped.

Checks run cheapest first and signature verification is rate-limited, so a
flood of junk costs little CPU.  Every rejection increments a ``beacon_*``
counter.  Groups and port are Husarnet's (``constants.BEACON_*``).

Layout (126 bytes, little-endian): ``version(1)=1 res(3)=0 address(16)
pubkey(32) port(2) timestamp_ms(8) signature(64)``; the signature covers
``b"husarnet_ros beacon v1\n" || bytes 0..61``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .constants import BEACON_GROUP_V4, BEACON_GROUP_V6, BEACON_PORT, DEFAULT_INTERFACE
from .counters import Counters
from .identity import Identity, address_from_pubkey, verify_signature
from .wire import BadIdentity, BadSignature, Malformed

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]

BEACON_VERSION = 1
BEACON = struct.Struct("<I16s32sHQ64s")
BEACON_LEN = BEACON.size  # 126
BEACON_SIGNED_LEN = BEACON_LEN - 64
BEACON_DOMAIN = b"husarnet_ros beacon v1\n"

DEFAULT_INTERVAL = 5.0
DEFAULT_MAX_SKEW = 300.0  # robots in the field may have poorly synced clocks; a beacon is only a hint
MAX_TRACKED_SENDERS = 1024
VERIFY_RATE = 200.0  # signature checks per second, burst the same

IP_PKTINFO = 8  # linux/in.h; not exported by Python's socket module
_IN_PKTINFO = struct.Struct("=i4s4s")
_IN6_PKTINFO = struct.Struct("=16sI")
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000

COUNTER_NAMES = (
    "beacon_tx",
    "beacon_tx_errors",
    "beacon_rx",
    "beacon_accepted",
    "beacon_malformed",
    "beacon_bad_id",
    "beacon_bad_sig",
    "beacon_off_subnet",
    "beacon_stale",
    "beacon_replay",
    "beacon_rate_limited",
)


@dataclass(frozen=True)
class Beacon:
    """A beacon's fields; objects returned by :func:`parse_beacon` are authentic (signature checked)."""

    address: bytes
    public_key: bytes
    port: int
    timestamp_ms: int
    signature: bytes


def build_beacon(identity: Identity, port: int, timestamp_ms: int) -> bytes:
    """A beacon announcing ``identity`` on UDP ``port``, signed now."""
    if not 0 < port <= 0xFFFF:
        raise ValueError("port must be 1..65535")
    if not 0 <= timestamp_ms < 1 << 64:
        raise ValueError("timestamp_ms must fit 64 bits")
    head = BEACON.pack(BEACON_VERSION, identity.address, identity.public_key, port, timestamp_ms, bytes(64))
    head = head[:BEACON_SIGNED_LEN]
    return head + identity.sign(BEACON_DOMAIN + head)


def parse_beacon_unverified(buf: bytes | bytearray | memoryview) -> Beacon:
    """Layout and self-certifying address checks only (cheap); raises Malformed or BadIdentity."""
    if len(buf) != BEACON_LEN:
        raise Malformed(f"beacon must be {BEACON_LEN} bytes, got {len(buf)}")
    word, addr, pub, port, ts, sig = BEACON.unpack(buf)
    if word != BEACON_VERSION:
        raise Malformed("unknown beacon version or reserved bytes set")
    if port == 0:
        raise Malformed("beacon port 0")
    if address_from_pubkey(pub) != addr:
        raise BadIdentity("beacon key does not hash to its address")
    return Beacon(addr, pub, port, ts, sig)


def verify_beacon(buf: bytes | bytearray | memoryview, beacon: Beacon) -> bool:
    """True if ``beacon`` (parsed from ``buf``) carries a valid signature."""
    return verify_signature(beacon.public_key, beacon.signature, BEACON_DOMAIN + bytes(buf[:BEACON_SIGNED_LEN]))


def parse_beacon(buf: bytes | bytearray | memoryview) -> Beacon:
    """Parse and authenticate a beacon; raises Malformed, BadIdentity or BadSignature (each has ``reason``)."""
    beacon = parse_beacon_unverified(buf)
    if not verify_beacon(buf, beacon):
        raise BadSignature("beacon signature does not verify")
    return beacon


# --- Interfaces ----------------------------------------------------------------------
@dataclass
class Interface:
    """One up, multicast-capable interface and its directly connected subnets."""

    index: int
    name: str
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)

    @property
    def has_ipv4(self) -> bool:
        return any(n.version == 4 for n in self.networks)


def list_interfaces(exclude: Iterable[str] = ()) -> list[Interface]:
    """Up, multicast-capable, non-loopback interfaces (minus ``exclude``) with their subnets, via netlink."""
    from pyroute2 import IPRoute  # imported lazily: only the real service needs netlink

    excluded = set(exclude)
    out: dict[int, Interface] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            flags = link["flags"]
            name = link.get_attr("IFLA_IFNAME")
            if not flags & _IFF_UP or flags & _IFF_LOOPBACK or not flags & _IFF_MULTICAST or name in excluded:
                continue
            out[link["index"]] = Interface(link["index"], name)
        for msg in ipr.get_addr():
            iface = out.get(msg["index"])
            if iface is None:
                continue
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not addr:
                continue
            with contextlib.suppress(ValueError):
                iface.networks.append(ipaddress.ip_network(f"{addr}/{msg['prefixlen']}", strict=False))
    return sorted(out.values(), key=lambda i: i.index)


class _TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def take(self, now: float, n: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class BeaconService:
    """Sends our beacon on every usable interface and reports authentic beacons from the LAN.

    ``on_beacon(address, public_key, endpoint)`` runs on ``loop``'s thread; the
    endpoint is (source host, advertised port), link-local hosts carry
    ``%ifname``.  :meth:`start` and :meth:`close` must be called on the loop's
    thread.  ``interfaces`` is injectable so the acceptance rules can be unit
    tested without netlink.
    """

    def __init__(
        self,
        identity: Identity,
        udp_port: int,
        *,
        loop: asyncio.AbstractEventLoop,
        on_beacon: Callable[[bytes, bytes, Endpoint], None],
        exclude_ifaces: Iterable[str] = (DEFAULT_INTERFACE,),
        counters: Counters | None = None,
        interval: float = DEFAULT_INTERVAL,
        max_skew: float = DEFAULT_MAX_SKEW,
        port: int = BEACON_PORT,
        group_v4: str = BEACON_GROUP_V4,
        group_v6: str = BEACON_GROUP_V6,
        interfaces: Callable[[], list[Interface]] | None = None,
        wallclock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.udp_port = udp_port
        self.loop = loop
        self.on_beacon = on_beacon
        self.exclude_ifaces = tuple(exclude_ifaces)
        self.counters = counters if counters is not None else Counters()
        self.interval = interval
        self.max_skew_ms = int(max_skew * 1000)
        self.port = port
        self.group_v4 = group_v4
        self.group_v6 = group_v6
        self._list_interfaces = interfaces or (lambda: list_interfaces(self.exclude_ifaces))
        self._wallclock = wallclock
        self._clock = clock
        self._ifaces: dict[int, Interface] = {}
        self._last_ts: dict[tuple[bytes, int, bool], int] = {}
        self._bucket = _TokenBucket(VERIFY_RATE, VERIFY_RATE, clock())
        self._sock4: socket.socket | None = None
        self._sock6: socket.socket | None = None
        self._joined4: set[int] = set()
        self._joined6: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="beacon-netlink")
        self._closed = False
        for name in COUNTER_NAMES:
            self.counters.inc(name, 0)

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Open the multicast sockets, send the first beacon and schedule the next ones."""
        try:
            self._sock4 = self._open_v4()
        except OSError as exc:
            log.warning("LAN discovery: no IPv4 multicast socket on port %d: %s", self.port, exc)
        try:
            self._sock6 = self._open_v6()
        except OSError as exc:
            log.warning("LAN discovery: no IPv6 multicast socket on port %d: %s", self.port, exc)
        if self._sock4 is None and self._sock6 is None:
            raise OSError(f"LAN discovery: cannot open UDP port {self.port} for IPv4 or IPv6")
        for sock in (self._sock4, self._sock6):
            if sock is not None:
                self.loop.add_reader(sock.fileno(), self._on_readable, sock)
        self._tick()

    def close(self) -> None:
        """Stop sending and receiving; idempotent."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._executor.shutdown(wait=True, cancel_futures=True)
        for sock in (self._sock4, self._sock6):
            if sock is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(sock.fileno())
                sock.close()
        self._sock4 = self._sock6 = None

    def _open_v4(self) -> socket.socket:
        return self._open(
            socket.AF_INET,
            [
                (socket.IPPROTO_IP, IP_PKTINFO),
                (socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0),
                (socket.IPPROTO_IP, socket.IP_MULTICAST_TTL),
            ],
            "0.0.0.0",
        )

    def _open_v6(self) -> socket.socket:
        return self._open(
            socket.AF_INET6,
            [
                (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
                (socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO),
                (socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0),
                (socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS),
            ],
            "::",
        )

    def _open(self, family: int, options: list[tuple[int, ...]], bind_host: str) -> socket.socket:
        """A non-blocking multicast socket on ``self.port``; ``options`` are (level, name[, value=1]), link-local."""
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for level, name, *value in options:
                s.setsockopt(level, name, value[0] if value else 1)
            s.bind((bind_host, self.port))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    # --- sending -------------------------------------------------------------------------
    def _tick(self) -> None:
        if self._closed:
            return
        self._task = self.loop.create_task(self._refresh_and_send())

    async def _refresh_and_send(self) -> None:
        try:
            # pyroute2's sync API runs its own asyncio loop, which cannot nest in ours: use a worker thread.
            ifaces = await self.loop.run_in_executor(self._executor, self._list_interfaces)
        except Exception as exc:  # a netlink hiccup: keep the previous view
            log.warning("LAN discovery: cannot list interfaces: %s", exc)
            ifaces = None
        if self._closed:
            return
        try:
            if ifaces is not None:
                self.apply_interfaces(ifaces)
            self.send_now()
        except Exception:  # discovery must never kill the control loop
            log.exception("LAN discovery tick failed")
        self._timer = self.loop.call_later(self.interval, self._tick)

    def refresh_interfaces(self) -> None:
        """Re-read interfaces synchronously (only where no asyncio loop runs in this thread, e.g. tests)."""
        self.apply_interfaces(self._list_interfaces())

    def apply_interfaces(self, ifaces: list[Interface]) -> None:
        """Adopt a new interface view; join the groups on new interfaces."""
        self._ifaces = {i.index: i for i in ifaces if i.name not in self.exclude_ifaces}
        self._joined4 &= set(self._ifaces)
        self._joined6 &= set(self._ifaces)
        for iface in self._ifaces.values():
            if self._sock4 is not None and iface.has_ipv4 and iface.index not in self._joined4:
                mreq = struct.pack("=4s4si", socket.inet_aton(self.group_v4), bytes(4), iface.index)
                try:
                    self._sock4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                    self._joined4.add(iface.index)
                except OSError as exc:
                    if exc.errno == 98:  # EADDRINUSE: already joined
                        self._joined4.add(iface.index)
                    else:
                        log.debug("LAN discovery: IPv4 join on %s failed: %s", iface.name, exc)
            if self._sock6 is not None and iface.index not in self._joined6:
                mreq6 = struct.pack("=16sI", socket.inet_pton(socket.AF_INET6, self.group_v6), iface.index)
                try:
                    self._sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq6)
                    self._joined6.add(iface.index)
                except OSError as exc:
                    if exc.errno == 98:
                        self._joined6.add(iface.index)
                    else:
                        log.debug("LAN discovery: IPv6 join on %s failed: %s", iface.name, exc)

    def send_now(self) -> None:
        """Send one fresh beacon on every usable interface, IPv4 and IPv6."""
        data = build_beacon(self.identity, self.udp_port, int(self._wallclock() * 1000))
        for iface in list(self._ifaces.values()):
            if self._sock4 is not None and iface.has_ipv4:
                try:
                    mreqn = struct.pack("=4s4si", bytes(4), bytes(4), iface.index)
                    self._sock4.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                    self._sock4.sendto(data, (self.group_v4, self.port))
                    self.counters.inc("beacon_tx")
                except OSError as exc:
                    self.counters.inc("beacon_tx_errors")
                    log.debug("LAN discovery: IPv4 send on %s failed: %s", iface.name, exc)
            if self._sock6 is not None:
                try:
                    self._sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, iface.index)
                    self._sock6.sendto(data, (self.group_v6, self.port, 0, iface.index))
                    self.counters.inc("beacon_tx")
                except OSError as exc:
                    self.counters.inc("beacon_tx_errors")
                    log.debug("LAN discovery: IPv6 send on %s failed: %s", iface.name, exc)

    # --- receiving -----------------------------------------------------------------------
    def _on_readable(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded batch so one socket cannot starve the loop
            try:
                data, anc, _flags, src = sock.recvmsg(512, socket.CMSG_SPACE(64))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("LAN discovery: receive failed: %s", exc)
                return
            ifindex = 0
            for level, ctype, cdata in anc:
                if level == socket.IPPROTO_IP and ctype == IP_PKTINFO and len(cdata) >= _IN_PKTINFO.size:
                    ifindex = _IN_PKTINFO.unpack_from(cdata)[0]
                elif level == socket.IPPROTO_IPV6 and ctype == socket.IPV6_PKTINFO and len(cdata) >= 20:
                    ifindex = _IN6_PKTINFO.unpack_from(cdata)[1]
            self.handle_datagram(data, src[0], ifindex)

    def _source_ok(self, host: str, ifindex: int) -> str | None:
        """The endpoint host to report if ``host`` is directly connected on ``ifindex``, else None."""
        iface = self._ifaces.get(ifindex)
        if iface is None:
            return None
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            return None
        if ip.version == 6 and ip.is_link_local:
            return f"{ip}%{iface.name}"
        for net in iface.networks:
            if (
                net.version == ip.version
                and ip in net
                and ip != net.network_address
                and (ip.version == 6 or net.prefixlen >= 31 or ip != net.broadcast_address)
            ):
                return str(ip)
        return None

    def handle_datagram(self, data: bytes, src_host: str, ifindex: int) -> bool:
        """Check one received datagram; report it if it passes every rule. Returns True if accepted."""
        c = self.counters
        c.inc("beacon_rx")
        try:
            beacon = parse_beacon_unverified(data)
        except BadIdentity:
            c.inc("beacon_bad_id")
            return False
        except Malformed:
            c.inc("beacon_malformed")
            return False
        if beacon.address == self.identity.address:
            return False  # our own beacon (another socket or a looped copy)
        host = self._source_ok(src_host, ifindex)
        if host is None:
            c.inc("beacon_off_subnet")
            return False
        now_ms = int(self._wallclock() * 1000)
        if abs(now_ms - beacon.timestamp_ms) > self.max_skew_ms:
            c.inc("beacon_stale")
            return False
        # The same beacon legitimately arrives once per interface and IP family; replay is judged per path.
        key = (beacon.address, ifindex, ":" in host)
        last = self._last_ts.get(key)
        if last is not None and beacon.timestamp_ms <= last:
            c.inc("beacon_replay")
            return False
        if not self._bucket.take(self._clock()):
            c.inc("beacon_rate_limited")
            return False
        if not verify_beacon(data, beacon):
            c.inc("beacon_bad_sig")
            return False
        self._last_ts.pop(key, None)
        self._last_ts[key] = beacon.timestamp_ms
        if len(self._last_ts) > MAX_TRACKED_SENDERS:
            self._last_ts.pop(next(iter(self._last_ts)))
        c.inc("beacon_accepted")
        try:
            self.on_beacon(beacon.address, beacon.public_key, (host, beacon.port))
        except Exception:  # a consumer bug must not stop discovery
            log.exception("on_beacon callback failed")
        return True
