"""Path rules: classification, preference lan > direct > relay, roaming and expiry."""

from __future__ import annotations

import ipaddress

import pytest

from husarnet_ros.core.path import KIND_DIRECT, KIND_LAN, KIND_NONE, KIND_RELAY, MAX_CANDIDATES, PathSet, classify
from husarnet_ros.core.transport import RelayEndpoint, format_endpoint, normalize_endpoint, parse_endpoint

LAN = [ipaddress.ip_network("198.18.1.0/24"), ipaddress.ip_network("fd00:1::/64")]


@pytest.mark.parametrize(
    ("endpoint", "beacon", "kind"),
    [
        (("198.18.1.7", 5582), False, KIND_LAN),
        (("198.18.2.7", 5582), False, KIND_DIRECT),
        (("fd00:1::9", 5582), False, KIND_LAN),
        (("fd00:2::9", 5582), False, KIND_DIRECT),
        (("fe80::1%eth0", 5582), False, KIND_LAN),
        (("198.18.2.7", 5582), True, KIND_LAN),
        (RelayEndpoint("198.18.0.1:443", bytes(16)), False, KIND_RELAY),
    ],
)
def test_classify(endpoint, beacon, kind):
    assert classify(endpoint, LAN, from_beacon=beacon) == kind


def test_candidates_are_not_used_until_validated():
    ps = PathSet()
    ps.add_candidate(("198.18.2.1", 1), KIND_DIRECT, "static", 0.0)
    assert ps.current is None and ps.kind == KIND_NONE and ps.endpoint is None
    assert ps.on_authenticated(("198.18.2.1", 1), KIND_DIRECT, 1.0) is True
    assert ps.endpoint == ("198.18.2.1", 1) and ps.kind == KIND_DIRECT


def test_preference_lan_over_direct_over_relay():
    ps = PathSet()
    relay = RelayEndpoint("base:443", bytes(16))
    ps.on_authenticated(relay, KIND_RELAY, 1.0)
    assert ps.kind == KIND_RELAY
    ps.on_authenticated(("198.18.2.1", 1), KIND_DIRECT, 2.0)
    assert ps.kind == KIND_DIRECT
    # More recent relay traffic does not downgrade a live direct path.
    ps.on_authenticated(relay, KIND_RELAY, 10.0)
    assert ps.kind == KIND_DIRECT
    ps.on_authenticated(("198.18.1.1", 1), KIND_LAN, 11.0)
    assert ps.kind == KIND_LAN


def test_probe_reply_validates_with_rtt():
    ps = PathSet()
    ep = ("198.18.2.1", 1)
    ps.add_candidate(ep, KIND_DIRECT, "base", 0.0)
    ps.start_probe(ep, b"n" * 8, 1.0)
    p = ps.on_probe_reply(ep, b"n" * 8, KIND_DIRECT, 1.25)
    assert p is not None and p.validated and p.rtt == pytest.approx(0.25)
    assert ps.endpoint == ep


def test_probe_reply_proves_only_the_path_it_arrived_on():
    ps = PathSet()
    real, lure = ("198.18.2.1", 1), ("198.18.1.66", 1)  # the lure is a better kind (LAN) than the real path
    ps.on_authenticated(real, KIND_DIRECT, 1.0)
    ps.add_candidate(lure, KIND_LAN, "beacon", 1.0)
    ps.start_probe(real, b"r" * 8, 2.0)
    ps.start_probe(lure, b"m" * 8, 2.0)
    # The reply to the probe sent to the lure arrives on the real path (forwarded with a spoofed source).
    assert ps.on_probe_reply(real, b"m" * 8, KIND_DIRECT, 2.1) is None
    assert not ps.paths[lure].validated
    assert ps.endpoint == real and ps.kind == KIND_DIRECT
    assert ps.paths[real].rtt is None  # no RTT from someone else's probe
    assert ps.on_probe_reply(real, b"r" * 8, KIND_DIRECT, 2.2) is ps.paths[real]
    assert ps.paths[real].rtt == pytest.approx(0.2)


def test_roaming_follows_same_kind_after_a_second_but_not_flapping():
    ps = PathSet()
    a, b = ("198.18.2.1", 1), ("198.18.3.1", 2)
    ps.on_authenticated(a, KIND_DIRECT, 1.0)
    ps.on_authenticated(b, KIND_DIRECT, 1.2)
    assert ps.endpoint == a  # both alive: stay
    ps.on_authenticated(b, KIND_DIRECT, 5.0)
    assert ps.endpoint == b  # a went quiet: roam


