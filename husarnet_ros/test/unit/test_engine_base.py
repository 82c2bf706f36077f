"""Engines meeting through a real base server on loopback: rendezvous, relay, and upgrade to direct.

The base server runs in-process on 127.0.0.1 (TCP and UDP, ephemeral ports).
In the relay tests the engines sit on the in-memory network, which cannot
reach the base's UDP port, so the base relays over TCP: that is exactly the
"direct UDP blocked" case.  Then a direct hint appears and the pair must
upgrade to direct only after an authenticated probe on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from husarnet_ros.base.server import BaseConfig, BaseServer
from husarnet_ros.core.constants import Timers
from husarnet_ros.core.engine import Engine, EngineConfig
from husarnet_ros.core.identity import Identity, format_address
from husarnet_ros.core.memnet import MemoryNetwork
from husarnet_ros.core.transport import UdpTransport

TIMERS = Timers(
    rekey_timeout=0.3,
    keepalive_timeout=1.0,
    probe_interval=1.0,
    path_timeout=3.0,
    rekey_attempt_time=20.0,
    base_reconnect_min=0.1,
    base_reconnect_max=1.0,
)


def packet(src: bytes, dst: bytes, payload: bytes) -> bytes:
    return struct.pack(">IHBB", 6 << 28, len(payload), 59, 64) + src + dst + payload


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


class BaseThread:
    """A BaseServer on its own asyncio loop thread, bound to 127.0.0.1."""

    def __init__(self, state_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = BaseServer(BaseConfig(state_dir=state_dir, bind="127.0.0.1", tcp_port=0, udp_port=0))
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-base", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    @property
    def spec(self) -> str:
        key = self.server.public_key.hex()
        return f"127.0.0.1:{self.server.tcp_port}:{self.server.udp_port}#{key}"

    def close(self) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def base(tmp_path):
    b = BaseThread(tmp_path / "base")
    yield b
    b.close()


def make_engine(tmp: Path, name: str, ident: Identity, other: Identity, base_spec: str, transport) -> Engine:
    cfg = EngineConfig(
        state_dir=tmp / name,
        use_tun=False,
        lan_discovery=False,
        base_servers=[base_spec],
        whitelist=[format_address(other.address)],
        timers=TIMERS,
    )
    return Engine(cfg, identity=ident, transport=transport)


def info(engine: Engine, addr: bytes):
    return next((p for p in engine.peers() if p.address == addr), None)


def test_relay_then_upgrade_to_direct(tmp_path, base):
    ia, ib = Identity.generate(), Identity.generate()
    net = MemoryNetwork(seed=2)
    ep_a, ep_b = ("198.18.0.1", 5582), ("198.18.0.2", 5582)
    a = make_engine(tmp_path, "a", ia, ib, base.spec, net.transport(ep_a))
    b = make_engine(tmp_path, "b", ib, ia, base.spec, net.transport(ep_b))
    got_b: list[bytes] = []
    got_a: list[bytes] = []
    b.on_packet = got_b.append
    a.on_packet = got_a.append
    try:
        a.start()
        b.start()
        assert wait_for(lambda: a.status().base == "tcp" and b.status().base == "tcp")
        # No static endpoints, no LAN: the base introduces them and relays (its UDP is unreachable here).
        assert wait_for(lambda: (i := info(a, ib.address)) is not None and i.is_secure and i.path == "relay", 15)
        deadline = time.monotonic() + 10
        while not got_b:
            assert time.monotonic() < deadline
            a.inject_packet(packet(ia.address, ib.address, b"via-relay"))
            time.sleep(0.1)
        assert got_b[0][40:] == b"via-relay" and got_b[0][8:24] == ia.address
        b.inject_packet(packet(ib.address, ia.address, b"back-via-relay"))
        assert wait_for(lambda: any(p[40:] == b"back-via-relay" for p in got_a))
        assert a.ping(ib.address, 3.0) > 0
        # A direct hint appears (e.g. from a LAN beacon): used only after an authenticated probe succeeds.
        a.add_candidates(ib.address, [ep_b], source="base")
        assert wait_for(lambda: info(a, ib.address).path == "direct", 10)
        assert info(a, ib.address).endpoint == "198.18.0.2:5582"
        n = len(got_b)
        a.inject_packet(packet(ia.address, ib.address, b"direct-now"))
        assert wait_for(lambda: len(got_b) > n and got_b[-1][40:] == b"direct-now")
        assert a.counters.get("bad_mac") == 0 and b.counters.get("bad_mac") == 0
    finally:
        a.stop()
        b.stop()
        net.close()


def test_rendezvous_over_loopback_udp(tmp_path, base):
    """Real UDP sockets on loopback; the base learns each node's UDP mapping and hands it to the other."""
    ia, ib = Identity.generate(), Identity.generate()
    a = make_engine(tmp_path, "a", ia, ib, base.spec, loopback_udp())
    b = make_engine(tmp_path, "b", ib, ia, base.spec, loopback_udp())
    got_b: list[bytes] = []
    b.on_packet = got_b.append
    try:
        a.start()
        b.start()
        assert wait_for(lambda: a.status().base == "udp" and b.status().base == "udp", 15)
        assert wait_for(lambda: (i := info(a, ib.address)) is not None and i.is_secure and i.path == "direct", 15)
        assert info(a, ib.address).endpoint == f"127.0.0.1:{b.local_port}"
        deadline = time.monotonic() + 10
        while not got_b:
            assert time.monotonic() < deadline
            a.inject_packet(packet(ia.address, ib.address, b"hi-over-udp"))
            time.sleep(0.1)
        assert got_b[0][40:] == b"hi-over-udp"
    finally:
        a.stop()
        b.stop()


