"""Node side of a base server: login, rendezvous queries, relay, and the UDP mapping.

The channel to the base is an ordinary Noise IK session (``handshake`` +
``session``), so every base->node message is accepted only if it opens under
the session's keys: a forged PEER_INFO or RELAYED from a spoofed base address
fails the AEAD and is dropped (``base_*`` counters), and the relayed source
address is the one the base stamped inside that authenticated envelope.

Sequence (docs/ARCHITECTURE.md "Base client"):

1. TCP connect; datagrams are framed with a 2-byte big-endian length.
2. Key: pinned (``host:port#<hex key>``) or trust-on-first-use.  The node
   sends a signed Hello; the base answers with its own Hello addressed to the
   node.  A first key is stored in ``state_dir/base_keys.json`` (atomically);
   a different key later is refused with a clear error and no connection.
3. Noise IK handshake (node = initiator), LOGIN_CHALLENGE -> LOGIN (Ed25519
   signature over domain || base key || nonce) -> LOGIN_OK.  State 'tcp'.
4. UDP_PING over UDP from the node's main socket (``send_udp``), so the base
   learns the node's public mapping; a UDP_PONG makes the state 'udp' and
   relayed traffic then prefers UDP.  Pings repeat to keep the mapping open.
5. Keepalives and rekeys (WireGuard timers) over TCP.  On any failure: state
   'none', reconnect with exponential backoff and jitter between
   ``timers.base_reconnect_min`` and ``base_reconnect_max``.

Threading: :meth:`run`, :meth:`close` and every callback except
``on_relayed`` run on ``loop``.  :meth:`relay`, :meth:`query`,
:meth:`handle_udp` and :meth:`on_plaintext` may be called from any thread;
``on_relayed`` is called on the thread that delivered the datagram (the
transport's receive thread for UDP, the loop for TCP) so relayed data never
waits for the control loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import base_proto as bp
from . import handshake as hs
from .constants import DEFAULT_BASE_TCP_PORT, DEFAULT_BASE_UDP_PORT, Timers
from .counters import Counters
from .fsutil import atomic_write_json
from .identity import Identity, address_from_pubkey, format_address
from .session import Keypair, SessionDrop, random_index
from .wire import (
    DATA_MIN_LEN,
    MSG_DATA,
    MSG_HANDSHAKE_RESP,
    Malformed,
    build_hello,
    parse_hello,
)

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]

BASE_KEYS_FILE = "base_keys.json"
_FRAME = struct.Struct(">H")
_U32 = struct.Struct("<I")

CONNECT_TIMEOUT = 10.0
TCP_KEEPALIVE_INTERVAL = 25.0  # authenticated keepalive to the base over TCP
UDP_PING_INTERVAL = 15.0  # keeps the NAT mapping and the base's "UDP fresh" window (30 s) alive
ENDPOINTS_CHECK_INTERVAL = 30.0
MAX_TCP_BUFFER = 1 << 20

STATE_NONE = "none"
STATE_TCP = "tcp"
STATE_UDP = "udp"

#: Counters this client increments (prefixed so they never mix with peer traffic drops).
CLIENT_COUNTERS = (
    "base_connect_attempts",
    "base_logins",
    "base_key_mismatch",
    "base_malformed",
    "base_bad_mac",
    "base_replay",
    "base_too_old",
    "base_expired",
    "base_unknown_index",
    "base_bad_peer_info",
    "base_relayed_rx",
    "base_relay_tx",
    "base_relay_dropped",
)


class BaseKeyMismatchError(Exception):
    """The base presented a key other than the pinned or trusted-on-first-use one: do not connect."""


class BaseProtocolError(Exception):
    """The base broke the protocol during connection setup."""


@dataclass(frozen=True)
class BaseSpec:
    """A parsed base server spec."""

    host: str
    tcp_port: int
    udp_port: int
    pinned_key: bytes | None = None

    @property
    def key(self) -> str:
        """Stable name of this base ("host:tcp_port"): the base_keys.json entry and the RelayEndpoint key."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.tcp_port}"


