"""Websetup: remote management of a node by an operator's dashboard (DESIGN.md 4.8).

A dashboard (or ``husarnet-ros websetup send``) sends small UDP requests to
port 5580 on the node's overlay address; each is authenticated with the
node's 32-byte shared secret (HMAC-SHA256, format in :mod:`websetup_proto`).
The checks run cheapest first, so garbage costs almost nothing:

1. the source must be an overlay (fc94) address, and the socket is bound to
   the node's own fc94 address on ``hnet0`` - the overlay authenticated it;
2. the source must be on the *websetup* whitelist (separate from the peer
   whitelist: being allowed to connect is not being allowed to administer);
3. a sender that failed recently spends tokens from its own bucket (and from a
   global one); an honest sender that never failed is never slowed down by
   somebody else's flood;
4. structure, version and MAC (``hmac.compare_digest``);
5. the counter must be strictly greater than the last one accepted from that
   sender; it is checked, consumed and written to ``websetup.json`` under one
   lock *before* the command runs, so a replay - also after a restart, also
   50 copies at once - is applied at most once.

Only a fresh, authenticated request gets an answer; everything else is silence
plus a counter.  The secret is never logged, nor are MACs or arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .constants import ADDRESS_LEN, OVERLAY_PREFIX, WEBSETUP_PORT
from .counters import Counters
from .fsutil import StateFileError, atomic_write_json, ensure_state_dir, read_private_file
from .hosts import validate_hostname
from .identity import format_address, parse_address
from .websetup_proto import (
    ARG_COUNTS,
    COMMANDS,
    MAX_COUNTER,
    MAX_REPLY_BODY,
    SECRET_LEN,
    Command,
    Reply,
    WebsetupError,
    build_command,
    build_reply,
    parse_command,
    parse_reply,
)
from .whitelist import Whitelist

__all__ = [
    "COMMANDS",
    "Command",
    "Reply",
    "WebsetupClient",
    "WebsetupError",
    "WebsetupServer",
    "WebsetupStateError",
    "build_command",
    "build_reply",
    "default_overlay_source",
    "parse_command",
    "parse_reply",
    "read_secret",
]

log = logging.getLogger(__name__)

STATE_FILE = "websetup.json"
STATE_FORMAT = 1
MAX_STATE_FILE = 1 << 20
MAX_WEBSETUP_WHITELIST = 256
MAX_HOSTS = 4096
PER_SOURCE_BURST = 10
PER_SOURCE_RATE = 1.0  # failures per second a sender may make once its burst is spent
GLOBAL_BURST = 100
GLOBAL_RATE = 20.0
MAX_BUCKETS = 1024
MAX_IN_FLIGHT_PER_SOURCE = 4
MAX_IN_FLIGHT = 64
IPV6_FREEBIND = 78  # linux/in6.h; not exported by the socket module

# Counter names this module increments (also returned by status()).
COUNTER_NAMES = (
    "accepted",
    "not_overlay",
    "not_whitelisted",
    "rate_limited",
    "malformed",
    "bad_version",
    "bad_mac",
    "replay",
    "bad_args",
    "state_error",
)


class WebsetupStateError(StateFileError):
    """``websetup.json`` is corrupt or unsafe; the message names the file.  It is never overwritten."""


def default_overlay_source(src: tuple) -> bytes | None:
    """The 16-byte overlay address of a datagram source, or None if it is not inside fc94::/16."""
    try:
        host = str(src[0]).split("%", 1)[0]
        packed = ipaddress.IPv6Address(host).packed
    except (ValueError, IndexError, TypeError):
        return None
    return packed if packed[:2] == OVERLAY_PREFIX else None


def _parse_websetup_whitelist(items: Iterable[str | bytes]) -> list[bytes]:
    result: list[bytes] = []
    for item in items:
        if isinstance(item, (bytes, bytearray)):
            if len(item) != ADDRESS_LEN or bytes(item[:2]) != OVERLAY_PREFIX:
                raise ValueError("websetup whitelist address must be 16 bytes inside fc94::/16")
            addr = bytes(item)
        else:
            addr = parse_address(item)
        if addr not in result:
            result.append(addr)
    if len(result) > MAX_WEBSETUP_WHITELIST:
        raise ValueError(f"at most {MAX_WEBSETUP_WHITELIST} websetup whitelist entries")
    return result


# --- persisted state -------------------------------------------------------------------------


class _State:
    """Contents of ``websetup.json``; the secret is kept out of repr."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.secret = b""
        self.whitelist: list[bytes] = []
        self.counters: dict[bytes, int] = {}
        self.added_whitelist: set[bytes] = set()
        self.hosts: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"_State(path={self.path!s}, whitelist={len(self.whitelist)}, senders={len(self.counters)})"

    def _fail(self, why: str) -> WebsetupStateError:
        return WebsetupStateError(f"websetup state file {self.path} is unusable: {why}. It was left untouched")

    def load(self) -> bool:
        """Read the file; False if it does not exist."""
        if not self.path.exists():
            return False
        try:
            data = read_private_file(self.path, MAX_STATE_FILE)
        except StateFileError as exc:
            raise WebsetupStateError(str(exc)) from None
        except OSError as exc:
            raise self._fail(f"cannot read it ({exc})") from None
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise self._fail("not valid JSON") from None  # no parser text: it could quote the secret
        if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
            raise self._fail(f"not a format-{STATE_FORMAT} object")
        expected = {"format", "secret", "whitelist", "counters", "added_whitelist", "hosts"}
        if set(obj) != expected:
            raise self._fail(f"keys must be {sorted(expected)}")
        sec = obj["secret"]
        if not (isinstance(sec, str) and len(sec) == 2 * SECRET_LEN and all(c in string.hexdigits for c in sec)):
            raise self._fail(f"'secret' must be {2 * SECRET_LEN} hex characters")
        try:
            whitelist = _parse_websetup_whitelist(_list_of_str(obj["whitelist"]))
            counters: dict[bytes, int] = {}
            raw_counters = obj["counters"]
            if not isinstance(raw_counters, dict):
                raise ValueError("'counters' must be an object")
            for key, value in raw_counters.items():
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNTER:
                    raise ValueError(f"counter of {key!r} must be an unsigned 64-bit integer")
                counters[parse_address(key)] = value
            added = {parse_address(a) for a in _list_of_str(obj["added_whitelist"])}
            raw_hosts = obj["hosts"]
            if not isinstance(raw_hosts, dict) or len(raw_hosts) > MAX_HOSTS:
                raise ValueError("'hosts' must be an object of hostname -> address")
            hosts = {validate_hostname(name): parse_address(_str(a)) for name, a in raw_hosts.items()}
        except ValueError as exc:
            raise self._fail(str(exc)) from None
        self.secret = bytes.fromhex(sec)
        self.whitelist, self.counters, self.added_whitelist, self.hosts = whitelist, counters, added, hosts
        return True

    def save(self) -> None:
        atomic_write_json(
            self.path,
            {
                "format": STATE_FORMAT,
                "secret": self.secret.hex(),
                "whitelist": [format_address(a) for a in self.whitelist],
                "counters": {format_address(a): c for a, c in sorted(self.counters.items())},
                "added_whitelist": sorted(format_address(a) for a in self.added_whitelist),
                "hosts": {n: format_address(a) for n, a in sorted(self.hosts.items())},
            },
            mode=0o600,
        )


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _list_of_str(v: object) -> list[str]:
    if not isinstance(v, list) or len(v) > 65536:
        raise ValueError("expected a list of strings")
    return [_str(x) for x in v]


