"""End-to-end relay security (issue #3 test 7, TESTPLAN rows 8, 9 and 10 via the base).

peerA and peerB sit behind two NATs and direct UDP between the NATs is dropped in the ``wan`` bridge, so
every A<->B datagram crosses the base's relay. What is checked:
- confidentiality: a known 32-byte marker sent over the overlay (UDP and TCP) never appears in any byte
  captured on the base host;
- tampering: a base restarted with a test hook flips a bit in the payload (``HUSARNET_BASE_TEST_FLIP_BITS=1``)
  or in the header of every relayed datagram, or truncates it (``HUSARNET_BASE_TEST_TAMPER=header|truncate``);
  B counts each as ``bad_mac`` (AEAD) or ``unknown_peer`` (receiver index), delivers nothing, and keeps its
  session (no teardown by forged packets);
- injection (row 9) and swapped stamps (row 8): a base that stamps every relayed frame as coming from A
  (``HUSARNET_BASE_TEST_TAMPER=stamp=<A>``) carries mallory's forgeries to B as A's: junk, Data under B's real
  receiver index for A with a broken tag, initiations and a Hello with A's key but no A private key. Each
  dies at B under its own counter; B's own frames, stamped as A on their way to A, are still A<->B traffic
  (the keys, not the stamp, name the sender), and the A<->B session carries traffic throughout;
- row 10 via the base: a node that knows the base but is not whitelisted gets neither a path nor any
  traffic through; its relayed attempts are dropped by the receiver as ``not_whitelisted``.
Verdicts come from the control sockets (counters, path state) and from sniffers, never from logs.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from husarnet_ros.testing import e2e, traffic
from husarnet_ros.testing.netns import Lab, reference_topology, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]


MARKER = b"husarnet-ros-relay-marker-0x5eC!"  # 32 bytes
assert len(MARKER) == 32
FLIP_ENV = {"HUSARNET_BASE_TEST_FLIP_BITS": "1"}
TAMPER = "HUSARNET_BASE_TEST_TAMPER"
# Scaled timers: keepalive 4 s, rekey after 48 s, reject after 72 s; long enough that no regular rekey
# falls into the tampering phase, short enough to keep the test quick. The phases assert that no handshake
# completes, and the one unscheduled handshake is the unanswered-path rule's: it fires when the peer's
# passive keepalive is rekey_timeout late. At 0.2 that margin was 1 s, which a machine loaded with two CPU
# hogs exceeded now and then (B logged "no answer on the relay path for 3.0 s"); 0.4 gives 2 s and the
# test takes as long.
SCALE = 0.4


def _relayed_pair(lab: Lab, t, base: e2e.BaseServer, *, trust=None, timers_scale: float = SCALE):
    """A and B with the base; direct UDP between the NATs dropped (the base stays reachable)."""
    block = lab.block_udp(t.wan, t.NAT_A_IP, t.NAT_B_IP)
    ds = e2e.start_mesh(
        lab,
        {"A": t.peerA, "B": t.peerB},
        trust=trust,
        timers_scale=timers_scale,
        extra={"A": {"base": [base.spec]}, "B": {"base": [base.spec]}},
    )
    return block, ds


def _tcp_send(lab: Lab, server_ns, client_ns, address: str, payload: bytes, port: int) -> bytes:
    """Send ``payload`` over one TCP connection from client_ns to [address]:port; return what arrived."""
    srv = lab.socket(server_ns, socket.AF_INET6, socket.SOCK_STREAM)
    cli = lab.socket(client_ns, socket.AF_INET6, socket.SOCK_STREAM)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("::", port))
        srv.listen(1)
        srv.settimeout(15)
        cli.settimeout(15)
        cli.connect((address, port))
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(15)
            cli.sendall(payload)
            cli.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
        return got
    finally:
        cli.close()
        srv.close()


# Run inside mallory's namespace: log in to the base with mallory's own key, then RELAY to B, five times: random
# bytes, Data with a random receiver index, an initiation whose key does not match its static, and an
# initiation and a Hello with A's real public key but made without A's private key; then each of the
# forged Data datagrams given as hex arguments. Prints a count.
_INJECT = r"""
import asyncio, json, os, sys, time
from pathlib import Path
from husarnet_ros.base.simnode import SimNode
from husarnet_ros.core import handshake as hs, wire
from husarnet_ros.core.identity import Identity, parse_address
from husarnet_ros.testing.rogue import forged_identity, impostor_identity