_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def parse_base_spec(spec: str) -> BaseSpec:
    """Parse ``host``, ``host:tcp_port``, ``host:tcp_port:udp_port`` (IPv6 hosts in brackets), ``#<hex key>``.

    With one port it is the TCP port and UDP uses 5582; with none, 443 and 5582.
    """
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 400:
        raise ValueError("base server spec must be a non-empty string like 'base.example.org:443'")
    text = spec.strip()
    pinned: bytes | None = None
    if "#" in text:
        text, key_hex = text.split("#", 1)
        try:
            pinned = bytes.fromhex(key_hex.strip())
        except ValueError:
            raise ValueError(f"base spec {spec!r}: pinned key is not hex") from None
        if len(pinned) != 32 or address_from_pubkey(pinned) is None:
            raise ValueError(f"base spec {spec!r}: pinned key must be a valid 32-byte husarnet_ros public key")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"base spec {spec!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"base spec {spec!r}: {host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"base spec {spec!r}: expected ':' after ']'")
        ports = rest[1:].split(":") if rest else []
    else:
        parts = text.split(":")
        host, ports = parts[0], parts[1:]
        if not _HOST_RE.match(host):
            raise ValueError(f"base spec {spec!r}: {host!r} is not a host name or IPv4 address")
    if len(ports) > 2:
        raise ValueError(f"base spec {spec!r}: use host, host:tcp_port or host:tcp_port:udp_port")
    nums = []
    for p in ports:
        if not p.isdigit() or not 0 < int(p) <= 65535:
            raise ValueError(f"base spec {spec!r}: port {p!r} must be 1..65535")
        nums.append(int(p))
    tcp = nums[0] if nums else DEFAULT_BASE_TCP_PORT
    udp = nums[1] if len(nums) > 1 else DEFAULT_BASE_UDP_PORT
    return BaseSpec(host, tcp, udp, pinned)


