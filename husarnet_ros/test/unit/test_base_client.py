"""BaseClient pieces that need no server: spec parsing, the TOFU store, backoff, refusing without a session."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from husarnet_ros.core.base_client import (
    BaseClient,
    BaseKeyMismatchError,
    BaseSpec,
    KnownBaseKeys,
    parse_base_spec,
)
from husarnet_ros.core.constants import Timers
from husarnet_ros.core.identity import Identity, address_from_pubkey


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("base.example.org", BaseSpec("base.example.org", 443, 5582)),
        ("base.example.org:8443", BaseSpec("base.example.org", 8443, 5582)),
        ("198.18.0.1:443:6000", BaseSpec("198.18.0.1", 443, 6000)),
        ("[fd00::1]", BaseSpec("fd00::1", 443, 5582)),
        ("[fd00::1]:444", BaseSpec("fd00::1", 444, 5582)),
        ("[fd00::1]:444:555", BaseSpec("fd00::1", 444, 555)),
    ],
)
def test_parse_base_spec(spec: str, want: BaseSpec) -> None:
    assert parse_base_spec(spec) == want


def test_parse_base_spec_with_pin(ident) -> None:
    got = parse_base_spec(f"198.18.0.1:443#{ident.public_key.hex()}")
    assert got.pinned_key == ident.public_key and got.tcp_port == 443
    assert got.key == "198.18.0.1:443"
    assert parse_base_spec("[fd00::1]:1:2").key == "[fd00::1]:1"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "host:0",
        "host:70000",
        "host:1:2:3",
        "host:abc",
        "[fd00::1",
        "[notv6]:1",
        "[fd00::1]x",
        "bad host:1",
        "host#zz",
        "host#" + "00" * 32,  # not a valid husarnet key (no fc94 address)
        "host#abcd",
        "-x:1",
    ],
)
def test_parse_base_spec_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_base_spec(spec)


def test_known_keys_round_trip_and_corruption(tmp_path, ident) -> None:
    keys = KnownBaseKeys(tmp_path)
    assert keys.get("h:1") is None
    keys.remember("h:1", ident.public_key)
    keys.remember("h:2", b"\x01" * 32)
    assert keys.get("h:1") == ident.public_key and keys.get("h:2") == b"\x01" * 32
    assert json.loads((tmp_path / "base_keys.json").read_text())["h:1"] == ident.public_key.hex()
    assert (tmp_path / "base_keys.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "base_keys.json").write_text("{not json")
    with pytest.raises(BaseKeyMismatchError):
        keys.get("h:1")
    (tmp_path / "base_keys.json").write_text('{"h:1": 5}')
    with pytest.raises(BaseKeyMismatchError):
        keys.get("h:1")


def _client(tmp_path, ident, **kw) -> tuple[BaseClient, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    sent: list = []
    c = BaseClient(
        ident,
        "127.0.0.1:1:2",
        tmp_path,
        loop=loop,
        send_udp=lambda d, ep: sent.append((d, ep)),
        on_peer_info=lambda *a: None,
        on_relayed=lambda *a: None,
        **kw,
    )
    return c, loop


def test_backoff_is_exponential_jittered_and_capped(tmp_path, ident) -> None:
    c, loop = _client(
        tmp_path, ident, timers=Timers(base_reconnect_min=1.0, base_reconnect_max=60.0), rng=random.Random(1)
    )
    try:
        for failures, lo, hi in [(0, 0.5, 1.0), (1, 1.0, 2.0), (3, 4.0, 8.0), (10, 30.0, 60.0), (1000, 30.0, 60.0)]:
            samples = [c.backoff_delay(failures) for _ in range(200)]
            assert all(lo <= s <= hi for s in samples), (failures, min(samples), max(samples))
            assert max(samples) - min(samples) > (hi - lo) * 0.5  # really jittered
    finally:
        loop.close()


def test_no_session_means_no_send(tmp_path, ident) -> None:
    c, loop = _client(tmp_path, ident)
    try:
        assert c.state == "none" and c.public_key is None
        assert not c.relay(ident.address, b"\x04" + bytes(40))
        assert not c.query(ident.address)
        assert not c.handle_udp(b"\x04\x00\x00\x00" + bytes(40), ("127.0.0.1", 2))
        assert c.counters["base_relay_dropped"] == 1
    finally:
        loop.close()


def test_close_ends_run_while_backing_off(tmp_path, ident) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        c = BaseClient(
            ident,
            "127.0.0.1:1",  # nothing listens on port 1: connection refused
            tmp_path,
            loop=loop,
            timers=Timers(base_reconnect_min=30.0),
            send_udp=lambda d, ep: None,
            on_peer_info=lambda *a: None,
            on_relayed=lambda *a: None,
        )
        task = loop.create_task(c.run())
        while c.connect_attempts < 1 or c.error == "":
            await asyncio.sleep(0.01)
        assert "Connection" in c.error or "refused" in c.error.lower()
        c.close()
        await asyncio.wait_for(task, 2)  # returns promptly despite the 15-30 s backoff
        assert c.connect_attempts == 1

    asyncio.run(main())


def test_hostname_that_cannot_be_sent_is_left_out(tmp_path, ident) -> None:
    c, loop = _client(tmp_path, ident, hostname="not valid name")
    try:
        assert c._login_hostname() == ""
        c.hostname = "robot-1"
        assert c._login_hostname() == "robot-1"
    finally:
        loop.close()


# --- fuzz: authenticated but hostile base messages --------------------------------------------------
@pytest.fixture(scope="module")
def base_ident() -> Identity:
    return Identity.generate()


def _logged_in_client(tmp_path, ident, base_ident):
    import time

    from husarnet_ros.core import handshake as hs
    from husarnet_ros.core.session import Keypair

    got: dict[str, list] = {"info": [], "relayed": []}
    loop = asyncio.new_event_loop()
    c = BaseClient(
        ident,
        "127.0.0.1:1:2",
        tmp_path,
        loop=loop,
        send_udp=lambda d, ep: None,
        on_peer_info=lambda *a: got["info"].append(a),
        on_relayed=lambda *a: got["relayed"].append(a),
    )
    c._loop_thread = __import__("threading").get_ident()  # as if run() were running on this thread
    init, ist = hs.create_initiation(ident, base_ident.public_key, 11, hs.tai64n(time.time()), 0)
    resp, bkm = hs.create_response(hs.consume_initiation(base_ident, init), 22, 0)
    kp = Keypair(hs.consume_response(ist, resp), time.monotonic(), c)
    c._install(kp)
    c._state = "tcp"
    c.udp_endpoint = ("127.0.0.1", 2)
    return c, loop, Keypair(bkm, time.monotonic()), got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), first=st.sampled_from([0x10, 0x12, 0x15, 0x17, 0x19, 0x1A, 0x2F]))
def test_fuzz_client_control(tmp_path, ident, base_ident, data, first) -> None:
    c, loop, base_kp, got = _logged_in_client(tmp_path, ident, base_ident)
    try:
        plaintext = bytes([first]) + data
        c._handle_tcp_frame(base_kp.seal(plaintext))
        c.handle_udp(base_kp.seal(plaintext), c.udp_endpoint)
        c._handle_tcp_frame(data)
        c.handle_udp(b"\x04\x00\x00\x00" + data, c.udp_endpoint)
        for addr, pub, eps, _punch in got["info"]:
            assert address_from_pubkey(pub) == addr and len(eps) <= 16  # only verified keys reach the engine
        assert c.state == "tcp"  # nothing hostile changed the connection state
    finally:
        loop.close()


def test_genuine_peer_info_reaches_the_callback_and_a_bad_key_does_not(tmp_path, ident, base_ident) -> None:
    from husarnet_ros.core import base_proto as bp

    c, loop, base_kp, got = _logged_in_client(tmp_path, ident, base_ident)
    try:
        other = Identity.generate()
        eps = [("198.18.0.9", 5582)]
        c._handle_tcp_frame(base_kp.seal(bp.build_peer_info(other.address, other.public_key, bp.FLAG_ONLINE, eps)))
        assert got["info"] == [(other.address, other.public_key, eps, False)]
        # The base (or anyone) cannot bind a key to an address it does not hash to.
        c._handle_tcp_frame(base_kp.seal(bp.build_peer_info(other.address, ident.public_key, bp.FLAG_ONLINE, eps)))
        assert len(got["info"]) == 1 and c.counters["base_bad_peer_info"] == 1
        c._handle_tcp_frame(base_kp.seal(bp.build_relayed(other.address, b"\x04abc")))
        assert got["relayed"] == [(other.address, b"\x04abc")]
    finally:
        loop.close()