def test_peer_traffic_on_a_less_preferred_path_wins_once_the_preferred_one_is_silent():
    """A robot that moved to another subnet (lan -> direct) or a peer that fell back to the relay is followed."""
    lan, direct = ("192.168.1.7", 5582), ("198.18.3.12", 5582)
    ps = PathSet(stale_after=0.5)
    ps.add_candidate(lan, KIND_LAN, "beacon", 0.0)
    ps.on_authenticated(lan, KIND_LAN, 1.0, data=True)
    ps.on_authenticated(direct, KIND_DIRECT, 1.2, data=True)
    assert ps.endpoint == lan  # the lan path spoke 0.2 s ago: not stale, the better kind stays
    ps.on_authenticated(direct, KIND_DIRECT, 1.4, rtt=0.01)  # a probe reply: probes go to every path
    assert ps.endpoint == lan
    ps.on_authenticated(direct, KIND_DIRECT, 1.6, data=True)  # lan silent for 0.6 s, the peer's data here
    assert ps.endpoint == direct
    ps.on_authenticated(lan, KIND_LAN, 1.7, rtt=0.01)  # the lan path answers a probe again: preferred again
    assert ps.endpoint == lan


def test_expiry_falls_back_and_to_none():
    ps = PathSet()
    a = ("198.18.1.1", 1)
    relay = RelayEndpoint("base:443", bytes(16))
    ps.on_authenticated(a, KIND_LAN, 1.0)
    ps.on_authenticated(relay, KIND_RELAY, 50.0)
    assert ps.kind == KIND_LAN
    assert ps.expire(100.0, 75.0) is True
    assert ps.kind == KIND_RELAY
    ps.expire(200.0, 75.0)
    assert ps.kind == KIND_NONE and ps.current is None


def test_candidates_bounded():
    ps = PathSet()
    for i in range(3 * MAX_CANDIDATES):
        ps.add_candidate((f"198.18.4.{i}", 1), KIND_DIRECT, "base", float(i))
    assert len(ps.paths) == MAX_CANDIDATES
    assert ("198.18.4.0", 1) not in ps.paths  # oldest unvalidated hints go first


def test_validated_paths_bounded_too():
    ps = PathSet()
    for i in range(3 * MAX_CANDIDATES):  # a peer whose authenticated packets come from ever new ports
        ps.on_authenticated((f"198.18.4.{i}", 1), KIND_DIRECT, float(i))
    assert len(ps.paths) == MAX_CANDIDATES
    assert ps.current is not None and ps.current.endpoint in ps.paths
    assert ("198.18.4.0", 1) not in ps.paths  # heard from longest ago goes first


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("198.18.0.2:5582", ("198.18.0.2", 5582)),
        ("[fd00::2]:5582", ("fd00::2", 5582)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
        ("[::ffff:198.18.0.3]:7", ("198.18.0.3", 7)),
    ],
)
def test_endpoint_parse_format_round_trip(text, endpoint):
    assert parse_endpoint(text) == endpoint
    assert parse_endpoint(format_endpoint(endpoint)) == endpoint


@pytest.mark.parametrize("bad", ["198.18.0.2", "fd00::2:5582", "[fd00::2]5582", "host:1", "1.2.3.4:0", "1.2.3.4:70000"])
def test_endpoint_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_endpoint(bad)


def test_normalize_maps_ipv4_mapped():
    assert normalize_endpoint("::ffff:198.18.0.9", 1) == ("198.18.0.9", 1)


def test_relayed_peers_retry_the_hole_punch_within_seconds() -> None:
    """A punch that lost the race is retried after 1, 2, 4, 8, 16 s, then every probe interval."""
    from husarnet_ros.core.path import KIND_NONE, KIND_RELAY, RELAYED_FAST_ROUNDS, probe_interval_for

    waits = [probe_interval_for(KIND_RELAY, r, 25.0) for r in range(RELAYED_FAST_ROUNDS + 2)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 25.0, 25.0]
    assert probe_interval_for(KIND_NONE, 0, 25.0) == 1.0
    # Direct and LAN paths keep the plain interval (it also keeps NAT mappings open); scaled timers scale.
    assert probe_interval_for("direct", 0, 25.0) == 25.0
    assert probe_interval_for("lan", 3, 25.0) == 25.0
    assert probe_interval_for(KIND_RELAY, 2, 2.5) == 0.4
