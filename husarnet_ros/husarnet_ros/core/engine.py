"""The engine: owns identity, whitelist, peers, sessions, paths, transport and TUN (DESIGN.md 3 and 4).

Threads, and what runs where:

* ``udp-rx`` (the transport's receive thread): classifies each datagram.
  Data messages are opened and delivered right there by :class:`Datapath`;
  handshake and Hello messages are posted (bounded) to the control loop.
* ``tun-rx``: reads the TUN in batches and seals/sends them (:class:`Datapath`).
* ``hnet-ctl``: one asyncio loop for everything slow and stateful: handshakes,
  WireGuard's timers (rekey, keepalive, retry, give-up), path probes, key
  discovery, whitelist changes, the base client and LAN beacons.

The protocol rules live in one place each: the handshake messages in
:mod:`handshake`, the keys and replay window in :mod:`session`, the path rules in
:mod:`path`, the per-packet rules in :mod:`datapath`, and the timer rules
below in :meth:`Engine._peer_timers`, which a reader can check against
WireGuard's ``timers.go``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import endpoint_cache
from . import handshake as hs
from .constants import DEFAULT_INTERFACE, DEFAULT_MTU, DEFAULT_UDP_PORT, OVERLAY_PREFIX, Timers
from .cookie import COOKIE_SECRET_LIFETIME, CookieChecker, CookieError, SourceLimiter, open_cookie_reply, with_mac2
from .counters import Counters
from .datapath import Datapath
from .fsutil import StateFileError, ensure_state_dir
from .gil import QuickHandover
from .heap import keep_freed_heap
from .identity import Identity, format_address, parse_address
from .offload import MAX_PACKET, Coalescer, OffloadError, split_for_send
from .path import KIND_NONE, KIND_RELAY, Network, classify, probe_interval_for
from .peer import IndexTable, Peer, PendingHandshake
from .session import Keypair
from .superpacket import tso_limit
from .threads import NamedThread
from .transport import (
    AnyEndpoint,
    Endpoint,
    RelayEndpoint,
    Transport,
    UdpTransport,
    format_endpoint,
    parse_endpoint,
    send_many,
)
from .udp import DatagramRun
from .warmer import DEFAULT_INTERVAL as DEFAULT_WARM_INTERVAL
from .warmer import LoopbackEcho, PathWarmer, ShadowPair, check_interval, traffic_units
from .whitelist import Whitelist, WhitelistError
from .wire import (
    HANDSHAKE_INIT_LEN,
    MAC_LEN,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_DATA_SUPER,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
    MSG_HELLO,
    Malformed,
    build_hello,
    build_probe,
    parse_cookie_reply,
    parse_hello,
    split_mac2,
)

log = logging.getLogger(__name__)

_DATA_WORD = MSG_DATA.to_bytes(4, "little")
_DATA_WORDS = (_DATA_WORD, MSG_DATA_SUPER.to_bytes(4, "little"))
_CONTROL_WORDS = frozenset((MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP, MSG_COOKIE_REPLY, MSG_HELLO))

#: Hello flag: "this Hello answers yours" (never answered again, so Hellos cannot ping-pong).
HELLO_FLAG_REPLY = 1
#: Verified beacons remembered from peers that are not whitelisted (bounded; see _remember_unlisted_beacon).
MAX_UNLISTED_BEACONS = 256
#: Control datagrams (handshakes, Hellos) waiting for the loop; beyond this they are dropped (rate_limited).
MAX_CONTROL_BACKLOG = 1024
#: Initiations the responder processes per second (token bucket), so a flood cannot eat the loop.
INITIATION_RATE = 200.0
#: With handshake cookies, how long (s) the responder stays "under load" after the strangers' budget last
#: ran dry (WireGuard's UnderLoadAfterTime): meanwhile every stranger proves its address first, so no
#: spoofed initiation of a flood costs a Diffie-Hellman, and a newcomer never depends on winning a token.
UNDER_LOAD_HOLD = 1.0
#: Bound on peers created from unsolicited traffic (whitelist disabled).
MAX_PEERS = 4096
#: How often (s) the validated direct paths are compared with the endpoint cache, and written if they changed.
ENDPOINT_SAVE_INTERVAL = 30.0
#: How often the TUN device's link state and address are checked (seconds).
INTERFACE_CHECK_INTERVAL = 1.0


class EngineError(Exception):
    """The engine could not start (or an operation failed); the message says what to do."""


@dataclass
class EngineConfig:
    """Everything a node is configured with (ROS parameters, daemon flags)."""

    state_dir: Path
    interface_name: str = DEFAULT_INTERFACE
    hostname: str = ""
    udp_port: int = DEFAULT_UDP_PORT
    mtu: int = DEFAULT_MTU
    base_servers: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    lan_discovery: bool = True
    #: Under a handshake flood, answer strangers' initiations with cookie replies (cookie.py): peers at
    #: addresses we have not seen still get in, but a sender that knows our public key gets an answer.
    handshake_cookies: bool = False
    whitelist_enabled: bool = True
    whitelist: list[str] = field(default_factory=list)
    websetup_enabled: bool = True
    websetup_whitelist: list[str] = field(default_factory=list)
    hosts_file: str | None = None
    use_tun: bool = True
    timers: Timers = field(default_factory=Timers)
    offload: bool = True  # TUN virtio-net headers (TSO/GRO super-packets) when the kernel allows
    #: Seal TSO/USO super-packets whole to peers that agree and while the path is clean (issue #6).
    #: None: on iff the TUN runs with offloads and HUSARNET_ROS_SUPER is not "0"; True also works in
    #: memory (received super-packets are split for ``on_packet``).
    super_packets: bool | None = None
    #: Seconds between two runs of a packet through a shadow data path while light traffic flows, which
    #: keeps the per-packet code in the CPU caches (warmer.py, issue #6); 0 turns it off.
    warm_interval: float = DEFAULT_WARM_INTERVAL


@dataclass(frozen=True)
class PeerInfo:
    """A snapshot of one peer for the node, the CLI and tests."""

    address: bytes
    hostname: str
    path: str  # 'lan' | 'direct' | 'relay' | 'none'
    endpoint: str
    rtt_ms: float
    is_whitelisted: bool
    is_secure: bool
    last_seen: float  # wall clock, 0 = never
    rx_bytes: int
    tx_bytes: int
    session_age: float
    cipher: str


@dataclass(frozen=True)
class StatusInfo:
    """A snapshot of the node itself."""

    address: bytes
    hostname: str
    base: str  # 'none' | 'tcp' | 'udp'
    base_address: str
    whitelist_enabled: bool
    counters: dict[str, int]
    websetup: dict
    dds_restart_needed: bool = False
    #: Why the overlay stopped working while the engine runs (the TUN device was deleted under it); "" while fine.
    failure: str = ""
    #: What someone outside may fix while the overlay runs degraded (the TUN device was set down, the hosts file
    #: cannot be written); "" while fine.
    warning: str = ""


def parse_peer_spec(spec: str) -> tuple[bytes, Endpoint | None]:
    """``fc94:...``, ``fc94:...@198.18.0.2:5582`` or ``[fc94::..]@[fd00::2]:5582`` -> (address, endpoint)."""
    spec = spec.strip()
    addr_text, sep, ep_text = spec.partition("@")
    addr_text = addr_text.strip()
    if addr_text.startswith("[") and addr_text.endswith("]"):
        addr_text = addr_text[1:-1]
    try:
        address = parse_address(addr_text)
    except ValueError as exc:
        raise ValueError(f"peer {spec!r}: {exc}") from None
    if not sep:
        return address, None
    try:
        return address, parse_endpoint(ep_text)
    except ValueError as exc:
        raise ValueError(f"peer {spec!r}: {exc}") from None


def _interface_addresses(exclude: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Addresses (with prefix) of this host's interfaces except ``exclude`` and loopback; [] without netlink."""
    out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for msg in ipr.get_addr():
                if names.get(msg["index"]) in (exclude, "lo"):
                    continue
                addr = msg.get_attr("IFA_ADDRESS")
                if addr:
                    with contextlib.suppress(ValueError):
                        out.append(ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}"))
    except Exception as exc:
        # Classification degrades to 'direct' and no LAN endpoints are reported; never fails the engine.
        log.debug("cannot list local addresses: %s", exc)
    return out


