"""Base server and base client on loopback (no root): login, rendezvous, relay, and attacks on them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from husarnet_ros.base.server import BaseConfig, BaseServer, NodeConn
from husarnet_ros.base.simnode import SimNode
from husarnet_ros.core import base_proto as bp
from husarnet_ros.core import handshake as hs
from husarnet_ros.core.constants import Timers
from husarnet_ros.core.identity import Identity
from husarnet_ros.core.session import Keypair
from husarnet_ros.core.wire import build_hello

pytestmark = pytest.mark.timeout(60)

FAST = Timers(base_reconnect_min=0.05, base_reconnect_max=0.4)
DATAGRAM = b"\x04\x00\x00\x00" + bytes(12) + b"end-to-end sealed payload" + bytes(16)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 45))


async def start_server(tmp: Path, **kw) -> BaseServer:
    identity = kw.pop("identity", None)
    cfg = BaseConfig(state_dir=tmp / "base", bind="127.0.0.1", tcp_port=kw.pop("tcp_port", 0), udp_port=0, **kw)
    srv = BaseServer(cfg, identity=identity)
    await srv.start()
    return srv


def spec_of(srv: BaseServer) -> str:
    return f"127.0.0.1:{srv.tcp_port}:{srv.udp_port}"


async def nodes(srv: BaseServer, tmp: Path, *names: str, **kw) -> list[SimNode]:
    out = []
    for name in names:
        n = SimNode(spec_of(srv), tmp / name, hostname=name, timers=kw.get("timers", FAST), **kw.get("extra", {}))
        await n.start()
        out.append(n)
    return out


async def close_all(srv: BaseServer | None, *ns: SimNode) -> None:
    for n in ns:
        await n.close()
    if srv is not None:
        await srv.close()


# --- raw protocol helpers for the attack tests ------------------------------------------------
async def raw_connect(srv: BaseServer):
    r, w = await asyncio.open_connection("127.0.0.1", srv.tcp_port)
    return r, w


def frame(d: bytes) -> bytes:
    return struct.pack(">H", len(d)) + d


async def read_frame(r: asyncio.StreamReader) -> bytes:
    n = struct.unpack(">H", await r.readexactly(2))[0]
    return await r.readexactly(n)


_last_ts: dict[bytes, bytes] = {}


async def raw_handshake(srv: BaseServer, ident: Identity, init: bytes | None = None):
    """Handshake by hand; returns (reader, writer, keypair, challenge nonce, init message)."""
    r, w = await raw_connect(srv)
    st = None
    if init is None:
        # TAI64N is whitened to ~17 ms: a second handshake of the same key in the same tick is a replay.
        ts = hs.tai64n(time.time())
        while ts <= _last_ts.get(ident.address, b""):
            await asyncio.sleep(0.005)
            ts = hs.tai64n(time.time())
        _last_ts[ident.address] = ts
        init, st = hs.create_initiation(ident, srv.public_key, 77, ts, 0)
    w.write(frame(init))
    resp = await asyncio.wait_for(read_frame(r), 5)
    km = hs.consume_response(st, resp)
    kp = Keypair(km, time.monotonic())
    challenge = kp.open(await asyncio.wait_for(read_frame(r), 5))
    return r, w, kp, bp.parse_login_challenge(challenge), init


async def closed_by_peer(r: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    try:
        data = await asyncio.wait_for(r.read(65536), timeout)
    except (ConnectionError, asyncio.TimeoutError):
        return False
    return data == b""


# --- login and rendezvous ---------------------------------------------------------------------
def test_login_and_query_sends_peer_info_with_punch_to_both(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        a, b = await nodes(srv, tmp_path, "a", "b")
        b.lan = [("198.18.3.3", 5582)]
        try:
            assert await a.wait_state("udp") and await b.wait_state("udp")
            assert srv.counters["logins"] == 2 and len(srv.nodes) == 2
            b.client.update_endpoints()
            await asyncio.sleep(0.05)
            assert a.client.query(b.address)
            assert await a.wait(lambda: a.peer_infos and b.peer_infos)
            addr, pub, eps, punch = a.peer_infos[0]
            assert (addr, pub, punch) == (b.address, b.identity.public_key, False)
            assert ("127.0.0.1", b.local_port) in eps and ("198.18.3.3", 5582) in eps
            addr, pub, eps, punch = b.peer_infos[0]
            assert (addr, pub, punch) == (a.address, a.identity.public_key, True)
            assert eps[0] == ("127.0.0.1", a.local_port)  # the public UDP mapping the base observed
            assert a.client.observed_endpoint == ("127.0.0.1", a.local_port)
            # An offline target: no callback, nobody else is told anything.
            a.client.query(Identity.generate().address)
            await asyncio.sleep(0.1)
            assert len(a.peer_infos) == 1 and len(b.peer_infos) == 1
        finally:
            await close_all(srv, a, b)

    run(main())


def test_relay_stamps_source_from_the_session(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        a, b, c = await nodes(srv, tmp_path, "a", "b", "c")
        try:
            for n in (a, b, c):
                assert await n.wait_state("udp")
            assert a.client.relay(b.address, DATAGRAM)
            assert c.client.relay(b.address, DATAGRAM + b"c")
            assert await b.wait(lambda: len(b.relayed) == 2)
            got = dict((d, s) for s, d in b.relayed)
            assert got[DATAGRAM] == a.address and got[DATAGRAM + b"c"] == c.address
            assert srv.counters["relayed_udp"] == 2
            # A node cannot inject a base->node message: RELAYED sent *to* the base is refused, nothing delivered.
            a.client._send_control(bp.build_relayed(c.address, DATAGRAM))
            await asyncio.sleep(0.1)
            assert srv.counters["unexpected"] == 1 and len(b.relayed) == 2 and not c.relayed
            # Relay to a node that is not logged in: dropped and counted.
            assert a.client.relay(Identity.generate().address, DATAGRAM)
            assert await a.wait(lambda: srv.counters["relay_no_peer"] == 1)
        finally:
            await close_all(srv, a, b, c)

    run(main())


def test_relay_over_tcp_when_udp_is_blocked(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        a, b = await nodes(srv, tmp_path, "a", "b", extra={"udp_blocked": True})
        try:
            assert await a.wait_state("tcp") and await b.wait_state("tcp")
            await asyncio.sleep(0.3)
            assert a.client.state == "tcp" and b.client.state == "tcp"  # no UDP round trip possible
            for i in range(5):
                assert a.client.relay(b.address, DATAGRAM + bytes([i]))
            assert await b.wait(lambda: len(b.relayed) == 5)
            assert [d[-1] for _, d in b.relayed] == [0, 1, 2, 3, 4]
            assert srv.counters["relayed_tcp"] == 5 and srv.counters["relayed_udp"] == 0
        finally:
            await close_all(srv, a, b)

    run(main())


def test_relay_from_another_thread(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        a, b = await nodes(srv, tmp_path, "a", "b", extra={"udp_blocked": True})
        try:
            assert await a.wait_state("tcp") and await b.wait_state("tcp")
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(None, lambda: [a.client.relay(b.address, DATAGRAM) for _ in range(20)])
            assert all(ok)
            assert await b.wait(lambda: len(b.relayed) == 20)
        finally:
            await close_all(srv, a, b)

    run(main())


def test_relay_rate_limit_counts_drops(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path, relay_rate=1000.0, relay_burst=2000.0)
        a, b = await nodes(srv, tmp_path, "a", "b")
        try:
            assert await a.wait_state("udp") and await b.wait_state("udp")
            payload = DATAGRAM + bytes(500 - len(DATAGRAM))
            for _ in range(20):
                a.client.relay(b.address, payload)
            assert await a.wait(lambda: srv.counters["relayed_packets"] + srv.counters["rate_limited"] == 20)
            # Burst 2000 B = 4 packets, refill 2 packets/s: even a stalled machine passes at most a few more.
            assert srv.counters["rate_limited"] >= 12
            assert len(b.relayed) == srv.counters["relayed_packets"] <= 8
        finally:
            await close_all(srv, a, b)

    run(main())


def test_flip_bits_test_hook(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path, flip_bits=True)
        a, b = await nodes(srv, tmp_path, "a", "b")
        try:
            assert await a.wait_state("udp") and await b.wait_state("udp")
            a.client.relay(b.address, DATAGRAM)
            assert await b.wait(lambda: b.relayed)
            got = b.relayed[0][1]
            assert len(got) == len(DATAGRAM) and got != DATAGRAM
            assert sum(bin(x ^ y).count("1") for x, y in zip(got, DATAGRAM, strict=True)) == 1
        finally:
            await close_all(srv, a, b)

    run(main())


# --- forged and unauthenticated messages --------------------------------------------------------
def test_forged_base_datagrams_are_ignored_by_the_client(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        a, b = await nodes(srv, tmp_path, "a", "b")
        try:
            assert await a.wait_state("udp") and await b.wait_state("udp")
            cl = b.client
            kp = cl._send_kp
            # Spoofed base source, right receiver index, no key: fails the AEAD.
            forged = struct.pack("<IIQ", 4, kp.local_index, 10**6) + bp.build_relayed(a.address, DATAGRAM) + bytes(16)
            assert cl.handle_udp(forged, cl.udp_endpoint)
            forged_pi = struct.pack("<IIQ", 4, kp.local_index, 10**6 + 1) + bytes(80)
            assert cl.handle_udp(forged_pi, cl.udp_endpoint)
            assert b.counters["base_bad_mac"] == 2
            # Not ours at all (unknown index or not Data): declined so the engine can handle it.
            assert not cl.handle_udp(struct.pack("<IIQ", 4, kp.local_index ^ 1, 0) + bytes(32), cl.udp_endpoint)
            assert not cl.handle_udp(b"\x01\x00\x00\x00" + bytes(164), cl.udp_endpoint)
            # A genuine datagram captured and replayed is refused by the window.
            captured = []
            orig = srv.send_udp

            def tap(d, ep):
                captured.append(d)
                return orig(d, ep)

            srv.send_udp = tap
            a.client.relay(b.address, DATAGRAM)
            assert await b.wait(lambda: len(b.relayed) == 1)
            assert cl.handle_udp(captured[-1], ("127.0.0.1", 1))
            assert b.counters["base_replay"] == 1 and len(b.relayed) == 1
            assert not b.peer_infos
        finally:
            await close_all(srv, a, b)

    run(main())


def test_spoofed_udp_to_base_never_moves_the_node_endpoint(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        a, b = await nodes(srv, tmp_path, "a", "b")
        try:
            assert await a.wait_state("udp") and await b.wait_state("udp")
            conn = srv.nodes[a.address]
            good = conn.udp_endpoint
            kp = a.client._send_kp
            loop = asyncio.get_running_loop()
            tr, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
            # Right index, garbage ciphertext, from the attacker's socket.
            tr.sendto(struct.pack("<IIQ", 4, kp.remote_index, 99) + bytes(40), ("127.0.0.1", srv.udp_port))
            # A genuine datagram replayed from the attacker's socket.
            sealed = kp.seal(bp.build_relay(b.address, DATAGRAM))
            a.client.send_udp(sealed, a.client.udp_endpoint)
            assert await b.wait(lambda: len(b.relayed) == 1)
            tr.sendto(sealed, ("127.0.0.1", srv.udp_port))
            tr.sendto(b"\x05junk", ("127.0.0.1", srv.udp_port))
            await asyncio.sleep(0.2)
            tr.close()
            assert srv.counters["bad_mac"] == 1 and srv.counters["replay"] == 1 and srv.counters["malformed"] >= 1
            assert conn.udp_endpoint == good and len(b.relayed) == 1
        finally:
            await close_all(srv, a, b)

    run(main())


def test_bad_login_signature_is_refused(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        ident = Identity.generate()
        try:
            r, w, kp, nonce, _ = await raw_handshake(srv, ident)
            other = Identity.generate()  # signs with the wrong key
            sig = other.sign(bp.login_message(srv.public_key, nonce))
            w.write(frame(kp.seal(bp.build_login(sig, "mallory", []))))
            assert await closed_by_peer(r)
            assert srv.counters["login_failed"] == 1 and ident.address not in srv.nodes
            w.close()
            # Right key but signing a different nonce (replay of an old login): refused too.
            r, w, kp, nonce, _ = await raw_handshake(srv, ident)
            sig = ident.sign(bp.login_message(srv.public_key, bytes(32)))
            w.write(frame(kp.seal(bp.build_login(sig, "x", []))))
            assert await closed_by_peer(r)
            assert srv.counters["login_failed"] == 2 and not srv.nodes
            w.close()
        finally:
            await srv.close()

    run(main())


def test_replayed_initiation_is_refused(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        ident = Identity.generate()
        try:
            r, w, kp, nonce, init = await raw_handshake(srv, ident)
            w.write(frame(kp.seal(bp.build_login(ident.sign(bp.login_message(srv.public_key, nonce)), "n", []))))
            assert bp.parse_login_ok(kp.open(await read_frame(r))) is None
            assert ident.address in srv.nodes
            r2, w2 = await raw_connect(srv)
            w2.write(frame(init))  # the same initiation, captured and replayed
            assert await closed_by_peer(r2)
            assert srv.counters["replay"] == 1 and srv.counters["handshakes_completed"] == 1
            assert srv.nodes[ident.address].transport is not None  # the genuine session is untouched
            w.close()
            w2.close()
        finally:
            await srv.close()

    run(main())


def test_messages_before_login_are_ignored(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        a = (await nodes(srv, tmp_path, "a"))[0]
        ident = Identity.generate()
        try:
            assert await a.wait_state("udp")
            _r, w, kp, _nonce, _ = await raw_handshake(srv, ident)
            w.write(frame(kp.seal(bp.build_query(a.address))))
            w.write(frame(kp.seal(bp.build_relay(a.address, DATAGRAM))))
            await asyncio.sleep(0.2)
            assert srv.counters["unexpected"] == 2 and not a.peer_infos and not a.relayed
            w.close()
        finally:
            await close_all(srv, a)

    run(main())


def test_garbage_frames_close_the_connection(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        try:
            for junk in (b"\x00\x00", frame(b"\x09\x00\x00\x00abc"), frame(b"\x01" + bytes(167))):
                r, w = await raw_connect(srv)
                w.write(junk)
                assert await closed_by_peer(r)
                w.close()
            assert not srv.nodes and srv.counters["malformed"] + srv.counters["bad_mac"] >= 3
        finally:
            await srv.close()

    run(main())


def test_second_login_supersedes_the_first(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        ident = Identity.generate()
        n1 = SimNode(spec_of(srv), tmp_path / "n1", identity=ident, timers=FAST)
        n2 = SimNode(spec_of(srv), tmp_path / "n2", identity=ident, timers=Timers(base_reconnect_min=30))
        try:
            await n1.start()
            assert await n1.wait_state("udp")
            first = srv.nodes[ident.address]
            n1.client._closed = True  # n1 must not fight back by reconnecting
            await asyncio.sleep(0.05)  # TAI64N is whitened to ~17 ms: a same-tick initiation would look replayed
            await n2.start()
            assert await n2.wait_state("udp")
            assert await n2.wait(lambda: srv.counters["superseded"] == 1 and first.transport is None)
            assert srv.nodes[ident.address] is not first and len(srv.nodes) == 1
            assert srv.counters["logouts"] == 0  # the superseded connection did not unregister the new one
        finally:
            await close_all(srv, n1, n2)

    run(main())


# --- keys: trust on first use and pinning -------------------------------------------------------
def test_tofu_stores_key_and_refuses_a_changed_key(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        port = srv.tcp_port
        a = SimNode(spec_of(srv), tmp_path / "a", timers=FAST)
        await a.start()
        try:
            assert await a.wait_state("udp")
            stored = json.loads((tmp_path / "a" / "base_keys.json").read_text())
            assert stored == {f"127.0.0.1:{port}": srv.public_key.hex()}
            assert oct((tmp_path / "a" / "base_keys.json").stat().st_mode & 0o777) == "0o600"
            await srv.close()
            # Same address and port, another identity: an impostor (or a reinstalled base).
            (tmp_path / "base" / "id").unlink()
            srv2 = await start_server(tmp_path, tcp_port=port)
            assert srv2.public_key != srv.public_key
            assert await a.wait(lambda: a.counters["base_key_mismatch"] >= 1)
            assert a.client.state == "none" and "trusted on first use" in a.client.error
            assert srv2.counters["handshakes_received"] == 0 and not srv2.nodes  # it never even tried
            assert json.loads((tmp_path / "a" / "base_keys.json").read_text()) == stored
            await srv2.close()
        finally:
            await close_all(None, a)

    run(main())


def test_pinned_key(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path)
        good = SimNode(f"{spec_of(srv)}#{srv.public_key.hex()}", tmp_path / "g", timers=FAST)
        wrong = Identity.generate().public_key
        bad = SimNode(f"{spec_of(srv)}#{wrong.hex()}", tmp_path / "b", timers=FAST)
        await good.start()
        await bad.start()
        try:
            assert await good.wait_state("udp")
            assert not (tmp_path / "g" / "base_keys.json").exists()  # pinned: nothing to remember
            assert await bad.wait(lambda: bad.counters["base_key_mismatch"] >= 1)
            assert bad.client.state == "none" and "pins" in bad.client.error
            assert len(srv.nodes) == 1
        finally:
            await close_all(srv, good, bad)

    run(main())


# --- outages -------------------------------------------------------------------------------------
def test_reconnect_with_backoff_after_restart(tmp_path) -> None:
    async def main():
        timers = Timers(base_reconnect_min=0.05, base_reconnect_max=0.4)
        srv = await start_server(tmp_path)
        port = srv.tcp_port
        a, b = await nodes(srv, tmp_path, "a", "b", timers=timers)
        try:
            assert await a.wait_state("udp") and await b.wait_state("udp")
            before = a.client.connect_attempts
            await srv.close()
            assert await a.wait(lambda: a.client.state == "none")
            t0 = time.monotonic()
            await asyncio.sleep(2.0)
            attempts = a.client.connect_attempts - before
            elapsed = time.monotonic() - t0
            # Delays 0.05*2^k*[0.5,1] capped at 0.4*[0.5,1]: at most ~4 + elapsed/0.2 attempts (a busy loop: 1000s).
            assert 2 <= attempts <= 4 + elapsed / 0.2 + 1, attempts
            # The base comes back with empty state (same key): both nodes log in again and relay works.
            srv2 = BaseServer(
                BaseConfig(state_dir=tmp_path / "base", bind="127.0.0.1", tcp_port=port, udp_port=srv.udp_port)
            )
            await srv2.start()
            try:
                assert await a.wait_state("udp") and await b.wait_state("udp")
                assert len(srv2.nodes) == 2
                a.client.relay(b.address, DATAGRAM)
                assert await b.wait(lambda: b.relayed)
            finally:
                await close_all(srv2, a, b)
        finally:
            await close_all(None, a, b)

    run(main())


def test_rekey_keeps_the_session_alive(tmp_path) -> None:
    async def main():
        timers = Timers(rekey_after_time=0.5, reject_after_time=1.5, rekey_timeout=0.5, base_reconnect_min=0.05)
        srv = await start_server(tmp_path, timers=timers)
        a, b = await nodes(srv, tmp_path, "a", "b", timers=timers, extra={"udp_ping_interval": 0.3})
        try:
            assert await a.wait_state("udp") and await b.wait_state("udp")
            first = a.client._send_kp
            for i in range(8):
                await asyncio.sleep(0.5)
                a.client.relay(b.address, DATAGRAM + bytes([i]))
            assert await b.wait(lambda: len(b.relayed) >= 7)
            assert a.client._send_kp is not first
            assert a.counters["base_logins"] == 1  # no reconnect: the same TCP session, new keys
            assert srv.counters["handshakes_completed"] >= 6 and srv.counters["expired"] == 0
            assert len(srv.index) <= 6  # old keypairs are dropped (at most 3 per node)
        finally:
            await close_all(srv, a, b)

    run(main())


def test_login_timeout_and_stats_file(tmp_path) -> None:
    async def main():
        stats = tmp_path / "stats.json"
        srv = await start_server(tmp_path, login_timeout=0.2, sweep_interval=0.1, stats_file=stats, stats_interval=0.1)
        try:
            r, w = await raw_connect(srv)
            w.write(frame(build_hello(Identity.generate(), None, 1)))
            await read_frame(r)
            assert await closed_by_peer(r, 3)
            assert srv.counters["timeouts"] == 1
            await asyncio.sleep(0.3)
            data = json.loads(stats.read_text())
            assert data["counters"]["timeouts"] == 1 and data["nodes"] == 0
            w.close()
        finally:
            await srv.close()

    run(main())


# --- command line --------------------------------------------------------------------------------
def test_cli_sigterm_and_sigusr1(tmp_path) -> None:
    stats = tmp_path / "stats.json"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-m", "husarnet_ros.base", "--state-dir", str(tmp_path / "b"), "--bind", "127.0.0.1"]
    cmd += ["--tcp-port", "0", "--udp-port", "0", "--stats-file", str(stats), "--stats-interval", "3600"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not stats.exists() and time.time() < deadline:
            time.sleep(0.05)
        first = json.loads(stats.read_text())
        assert first["tcp_port"] > 0 and first["nodes"] == 0
        stats.unlink()
        proc.send_signal(signal.SIGUSR1)
        while not stats.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert stats.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        err = proc.stderr.read()
        assert "listening" in err and "shutting down" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    key = subprocess.run([*cmd[:5], "--print-key"], env=env, capture_output=True, text=True, check=True)
    assert bytes.fromhex(key.stdout.strip()) == Identity.load(tmp_path / "b" / "id").public_key


def test_global_handshake_budget(tmp_path) -> None:
    async def main():
        srv = await start_server(tmp_path, handshake_rate=3.0)
        try:
            closed = 0
            hellos = [build_hello(Identity.generate(), None, 1) for _ in range(6)]
            srv._hs_bucket.tokens, srv._hs_bucket.last = 3.0, srv.clock()
            for hello in hellos:  # far faster than 3/s
                r, w = await raw_connect(srv)
                w.write(frame(hello))
                try:
                    await asyncio.wait_for(read_frame(r), 2)
                except asyncio.IncompleteReadError:
                    closed += 1
                w.close()
            assert srv.counters["hellos"] == 3 and srv.counters["rate_limited"] == 3 and closed == 3
        finally:
            await srv.close()

    run(main())


def test_nat_rebinding_moves_the_endpoint_only_on_authenticated_datagrams(tmp_path) -> None:
    async def main():
        from husarnet_ros.base.simnode import SharedUdp

        srv = await start_server(tmp_path)
        a, b = await nodes(srv, tmp_path, "a", "b")
        try:
            assert await a.wait_state("udp") and await b.wait_state("udp")
            old = a.client.observed_endpoint
            assert srv.nodes[a.address].udp_endpoint == old
            # The NAT rebinds: the node's datagrams now come from another port.
            old_udp = a.udp
            a.udp = await SharedUdp.open(a.index)
            a.client._send_ping(time.monotonic())
            new = ("127.0.0.1", a.udp.local_port)
            assert await a.wait(lambda: srv.nodes[a.address].udp_endpoint == new)
            assert srv.counters["udp_endpoint_moved"] == 1
            assert await a.wait(lambda: a.client.observed_endpoint == new)  # OBSERVED over TCP and the pong
            b.client.relay(a.address, DATAGRAM)
            assert await a.wait(lambda: a.relayed)  # relayed traffic follows the new mapping
            old_udp.close()
        finally:
            await close_all(srv, a, b)

    run(main())


# --- fuzz: hostile bytes at every entry point never raise ----------------------------------------
class _FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 4000) if name == "peername" else default


def _session_pair(server_id: Identity, node_id: Identity):
    init, ist = hs.create_initiation(node_id, server_id.public_key, 1, hs.tai64n(time.time()), 0)
    resp, skm = hs.create_response(hs.consume_initiation(server_id, init), 2, 0)
    nkm = hs.consume_response(ist, resp)
    return skm, Keypair(nkm, time.monotonic())


@pytest.fixture(scope="module")
def fuzz_ids():
    return Identity.generate(), Identity.generate()


def _logged_in_conn(tmp_path, fuzz_ids):
    server_id, node_id = fuzz_ids
    srv = BaseServer(BaseConfig(state_dir=tmp_path), identity=server_id)
    conn = NodeConn(srv)
    conn.transport = _FakeTransport()
    skm, node_kp = _session_pair(server_id, node_id)
    kp = Keypair(skm, time.monotonic(), conn)
    srv.index[kp.local_index] = kp
    conn.add_keypair(kp)
    conn.send_kp = kp
    conn.state, conn.address, conn.public_key = "up", node_id.address, node_id.public_key
    srv.nodes[conn.address] = conn
    return srv, conn, node_kp


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), first=st.sampled_from([0x10, 0x11, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x2F]))
def test_fuzz_server_entry_points(tmp_path, fuzz_ids, data, first) -> None:
    srv, conn, node_kp = _logged_in_conn(tmp_path, fuzz_ids)
    plaintext = bytes([first]) + data
    # Authenticated but hostile control plaintext, over TCP and over UDP.
    srv.handle_tcp_frame(conn, node_kp.seal(plaintext))
    srv.handle_udp(node_kp.seal(plaintext), ("127.0.0.1", 5000))
    # Raw junk on both transports and as a TCP byte stream.
    srv.handle_udp(data, ("127.0.0.1", 5001))
    srv.handle_udp(b"\x04\x00\x00\x00" + data, ("127.0.0.1", 5001))
    if conn.transport is not None and not conn.transport.closed:
        conn.data_received(data)
    # Nothing escaped as an exception, and nothing hostile unregistered or replaced the node.
    assert srv.nodes.get(conn.address) is conn


def test_timers_scale_option_scales_and_is_bounded() -> None:
    from husarnet_ros.base.server import build_arg_parser, config_from_args

    cfg = config_from_args(build_arg_parser().parse_args(["--state-dir", "/nonexistent", "--timers-scale", "0.5"]))
    assert cfg.timers == Timers().scaled(0.5)
    with pytest.raises(SystemExit, match="timers-scale"):
        config_from_args(build_arg_parser().parse_args(["--state-dir", "/nonexistent", "--timers-scale", "0"]))


def test_print_key_with_an_unsafe_id_file_is_a_one_line_error(tmp_path, caplog) -> None:
    from husarnet_ros.base.server import main

    Identity.generate().save(tmp_path / "id")
    (tmp_path / "id").chmod(0o644)
    assert main(["--state-dir", str(tmp_path), "--print-key"]) == 1
    assert "chmod 600" in caplog.text