spec, state, b_addr, a_state, b_state = sys.argv[1:6]
forged_data = [bytes.fromhex(h) for h in sys.argv[6:]]
a_id, b_id = Identity.load(Path(a_state) / "id"), Identity.load(Path(b_state) / "id")

async def main():
    node = SimNode(spec, state, host="0.0.0.0")
    await node.start()
    assert await node.wait_state("tcp", "udp", timeout=10), node.client.error
    me = node.identity
    dst = parse_address(b_addr)
    sent = 0
    impostor = impostor_identity(a_id, me)
    for i in range(5):
        junk = [
            os.urandom(60),
            wire.build_data_header(int.from_bytes(os.urandom(4), "little"), i) + os.urandom(48),
            hs.create_initiation(forged_identity(a_id, me), b_id.public_key, 1000 + i, hs.tai64n(time.time()), 0)[0],
            hs.create_initiation(impostor, b_id.public_key, 2000 + i, hs.tai64n(time.time()), 0)[0],
            wire.build_hello(impostor, b_id.address, int(time.time() * 1000) + i),
        ]
        for dg in junk:
            sent += bool(node.client.relay(dst, dg))
        await asyncio.sleep(0.05)
    for dg in forged_data:
        sent += bool(node.client.relay(dst, dg))
    await asyncio.sleep(0.5)
    await node.close()
    print(json.dumps({"sent": sent}))

