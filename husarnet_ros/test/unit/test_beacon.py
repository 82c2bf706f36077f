"""LAN beacons: format round trip, strict parsing, and every acceptance rule of the service."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from husarnet_ros.core import beacon as bc
from husarnet_ros.core.counters import Counters
from husarnet_ros.core.identity import Identity
from husarnet_ros.core.wire import BadIdentity, BadSignature, Malformed


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def make_service(
    me: Identity, got: list, counters: Counters, now: list[float] | None = None, loop=None
) -> bc.BeaconService:
    clock = now if now is not None else [NOW]
    ifaces = [
        bc.Interface(3, "eth0", [ipaddress.ip_network("198.18.1.0/24"), ipaddress.ip_network("fd00:1::/64")]),
        bc.Interface(4, "eth1", [ipaddress.ip_network("198.18.2.0/24")]),
    ]
    svc = bc.BeaconService(
        me,
        5582,
        loop=loop,  # only start() touches the loop
        on_beacon=lambda a, p, ep: got.append((a, p, ep)),
        counters=counters,
        interfaces=lambda: ifaces,
        wallclock=lambda: clock[0],
    )
    svc.refresh_interfaces()
    return svc


def test_round_trip(ids) -> None:
    a, _ = ids
    data = bc.build_beacon(a, 5582, 123456)
    assert len(data) == bc.BEACON_LEN == 126
    b = bc.parse_beacon(data)
    assert (b.address, b.public_key, b.port, b.timestamp_ms) == (a.address, a.public_key, 5582, 123456)


def test_every_field_is_signed(ids) -> None:
    a, _ = ids
    data = bc.build_beacon(a, 5582, 123456)
    # Port and timestamp are outside the key/address pair, so flipping them must break the signature.
    for i in (52, 53, 54, 61):
        bad = bytearray(data)
        bad[i] ^= 1
        with pytest.raises(BadSignature):
            bc.parse_beacon(bytes(bad))
    bad = bytearray(data)
    bad[-1] ^= 1
    with pytest.raises(BadSignature):
        bc.parse_beacon(bytes(bad))


def test_strict_layout(ids) -> None:
    a, b = ids
    data = bc.build_beacon(a, 5582, 1)
    with pytest.raises(Malformed):
        bc.parse_beacon(data[:-1])
    with pytest.raises(Malformed):
        bc.parse_beacon(data + b"\x00")
    with pytest.raises(Malformed):
        bc.parse_beacon(b"\x02" + data[1:])  # unknown version
    with pytest.raises(Malformed):
        bc.parse_beacon(data[:1] + b"\x01" + data[2:])  # reserved byte
    swapped = data[:4] + b.address + data[20:]  # address of b with key of a
    with pytest.raises(BadIdentity):
        bc.parse_beacon(swapped)
    with pytest.raises(ValueError):
        bc.build_beacon(a, 0, 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_parse_only_raises_malformed(data: bytes) -> None:
    with contextlib.suppress(Malformed):
        bc.parse_beacon(data)
    padded = (b"\x01\x00\x00\x00" + data + bytes(126))[:126]
    with contextlib.suppress(Malformed):
        bc.parse_beacon(padded)


def test_service_accepts_on_subnet_and_reports_endpoint(ids) -> None:
    me, peer = ids
    got: list = []
    c = Counters()
    svc = make_service(me, got, c)
    assert svc.handle_datagram(bc.build_beacon(peer, 6000, int(NOW * 1000)), "198.18.1.7", 3)
    assert got == [(peer.address, peer.public_key, ("198.18.1.7", 6000))]
    assert c["beacon_accepted"] == 1


def test_service_rejects_bad_signature(ids) -> None:
    me, peer = ids
    got: list = []
    c = Counters()
    svc = make_service(me, got, c)
    bad = bytearray(bc.build_beacon(peer, 6000, int(NOW * 1000)))
    bad[-5] ^= 0x40
    assert not svc.handle_datagram(bytes(bad), "198.18.1.7", 3)
    assert got == [] and c["beacon_bad_sig"] == 1


def test_service_rejects_source_not_on_receiving_interface_subnet(ids) -> None:
    me, peer = ids
    got: list = []
    c = Counters()
    svc = make_service(me, got, c)
    data = bc.build_beacon(peer, 6000, int(NOW * 1000))
    assert not svc.handle_datagram(data, "198.18.2.7", 3)  # eth1's subnet, arrived on eth0
    assert not svc.handle_datagram(data, "198.19.0.1", 3)  # routed / spoofed
    assert not svc.handle_datagram(data, "198.18.1.7", 99)  # unknown or excluded interface (e.g. hnet0)
    assert not svc.handle_datagram(data, "198.18.1.255", 3)  # broadcast address of the subnet
    assert not svc.handle_datagram(data, "127.0.0.1", 3)
    assert got == [] and c["beacon_off_subnet"] == 5
    assert svc.handle_datagram(data, "fd00:1::9", 3)
    assert got[-1][2] == ("fd00:1::9", 6000)


def test_service_scopes_link_local_to_receiving_interface(ids) -> None:
    me, peer = ids
    got: list = []
    svc = make_service(me, got, Counters())
    assert svc.handle_datagram(bc.build_beacon(peer, 6000, int(NOW * 1000)), "fe80::1%whatever", 4)
    assert got[-1][2] == ("fe80::1%eth1", 6000)


def test_service_rejects_stale_replayed_and_own(ids) -> None:
    me, peer = ids
    got: list = []
    c = Counters()
    now = [NOW]
    svc = make_service(me, got, c, now)
    ts = int(NOW * 1000)
    assert not svc.handle_datagram(bc.build_beacon(peer, 1, ts - 301_000), "198.18.1.7", 3)
    assert not svc.handle_datagram(bc.build_beacon(peer, 1, ts + 301_000), "198.18.1.7", 3)
    assert c["beacon_stale"] == 2
    first = bc.build_beacon(peer, 1, ts)
    assert svc.handle_datagram(first, "198.18.1.7", 3)
    assert not svc.handle_datagram(first, "198.18.1.7", 3)  # replay
    assert not svc.handle_datagram(bc.build_beacon(peer, 1, ts - 1), "198.18.1.7", 3)  # older
    assert c["beacon_replay"] == 2
    assert svc.handle_datagram(bc.build_beacon(peer, 1, ts + 1), "198.18.1.7", 3)
    assert not svc.handle_datagram(bc.build_beacon(me, 1, ts + 5), "198.18.1.7", 3)  # own beacon
    assert len(got) == 2


def test_service_counts_malformed_and_bad_id(ids) -> None:
    me, peer = ids
    c = Counters()
    svc = make_service(me, [], c)
    assert not svc.handle_datagram(b"junk", "198.18.1.7", 3)
    data = bc.build_beacon(peer, 1, int(NOW * 1000))
    assert not svc.handle_datagram(data[:4] + me.address + data[20:], "198.18.1.7", 3)
    assert c["beacon_malformed"] == 1 and c["beacon_bad_id"] == 1


def test_signature_checks_are_rate_limited(ids) -> None:
    me, peer = ids
    c = Counters()
    svc = make_service(me, [], c)
    svc._clock = lambda: 0.0  # frozen clock: the bucket never refills
    svc._bucket = bc._TokenBucket(bc.VERIFY_RATE, 5, 0.0)
    base = int(NOW * 1000)
    for i in range(10):
        bad = bytearray(bc.build_beacon(peer, 1, base + i))
        bad[-1] ^= 1
        svc.handle_datagram(bytes(bad), "198.18.1.7", 3)
    assert c["beacon_bad_sig"] == 5 and c["beacon_rate_limited"] == 5


def test_same_beacon_on_two_paths_is_not_a_replay(ids) -> None:
    me, peer = ids
    got: list = []
    c = Counters()
    svc = make_service(me, got, c)
    data = bc.build_beacon(peer, 6000, int(NOW * 1000))
    assert svc.handle_datagram(data, "198.18.1.7", 3)
    assert svc.handle_datagram(data, "fe80::7", 3)
    assert svc.handle_datagram(data, "198.18.2.7", 4)
    assert not svc.handle_datagram(data, "198.18.2.7", 4)
    assert len(got) == 3 and c["beacon_replay"] == 1