def _load_or_create(state_dir: str | Path, create: bool = True) -> _State:
    state = _State(Path(state_dir) / STATE_FILE)
    if not state.load():
        if not create:
            raise WebsetupStateError(f"{state.path} does not exist; start the node once to create it")
        ensure_state_dir(state_dir)
        state.secret = secrets.token_bytes(SECRET_LEN)
        state.save()
        log.info("created a new websetup secret in %s", state.path)
    return state


def read_secret(state_dir: str | Path, create: bool = False) -> bytes:
    """The node's websetup secret (for the CLI that prints it to the operator)."""
    return _load_or_create(state_dir, create).secret


# --- rate limiting -----------------------------------------------------------------------------


class _Bucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst, self.rate, self.tokens, self.stamp = burst, rate, burst, now

    def level(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def take(self, now: float) -> None:
        self.tokens = self.level(now) - 1.0


class FailureLimiter:
    """Token buckets charged only by failures: per sender, plus a global one for senders that failed recently.

    A sender without a failure history has no bucket and always passes, so a
    flood of forged messages from one address never locks out another.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sources: dict[bytes, _Bucket] = {}
        self._global = _Bucket(GLOBAL_BURST, GLOBAL_RATE, clock())

    def allowed(self, src: bytes) -> bool:
        now = self._clock()
        with self._lock:
            bucket = self._sources.get(src)
            if bucket is None:
                return True
            level = bucket.level(now)
            if level >= bucket.burst:
                del self._sources[src]  # recovered: forget it
                return True
            return level >= 1.0 and self._global.level(now) >= 1.0

    def failure(self, src: bytes) -> None:
        now = self._clock()
        with self._lock:
            bucket = self._sources.get(src)
            if bucket is None:
                if len(self._sources) >= MAX_BUCKETS:
                    for key in [k for k, b in self._sources.items() if b.level(now) >= b.burst]:
                        del self._sources[key]
                if len(self._sources) >= MAX_BUCKETS:
                    self._global.take(now)
                    return
                bucket = self._sources[src] = _Bucket(PER_SOURCE_BURST, PER_SOURCE_RATE, now)
            bucket.take(now)
            self._global.take(now)


# --- server ----------------------------------------------------------------------------------


class _CommandError(Exception):
    """A bad argument or a failed action: answered with an error reply, nothing changed."""


class WebsetupServer:
    """Websetup for one node; ``handle`` is pure logic (thread-safe), ``start``/``close`` add the UDP socket."""

    def __init__(
        self,
        state_dir: str | Path,
        whitelist: Whitelist,
        *,
        websetup_whitelist: Iterable[str | bytes] | None = None,
        hosts_hook: Callable[[dict[str, bytes]], None] | None = None,
        get_latency: Callable[[], dict[bytes, float]] | None = None,
        version: str = "",
        counters: Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        overlay_source: Callable[[tuple], bytes | None] = default_overlay_source,
    ) -> None:
        self.whitelist = whitelist
        self.counters = counters if counters is not None else Counters()
        self._hosts_hook = hosts_hook
        self._get_latency = get_latency
        self._version = version
        self._wallclock = wallclock
        self._overlay_source = overlay_source
        self._lock = threading.RLock()
        self._limiter = FailureLimiter(clock)
        self._state = _load_or_create(state_dir)
        if websetup_whitelist is not None:
            configured = _parse_websetup_whitelist(websetup_whitelist)
            if configured != self._state.whitelist:
                self._state.whitelist = configured
                self._state.save()
        self._allowed = frozenset(self._state.whitelist)
        self._last_command: dict[str, Any] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: dict[bytes, int] = {}
        self._bound: tuple[str, int] | None = None
        if hosts_hook is not None and self._state.hosts:
            try:
                hosts_hook(dict(self._state.hosts))
            except Exception as exc:
                log.error("websetup: hosts file not updated at start: %s", exc)

    # --- read-only views -----------------------------------------------------------------
    @property
    def secret(self) -> bytes:
        return self._state.secret

    # These readers take no lock: a request holds the lock while hooks run, and a hook may wait for the
    # engine's loop, which may be asking for status at that moment.  The containers they read are
    # replaced, never mutated in place, so a plain read sees a whole old or a whole new value.
    def hosts(self) -> dict[str, bytes]:
        """Host names added through websetup (hostname -> address)."""
        return dict(self._state.hosts)

    def status(self) -> dict[str, Any]:
        """For the node's status: whether it listens, where, who may send, the last command, counters."""
        snap = self.counters.snapshot()
        bound, last = self._bound, self._last_command
        return {
            "enabled": True,
            "listening": self._transport is not None,
            "address": bound[0] if bound else "",
            "port": bound[1] if bound else WEBSETUP_PORT,
            "websetup_whitelist": [format_address(a) for a in self._state.whitelist],
            "last_command": dict(last) if last else None,
            "counters": {k: snap.get(k, 0) for k in COUNTER_NAMES},
        }

    # --- the pure part -------------------------------------------------------------------
    def _prefilter(self, src: tuple) -> bytes | None:
        addr = self._overlay_source(src)
        if addr is None:
            self.counters.inc("not_overlay")
            return None
        if addr not in self._allowed:
            self.counters.inc("not_whitelisted")
            return None
        if not self._limiter.allowed(addr):
            self.counters.inc("rate_limited")
            return None
        return addr

    def _reject(self, addr: bytes, reason: str) -> None:
        self.counters.inc(reason)
        self._limiter.failure(addr)
        log.debug("websetup: dropped a request from %s: %s", format_address(addr), reason)

    def handle(self, datagram: bytes, src: tuple) -> bytes | None:
        """Process one datagram from ``src`` (socket address tuple); the reply datagram, or None for silence."""
        addr = self._prefilter(src)
        if addr is None:
            return None
        secret = self._state.secret
        try:
            cmd = parse_command(datagram, secret, addr)
        except WebsetupError as exc:
            self._reject(addr, exc.reason)
            return None
        with self._lock:
            if self._state.secret != secret:  # changed while we verified: the old secret is gone
                self._reject(addr, "bad_mac")
                return None
            if cmd.counter <= self._state.counters.get(addr, 0):
                self._reject(addr, "replay")
                return None
            previous = self._state.counters.get(addr)
            self._state.counters[addr] = cmd.counter
            try:
                self._state.save()  # consumed and durable before anything is applied
            except OSError as exc:
                if previous is None:
                    del self._state.counters[addr]
                else:
                    self._state.counters[addr] = previous
                self.counters.inc("state_error")
                log.error("websetup: cannot persist the request counter, request not applied: %s", exc)
                return None
            try:
                fields = self._apply(addr, cmd)
                ok = True
            except _CommandError as exc:
                fields, ok = (str(exc),), False
                self.counters.inc("bad_args")
            self.counters.inc("accepted")
            self._last_command = {
                "command": cmd.command,
                "from": format_address(addr),
                "ok": ok,
                "at": self._wallclock(),
            }
            log.info("websetup: %s from %s -> %s", cmd.command, format_address(addr), "ok" if ok else fields[0])
            return build_reply(secret, addr, cmd.counter, cmd.command, ok, fields)

    # --- commands ----------------------------------------------------------------------
    def _apply(self, sender: bytes, cmd: Command) -> tuple[str, ...]:
        lo, hi = ARG_COUNTS[cmd.command]
        if not lo <= len(cmd.args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise _CommandError(f"{cmd.command} takes {want} argument(s), got {len(cmd.args)}")
        handler = getattr(self, "_cmd_" + cmd.command.replace("-", "_"))
        try:
            return handler(*cmd.args)
        except _CommandError:
            raise
        except ValueError as exc:
            raise _CommandError(str(exc)) from None
        except Exception as exc:
            log.error("websetup: %s failed: %s", cmd.command, type(exc).__name__)
            raise _CommandError(f"{cmd.command} failed: {type(exc).__name__}") from None

    def _cmd_ping(self) -> tuple[str, ...]:
        return ("pong",)

    def _cmd_whitelist_add(self, address: str, hostname: str = "") -> tuple[str, ...]:
        addr = parse_address(address)
        if hostname:
            validate_hostname(hostname)
        was_listed = addr in self.whitelist.entries()
        if not was_listed and addr not in self._state.added_whitelist:
            # Record provenance first: a crash in between leaves a harmless no-op for cleanup.
            self._state.added_whitelist.add(addr)
            self._state.save()
        try:
            changed = self.whitelist.add(addr, hostname)
        except Exception:  # bad name, full list or a failed write: take the provenance back
            if not was_listed:
                self._state.added_whitelist.discard(addr)
                self._state.save()
            raise
        return ("added" if changed else "unchanged",)

    def _cmd_whitelist_rm(self, address: str) -> tuple[str, ...]:
        addr = parse_address(address)
        removed = self.whitelist.remove(addr)
        if addr in self._state.added_whitelist:
            self._state.added_whitelist.discard(addr)
            self._state.save()
        return ("removed" if removed else "not listed",)

    def _cmd_whitelist_ls(self, offset: str = "0") -> tuple[str, ...]:
        if not (offset.isascii() and offset.isdigit() and len(offset) <= 6):
            raise _CommandError("offset must be a decimal number")
        start = int(offset)
        entries = sorted(self.whitelist.entries().items())
        head = ("enabled" if self.whitelist.enabled else "disabled", str(len(entries)))
        out = list(head)
        size = sum(2 + len(f) for f in out) + 1
        for addr, name in entries[start:]:
            line = f"{format_address(addr)} {name}".rstrip()
            if size + 2 + len(line) > MAX_REPLY_BODY or len(out) >= 500:
                break  # the client asks again with offset = number received so far
            out.append(line)
            size += 2 + len(line)
        return tuple(out)

    def _cmd_whitelist_enable(self) -> tuple[str, ...]:
        return ("changed" if self.whitelist.set_enabled(True) else "unchanged",)

    def _cmd_whitelist_disable(self) -> tuple[str, ...]:
        return ("changed" if self.whitelist.set_enabled(False) else "unchanged",)

    def _set_hosts(self, hosts: dict[str, bytes]) -> None:
        self._state.hosts = hosts
        self._state.save()
        if self._hosts_hook is not None:
            try:
                self._hosts_hook(dict(hosts))
            except Exception as exc:
                raise _CommandError(f"saved, but the hosts file was not updated: {type(exc).__name__}") from None

    def _cmd_host_add(self, address: str, hostname: str) -> tuple[str, ...]:
        addr = parse_address(address)
        validate_hostname(hostname)
        if self._hosts_hook is None:
            raise _CommandError("this node does not manage a hosts file")
        hosts = {n: a for n, a in self._state.hosts.items() if n.lower() != hostname.lower()}
        if len(hosts) >= MAX_HOSTS:
            raise _CommandError(f"at most {MAX_HOSTS} websetup host names")
        hosts[hostname] = addr
        if hosts == self._state.hosts:
            return ("unchanged",)
        self._set_hosts(hosts)
        return ("added",)

    def _cmd_host_rm(self, hostname: str) -> tuple[str, ...]:
        validate_hostname(hostname)
        hosts = {n: a for n, a in self._state.hosts.items() if n.lower() != hostname.lower()}
        if hosts == self._state.hosts:
            return ("not listed",)
        self._set_hosts(hosts)
        return ("removed",)

    def _cmd_get_version(self) -> tuple[str, ...]:
        return (self._version or "unknown",)

    def _cmd_get_latency(self) -> tuple[str, ...]:
        if self._get_latency is None:
            raise _CommandError("latency is not available on this node")
        rtts = self._get_latency()
        return tuple(f"{format_address(a)} {rtt:.3f}" for a, rtt in sorted(rtts.items())[:400])

    def _cmd_change_secret(self, new_hex: str) -> tuple[str, ...]:
        if not (len(new_hex) == 2 * SECRET_LEN and all(c in string.hexdigits for c in new_hex)):
            raise _CommandError(f"the new secret must be {2 * SECRET_LEN} hex characters")
        old = self._state.secret
        self._state.secret = bytes.fromhex(new_hex)
        try:
            self._state.save()
        except OSError:
            self._state.secret = old
            raise
        return ("changed",)

    def _cmd_cleanup(self) -> tuple[str, ...]:
        removed = 0
        for addr in sorted(self._state.added_whitelist):
            removed += self.whitelist.remove(addr)
        hosts = len(self._state.hosts)
        self._state.added_whitelist = set()
        self._set_hosts({})
        return (f"removed {removed} whitelist entries and {hosts} host names",)

    # --- the socket ------------------------------------------------------------------------
    async def start(self, bind_address: str, port: int = WEBSETUP_PORT, *, interface: str | None = None) -> None:
        """Listen on ``[bind_address]:port`` (the node's own overlay address); ``interface`` pins it to hnet0."""
        if self._transport is not None:
            raise RuntimeError("websetup server already started")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            with contextlib.suppress(OSError):  # FREEBIND: start before the address is up
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            if interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.bind((bind_address, port))
            sock.setblocking(False)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="websetup")
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None
            raise
        self._loop = loop
        self._transport = transport  # type: ignore[assignment]
        self._bound = sock.getsockname()[:2]
        log.info("websetup listening on [%s]:%d", self._bound[0], self._bound[1])

    def _datagram(self, data: bytes, src: tuple) -> None:
        """On the loop: cheap checks inline, the rest in the worker thread with bounded per-source queueing."""
        addr = self._prefilter(src)
        if addr is None or self._executor is None:
            return
        if self._in_flight.get(addr, 0) >= MAX_IN_FLIGHT_PER_SOURCE or sum(self._in_flight.values()) >= MAX_IN_FLIGHT:
            self.counters.inc("rate_limited")
            return
        self._in_flight[addr] = self._in_flight.get(addr, 0) + 1
        fut = self._loop.run_in_executor(self._executor, self.handle, data, src)  # type: ignore[union-attr]

        def done(f: asyncio.Future) -> None:
            n = self._in_flight.get(addr, 1) - 1
            if n <= 0:
                self._in_flight.pop(addr, None)
            else:
                self._in_flight[addr] = n
            if f.cancelled() or f.exception() is not None:
                if not f.cancelled():
                    log.error("websetup: request handling failed: %s", type(f.exception()).__name__)
                return
            reply = f.result()
            if reply is not None and self._transport is not None:
                self._transport.sendto(reply, src)

        fut.add_done_callback(done)

    def close(self) -> None:
        """Stop listening (idempotent).  Waits for a running request unless called from the loop's own thread."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            on_loop = False
            with contextlib.suppress(RuntimeError):
                on_loop = asyncio.get_running_loop() is self._loop
            executor.shutdown(wait=not on_loop, cancel_futures=True)
        self._bound = None


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: WebsetupServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.server._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("websetup socket error: %s", exc)


# --- client (the dashboard side, used by the CLI) ----------------------------------------------


class WebsetupClient:
    """Sends authenticated websetup commands; its counter is persisted so it only ever increases."""

    def __init__(
        self,
        secret: bytes,
        counter_store_path: str | Path,
        *,
        source_address: bytes | None = None,
        port: int = WEBSETUP_PORT,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_LEN:
            raise ValueError(f"websetup secret must be {SECRET_LEN} bytes")
        self.secret = bytes(secret)
        self.counter_store_path = Path(counter_store_path)
        self.source_address = source_address
        self.port = port
        self._wallclock = wallclock
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WebsetupClient(counter_store_path={self.counter_store_path!s})"

    def next_counter(self) -> int:
        """max(last + 1, wall-clock microseconds), written before use so a crash cannot reuse it."""
        with self._lock:
            last = 0
            try:
                with open(self.counter_store_path, "rb") as f:
                    obj = json.loads(f.read(4096))  # bounded: a wrong path must not eat memory
                if isinstance(obj, dict) and isinstance(obj.get("counter"), int):
                    last = obj["counter"]
            except FileNotFoundError:
                pass
            except (OSError, ValueError):
                log.warning("websetup client: counter store %s unreadable; using the clock", self.counter_store_path)
            counter = max(last + 1, int(self._wallclock() * 1_000_000))
            if counter > MAX_COUNTER:
                raise WebsetupError("counter_exhausted", "the 64-bit counter is used up")
            atomic_write_json(self.counter_store_path, {"counter": counter})
            return counter

    def send(self, node_address: str | bytes, command: str, args: Sequence[str] = (), timeout: float = 2.0) -> Reply:
        """Send one command and wait for its authenticated reply; raises WebsetupError('timeout') on silence."""
        if isinstance(node_address, (bytes, bytearray)):
            host = str(ipaddress.IPv6Address(bytes(node_address)))
        else:
            host = str(ipaddress.IPv6Address(node_address.split("%", 1)[0]))
        args = tuple(args)
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.connect((host, self.port))
            src = self.source_address or ipaddress.IPv6Address(sock.getsockname()[0].split("%", 1)[0]).packed
            counter = self.next_counter()
            sock.send(build_command(self.secret, src, counter, command, args))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WebsetupError("timeout", f"no authenticated reply from {host} within {timeout} s")
                sock.settimeout(left)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionRefusedError:
                    raise WebsetupError("refused", f"nothing listens on [{host}]:{self.port}") from None
                try:
                    reply = parse_reply(data, self.secret, src)
                except WebsetupError:
                    continue
                if reply.counter != counter or reply.command != command:
                    continue
                if command == "change-secret" and reply.ok:
                    self.secret = bytes.fromhex(args[0])
                return reply