def loopback_udp() -> UdpTransport:
    """A real UDP socket on 127.0.0.1 that reports no LAN endpoints: every datagram stays on loopback."""
    t = UdpTransport(0, bind_host="127.0.0.1")
    t.local_networks = []
    return t


@contextlib.contextmanager
def direct_pair_via_base(tmp_path: Path, bt: BaseThread) -> Iterator[tuple[Identity, Identity, Engine, Engine, list]]:
    """A and B on loopback UDP, met through the base and on a direct path; what B receives is collected."""
    ia, ib = Identity.generate(), Identity.generate()
    a = make_engine(tmp_path, "a", ia, ib, bt.spec, loopback_udp())
    b = make_engine(tmp_path, "b", ib, ia, bt.spec, loopback_udp())
    got_b: list[bytes] = []
    b.on_packet = got_b.append
    try:
        a.start()
        b.start()
        assert wait_for(lambda: (i := info(a, ib.address)) is not None and i.is_secure and i.path == "direct", 15)
        yield ia, ib, a, b, got_b
    finally:
        a.stop()
        b.stop()


def test_base_down_keeps_direct_session(tmp_path):
    bt = BaseThread(tmp_path / "base")
    try:
        with direct_pair_via_base(tmp_path, bt) as (ia, ib, a, _b, got_b):
            bt.close()
            assert wait_for(lambda: a.status().base == "none", 10)
            for i in range(10):
                a.inject_packet(packet(ia.address, ib.address, b"p%d" % i))
            assert wait_for(lambda: len([p for p in got_b if p[40:41] == b"p"]) == 10)
    finally:
        bt.close()


def _restart_a_without_base(tmp_path: Path, ia: Identity, ib: Identity, got_b: list[bytes]) -> bool:
    """Start A again (same state directory, new socket) with its base gone: True if B gets a packet from it."""
    a = make_engine(tmp_path, "a", ia, ib, "127.0.0.1:9", loopback_udp())  # a base that is not there
    try:
        a.start()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            i = info(a, ib.address)
            if i is not None and i.is_secure:
                a.inject_packet(packet(ia.address, ib.address, b"after-restart"))
                if wait_for(lambda: any(p[40:] == b"after-restart" for p in got_b), 1):
                    return True
            time.sleep(0.05)
        return False
    finally:
        a.stop()


def test_a_restart_while_the_base_is_down_reaches_the_peer_at_its_cached_endpoint(tmp_path):
    """The endpoint cache: A met B through the base; the base goes away; A restarts and still finds B
    at the direct endpoint it validated before (a hint: the handshake authenticates it).  Without the
    cache file the same restart stays cut off, which is what the cache is for."""
    bt = BaseThread(tmp_path / "base")
    try:
        with direct_pair_via_base(tmp_path, bt) as (ia, ib, a, b, got_b):
            a.stop()  # writes the cache
            bt.close()
            cache = tmp_path / "a" / "endpoints.json"
            assert (cache.stat().st_mode & 0o777) == 0o600
            expected = {format_address(ib.address): [f"127.0.0.1:{b.local_port}"]}
            assert json.loads(cache.read_text())["peers"] == expected
            assert _restart_a_without_base(tmp_path, ia, ib, got_b)
            cache.unlink()
            assert not _restart_a_without_base(tmp_path, ia, ib, got_b)
    finally:
        bt.close()


def test_a_damaged_endpoint_cache_is_reported_and_replaced(tmp_path, caplog):
    ia, ib = Identity.generate(), Identity.generate()
    (tmp_path / "a").mkdir()
    cache = tmp_path / "a" / "endpoints.json"
    cache.write_text("{damaged")
    cache.chmod(0o600)
    ta = UdpTransport(0, bind_host="127.0.0.1")
    a = make_engine(tmp_path, "a", ia, ib, "127.0.0.1:9", ta)
    with caplog.at_level("WARNING"):
        a.start()
        a.stop()
    assert any("is not JSON" in r.getMessage() and "starting without it" in r.getMessage() for r in caplog.records)
    assert json.loads(cache.read_text()) == {"version": 1, "peers": {}}  # rewritten, usable again


def test_an_endpoint_cache_that_cannot_be_written_is_one_warning_not_one_per_interval(tmp_path, caplog, monkeypatch):
    """A read-only state directory (an immutable robot image) is a choice, not news every 30 s."""
    from husarnet_ros.core import endpoint_cache

    ia, ib = Identity.generate(), Identity.generate()
    transport = UdpTransport(0, bind_host="127.0.0.1")
    a = make_engine(tmp_path, "a", ia, ib, "127.0.0.1:9", transport)
    a._endpoint_cache_path = tmp_path / "a" / "endpoints.json"
    calls: list[dict] = []

    def read_only(path, entries):  # type: ignore[no-untyped-def]
        calls.append(entries)
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(endpoint_cache, "save", read_only)
    snapshot = {ib.address: [("198.18.0.2", 5582)]}
    with caplog.at_level("WARNING"):
        for _ in range(3):
            a._save_endpoints(snapshot)
    warned = [r for r in caplog.records if "not written" in r.getMessage()]
    assert len(calls) == 3 and len(warned) == 1 and "Read-only" in warned[0].getMessage()
    assert a._cached_endpoints == {}  # not saved: the next interval tries again
    monkeypatch.setattr(endpoint_cache, "save", lambda path, entries: None)
    a._save_endpoints(snapshot)
    assert a._cached_endpoints == snapshot and a._cache_save_error == ""
    transport.close()