asyncio.run(main())
"""


def _ping_ok(lab: Lab, ns, address: str) -> bool:
    return traffic.ping(lab, ns, address, count=1, wait=1).received == 1


def _restart_base(lab: Lab, t, prev: e2e.BaseServer, ds, env: dict[str, str] | None) -> e2e.BaseServer:
    """Stop ``prev`` and start the same base (key and state) with ``env``; wait until both nodes are logged in."""
    prev.proc.stop()
    new = e2e.start_base(lab, t, timers_scale=SCALE, state_dir=prev.state_dir, env=env)
    assert wait_until(lambda: all(x.status()["base"] != "none" for x in ds.values()), 15)
    return new


def _tampering_phase(
    lab: Lab, t, prev: e2e.BaseServer, ds, env: dict[str, str], reasons: tuple[str, ...], port: int
) -> e2e.BaseServer:
    """Restart the base with a tampering hook; A sends to B until 10 datagrams died at B for one of ``reasons``.

    Not more: nothing comes back through a base that mangles every frame, so A gives the relay path up after
    keepalive + rekey_timeout of unanswered data (as it must) and then only probes it now and then.

    Whatever the tampering: nothing reaches B's application, and the forged packets do not tear the session
    down (same keys: no handshake completed, the session keeps ageing). Returns the tampering base.
    """
    a, b = ds["A"], ds["B"]
    # Each phase starts from a working relay: the previous tampering made A give its relay path up.
    clean = _restart_base(lab, t, prev, ds, None)
    assert wait_until(lambda: _ping_ok(lab, t.peerA, b.address), 30, interval=0.2), (env, a.peers(), b.peers())
    hs_before = {n: x.counters()["handshakes_completed"] for n, x in ds.items()}
    age_before = b.peer(a.address)["session_age"]
    evil = _restart_base(lab, t, clean, ds, env)
    before = b.counters()
    rec = traffic.UdpRecorder.start(lab, t.peerB, "::", port, echo=False)
    s = lab.socket(t.peerA, socket.AF_INET6, socket.SOCK_DGRAM)
    sent = 0
    deadline = time.monotonic() + 10

    def died() -> int:
        now = b.counters()
        return sum(now[r] - before[r] for r in reasons)

    while died() < 10 and time.monotonic() < deadline:
        s.sendto(b"tampered %d" % sent, (b.address, port))
        sent += 1
        time.sleep(0.05)
    s.close()
    time.sleep(0.5)
    got = e2e.delta(before, b.counters())
    assert sum(got.get(r, 0) for r in reasons) >= 10, (env, sent, got)
    assert rec.payloads() == [], f"a tampered datagram reached the application ({env})"
    entry = b.peer(a.address)
    assert entry is not None and entry["is_secure"], entry
    assert entry["session_age"] >= age_before, (env, entry, age_before)
    hs_after = {n: x.counters()["handshakes_completed"] for n, x in ds.items()}
    assert hs_after == hs_before, (env, hs_after, hs_before, {n: x.tail(15) for n, x in ds.items()})
    assert evil.proc.alive and a.proc.alive and b.proc.alive
    return evil


def _direct_data(sniff, t) -> list[bytes]:
    """A's Data datagrams to B's direct endpoints, seen on the WAN before the block drops them (A's probes).

    Sealed under the A<->B session and never delivered, so each carries B's real receiver index for A and
    a counter B has not seen: the raw material for a forgery B can only reject by its AEAD tag.
    """
    return [
        p.payload
        for p in sniff.udp()
        if p.src == t.NAT_A_IP and p.dst != t.BASE_IP and p.payload[:4] == b"\x04\x00\x00\x00" and len(p.payload) > 32
    ]


def test_rows8_9_relay_sees_no_plaintext_and_tampering_is_dropped_without_teardown():
    with Lab("rsec") as lab:
        t = reference_topology(lab)
        base = e2e.start_base(lab, t, timers_scale=SCALE)
        block, ds = _relayed_pair(lab, t, base)
        a, b = ds["A"], ds["B"]
        assert wait_until(lambda: _ping_ok(lab, t.peerA, b.address), 30, interval=0.2), (a.status(), a.peers())
        a.wait_path(b.address, paths=("relay",), timeout=15)
        b.wait_path(a.address, paths=("relay",), timeout=15)

        wan = lab.sniff(t.wan, "br0")  # A's direct attempts to B, before the block drops them

        # --- row 9: confidentiality. Capture everything on the base host while the marker crosses.
        sniff = lab.sniff(t.base, "eth0")
        relay_tx0 = a.counters()["base_relay_tx"]
        rec = traffic.UdpRecorder.start(lab, t.peerB, "::", 7000, echo=False)
        s = lab.socket(t.peerA, socket.AF_INET6, socket.SOCK_DGRAM)
        for _ in range(5):
            s.sendto(MARKER, (b.address, 7000))
            time.sleep(0.05)
        s.close()
        assert wait_until(lambda: MARKER in rec.payloads(), 5), "the marker must cross the overlay"
        assert _tcp_send(lab, t.peerB, t.peerA, b.address, MARKER * 64, 7001) == MARKER * 64
        time.sleep(0.3)
        frames = sniff.stop()
        assert a.counters()["base_relay_tx"] - relay_tx0 >= 5, "the marker must have gone through the relay"
        assert a.path_to(b.address) == "relay"
        assert len(frames) >= 10
        leaked = [f for f in frames if MARKER in f.data or MARKER[:16] in f.data or MARKER[16:] in f.data]
        assert leaked == [], f"{len(leaked)} frames on the base host carry the plaintext marker"

        # --- row 8: a tampering relay (same key and state): one bit flipped in the payload or in the header,
        # or truncated. The AEAD (or the receiver index) catches each; the session survives every phase.
        evil = _tampering_phase(lab, t, base, ds, FLIP_ENV, ("bad_mac",), 7002)
        evil = _tampering_phase(lab, t, evil, ds, {TAMPER: "header"}, ("unknown_peer",), 7003)
        evil = _tampering_phase(lab, t, evil, ds, {TAMPER: "truncate"}, ("bad_mac", "malformed"), 7004)

        # --- rows 8 and 9: a base that stamps every relayed frame as coming from A. A's own frames are
        # unchanged; B's frames reach A stamped as A itself, and must still count as B's.
        clean = _restart_base(lab, t, evil, ds, None)  # a working relay first, as for every phase
        assert wait_until(lambda: _ping_ok(lab, t.peerA, b.address), 30, interval=0.2), (a.peers(), b.peers())
        stamping = _restart_base(lab, t, clean, ds, {TAMPER: f"stamp={a.address}"})
        assert wait_until(lambda: _ping_ok(lab, t.peerA, b.address), 30, interval=0.2), (a.peers(), b.peers())
        assert traffic.ping(lab, t.peerB, a.address, count=3, interval=0.2).received == 3
        assert a.path_to(b.address) == "relay" and b.path_to(a.address) == "relay"
        assert [p["address"] for p in a.peers()] == [b.address], a.peers()

        # Mallory, logged in to the same base with its own key, relays forgeries to B; the base says they
        # are A's. Among them: A's captured direct probes with one bit of the tag flipped.
        captured = _direct_data(wan, t)[-5:]
        assert captured, "A sent no Data to B's direct endpoints (its probes) to forge from"
        forged = [dg[:-1] + bytes([dg[-1] ^ 0x01]) for dg in captured]
        hs_before = {n: x.counters()["handshakes_completed"] for n, x in ds.items()}
        age_before = b.peer(a.address)["session_age"]
        before_b = b.counters()
        res = lab.run(
            t.mallory,
            [
                sys.executable,
                "-c",
                _INJECT,
                base.spec,
                str(lab.tmp / "state-M"),
                b.address,
                str(a.state_dir),
                str(b.state_dir),
                *(dg.hex() for dg in forged),
            ],
            check=False,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        sent = json.loads(res.stdout.strip().splitlines()[-1])["sent"]
        assert sent == 25 + len(forged)
        assert wait_until(lambda: b.counters()["base_relayed_rx"] - before_b["base_relayed_rx"] >= sent, 5)
        expected = {"malformed": 5, "unknown_peer": 5, "bad_id": 5, "bad_sig": 5, "bad_mac": 5}
        # The forged probes die as bad_mac under the live session, or as unknown_peer if A renegotiated
        # since they were captured (their receiver index is then gone): dropped either way.
        index_or_tag = 10 + len(forged)

        def arrived() -> bool:
            got = e2e.delta(before_b, b.counters())
            return all(got.get(k, 0) >= n for k, n in expected.items()) and (
                got.get("bad_mac", 0) + got.get("unknown_peer", 0) >= index_or_tag
            )

        assert wait_until(arrived, 5), e2e.delta(before_b, b.counters())
        got = e2e.delta(before_b, b.counters())
        # Random bytes -> malformed, unknown index -> unknown_peer, key not matching its static -> bad_id,
        # A's key without A's private key -> bad_mac (Noise proof) / bad_sig (Hello), broken tag -> bad_mac.
        assert {k: got.get(k, 0) for k in ("malformed", "bad_id", "bad_sig")} == {
            k: 5 for k in ("malformed", "bad_id", "bad_sig")
        }, got
        assert got.get("bad_mac", 0) + got.get("unknown_peer", 0) == index_or_tag, got
        assert not {"replay", "not_whitelisted", "bad_inner_src"} & got.keys(), got
        # Nothing was torn down or re-keyed, and nothing else moved into B's peer table.
        hs_after = {n: x.counters()["handshakes_completed"] for n, x in ds.items()}
        assert hs_after == hs_before, (hs_after, hs_before, {n: x.tail(15) for n, x in ds.items()})
        entry = b.peer(a.address)
        assert entry["is_secure"] and entry["path"] == "relay", entry
        assert entry["session_age"] >= age_before, (entry, age_before)
        assert [p["address"] for p in b.peers()] == [a.address], b.peers()
        assert traffic.ping(lab, t.peerA, b.address, count=3, interval=0.2).received == 3
        assert traffic.ping(lab, t.peerB, a.address, count=3, interval=0.2).received == 3
        problems = e2e.stop_all_and_check(lab, ds.values())
        assert not problems, problems
        assert stamping.proc.stop() == 0
        assert sum(lab.rule_packets(r) for r in block) > 0  # direct attempts really hit the block
    e2e.assert_lab_clean(lab)


def test_row10_non_whitelisted_node_gets_nothing_through_the_relay():
    """B whitelists A, A whitelists nobody: B's relayed attempts die at A as not_whitelisted."""
    with Lab("r10b") as lab:
        t = reference_topology(lab)
        base = e2e.start_base(lab, t, timers_scale=SCALE)
        _block, ds = _relayed_pair(lab, t, base, trust=[("B", "A")])
        a, b = ds["A"], ds["B"]
        assert wait_until(lambda: a.status()["base"] != "none" and b.status()["base"] != "none", 15)
        rec = traffic.UdpRecorder.start(lab, t.peerA, "::", 7000, echo=False)
        before_a = a.counters()
        s = lab.socket(t.peerB, socket.AF_INET6, socket.SOCK_DGRAM)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            s.sendto(b"let me in", (a.address, 7000))
            time.sleep(0.1)
        s.close()
        assert wait_until(lambda: a.counters()["not_whitelisted"] > before_a["not_whitelisted"], 5), e2e.delta(
            before_a, a.counters()
        )
        after_a = a.counters()
        assert after_a["base_relayed_rx"] > before_a["base_relayed_rx"], "B's attempts must have reached A by relay"
        assert after_a["handshakes_completed"] == before_a["handshakes_completed"]
        assert rec.payloads() == []
        assert b.path_to(a.address) == "none"
        entry = a.peer(b.address)
        assert entry is None or (entry["path"] == "none" and not entry["is_secure"]), entry
        # And A -> B is refused locally as well.
        nw = a.counters()["not_whitelisted"]
        assert traffic.ping(lab, t.peerA, b.address, count=2, wait=1).received == 0
        assert a.counters()["not_whitelisted"] > nw
        problems = e2e.stop_all_and_check(lab, ds.values())
        assert not problems, problems
        assert base.proc.stop() == 0
    e2e.assert_lab_clean(lab)