class Engine:
    """One overlay node.  Thread-safe public methods; see the module docstring for the threads."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        identity: Identity | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.timers = config.timers
        self.identity: Identity | None = identity
        self.address: bytes = identity.address if identity is not None else b""
        self.counters = Counters()
        self.whitelist: Whitelist | None = None
        self.on_packet: Callable[[bytes], None] | None = None
        self.dds_restart_needed = False
        self._endpoint_cache_path: Path | None = None  # set when the underlay is real UDP (endpoint_cache.py)
        self._cached_endpoints: dict[bytes, list[Endpoint]] = {}  # as last loaded or saved
        self._cache_save_error = ""  # the last save failure, warned about once
        #: Set (once) when the data path fails for good while running: see :meth:`_on_tun_failure`.
        self.failure = ""
        #: Set while the TUN device is down or lost its address and we could not put it back (_check_interface),
        #: or while the hosts file cannot be written (_write_hosts): the causes of ``_warnings``, joined.
        self.warning = ""
        self._warnings: dict[str, str] = {}  # cause ("tun", "hosts") -> its text; see _set_warning
        self._warning_lock = threading.Lock()
        self._tun_write_errors = 0  # the TUN's write_errors already counted as tun_write_failed
        self._given_transport = transport
        self._transport: Transport | None = None
        self._clock = clock
        self._wallclock = wallclock
        self._peers: dict[bytes, Peer] = {}
        self._index = IndexTable()
        self._tun: Any = None
        self._datapath: Datapath | None = None
        self._warmer: PathWarmer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._tick_task: asyncio.Task | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._static: dict[bytes, Endpoint | None] = {}
        self._local_networks: list[Network] = []
        self._local_endpoints: list[Endpoint] = []
        self._bases: dict[str, Any] = {}  # base key -> BaseClient
        self._hosts: Any = None  # hosts.HostsSync
        self._websetup: Any = None  # websetup.WebsetupServer
        self._base_tasks: list[asyncio.Task] = []
        self._beacon_endpoints: set[Endpoint] = set()
        # Verified beacons of peers not (yet) whitelisted: address -> (public key, endpoint, when seen).
        # Whitelisting one of them then connects at once instead of waiting up to a beacon interval.
        self._unlisted_beacons: dict[bytes, tuple[bytes, Endpoint, float]] = {}
        self._scoped: dict[Endpoint, Endpoint] = {}  # unscoped link-local source -> scoped endpoint
        self._beacons: Any = None
        self._control_posted = 0  # written by receive threads (under _post_lock)
        self._control_done = 0  # written by the loop only
        self._post_lock = threading.Lock()
        # Diffie-Hellman budgets: [strangers, known sources, cookie-proven sources] (_take_init_token).
        self._init_tokens = [INITIATION_RATE] * 3
        self._init_tokens_at = [clock()] * 3
        self._under_load_until = float("-inf")  # strangers' budget ran dry (handshake cookies only)
        self._cookies: CookieChecker | None = None  # made once the identity is known (_start)
        self._proven_sources = SourceLimiter()
        self._known_sources: frozenset = frozenset()  # every peer's endpoints, rebuilt each tick
        self._last_hello_ts = 0
        self._relay_sender: Callable[[bytes, RelayEndpoint], None] | None = None
        self._base_status: tuple[str, str] = ("none", "")
        self._state = "new"  # new -> running -> stopped
        self._lock = threading.Lock()
        self._rng = random.Random()

    # ========================================================================= lifecycle
    def start(self) -> None:
        """Bring the node up: identity, whitelist, socket, TUN, threads.  All or nothing.

        Raises :class:`EngineError` with one clear message; everything created
        before the failing step has been undone by then.
        """
        with self._lock:
            if self._state != "new":
                raise EngineError("an Engine can be started only once; create a new one")
            self._state = "starting"
        try:
            self._start()
        except BaseException as exc:
            self._teardown()
            self._state = "stopped"
            if isinstance(exc, EngineError):
                raise
            if isinstance(exc, (OSError, ValueError, StateFileError, WhitelistError)):
                raise EngineError(str(exc)) from exc
            raise
        self._state = "running"

    def _start(self) -> None:
        cfg = self.config
        try:
            check_interval(cfg.warm_interval)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        try:
            state_dir = ensure_state_dir(cfg.state_dir)
        except OSError as exc:
            raise EngineError(f"cannot create state directory {cfg.state_dir}: {exc.strerror or exc}") from None
        if self.identity is None:
            id_path = state_dir / "id"
            try:
                self.identity = Identity.load_or_create(id_path)
            except (StateFileError, OSError) as exc:
                raise EngineError(
                    f"identity file {id_path} is unusable ({exc}); fix its permissions (0600) or move it away "
                    "to create a new identity (the node's address will change)"
                ) from None
            self.address = self.identity.address
        self._cookies = CookieChecker(self.identity.x25519_public, self._clock)
        try:
            self.whitelist = Whitelist(
                state_dir / "whitelist.json", static=cfg.whitelist, enabled_default=cfg.whitelist_enabled
            )
        except (WhitelistError, ValueError) as exc:
            raise EngineError(f"whitelist: {exc}") from None
        for spec in cfg.peers:
            try:
                addr, ep = parse_peer_spec(spec)
            except ValueError as exc:
                raise EngineError(str(exc)) from None
            if addr == self.address:
                raise EngineError(f"peer {spec!r} is this node's own address")
            self._static[addr] = ep
        # Underlay socket.
        if self._given_transport is not None:
            self._transport = self._given_transport
        else:
            try:
                self._transport = UdpTransport(cfg.udp_port)
            except OSError as exc:
                raise EngineError(udp_bind_error(cfg.udp_port, exc)) from None
        if isinstance(self._transport, UdpTransport):  # real endpoints: worth remembering across restarts
            self._endpoint_cache_path = state_dir / endpoint_cache.FILE_NAME
        nets = getattr(self._transport, "local_networks", None)
        if nets is not None:
            self._local_networks = list(nets)
        elif isinstance(self._transport, UdpTransport):
            self._refresh_local(_interface_addresses(cfg.interface_name))
        for spec in cfg.base_servers:
            from .base_client import parse_base_spec

            try:
                parse_base_spec(spec)
            except ValueError as exc:
                raise EngineError(str(exc)) from None
        self._datapath = Datapath(
            self.address,
            self._peers,
            self._index,
            self.counters,
            self,  # ControlHooks
            self._deliver,
            timers=self.timers,
            clock=self._clock,
            wallclock=self._wallclock,
            mtu=cfg.mtu,
            deliver_super=self._deliver_super,
        )
        # TUN device.
        if cfg.use_tun:
            from .tun import TunDevice, TunError

            try:
                self._tun = TunDevice.open(
                    cfg.interface_name,
                    self.address,
                    cfg.mtu,
                    vnet_hdr=cfg.offload,
                    gso_max_size=tso_limit(cfg.mtu),  # one GSO send and one GRO buffer per super-packet
                )
            except TunError as exc:
                if not cfg.offload:
                    raise EngineError(str(exc)) from None
                # A device that refuses virtio-net headers (or its offloads) still works packet by packet.
                log.info("TUN offload unavailable (%s); using plain packets", exc)
                try:
                    self._tun = TunDevice.open(cfg.interface_name, self.address, cfg.mtu)
                except TunError as exc2:
                    raise EngineError(str(exc2)) from None
        if cfg.super_packets is None:
            self._datapath.super_packets = self.offload_active and os.environ.get("HUSARNET_ROS_SUPER", "1") != "0"
        else:
            self._datapath.super_packets = cfg.super_packets
        # The lone-packet paths reach socket and TUN without the general batch calls (issue #6).
        if isinstance(self._transport, UdpTransport):
            self._datapath.sendto = self._transport.raw_sendto
            self._datapath.sockaddr = self._transport.sockaddr
        if self._tun is not None:
            self._datapath.write_direct = self._tun.write_packet
            self._datapath.on_tun_failure = self._on_tun_failure
        # Hosts file block (own names + whitelist hostnames + websetup names).
        if cfg.hosts_file:
            from .hosts import HostsFile, HostsSync

            try:
                self._hosts = HostsSync(HostsFile(cfg.hosts_file), self.address, cfg.hostname, None)
            except ValueError as exc:  # our own hostname: a configuration error
                raise EngineError(f"hosts file {cfg.hosts_file}: {exc}") from None
            # The whitelist's names are fed as the first source (so they win over websetup's), by our
            # own listener, so a stopped engine never rewrites the block.
            self._write_hosts("whitelist", self.whitelist.hostnames())
        # Control loop.
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop_thread = NamedThread(target=self._run_loop, args=(ready,), name="hnet-ctl", daemon=True)
        self._loop_thread.start()
        ready.wait()
        self._call(self._setup_on_loop).result(timeout=10)
        if cfg.websetup_enabled and self._tun is not None:
            asyncio.run_coroutine_threadsafe(self._start_websetup(), self._loop).result(timeout=10)
        if isinstance(self._transport, UdpTransport):
            self._transport.start(self._on_datagram, self._on_batch, self._datapath.receive_lone)
        else:
            self._transport.start(self._on_datagram)
        if self._tun is not None:
            if self._tun.vnet_hdr:
                keep_freed_heap()  # super-packet buffers: no page faults per 64 kB (heap.py)
            self._datapath.start_tun(self._tun)
            if cfg.warm_interval:
                self._start_warmer(self._datapath, self._tun, cfg.warm_interval)
        log.info("engine up: %s on UDP %d", format_address(self.address), self._transport.local_port)

    def _start_warmer(self, dp: Datapath, tun: Any, interval: float) -> None:
        """Run the path warmer beside the TUN thread, set up as the real lone paths run (warmer.py)."""
        features = hs.local_features()
        shadow = ShadowPair(
            vnet_hdr=tun.vnet_hdr,
            mtu=tun.mtu,
            cipher=hs.choose_cipher(features, features),  # what two nodes like this one pick
            super_packets=dp.super_packets,
            timers=self.timers,
            clock=dp.clock,
            wallclock=dp.wallclock,
        )
        counters = self.counters
        echo = LoopbackEcho()
        self._warmer = PathWarmer(
            shadow,
            lambda: traffic_units(counters),
            dp.clock,
            interval=interval,
            echo=echo,
            bursts=lambda: (dp.bursts, dp.burst_at),
            lone=lambda: (dp.lone_started, dp.lone_finished),
            handover=QuickHandover(),
            lone_at=lambda: dp.lone_at,
        )
        self._warmer.start()
        dp.on_exchange = self._warmer.nudge
        log.info(
            "path warmer on while light traffic flows: just before each exchange of periodic traffic, "
            "else every %g ms (kernel path through loopback: %s)",
            interval * 1000,
            ", ".join(echo.open_hosts) or "none",
        )

    @property
    def warm_rounds(self) -> int:
        """How many times the path warmer ran a packet through its shadow path (0 when off)."""
        return self._warmer.rounds if self._warmer is not None else 0

    @property
    def warm_paced_rounds(self) -> int:
        """Of :attr:`warm_rounds`, those timed just before an expected exchange of periodic traffic."""
        return self._warmer.paced_rounds if self._warmer is not None else 0

    @property
    def warm_deferred(self) -> int:
        """Warm-ups the path warmer put off, and cut short, because a real packet was on its way then."""
        w = self._warmer
        return w.deferred + w.yielded if w is not None else 0

    @property
    def warm_streaming(self) -> int:
        """The path warmer's looks that left the path to traffic faster than itself (a 1 kHz loop): no warm-up."""
        return self._warmer.streaming if self._warmer is not None else 0

    def _run_loop(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())

    def _call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the loop thread; returns a concurrent Future."""
        fut: Future = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(run)
        return fut

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Fire-and-forget onto the loop (no-op once stopped)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _setup_on_loop(self) -> None:
        assert self.whitelist is not None
        now = self._clock()
        for addr, ep in self._static.items():
            peer = self._get_peer(addr, create=True, force=True)
            assert peer is not None
            peer.static = True
            if ep is not None:
                peer.paths.add_candidate(ep, self.path_kind(ep), "static", now)
                if "%" in ep[0]:
                    self._scoped[(ep[0].split("%", 1)[0], ep[1])] = ep
        for addr, name in self.whitelist.entries().items():
            if addr != self.address:
                peer = self._get_peer(addr, create=True, force=True)
                if peer is not None and name:
                    peer.hostname = name
        self.whitelist.add_listener(self._on_whitelist_change)
        if self._endpoint_cache_path is not None:
            self._offer_cached_endpoints()
        if self.config.lan_discovery and isinstance(self._transport, UdpTransport):
            self._start_beacons()
        for spec in self.config.base_servers:
            self._start_base(spec)
        if self._bases:
            self.set_relay_sender(self._relay_via_base)
        self._tick_task = asyncio.get_running_loop().create_task(self._ticker())

    async def _start_websetup(self) -> None:
        """Websetup on UDP 5580 of our overlay address only (DESIGN.md 4.8)."""
        from .websetup import WebsetupServer

        try:
            from .. import __version__ as version
        except ImportError:
            version = ""
        server = WebsetupServer(
            self.config.state_dir,
            self.whitelist,
            websetup_whitelist=self.config.websetup_whitelist,
            hosts_hook=self._websetup_hosts if self._hosts is not None else None,
            get_latency=lambda: {p.address: p.rtt_ms for p in self.peers() if p.is_secure},
            version=str(version),
            counters=Counters(),
            clock=self._clock,
            wallclock=self._wallclock,
        )
        try:
            await server.start(format_address(self.address), interface=self._tun.name)
        except OSError as exc:
            # Management is optional; the overlay works without it.  Status shows listening=False.
            log.warning("websetup not listening: %s", exc)
        self._websetup = server

    def _start_beacons(self) -> None:
        try:
            from .beacon import BeaconService

            self._beacons = BeaconService(
                self.identity,
                self._transport.local_port,
                loop=asyncio.get_running_loop(),
                on_beacon=self._on_beacon,
                exclude_ifaces=(self.config.interface_name,),
                counters=self.counters,
                interval=max(0.5, min(5.0, self.timers.probe_interval / 5)),
                wallclock=self._wallclock,
            )
            self._beacons.start()
        except OSError as exc:
            # LAN discovery is optional: a node without multicast still works through static peers and the base.
            log.warning("LAN discovery disabled: %s", exc)
            self._beacons = None

    def _start_base(self, spec: str) -> None:
        from .base_client import BaseClient

        assert self._transport is not None
        transport = self._transport
        client: Any = None

        def on_state(state: str) -> None:
            self._on_base_state()

        def on_peer_info(address: bytes, public_key: bytes, endpoints: list[Endpoint], punch: bool) -> None:
            relay = RelayEndpoint(client.key, address)
            self._learn(address, [*endpoints, relay], public_key, "base")

        def on_relayed(src: bytes, datagram: bytes) -> None:
            # The base stamped ``src`` from its authenticated login; the datagram is still end-to-end sealed.
            self._on_datagram(datagram, RelayEndpoint(client.key, src))

        client = BaseClient(
            self.identity,
            spec,
            self.config.state_dir,
            loop=asyncio.get_running_loop(),
            timers=self.timers,
            counters=self.counters,
            send_udp=transport.send,
            on_peer_info=on_peer_info,
            on_relayed=on_relayed,
            lan_endpoints=lambda: list(self._local_endpoints),
            hostname=self.config.hostname,
            on_state=on_state,
            index=self._index,
            clock=self._clock,
            wallclock=self._wallclock,
        )
        self._bases[client.key] = client
        self._base_tasks.append(asyncio.get_running_loop().create_task(client.run()))

    def _on_base_state(self) -> None:
        best = ("none", "")
        rank = {"none": 0, "tcp": 1, "udp": 2}
        for c in self._bases.values():
            if rank.get(c.state, 0) > rank[best[0]]:
                best = (c.state, c.address_text)
        self.set_base_status(*best)
        if best[0] != "none":
            # (Re)connected, or the base now knows our UDP mapping: ask again about every peer that has no
            # session or only a relayed one, so both sides get fresh endpoints and punch towards each other.
            for peer in list(self._peers.values()):
                if peer.current is None or peer.paths.kind in (KIND_RELAY, KIND_NONE):
                    self._query_bases(peer, self._clock(), force=True)

    def _relay_via_base(self, datagram: bytes, endpoint: RelayEndpoint) -> None:
        client = self._bases.get(endpoint.base_key)
        if client is None or not client.relay(endpoint.peer_address, datagram):
            self.counters.inc("no_path")

    def _query_bases(self, peer: Peer, now: float, *, force: bool = False) -> None:
        """Ask the base(s) for a peer's key and endpoints (they also tell the peer to punch towards us)."""
        if not self._bases or (not force and now - peer.last_query < self.timers.probe_interval / 5):
            return
        peer.last_query = now
        for client in self._bases.values():
            client.query(peer.address)

    def _refresh_local(self, addrs: list) -> None:
        self._local_networks = [a.network for a in addrs]
        port = self._transport.local_port if self._transport is not None else 0
        self._local_endpoints = [
            (str(a.ip), port) for a in addrs if not a.ip.is_link_local and not a.ip.is_loopback and port
        ]

    def stop(self) -> None:
        """Stop everything; idempotent and safe from any thread except the engine's own."""
        if self._loop_thread is not None and threading.current_thread() is self._loop_thread:
            raise EngineError("stop() cannot run on the engine's own thread (e.g. inside a listener)")
        with self._lock:
            if self._state in ("stopped", "new"):
                self._state = "stopped"
                return
            self._state = "stopping"
        self._teardown()
        self._state = "stopped"
        log.info("engine stopped")

    def _teardown(self) -> None:
        """Undo whatever :meth:`_start` did, in reverse order; tolerant of partial starts."""
        if self._transport is None:
            self._transport = self._given_transport  # the engine owns a transport it was given
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
        if self._warmer is not None:
            self._datapath.on_exchange = None
            self._warmer.stop()
            self._warmer = None
        if self._datapath is not None:
            with contextlib.suppress(Exception):
                self._datapath.stop_tun()
        if self._tun is not None:
            with contextlib.suppress(Exception):
                self._tun.close()
            self._tun = None
        loop, thread = self._loop, self._loop_thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown_on_loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        if loop is not None and not loop.is_running():
            with contextlib.suppress(Exception):
                loop.close()
        for peer in list(self._peers.values()):
            self._clear_sessions(peer)
        self._loop_thread = None
        if self._hosts is not None:
            try:
                self._hosts.close()  # names must not point at a dead overlay
            except Exception as exc:
                log.warning("hosts file block not removed: %s", exc)
            self._hosts = None

    def _shutdown_on_loop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self._endpoint_cache_path is not None:
            self._save_endpoints(self._endpoint_snapshot())
        if self._beacons is not None:
            with contextlib.suppress(Exception):
                self._beacons.close()
            self._beacons = None
        for client in self._bases.values():
            with contextlib.suppress(Exception):
                client.close()
        self._relay_sender = None
        if self._websetup is not None:
            with contextlib.suppress(Exception):
                self._websetup.close()
        for peer in self._peers.values():
            for _nonce, (_t, fut) in list(peer.pings.items()):
                if not fut.done():
                    fut.set_exception(EngineError("engine stopped"))
            peer.pings.clear()

    # ========================================================================= public API
    def peers(self) -> list[PeerInfo]:
        """Snapshot of every known peer."""
        now = self._clock()
        out = []
        wl = self.whitelist
        entries = wl.entries() if wl is not None else {}
        for peer in list(self._peers.values()):
            with peer.lock:
                kp = peer.current
                cur = peer.paths.current
                out.append(
                    PeerInfo(
                        address=peer.address,
                        hostname=entries.get(peer.address) or peer.hostname,
                        path=cur.kind if (cur is not None and kp is not None) else KIND_NONE,
                        endpoint=format_endpoint(cur.endpoint) if cur is not None else "",
                        rtt_ms=round(cur.rtt * 1000, 3) if cur is not None and cur.rtt is not None else 0.0,
                        is_whitelisted=wl.is_allowed(peer.address) if wl is not None else False,
                        is_secure=kp is not None,
                        last_seen=peer.last_seen_wall,
                        rx_bytes=peer.rx_bytes,
                        tx_bytes=peer.tx_bytes,
                        session_age=(now - peer.session_started) if kp is not None else 0.0,
                        cipher=kp.cipher if kp is not None else "",
                    )
                )
        out.sort(key=lambda p: p.address)
        return out

    def status(self) -> StatusInfo:
        """Snapshot of this node."""
        wl = self.whitelist
        return StatusInfo(
            address=self.address,
            hostname=self.config.hostname,
            base=self._base_status[0],
            base_address=self._base_status[1],
            whitelist_enabled=wl.enabled if wl is not None else self.config.whitelist_enabled,
            counters=self.counters.snapshot(),
            websetup=self._websetup.status() if self._websetup is not None else {"enabled": False},
            dds_restart_needed=self.dds_restart_needed,
            failure=self.failure,
            warning=self.warning,
        )

    def _on_tun_failure(self, exc: Exception) -> None:
        """The TUN reader stopped on an error while the engine runs: record why, log it, tell the listeners.

        Called on the TUN thread.  Nothing can be sent or received any more, so the daemon exits with this
        reason and the ROS node reports it (status ``failure``, an ERROR diagnostic) instead of looking healthy.
        """
        from .tun import TunError

        reason = str(exc) if isinstance(exc, TunError) else f"the TUN reader failed: {exc!r}"
        self.failure = reason
        trace = None if isinstance(exc, TunError) else exc  # a bug, not a device gone: keep its traceback
        log.error("%s; the overlay can no longer send or receive", reason, exc_info=trace)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._notify, "status")

    def ping(self, address: bytes, timeout: float = 2.0) -> float:
        """Round-trip time (seconds) to a peer over its current session and path.

        This is an authenticated Probe/ProbeReply exchange inside the session,
        not ICMPv6: it measures the overlay path without needing the TUN, and
        works for in-memory engines.  Raises :class:`EngineError` if there is
        no session or no reply within ``timeout``.
        """
        if self._state != "running" or self._loop is None:
            raise EngineError("engine is not running")
        if threading.current_thread() is self._loop_thread:
            raise EngineError("ping() blocks; call it from another thread")
        fut = asyncio.run_coroutine_threadsafe(self._ping(bytes(address), timeout), self._loop)
        try:
            return fut.result(timeout + 1.0)
        except TimeoutError:
            fut.cancel()
            raise EngineError(f"no reply from {format_address(address)} within {timeout} s") from None

    def add_listener(self, fn: Callable[[str], None]) -> None:
        """``fn(kind)`` with kind 'peers' | 'status' | 'whitelist', called on the control thread."""
        self._listeners.append(fn)

    def inject_packet(self, packet: bytes) -> None:
        """In-memory mode: send an IPv6 packet as if it had been read from the TUN."""
        if self._datapath is None or self._state != "running":
            raise EngineError("engine is not running")
        self._datapath.send_packets([bytes(packet)])

    def inject_reads(self, reads: list[bytes]) -> None:
        """In-memory mode: send TUN reads with virtio-net headers (TSO/USO super-packets) as if read from the TUN."""
        if self._datapath is None or self._state != "running":
            raise EngineError("engine is not running")
        self._datapath.send_reads([bytes(r) for r in reads])

    def add_candidates(
        self, address: bytes, endpoints: list[AnyEndpoint], *, public_key: bytes | None = None, source: str = "base"
    ) -> None:
        """Endpoint hints (and optionally the verified key) for a peer, from the base or LAN discovery.

        Thread-safe.  Hints are only probed: nothing is sent on them as data before an authenticated round trip.
        """
        self._post(self._learn, bytes(address), list(endpoints), public_key, source)

    def deliver_datagram(self, datagram: bytes, endpoint: AnyEndpoint) -> None:
        """A datagram that reached us another way (relayed by the base): handle it like one from the socket."""
        self._on_datagram(datagram, endpoint)

    def set_relay_sender(self, fn: Callable[[bytes, RelayEndpoint], None] | None) -> None:
        """Where datagrams for a :class:`RelayEndpoint` go (the base client); None = no relay."""
        self._relay_sender = fn

    def set_base_status(self, kind: str, address: str) -> None:
        """Base connection state for :meth:`status` ('none' | 'tcp' | 'udp')."""
        if self._base_status != (kind, address):
            self._base_status = (kind, address)
            self._post(self._notify, "status")

    @property
    def offload_active(self) -> bool:
        """True if the TUN runs with virtio-net headers (TSO on read, GRO on write)."""
        return bool(self._tun is not None and self._tun.vnet_hdr)

    @property
    def local_port(self) -> int:
        return self._transport.local_port if self._transport is not None else 0

    # ========================================================================= datapath hooks (any thread)
    def send_datagrams(self, datagrams: list[bytes], endpoint: AnyEndpoint) -> None:
        if isinstance(endpoint, RelayEndpoint):
            relay = self._relay_sender
            if relay is None:
                self.counters.inc("no_path", len(datagrams))
                return
            for d in datagrams:
                relay(d, endpoint)
            return
        transport = self._transport
        if transport is not None:
            send_many(transport, datagrams, endpoint)

    def send_segmented(self, parts: list[bytes | memoryview], segment: int, endpoint: AnyEndpoint) -> None:
        """Datagrams of ``segment`` bytes (the last shorter) given as buffers back to back: one GSO send on UDP.

        Super-packet fragments come this way, as one buffer (:func:`~.wire.super_fragment_run`), so a
        UDP transport sends them in one ``sendmsg``; a transport without ``send_segmented`` gets them
        cut into datagrams.
        """
        transport = self._transport
        segmented = getattr(transport, "send_segmented", None)
        if segmented is not None and not isinstance(endpoint, RelayEndpoint):
            segmented(parts, segment, endpoint)
            return
        buf = b"".join(parts)
        self.send_datagrams([buf[off : off + segment] for off in range(0, len(buf), segment)], endpoint)

    def send_control(self, datagram: bytes, endpoint: AnyEndpoint) -> None:
        """One handshake, Hello, probe or keepalive: like data, but never waits long on a full socket.

        These are sent from the control loop, which must not stall behind a saturated data path.
        """
        if isinstance(endpoint, RelayEndpoint):
            self.send_datagrams([datagram], endpoint)
        elif self._transport is not None:
            self._transport.send(datagram, endpoint)

    def need_handshake(self, address: bytes, packet: bytes | None) -> None:
        self._post(self._on_need_handshake, address, packet)

    def keypair_confirmed(self, peer: Peer) -> None:
        self._post(self._on_session_up, peer)

    def probe_reply(self, peer: Peer, endpoint: AnyEndpoint, nonce: bytes, now: float) -> None:
        self._post(self._on_probe_reply, peer, endpoint, nonce, now)

    def base_plaintext(self, owner: Any, keypair: Keypair, plaintext: bytes, endpoint: AnyEndpoint) -> None:
        handler = getattr(owner, "on_plaintext", None)
        if handler is None:
            self.counters.inc("malformed")
            return
        handler(plaintext, endpoint)

    def path_kind(self, endpoint: AnyEndpoint) -> str:
        return classify(endpoint, self._local_networks, from_beacon=endpoint in self._beacon_endpoints)

    def is_allowed(self, address: bytes) -> bool:
        wl = self.whitelist
        return wl is not None and wl.is_allowed(address) and address != self.address

    # ========================================================================= receive dispatch
    def _on_datagram(self, data: bytes, src: AnyEndpoint) -> None:
        """Runs on the transport's receive thread: Data inline, everything else to the loop (bounded)."""
        if len(data) < 4:
            self.counters.inc("malformed")
            return
        if self._scoped and not isinstance(src, RelayEndpoint):
            src = self._scoped.get(src, src)
        word = int.from_bytes(data[:4], "little")
        if word in (MSG_DATA, MSG_DATA_SUPER):
            assert self._datapath is not None
            self._datapath.receive(data, src)
            return
        if word not in _CONTROL_WORDS:
            self.counters.inc("malformed")
            return
        # Two single-writer counters (receive threads / loop) instead of one shared one: no lost updates.
        backlog = self._control_posted - self._control_done
        if backlog >= MAX_CONTROL_BACKLOG and (
            backlog >= 2 * MAX_CONTROL_BACKLOG
            or (src not in self._known_sources and not self._cookie_checked(word, data, src))
        ):
            self.counters.inc("rate_limited")  # a full queue still admits known and cookie-proven sources
            return
        with self._post_lock:
            self._control_posted += 1
        self._post(self._on_control, word, data, src)

    def _on_batch(self, batch: list[tuple[bytes | DatagramRun, Endpoint]]) -> None:
        """A GRO batch from the UDP socket: Data messages opened together, the rest one by one.

        A :class:`DatagramRun` (a GRO buffer of DataSuper fragments, kept whole) is data.
        """
        if len(batch) == 1 and type(batch[0][0]) is not DatagramRun:  # light traffic: no filtering pass
            self._on_datagram(*batch[0])  # type: ignore[arg-type]
            return
        if self._scoped:
            batch = [(d, self._scoped.get(src, src)) for d, src in batch]
        data = [item for item in batch if type(item[0]) is DatagramRun or item[0][:4] in _DATA_WORDS]
        if data:
            assert self._datapath is not None
            self._datapath.receive_many(data)
        if len(data) != len(batch):
            for d, src in batch:
                if type(d) is not DatagramRun and d[:4] not in _DATA_WORDS:
                    self._on_datagram(d, src)

    def _cookie_checked(self, word: int, data: bytes, src: AnyEndpoint) -> bool:
        """For a stranger's datagram that meets a full control queue: True for an initiation with a valid mac2.

        With ``handshake_cookies``, an initiation without one, with a valid mac1, is answered here with a
        cookie reply (the queue being full is load as much as an empty budget is), so a newcomer can
        prove its address even while a flood keeps the queue full.  Anything else: False (dropped).
        """
        if word != MSG_HANDSHAKE_INIT:
            return False
        screened = self._screen_initiation(data, src)
        if isinstance(screened, str):
            return False
        body, proven = screened
        if not proven and self.config.handshake_cookies:
            self._send_cookie_reply(body, src)
        return proven

    def _screen_initiation(self, data: bytes, src: AnyEndpoint) -> tuple[bytes, bool] | str:
        """``(the 168-byte initiation, whether its mac2 proves src)``, or the drop reason.

        The checks before any Diffie-Hellman: two BLAKE2s at most, so a receive thread may run them too.
        """
        body, mac2 = split_mac2(data)
        if len(body) != HANDSHAKE_INIT_LEN:
            return "malformed"
        if not hs.check_mac1(self.identity, body):
            return "bad_mac"
        cookies = self._cookies
        return body, mac2 is not None and cookies is not None and cookies.check_mac2(body, mac2, src)

    def _send_cookie_reply(self, initiation: bytes, src: AnyEndpoint) -> None:
        assert self._cookies is not None
        self.counters.inc("cookie_replies_sent")
        self.send_control(self._cookies.reply(initiation, src), src)

    def _on_control(self, word: int, data: bytes, src: AnyEndpoint) -> None:
        self._control_done += 1
        if self._state not in ("running", "starting"):
            return
        try:
            if word == MSG_HANDSHAKE_INIT:
                self._on_initiation(data, src)
            elif word == MSG_HANDSHAKE_RESP:
                self._on_response(data, src)
            elif word == MSG_COOKIE_REPLY:
                self._on_cookie_reply(data)
            else:
                self._on_hello(data, src)
        except Exception:
            log.exception("control message handling failed")

    # ========================================================================= peers
    def _get_peer(self, address: bytes, *, create: bool, force: bool = False) -> Peer | None:
        peer = self._peers.get(address)
        if peer is None and create and address != self.address and address[:2] == OVERLAY_PREFIX:
            if not force and len(self._peers) >= MAX_PEERS:
                victim = self._evictable()
                if victim is None:
                    self.counters.inc("rate_limited")
                    return None
                # Half-open strangers (whitelist disabled) must not lock out a real newcomer.
                self._clear_sessions(victim)
                self._peers.pop(victim.address, None)
            peer = Peer(address)
            peer.paths.stale_after = self.timers.rekey_timeout
            self._peers[address] = peer
        return peer

    def _evictable(self) -> Peer | None:
        """The oldest peer that holds nothing worth keeping: not static, not listed, no session, no attempt."""
        listed = self.whitelist.entries() if self.whitelist is not None else {}
        for peer in self._peers.values():  # insertion order: oldest first
            if (
                not peer.static
                and peer.current is None
                and peer.handshake_started is None
                and not peer.staged
                and peer.address not in listed
            ):
                return peer
        return None

    def _learn(self, address: bytes, endpoints: list[AnyEndpoint], public_key: bytes | None, source: str) -> None:
        """Endpoint hints from the base or a beacon: remember them and start a handshake if the peer is allowed."""
        if not self.is_allowed(address):
            if source == "beacon" and public_key is not None and endpoints:
                from .identity import address_from_pubkey

                if address_from_pubkey(public_key) == address:
                    self._remember_unlisted_beacon(address, public_key, endpoints[0])
            return
        peer = self._get_peer(address, create=True)
        if peer is None:
            return
        if public_key is not None:
            from .identity import address_from_pubkey

            if address_from_pubkey(public_key) != address:
                self.counters.inc("bad_id")
                return
            if peer.public_key is None:
                peer.public_key = public_key
        now = self._clock()
        with peer.lock:
            for ep in endpoints:
                kind = KIND_RELAY if isinstance(ep, RelayEndpoint) else self.path_kind(ep)
                if source == "beacon" and not isinstance(ep, RelayEndpoint):
                    if len(self._beacon_endpoints) > 4096:
                        self._beacon_endpoints.clear()
                    self._beacon_endpoints.add(ep)
                    kind = "lan"
                if not isinstance(ep, RelayEndpoint) and "%" in ep[0] and len(self._scoped) < 1024:
                    # The socket reports link-local sources without their scope; map them back so
                    # replies (and the path table) keep the interface.
                    self._scoped[(ep[0].split("%", 1)[0], ep[1])] = ep
                peer.paths.add_candidate(ep, kind, source, now)
        if peer.current is None:
            self._start_handshake(peer)
        elif source in ("beacon", "base"):
            self._probe_round(peer, now)

    # ------------------------------------------------------------------ endpoint cache (endpoint_cache.py)
    def _offer_cached_endpoints(self) -> None:
        """At start: where each allowed peer was last reached directly, offered like a base hint (probed only)."""
        try:
            cached = endpoint_cache.load(self._endpoint_cache_path)
        except endpoint_cache.EndpointCacheError as exc:
            log.warning("%s; starting without it (it is written again once peers are reached)", exc)
            cached = {}
        self._cached_endpoints = cached
        for address, endpoints in cached.items():
            if address != self.address:
                self._learn(address, endpoints, None, "cache")

    def _endpoint_snapshot(self) -> dict[bytes, list[Endpoint]]:
        """Each allowed peer's validated direct paths, the current one first; the older entry for peers not met."""
        out: dict[bytes, list[Endpoint]] = {}
        for peer in list(self._peers.values()):
            if not self.is_allowed(peer.address):
                continue
            with peer.lock:
                current = peer.paths.current
                valid = [p for p in peer.paths.paths.values() if p.validated and type(p.endpoint) is tuple]
            valid.sort(key=lambda p: (p is not current, -p.last_auth_rx))
            if valid:
                out[peer.address] = [p.endpoint for p in valid[: endpoint_cache.MAX_ENDPOINTS]]
        for address, endpoints in self._cached_endpoints.items():
            if address not in out and self.is_allowed(address):
                out[address] = endpoints
        return out

    def _save_endpoints(self, snapshot: dict[bytes, list[Endpoint]]) -> None:
        """Write the cache (atomic, 0600); a failure is a warning: the cache only saves time after a restart."""
        try:
            endpoint_cache.save(self._endpoint_cache_path, snapshot)
        except OSError as exc:
            # Once per distinct error: a read-only state directory (an immutable robot image) must not
            # repeat the same warning every ENDPOINT_SAVE_INTERVAL.
            if str(exc) != self._cache_save_error:
                self._cache_save_error = str(exc)
                log.warning(
                    "endpoint cache %s not written (%s); after a restart peers are found the usual way",
                    self._endpoint_cache_path,
                    exc,
                )
            return
        self._cache_save_error = ""
        self._cached_endpoints = snapshot

    def _remember_unlisted_beacon(self, address: bytes, public_key: bytes, endpoint: Endpoint) -> None:
        """Keep a bounded cache of LAN neighbours we may be asked to whitelist (oldest evicted)."""
        cache = self._unlisted_beacons
        cache.pop(address, None)
        if len(cache) >= MAX_UNLISTED_BEACONS:
            cache.pop(next(iter(cache)))
        cache[address] = (public_key, endpoint, self._clock())

    def _on_beacon(self, address: bytes, public_key: bytes, endpoint: Endpoint) -> None:
        self._learn(address, [endpoint], public_key, "beacon")

    def _on_need_handshake(self, address: bytes, packet: bytes | None) -> None:
        if not self.is_allowed(address):
            return
        peer = self._get_peer(address, create=True)
        if peer is None:
            return
        if packet is not None:
            if peer.current is not None and peer.paths.endpoint is not None:
                assert self._datapath is not None
                self._datapath.send_packets([packet])  # the session came up meanwhile
                return
            peer.stage(packet)
        kp = peer.current
        if kp is None or peer.paths.endpoint is None or kp.needs_rekey(self._clock(), self.timers):
            self._start_handshake(peer)

    def _on_whitelist_change(self, kind: str, address: bytes | None) -> None:
        """Whitelist listener (any thread): tear down removed peers within a tick, start added ones."""
        if self._datapath is not None:  # at once: the lone-packet paths keep the old verdict until this
            self._datapath.drop_lanes()
        self._post(self._apply_whitelist, kind, address)

    def _apply_whitelist(self, kind: str, address: bytes | None) -> None:
        if kind == "add" and address is not None and address != self.address:
            peer = self._get_peer(address, create=True, force=True)
            if peer is not None:
                assert self.whitelist is not None
                peer.hostname = self.whitelist.entries().get(address, "") or peer.hostname
                seen = self._unlisted_beacons.pop(address, None)
                if seen is not None and self._clock() - seen[2] <= self.timers.probe_interval:
                    self._learn(address, [seen[1]], seen[0], "beacon")  # connects at once
                else:
                    self._start_handshake(peer)  # known paths, or asks the base; else the next beacon
        else:
            for peer in list(self._peers.values()):
                if not self.is_allowed(peer.address):
                    self._forget(peer)
        if self._hosts is not None and self._state == "running":
            self._write_hosts("whitelist", self.whitelist.hostnames())
        self._notify("whitelist")
        self._notify("peers")

    def _forget(self, peer: Peer) -> None:
        """Tear down every session with a peer that is no longer allowed, and forget it unless static."""
        self._clear_sessions(peer)
        if not peer.static:
            self._peers.pop(peer.address, None)
        log.info("peer %s removed (not whitelisted)", format_address(peer.address))

    def _clear_sessions(self, peer: Peer) -> None:
        with peer.lock:
            for kp in peer.keypairs():
                self._index.remove(kp.local_index, kp)
            peer.current = peer.previous = peer.next = None
            if peer.handshake is not None:
                self._index.remove(peer.handshake.local_index, peer.handshake)
                peer.handshake = None
            peer.handshake_started = None
            peer.staged.clear()
            peer.paths.invalidate()
            for _nonce, (_t, fut) in list(peer.pings.items()):
                if not fut.done():
                    fut.set_exception(EngineError("session torn down"))
            peer.pings.clear()

    # ========================================================================= handshake: initiator
    def _start_handshake(self, peer: Peer) -> None:
        """Begin a series of attempts (no-op if one is already running or we gave up recently)."""
        now = self._clock()
        if peer.handshake_started is not None or now < peer.next_attempt:
            return
        if not peer.paths.paths:
            self._query_bases(peer, now)  # nowhere to send yet: ask the base, or wait for a beacon
            return
        peer.handshake_started = now
        self._attempt(peer, now)

    def _attempt(self, peer: Peer, now: float) -> None:
        """One attempt: a Hello if we do not know the key yet, else an initiation, to every candidate."""
        endpoints = [p.endpoint for p in peer.paths.candidates()]
        peer.attempt_sent_at = now
        peer.attempt_jitter = self._rng.uniform(0, self.timers.rekey_timeout / 15)
        if peer.public_key is None:
            msg = build_hello(self.identity, peer.address, self._hello_timestamp())
            for ep in endpoints:
                self.send_control(msg, ep)
            peer.hello_sent_at = now
            return
        if peer.handshake is not None:
            self._index.remove(peer.handshake.local_index, peer.handshake)
        pending = PendingHandshake(peer, None, 0, now, b"")
        idx = self._index.reserve(pending)
        try:
            msg, state = hs.create_initiation(
                self.identity, peer.public_key, idx, hs.tai64n(self._wallclock()), self._local_features()
            )
        except Exception:
            self._index.remove(idx, pending)
            raise
        if peer.cookie is not None and now - peer.cookie_at < COOKIE_SECRET_LIFETIME:
            msg = with_mac2(msg, peer.cookie)  # the responder was under load: prove our address
        pending.state, pending.local_index, pending.message = state, idx, msg
        peer.handshake = pending
        # The same initiation on every path: the responder answers the first copy only.
        for ep in endpoints:
            self.send_control(msg, ep)
        self.counters.inc("handshakes_sent")

    def _ahead_of_us(self, tai64n: bytes) -> bool:
        """True if a peer's TAI64N timestamp is further in the future than any sane clock skew."""
        return tai64n > hs.tai64n(self._wallclock() + self.timers.rekey_attempt_time)

    def _ahead_of_us_ms(self, ms: int) -> bool:
        return ms > (self._wallclock() + self.timers.rekey_attempt_time) * 1000

    def _hello_timestamp(self) -> int:
        ts = max(int(self._wallclock() * 1000), self._last_hello_ts + 1)
        self._last_hello_ts = ts
        return ts

    def _on_cookie_reply(self, data: bytes) -> None:
        """A responder under load sent a cookie for our initiation: keep it, and repeat the attempt with mac2.

        The first cookie of an attempt repeats it at once (the newcomer gets in within a round trip);
        a cookie answering an initiation that already carried mac2 (ours had gone stale) is kept for
        the next scheduled attempt, so replies cannot drive us into a fast loop.
        """
        c = self.counters
        try:
            reply = parse_cookie_reply(data)
        except Malformed as exc:
            c.inc(exc.reason)
            return
        pending = self._index.lookup(reply.receiver_index)
        if type(pending) is not PendingHandshake or pending.state is None:
            c.inc("no_session")
            return
        peer = pending.peer
        mac1 = pending.message[HANDSHAKE_INIT_LEN - MAC_LEN : HANDSHAKE_INIT_LEN]
        try:
            cookie = open_cookie_reply(reply, pending.state.peer_static, mac1)
        except CookieError:
            c.inc("bad_mac")
            return
        c.inc("cookie_replies_received")
        now = self._clock()
        peer.cookie, peer.cookie_at = cookie, now
        if len(pending.message) == HANDSHAKE_INIT_LEN and peer.handshake is pending:
            self._attempt(peer, now)

    def _on_response(self, data: bytes, src: AnyEndpoint) -> None:
        if len(data) < 12:
            self.counters.inc("malformed")
            return
        receiver = int.from_bytes(data[8:12], "little")
        owner = self._index.get(receiver)
        if not isinstance(owner, PendingHandshake):
            handler = getattr(owner, "on_handshake_response", None)
            if handler is not None:  # a base connection's handshake
                handler(data, src)
            else:
                self.counters.inc("unknown_peer")
            return
        peer = owner.peer
        try:
            km = hs.consume_response(owner.state, data)
        except hs.HandshakeError as exc:
            self.counters.inc(_hs_reason(exc))
            return
        except Malformed as exc:
            self.counters.inc(exc.reason)
            return
        if not self.is_allowed(peer.address) or km.peer_address != peer.address:
            self.counters.inc("not_whitelisted")
            return
        now = self._clock()
        src = _named_by_key(src, peer.address)
        kp = Keypair(km, now, peer, timers=self.timers, clock=self._clock)
        self._agree_super(peer, kp, km)
        with peer.lock:
            self._index.set(kp.local_index, kp)  # replaces the PendingHandshake at the same index
            # A responder keypair in ``next`` (simultaneous handshakes) is kept: the other side may
            # already be sending on it, and it is promoted if it gets confirmed.
            dropped = [peer.previous] if peer.previous is not None else []
            peer.previous = peer.current
            peer.current = kp
            peer.handshake = None
            peer.session_started = now
            peer.paths.on_authenticated(src, self.path_kind(src), now, rtt=now - owner.sent_at)
        for k in dropped:
            self._index.remove(k.local_index, k)
        peer.last_rx = now
        if self._ahead_of_us(peer.last_init_timestamp):
            # The peer just proved it is alive with its current clock: forget the far-future mark
            # so its own initiations are accepted again (older captured ones stay rejected).
            peer.last_init_timestamp = hs.tai64n(self._wallclock())
        self.counters.inc("handshakes_completed")
        # Key confirmation: the responder switches to this keypair only once it receives on it.
        assert self._datapath is not None
        self._datapath.send_plaintext(peer, b"")
        self._on_session_up(peer)

    def _on_session_up(self, peer: Peer) -> None:
        """A keypair became current (either role): flush staged packets, probe the other paths, tell listeners."""
        peer.handshake_started = None
        peer.next_attempt = 0.0
        staged = peer.take_staged()
        if staged:
            assert self._datapath is not None
            self._datapath.send_packets(staged)
        self._probe_round(peer, self._clock())
        self._notify("peers")

    # ========================================================================= handshake: responder
    def _take_init_token(self, now: float, i: int) -> bool:
        """Diffie-Hellman budget ``i``: 0 for strangers, 1 for sources we know (a peer's endpoints), 2 for proven ones.

        A flood of initiations from strangers then cannot starve a known peer that restarts or rekeys,
        nor a newcomer that proved its source address with a cookie (cookie.py).
        """
        rate = INITIATION_RATE
        tokens = min(rate, self._init_tokens[i] + (now - self._init_tokens_at[i]) * rate)
        self._init_tokens_at[i] = now
        if tokens < 1:
            self._init_tokens[i] = tokens
            return False
        self._init_tokens[i] = tokens - 1
        return True

    def _on_initiation(self, data: bytes, src: AnyEndpoint) -> None:
        """Responder: mac1 -> decrypt -> identity -> whitelist -> timestamp -> respond.  Any failure = silence."""
        c = self.counters
        c.inc("handshakes_received")
        now = self._clock()
        screened = self._screen_initiation(data, src)
        if isinstance(screened, str):
            c.inc(screened)
            return
        data, proven = screened
        known = src in self._known_sources
        cookies = self.config.handshake_cookies
        if proven:  # a budget of its own, and a limit per source so one cannot take it all
            admitted = self._proven_sources.take(src, now) and self._take_init_token(now, 2)
        elif known:
            admitted = self._take_init_token(now, 1)
        else:
            # Under load every stranger still draws on the budget, so the load lasts while the demand
            # exceeds it, but none wins a token that refilled between two flood initiations: each gets
            # a cookie and must prove its address first.
            took = self._take_init_token(now, 0)
            if cookies and not took:
                self._under_load_until = now + UNDER_LOAD_HOLD
            admitted = took and not (cookies and now < self._under_load_until)
        if not admitted:
            c.inc("rate_limited")
            if cookies and not known and not proven:
                self._send_cookie_reply(data, src)  # under load: a stranger must first prove its address
            return
        try:
            st = hs.consume_initiation(self.identity, data)
        except hs.HandshakeError as exc:
            c.inc(_hs_reason(exc))
            return
        except Malformed as exc:
            c.inc(exc.reason)
            return
        addr = st.peer_address
        if addr == self.address:
            c.inc("bad_id")
            return
        if not self.is_allowed(addr):
            c.inc("not_whitelisted")
            return
        peer = self._get_peer(addr, create=True)
        if peer is None:
            return
        if peer.public_key is not None and peer.public_key != st.peer_public_key:
            c.inc("bad_id")  # same address, different key: a hash collision attempt
            return
        if st.timestamp <= peer.last_init_timestamp:
            c.inc("replay")  # never answered: it may be a replay
            if self._ahead_of_us(peer.last_init_timestamp):
                # The newest timestamp we hold for this peer is in our future: its clock was ahead and
                # has been corrected (e.g. after a restart), so its fresh initiations look old.  Prove
                # liveness our way instead: our own initiation to its known endpoints, which only the
                # real peer can answer.  A live session is not touched until that completes.
                self._start_handshake(peer)
            return
        peer.last_init_timestamp = st.timestamp
        peer.public_key = st.peer_public_key
        src = _named_by_key(src, addr)
        placeholder = object()
        idx = self._index.reserve(placeholder)
        try:
            msg, km = hs.create_response(st, idx, self._local_features())
        except Exception:
            self._index.remove(idx, placeholder)
            raise
        kp = Keypair(km, now, peer, timers=self.timers, clock=self._clock)
        self._agree_super(peer, kp, km)
        with peer.lock:
            self._index.set(idx, kp)
            old_next = peer.next
            peer.next = kp
            peer.paths.add_candidate(src, self.path_kind(src), "handshake", now)
        if old_next is not None:
            self._index.remove(old_next.local_index, old_next)
        self.send_control(msg, src)

    # ========================================================================= key discovery (Hello)
    def _on_hello(self, data: bytes, src: AnyEndpoint) -> None:
        """A signed key announcement; answered (once, rate-limited) only if the sender is whitelisted."""
        c = self.counters
        try:
            hello = parse_hello(data)
        except Malformed as exc:
            c.inc(exc.reason)
            return
        if hello.target != self.address or hello.address == self.address:
            c.inc("malformed")
            return
        if not self.is_allowed(hello.address):
            c.inc("not_whitelisted")
            return
        peer = self._get_peer(hello.address, create=True)
        if peer is None:
            return
        if peer.public_key is not None and peer.public_key != hello.public_key:
            c.inc("bad_id")
            return
        if hello.timestamp_ms <= peer.last_hello_ts and not self._ahead_of_us_ms(peer.last_hello_ts):
            c.inc("replay")
            return
        peer.last_hello_ts = hello.timestamp_ms
        peer.public_key = hello.public_key
        now = self._clock()
        src = _named_by_key(src, hello.address)
        with peer.lock:
            peer.paths.add_candidate(src, self.path_kind(src), "hello", now)
        if not hello.flags & HELLO_FLAG_REPLY:
            # The sender is about to initiate; do not race it with our own initiation.
            peer.next_attempt = max(peer.next_attempt, now + self.timers.rekey_timeout)
        if not hello.flags & HELLO_FLAG_REPLY and now - peer.hello_replied_at >= self.timers.rekey_timeout / 2:
            peer.hello_replied_at = now
            reply = build_hello(self.identity, hello.address, self._hello_timestamp(), HELLO_FLAG_REPLY)
            self.send_control(reply, src)
        if peer.handshake_started is not None and peer.handshake is None:
            self._attempt(peer, now)  # we were waiting for this key

    # ========================================================================= paths and probes
    def _probe_round(self, peer: Peer, now: float) -> None:
        """An authenticated Probe on every candidate path (keeps NAT mappings open, finds better paths)."""
        if peer.current is None:
            return
        peer.last_probe_round = now
        assert self._datapath is not None
        for p in list(peer.paths.candidates()):
            nonce = secrets.token_bytes(8)
            with peer.lock:
                peer.paths.start_probe(p.endpoint, nonce, now)
            self._datapath.send_plaintext(peer, build_probe(nonce), p.endpoint)

    def _on_probe_reply(self, peer: Peer, endpoint: AnyEndpoint, nonce: bytes, now: float) -> None:
        waiter = peer.pings.pop(nonce, None)
        if waiter is not None:
            sent, fut = waiter
            if not fut.done():
                fut.set_result(now - sent)
            return
        with peer.lock:
            before = peer.paths.current
            peer.paths.on_probe_reply(endpoint, nonce, self.path_kind(endpoint), now)
            changed = peer.paths.current is not before
        if changed:
            self._notify("peers")

    async def _ping(self, address: bytes, timeout: float) -> float:
        peer = self._peers.get(address)
        if peer is None or peer.current is None:
            raise EngineError(f"no session with {format_address(address)}")
        assert self._loop is not None and self._datapath is not None
        fut = self._loop.create_future()
        nonce = secrets.token_bytes(8)
        peer.pings[nonce] = (self._clock(), fut)
        if not self._datapath.send_plaintext(peer, build_probe(nonce)):
            peer.pings.pop(nonce, None)
            raise EngineError(f"no path to {format_address(address)}")
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise EngineError(f"no reply from {format_address(address)} within {timeout} s") from None
        finally:
            peer.pings.pop(nonce, None)

    # ========================================================================= timers (WireGuard's timers.go)
    def _tick_interval(self) -> float:
        t = self.timers
        return max(0.005, min(0.25, t.rekey_timeout / 10, t.keepalive_timeout / 10))

    async def _ticker(self) -> None:
        interval = self._tick_interval()
        last_nets = last_saved = last_iface = self._clock()
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            known = set()
            for peer in list(self._peers.values()):
                known.update(peer.paths.paths)
            self._known_sources = frozenset(known)
            for peer in list(self._peers.values()):
                try:
                    self._peer_timers(peer, now)
                except Exception:
                    log.exception("timers for %s failed", format_address(peer.address))
            if self._endpoint_cache_path is not None and now - last_saved >= ENDPOINT_SAVE_INTERVAL:
                last_saved = now
                snapshot = self._endpoint_snapshot()
                if snapshot != self._cached_endpoints:
                    await asyncio.get_running_loop().run_in_executor(None, self._save_endpoints, snapshot)
            if self._tun is not None and now - last_iface >= INTERFACE_CHECK_INTERVAL:
                last_iface = now
                await self._check_interface()
            if isinstance(self._transport, UdpTransport) and now - last_nets >= self.timers.probe_interval:
                last_nets = now
                addrs = await asyncio.get_running_loop().run_in_executor(
                    None, _interface_addresses, self.config.interface_name
                )
                self._refresh_local(addrs)
                for client in self._bases.values():
                    client.update_endpoints()

    async def _check_interface(self) -> None:
        """Is the TUN device still up, with our address?  Put a lost address back; report a device set down.

        Someone may set the device down (an operator, a network manager, ``netplan apply``).  While it is
        down every packet from a peer fails to be written (counted as ``tun_write_failed``), and IPv6
        removes our address and route, which setting it up again does not restore: without this check the
        overlay would stay cut while every peer looks connected.  We respect a device set down (it may be
        on purpose) but say so in ``status().warning``; once it is up, the address comes back here.
        """
        tun = self._tun
        if tun is None or self.failure:
            return
        errors = tun.write_errors  # only ever grows
        if errors > self._tun_write_errors:
            self.counters.inc("tun_write_failed", errors - self._tun_write_errors)
            self._tun_write_errors = errors
        from .tun import TunError

        address = format_address(self.address)
        try:
            up, has_address = await asyncio.get_running_loop().run_in_executor(None, tun.link_state)
            warning = ""
            if not up:
                warning = (
                    f"{tun.name} is down (it was set down outside husarnet_ros): the overlay is cut until "
                    f"'ip link set {tun.name} up'; husarnet_ros then puts its address back"
                )
            elif not has_address:
                await asyncio.get_running_loop().run_in_executor(None, tun.restore_address)
                log.warning("%s had lost its address %s (the link was down); put it back", tun.name, address)
        except TunError as exc:
            if tun.closed or self.failure:  # stopping, or deleted (the reader reports that)
                return
            warning = f"{tun.name} cannot be checked or repaired: {exc}"
        if self._set_warning("tun", warning):
            if not warning:
                log.info("%s is up with its address %s again", tun.name, address)
            self._notify("status")

    def _set_warning(self, cause: str, text: str) -> bool:
        """Set (or clear, with "") one cause of ``status().warning``; True when it changed.

        A new text is logged as a warning, so a condition that persists is logged once, not at every
        check.  The caller tells the listeners ("status") when this returns True.
        """
        with self._warning_lock:
            if self._warnings.get(cause, "") == text:
                return False
            if text:
                self._warnings[cause] = text
            else:
                del self._warnings[cause]
            self.warning = "; ".join(self._warnings[c] for c in sorted(self._warnings))
        if text:
            log.warning("%s", text)
        return True

    def _write_hosts(self, source: str, mapping: dict[str, bytes]) -> str:
        """Give the hosts block one source's names; a file we cannot write is a warning, not a failure.

        Peer hostnames are a convenience: peers stay reachable by address and their names are on the
        peers topic.  A normal user after setup-tun may not write /etc/hosts, so this must not keep
        the overlay down.  Every later change of names tries again; a success clears the warning.
        Returns the warning ("" on success).
        """
        from .hosts import HostsError

        hosts = self._hosts
        try:
            hosts.set_source(source, mapping)
        except (HostsError, ValueError, OSError) as exc:
            path = hosts.hosts_file.path
            warning = (
                f"hosts file {path} not updated ({exc}): peers are reachable by address only; run as root, "
                f"give this user write access to {path}, or set hosts_file to '' to leave it alone"
            )
        else:
            warning = ""
        if self._set_warning("hosts", warning) and self._state == "running":  # on the loop; at start, nobody asks
            self._notify("status")
        return warning

    def _websetup_hosts(self, mapping: dict[str, bytes]) -> None:
        """Websetup's host-add/rm: as :meth:`_write_hosts`, but failing, so the command's reply says so."""
        from .hosts import HostsError

        warning = self._write_hosts("websetup", mapping)
        if warning:
            raise HostsError(warning)

    @staticmethod
    def _path_unanswered(peer: Peer, now: float) -> float:
        """Seconds since data we sent on the current path went unanswered on it (0 while answered).

        Measured, like WireGuard's new-handshake timer, from the first send after the last authenticated
        packet on the path, not from the latest send (a steady stream would never let that age) and not
        from the last receipt (the first packet after a quiet minute is not a dead path).  Only the
        current path's receipts count: replies that still arrive another way (the relay's probe
        replies) must not keep a dead direct path.  The ticker sees a send within one tick.
        """
        cur = peer.paths.current
        if cur is None or peer.last_tx_data <= cur.last_auth_rx:
            peer.unanswered_since = 0.0
            return 0.0
        if not peer.unanswered_since or cur.last_auth_rx >= peer.unanswered_since:
            peer.unanswered_since = now  # a send after the last receipt, first seen at this tick
        return now - peer.unanswered_since

    def _peer_timers(self, peer: Peer, now: float) -> None:
        t = self.timers
        if not self.is_allowed(peer.address):
            if peer.keypairs() or peer.handshake is not None or peer.handshake_started is not None or not peer.static:
                self._forget(peer)
            return
        # Reject-after-time: old keys are dropped outright.
        expired = [kp for kp in peer.keypairs() if kp.expired(now, t)]
        if expired:
            with peer.lock:
                for kp in expired:
                    if peer.current is kp:
                        peer.current = None
                    if peer.previous is kp:
                        peer.previous = None
                    if peer.next is kp:
                        peer.next = None
                    self._index.remove(kp.local_index, kp)
            self._notify("peers")
        # Handshake retransmission every rekey_timeout (+ jitter); give up after rekey_attempt_time.
        if peer.handshake_started is not None:
            if now - peer.handshake_started >= t.rekey_attempt_time:
                log.info("handshake with %s gave up", format_address(peer.address))
                with peer.lock:
                    if peer.handshake is not None:
                        self._index.remove(peer.handshake.local_index, peer.handshake)
                        peer.handshake = None
                    peer.handshake_started = None
                    peer.staged.clear()
                peer.next_attempt = now + t.probe_interval
            elif now - peer.attempt_sent_at >= t.rekey_timeout + peer.attempt_jitter:
                self._attempt(peer, now)
            return
        kp = peer.current
        wanted = peer.static or (self.whitelist is not None and self.whitelist.enabled)
        if kp is None:
            if (wanted or peer.staged) and peer.next is None:
                if peer.paths.paths:
                    self._start_handshake(peer)
                else:
                    self._query_bases(peer, now)
            return
        # Rekey: the initiator after rekey_after_time; either side before the key is rejected.
        age = now - kp.created
        if kp.needs_rekey(now, t) or age >= t.reject_after_time - t.keepalive_timeout - t.rekey_timeout:
            self._start_handshake(peer)
            return
        # Sent data on the current path but heard nothing on it for keepalive + rekey_timeout: the path is
        # dead (a peer answers data with at least a keepalive within keepalive_timeout).  Fall back to the
        # next validated path (another address the peer speaks from, the relay); with none left the
        # session itself may be dead: renegotiate on every candidate.
        silent = self._path_unanswered(peer, now)
        if silent >= t.keepalive_timeout + t.rekey_timeout:
            peer.unanswered_since = 0.0
            dead = peer.paths.kind
            with peer.lock:
                peer.paths.invalidate(peer.paths.endpoint)
            peer.last_tx_data = 0.0
            # Logged: a path change the peer table shows only until the next one, and the reason for an
            # unscheduled handshake.
            after = peer.paths.kind if peer.paths.current is not None else "a new handshake"
            log.info(
                "%s: no answer on the %s path for %.1f s; now %s", format_address(peer.address), dead, silent, after
            )
            if peer.paths.current is None:
                self._start_handshake(peer)
            self._notify("peers")
            return
        # Keepalive: we received data and sent nothing back for keepalive_timeout.
        assert self._datapath is not None
        if peer.last_rx_data > peer.last_tx and now - peer.last_rx_data >= t.keepalive_timeout:
            self._datapath.send_plaintext(peer, b"")
        # Paths: re-probe every probe_interval (sooner while relayed), expire silent ones.
        kind = peer.paths.kind
        relayed = kind in (KIND_RELAY, KIND_NONE)
        if not relayed:
            peer.relayed_rounds = 0
        if now - peer.last_probe_round >= probe_interval_for(kind, peer.relayed_rounds, t.probe_interval):
            if relayed:
                # Still relayed: the endpoints we were given may be stale or incomplete (the base may
                # not have known a UDP mapping yet); a fresh query also makes the peer punch towards us.
                self._query_bases(peer, now)
                if peer.current is not None:  # a round is only sent (and counted) on a session
                    peer.relayed_rounds += 1
            self._probe_round(peer, now)
        with peer.lock:
            changed = peer.paths.expire(now, t.path_timeout)
        if changed:
            self._notify("peers")

    # ========================================================================= misc
    def _deliver(self, packets: list[bytes]) -> None:
        """Inbound IPv6 packets: to the TUN, or to ``on_packet`` in memory mode."""
        tun = self._tun
        if tun is not None:
            if len(packets) == 1:
                # Nothing to coalesce (the Coalescer gives a lone packet a plain header): no round trip
                # through it, which costs as much as the write itself on a cold CPU.
                tun.write_packet(packets[0])
            elif not tun.vnet_hdr:
                _write_all(tun, packets)
            else:
                # GRO: consecutive segments of one TCP flow become one super-packet write.
                co = Coalescer(vnet=True)
                for p in packets:
                    co.add(p)
                _write_all(tun, co.flush())
            return
        cb = self.on_packet
        if cb is not None:
            for p in packets:
                cb(p)

    def _deliver_super(self, supers: list[bytes]) -> None:
        """Inbound super-packets (virtio-net header + packet): one TUN write each, or split for ``on_packet``."""
        tun = self._tun
        if tun is not None and tun.vnet_hdr:
            _write_all(tun, supers)
            return
        packets: list[bytes] = []
        for p in supers:
            try:
                packets.extend(split_for_send(p, True, MAX_PACKET))
            except OffloadError:
                self.counters.inc("malformed")
        if packets:
            self._deliver(packets)

    def _agree_super(self, peer: Peer, kp: Keypair, km: hs.KeyMaterial) -> None:
        """Super-packets on ``kp`` iff both ends offered them in this authenticated handshake (either role)."""
        if km.peer_features & hs.FEATURE_OFFLOAD and self._local_features() & hs.FEATURE_OFFLOAD:
            peer.superpkt.agree(kp)

    def _local_features(self) -> int:
        """Handshake feature bits: the cipher's, plus FEATURE_OFFLOAD when we take super-packets."""
        dp = self._datapath
        return hs.local_features() | (hs.FEATURE_OFFLOAD if dp is not None and dp.super_packets else 0)

    def _notify(self, kind: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind)
            except Exception:
                log.exception("engine listener failed")

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _named_by_key(src: AnyEndpoint, address: bytes) -> AnyEndpoint:
    """A relayed source names the peer the *keys* authenticated, not whatever the base stamped."""
    if isinstance(src, RelayEndpoint) and src.peer_address != address:
        return RelayEndpoint(src.base_key, address)
    return src


def _hs_reason(exc: Exception) -> str:
    """Counter name for a handshake failure ('decrypt' is counted as a bad MAC)."""
    reason = getattr(exc, "reason", "malformed")
    return "bad_mac" if reason == "decrypt" else reason


def _write_all(tun: Any, packets: list[bytes]) -> None:
    """Write packets to the TUN; one the kernel refuses (malformed) is dropped like a router would."""
    for p in packets:
        try:
            tun.write(p)
        except OSError as exc:
            log.debug("TUN write failed: %s", exc)


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "PeerInfo",
    "StatusInfo",
    "parse_peer_spec",
]


def udp_bind_error(port: int, exc: OSError) -> str:
    """Why the underlay UDP port could not be opened, and what to do: the cause decides the advice."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"UDP port {port} is in use (another husarnet_ros instance?): stop it, or choose another "
            "udp_port (daemon: --udp-port; 0 takes any free port)"
        )
    if exc.errno == errno.EACCES:
        return f"UDP port {port} needs privileges (below 1024): run as root or choose a port from 1024 up"
    text = str(exc.strerror or exc)
    return text if str(port) in text else f"cannot open UDP port {port}: {text}"