class KnownBaseKeys:
    """``state_dir/base_keys.json``: {"host:port": "<hex key>"}, written atomically (trust on first use)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / BASE_KEYS_FILE

    def _load(self) -> dict[str, str]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(1 << 20)
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise BaseKeyMismatchError(f"{self.path} is not valid JSON; fix or remove it") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise BaseKeyMismatchError(f"{self.path} must map 'host:port' to a hex key")
        return data

    def get(self, name: str) -> bytes | None:
        value = self._load().get(name)
        if value is None:
            return None
        try:
            key = bytes.fromhex(value)
        except ValueError:
            raise BaseKeyMismatchError(f"{self.path}: entry {name!r} is not hex") from None
        return key

    def remember(self, name: str, key: bytes) -> None:
        data = self._load()
        data[name] = key.hex()
        atomic_write_json(self.path, data, 0o600)


def _normalize(host: str, port: int) -> Endpoint:
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


class BaseClient:
    """One base server connection, kept alive by :meth:`run` until :meth:`close`.

    ``index`` (optional) is the engine's index table (``reserve(owner)``,
    ``set(idx, owner)``, ``remove(idx, owner)``): when given, this client's
    session indexes live there with the keypair's ``owner`` = this client, so
    the engine's datapath can route the base's UDP Data datagrams to
    :meth:`on_plaintext`.  Without it, the engine passes every datagram from
    :attr:`udp_endpoint` to :meth:`handle_udp`.
    """

    def __init__(
        self,
        identity: Identity,
        spec: str,
        state_dir: str | os.PathLike[str],
        *,
        loop: asyncio.AbstractEventLoop,
        timers: Timers | None = None,
        counters: Counters | None = None,
        send_udp: Callable[[bytes, Endpoint], None],
        on_peer_info: Callable[[bytes, bytes, list[Endpoint], bool], None],
        on_relayed: Callable[[bytes, bytes], None],
        lan_endpoints: Callable[[], list[Endpoint]] = list,
        hostname: str = "",
        on_state: Callable[[str], None] | None = None,
        index: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        connect_timeout: float = CONNECT_TIMEOUT,
        udp_ping_interval: float = UDP_PING_INTERVAL,
        keepalive_interval: float = TCP_KEEPALIVE_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.spec = parse_base_spec(spec)
        self.key = self.spec.key
        self.state_dir = Path(state_dir)
        self.loop = loop
        self.timers = timers or Timers()
        self.counters = counters if counters is not None else Counters()
        self.send_udp = send_udp
        self.on_peer_info = on_peer_info
        self.on_relayed = on_relayed
        self.lan_endpoints = lan_endpoints
        self.hostname = hostname
        self.on_state = on_state
        self.index = index
        self.clock = clock
        self.wallclock = wallclock
        self.connect_timeout = connect_timeout
        self.udp_ping_interval = udp_ping_interval
        self.keepalive_interval = keepalive_interval
        self.rng = rng or random.Random()
        self.known_keys = KnownBaseKeys(self.state_dir)
        for name in CLIENT_COUNTERS:
            self.counters.inc(name, 0)

        self.public_key: bytes | None = self.spec.pinned_key
        self.udp_endpoint: Endpoint | None = None
        self.observed_endpoint: Endpoint | None = None
        self.error: str = ""
        self.connect_attempts = 0
        self._state = STATE_NONE
        self._kps: dict[int, Keypair] = {}
        self._send_kp: Keypair | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._loop_thread: int | None = None
        self._closed = False
        self._run_task: asyncio.Task[None] | None = None
        self._rekey: hs.InitiatorState | None = None
        self._rekey_sent = 0.0
        self._ping_nonces: dict[bytes, float] = {}
        self._last_pong = 0.0
        self._sent_endpoints: list[Endpoint] | None = None
        self._wake = asyncio.Event()

    # --- public properties ---------------------------------------------------------------
    @property
    def state(self) -> str:
        """'none' (no session), 'tcp' (logged in), 'udp' (logged in and UDP round trip confirmed)."""
        return self._state

    @property
    def address_text(self) -> str:
        return f"{self.spec.host}:{self.spec.tcp_port}"

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            log.info("base %s: %s", self.key, state)
            if self.on_state is not None:
                try:
                    self.on_state(state)
                except Exception:  # a consumer bug must not kill the connection
                    log.exception("on_state callback failed")

    # --- lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, log in and serve; reconnect with backoff and jitter until :meth:`close`."""
        self._loop_thread = threading.get_ident()
        self._run_task = asyncio.current_task()
        failures = 0
        while not self._closed:
            self.connect_attempts += 1
            self.counters.inc("base_connect_attempts")
            logged_in = False
            try:
                logged_in = await self._session()
            except asyncio.CancelledError:
                if self._closed:
                    break
                raise
            except BaseKeyMismatchError as exc:
                self.error = str(exc)
                self.counters.inc("base_key_mismatch")
                log.error("base %s: %s", self.key, exc)
                failures = max(failures, 30)  # a wrong key will not fix itself soon: retry at the slowest pace
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, BaseProtocolError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.info("base %s: connection failed: %s", self.key, self.error)
            except Exception as exc:  # never let a bug stop reconnecting
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("base %s: unexpected error", self.key)
            finally:
                self._teardown()
            if self._closed:
                break
            failures = 0 if logged_in else failures + 1
            delay = self.backoff_delay(failures)
            log.debug("base %s: reconnecting in %.2f s", self.key, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    def backoff_delay(self, failures: int) -> float:
        """Exponential backoff with jitter: min*2^failures capped at max, times a random factor in [0.5, 1]."""
        lo, hi = self.timers.base_reconnect_min, self.timers.base_reconnect_max
        delay = min(hi, lo * (2 ** min(failures, 30)))
        return delay * self.rng.uniform(0.5, 1.0)

    def close(self) -> None:
        """Stop for good: close the connection and end :meth:`run` (idempotent; call on the loop)."""
        self._closed = True
        self._wake.set()
        self._teardown()
        if self._run_task is not None and not self._run_task.done():
            self._run_task.cancel()

    def _teardown(self) -> None:
        w = self._writer
        self._writer = None
        if w is not None:
            with contextlib.suppress(Exception):
                w.close()
        for idx, kp in list(self._kps.items()):
            if self.index is not None:
                self.index.remove(idx, kp)
        self._kps = {}
        self._send_kp = None
        self._drop_rekey()
        self._ping_nonces.clear()
        self._sent_endpoints = None
        self._set_state(STATE_NONE)

    # --- one connection -------------------------------------------------------------------
    async def _session(self) -> bool:
        """One connection from TCP connect to disconnect; returns True if it got as far as LOGIN_OK."""
        spec = self.spec
        infos = await self.loop.getaddrinfo(spec.host, spec.tcp_port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {spec.host}")
        family, _, _, _, sockaddr = infos[0]
        host = sockaddr[0]
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, spec.tcp_port, family=family), self.connect_timeout
        )
        self._writer = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        udp_host = host.split("%", 1)[0] if family == socket.AF_INET6 and not host.startswith("fe80") else host
        self.udp_endpoint = _normalize(udp_host, spec.udp_port)

        base_key = await asyncio.wait_for(self._learn_key(reader), self.connect_timeout)
        self.public_key = base_key
        kp = await asyncio.wait_for(self._handshake(reader, base_key), self.connect_timeout)
        self._install(kp)
        await asyncio.wait_for(self._login(reader, base_key), self.connect_timeout)
        self.error = ""
        self.counters.inc("base_logins")
        log.info("base %s: logged in as %s", self.key, self.identity.address_str)
        self._set_state(STATE_TCP)
        timers = self.loop.create_task(self._timers_loop())
        try:
            while True:
                frame = await self._read_frame(reader)
                self._handle_tcp_frame(frame)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("base %s: connection lost (%s)", self.key, type(exc).__name__)
        finally:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await timers
        return True

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readexactly(2)
        size = _FRAME.unpack(head)[0]
        if size == 0:
            raise BaseProtocolError("empty frame from base")
        return await reader.readexactly(size)

    def _write_frame(self, datagram: bytes) -> bool:
        """Queue one framed datagram on the TCP connection (loop thread only)."""
        w = self._writer
        if w is None or w.is_closing():
            return False
        if w.transport.get_write_buffer_size() > MAX_TCP_BUFFER:
            self.counters.inc("base_relay_dropped")
            return False
        w.write(_FRAME.pack(len(datagram)) + datagram)
        return True

    async def _learn_key(self, reader: asyncio.StreamReader) -> bytes:
        """Hello exchange; returns the base's key after checking it against the pin or the TOFU store."""
        hello = build_hello(self.identity, None, int(self.wallclock() * 1000))
        self._write_frame(hello)
        frame = await self._read_frame(reader)
        try:
            answer = parse_hello(frame)
        except Malformed as exc:
            raise BaseProtocolError(f"base answered with an invalid hello ({exc.reason})") from None
        if answer.target != self.identity.address:
            raise BaseProtocolError("base hello is addressed to another node")
        key = answer.public_key
        pinned = self.spec.pinned_key
        if pinned is not None:
            if key != pinned:
                raise BaseKeyMismatchError(
                    f"base {self.key} presented key {key.hex()} but the configuration pins {pinned.hex()}; "
                    "refusing to connect"
                )
            return key
        stored = self.known_keys.get(self.key)
        if stored is None:
            self.known_keys.remember(self.key, key)
            log.warning(
                "base %s: trusting its key %s on first use (stored in %s; pin it with '%s#%s')",
                self.key,
                key.hex(),
                self.known_keys.path,
                self.key,
                key.hex(),
            )
            return key
        if stored != key:
            raise BaseKeyMismatchError(
                f"base {self.key} presented key {key.hex()} but {stored.hex()} was trusted on first use "
                f"(stored in {self.known_keys.path}); refusing to connect. If the base was reinstalled on "
                "purpose, remove its entry from that file or pin the new key with "
                f"'{self.key}#<new key>'"
            )
        return key

    def _new_index(self, owner: Any) -> int:
        if self.index is not None:
            return self.index.reserve(owner)
        idx = random_index()
        while idx == 0 or idx in self._kps:
            idx = random_index()
        return idx

    async def _handshake(self, reader: asyncio.StreamReader, base_key: bytes) -> Keypair:
        idx = self._new_index(self)
        try:
            msg, st = hs.create_initiation(
                self.identity, base_key, idx, hs.tai64n(self.wallclock()), hs.local_features()
            )
            self._write_frame(msg)
            frame = await self._read_frame(reader)
            try:
                km = hs.consume_response(st, frame)
            except hs.HandshakeError as exc:
                raise BaseProtocolError(f"base handshake response refused ({exc.reason})") from None
        except BaseException:
            if self.index is not None:
                self.index.remove(idx, self)
            raise
        return Keypair(km, self.clock(), self, timers=self.timers, clock=self.clock)

    def _install(self, kp: Keypair) -> None:
        """Make ``kp`` the sending keypair; keep the previous one for in-flight datagrams."""
        self._kps[kp.local_index] = kp
        if self.index is not None:
            self.index.set(kp.local_index, kp)
        self._send_kp = kp
        while len(self._kps) > 2:
            oldest = min(self._kps.values(), key=lambda k: k.created)
            del self._kps[oldest.local_index]
            if self.index is not None:
                self.index.remove(oldest.local_index, oldest)

    async def _login(self, reader: asyncio.StreamReader, base_key: bytes) -> None:
        plaintext = await self._read_control(reader)
        if not plaintext or plaintext[0] != bp.LOGIN_CHALLENGE:
            raise BaseProtocolError("base did not send a login challenge")
        nonce = bp.parse_login_challenge(plaintext)
        signature = self.identity.sign(bp.login_message(base_key, nonce))
        eps = self._current_endpoints()
        self._send_control(bp.build_login(signature, self._login_hostname(), eps))
        self._sent_endpoints = eps
        plaintext = await self._read_control(reader)
        if not plaintext or plaintext[0] != bp.LOGIN_OK:
            raise BaseProtocolError("base did not accept the login")
        observed = bp.parse_login_ok(plaintext)
        if observed is not None:
            self.observed_endpoint = observed

    def _login_hostname(self) -> str:
        name = self.hostname
        try:
            bp.build_login(bytes(64), name, [])
        except ValueError:
            return ""
        return name

    async def _read_control(self, reader: asyncio.StreamReader) -> bytes:
        """Next authenticated control plaintext during login (keepalives skipped)."""
        while True:
            frame = await self._read_frame(reader)
            plaintext = self._open(frame)
            if plaintext:
                return plaintext

    def _open(self, datagram: bytes) -> bytes | None:
        """Authenticate a Data datagram from the base; None (and a counter) if it is not genuine."""
        if len(datagram) < DATA_MIN_LEN or _U32.unpack_from(datagram)[0] != MSG_DATA:
            self.counters.inc("base_malformed")
            return None
        kp = self._kps.get(_U32.unpack_from(datagram, 4)[0])
        if kp is None:
            self.counters.inc("base_unknown_index")
            return None
        try:
            return kp.open(datagram)
        except SessionDrop as drop:
            self.counters.inc(f"base_{drop.reason}")
            return None

    def _current_endpoints(self) -> list[Endpoint]:
        try:
            return bp.usable_endpoints(list(self.lan_endpoints()))
        except Exception:  # a consumer bug must not block login
            log.exception("lan_endpoints callback failed")
            return []

    # --- sending --------------------------------------------------------------------------
    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _send_control(self, plaintext: bytes) -> bool:
        """Seal and send over TCP (loop thread only)."""
        kp = self._send_kp
        if kp is None:
            return False
        try:
            sealed = kp.seal(plaintext)
        except SessionDrop:
            return False
        return self._write_frame(sealed)

    def _call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._on_loop_thread():
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: nothing to do
                self.loop.call_soon_threadsafe(fn, *args)

    def query(self, address: bytes) -> bool:
        """Ask the base about ``address``: PEER_INFO comes back and the peer is told to punch towards us."""
        if self._send_kp is None or self._state == STATE_NONE:
            return False
        msg = bp.build_query(bytes(address))
        self._call_on_loop(self._send_control, msg)
        return True

    def update_endpoints(self) -> None:
        """Send the LAN endpoints again if they changed (call on the loop; also checked periodically)."""
        if self._state == STATE_NONE:
            return
        eps = self._current_endpoints()
        if eps != self._sent_endpoints and self._send_control(bp.build_endpoints(eps)):
            self._sent_endpoints = eps

    def relay(self, dst_address: bytes, datagram: bytes) -> bool:
        """Send an end-to-end sealed datagram to ``dst_address`` through the base (any thread).

        Prefers UDP once the UDP round trip is confirmed, else TCP.  False if
        there is no session or the TCP buffer is full (the datagram is dropped).
        """
        kp = self._send_kp
        if kp is None or self._state == STATE_NONE:
            self.counters.inc("base_relay_dropped")
            return False
        try:
            sealed = kp.seal(bp.build_relay(bytes(dst_address), datagram))
        except (SessionDrop, ValueError):
            self.counters.inc("base_relay_dropped")
            return False
        self.counters.inc("base_relay_tx")
        ep = self.udp_endpoint
        if self._state == STATE_UDP and ep is not None:
            self.send_udp(sealed, ep)
            return True
        if self._on_loop_thread():
            return self._write_frame(sealed)
        self._call_on_loop(self._write_frame, sealed)
        return True

    # --- receiving ------------------------------------------------------------------------
    def handle_udp(self, datagram: bytes, src: Endpoint) -> bool:
        """A datagram that arrived from :attr:`udp_endpoint` (any thread). True if it was the base's."""
        if len(datagram) < DATA_MIN_LEN or _U32.unpack_from(datagram)[0] != MSG_DATA:
            return False
        if _U32.unpack_from(datagram, 4)[0] not in self._kps:
            return False
        plaintext = self._open(datagram)
        if plaintext is not None:
            self.on_plaintext(plaintext, src)
        return True

    def on_plaintext(self, plaintext: bytes, endpoint: Any) -> None:
        """Authenticated plaintext from our base session (already opened by our keypair); any thread."""
        if not plaintext:
            return
        if plaintext[0] == bp.RELAYED:
            self._relayed(plaintext)
        else:
            self._call_on_loop(self._control, plaintext, True)

    def _handle_tcp_frame(self, frame: bytes) -> None:
        if len(frame) >= 4 and _U32.unpack_from(frame)[0] == MSG_HANDSHAKE_RESP:
            self._rekey_response(frame)
            return
        plaintext = self._open(frame)
        if not plaintext:
            return
        if plaintext[0] == bp.RELAYED:
            self._relayed(plaintext)
        else:
            self._control(plaintext, False)

    def _relayed(self, plaintext: bytes) -> None:
        try:
            src, datagram = bp.parse_relayed(plaintext)
        except Malformed:
            self.counters.inc("base_malformed")
            return
        self.counters.inc("base_relayed_rx")
        self.on_relayed(src, datagram)

    def _control(self, plaintext: bytes, via_udp: bool) -> None:
        """Base control messages, on the loop thread, all from inside the authenticated session."""
        try:
            mtype = bp.message_type(plaintext)
            if mtype == bp.PEER_INFO:
                info = bp.parse_peer_info(plaintext)
                if not info.online:
                    log.debug("base %s: %s is not online", self.key, format_address(info.address))
                    return
                if address_from_pubkey(info.public_key) != info.address:
                    self.counters.inc("base_bad_peer_info")
                    return
                self.on_peer_info(info.address, info.public_key, info.endpoints, info.punch)
            elif mtype == bp.UDP_PONG and via_udp:
                nonce, observed = bp.parse_udp_pong(plaintext)
                if self._ping_nonces.pop(nonce, None) is None:
                    return
                self._last_pong = self.clock()
                self.observed_endpoint = observed
                if self._state == STATE_TCP:
                    self._set_state(STATE_UDP)
            elif mtype == bp.OBSERVED:
                self.observed_endpoint = bp.parse_observed(plaintext)
            else:
                self.counters.inc("base_malformed")
        except Malformed:
            self.counters.inc("base_malformed")

    # --- timers: UDP pings, keepalives, rekeys, endpoint updates --------------------------------
    async def _timers_loop(self) -> None:
        next_ping = 0.0
        ping_backoff = 1.0
        last_keepalive = self.clock()
        last_endpoints = self.clock()
        while True:
            now = self.clock()
            if now >= next_ping:
                self._send_ping(now)
                if self._state == STATE_UDP:
                    ping_backoff = 1.0
                    next_ping = now + self.udp_ping_interval
                else:
                    next_ping = now + ping_backoff
                    ping_backoff = min(ping_backoff * 2, self.udp_ping_interval)
            if self._state == STATE_UDP and now - self._last_pong > 2.5 * self.udp_ping_interval:
                log.info("base %s: no UDP reply, relaying over TCP", self.key)
                self._set_state(STATE_TCP)
            kp = self._send_kp
            if kp is not None and self._rekey is None and kp.needs_rekey(now, self.timers):
                self._start_rekey(now)
            elif self._rekey is not None and now - self._rekey_sent > self.timers.rekey_timeout:
                self._drop_rekey()  # lost: the next tick tries again
            if now - last_keepalive >= self.keepalive_interval:
                self._send_control(b"")
                last_keepalive = now
            if now - last_endpoints >= ENDPOINTS_CHECK_INTERVAL:
                self.update_endpoints()
                last_endpoints = now
            await asyncio.sleep(min(1.0, self.udp_ping_interval / 4))

    def _send_ping(self, now: float) -> None:
        kp, ep = self._send_kp, self.udp_endpoint
        if kp is None or ep is None:
            return
        nonce = os.urandom(bp.PING_NONCE_LEN)
        self._ping_nonces[nonce] = now
        while len(self._ping_nonces) > 8:
            self._ping_nonces.pop(next(iter(self._ping_nonces)))
        try:
            self.send_udp(kp.seal(bp.build_udp_ping(nonce)), ep)
        except SessionDrop:
            return
        except OSError as exc:
            log.debug("base %s: UDP ping failed: %s", self.key, exc)

    def _start_rekey(self, now: float) -> None:
        assert self.public_key is not None
        idx = self._new_index(self)
        msg, st = hs.create_initiation(
            self.identity, self.public_key, idx, hs.tai64n(self.wallclock()), hs.local_features()
        )
        if self._write_frame(msg):
            self._rekey = st
            self._rekey_sent = now
        elif self.index is not None:
            self.index.remove(idx, self)

    def _drop_rekey(self) -> None:
        st = self._rekey
        self._rekey = None
        if st is not None and self.index is not None:
            self.index.remove(st.sender_index, self)

    def _rekey_response(self, frame: bytes) -> None:
        st = self._rekey
        if st is None:
            self.counters.inc("base_malformed")
            return
        try:
            km = hs.consume_response(st, frame)
        except hs.HandshakeError as exc:
            self.counters.inc(f"base_{exc.reason}")
            return
        self._rekey = None
        self._install(Keypair(km, self.clock(), self, timers=self.timers, clock=self.clock))
        self._send_control(b"")  # key confirmation: the base switches to the new keys once it sees this
