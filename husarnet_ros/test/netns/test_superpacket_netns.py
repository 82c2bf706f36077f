"""Super-packet mode (issue #6) between two real daemons with TUN offloads, in namespaces.

A TCP transfer over the overlay must arrive with the same SHA-256 whether the
sender seals super-packets (both daemons offload) or not (one daemon started
with HUSARNET_ROS_SUPER=0, so it offers no FEATURE_OFFLOAD): the two talk
either way.  Counters show which mode carried the data; no timing asserts.
"""

from __future__ import annotations

import os

import pytest

from husarnet_ros.testing import traffic
from husarnet_ros.testing.netns import Lab, wait_until

pytestmark = pytest.mark.netns

A4, B4 = "198.18.96.1", "198.18.96.2"
A6, B6 = "fd00:96::1", "fd00:96::2"


def start_pair(lab: Lab, super_b: bool) -> tuple:
    a = lab.host("a")
    b = lab.host("b")
    lab.link(a, b, f"{A4}/24", f"{A6}/64", other_addr4=f"{B4}/24", other_addr6=f"{B6}/64")
    sa, sb = lab.tmp / "sa", lab.tmp / "sb"
    addr_a, addr_b = lab.daemon_address(sa), lab.daemon_address(sb)
    common = {"udp_port": 5582, "no_lan_discovery": True}
    old = os.environ.get("HUSARNET_ROS_SUPER")
    try:
        os.environ["HUSARNET_ROS_SUPER"] = "1"
        da = lab.start_daemon(a, sa, peer=[f"{addr_b}@{B4}:5582"], whitelist=[addr_b], **common)
        os.environ["HUSARNET_ROS_SUPER"] = "1" if super_b else "0"
        db = lab.start_daemon(b, sb, peer=[f"{addr_a}@{A4}:5582"], whitelist=[addr_a], **common)
    finally:
        if old is None:
            os.environ.pop("HUSARNET_ROS_SUPER", None)
        else:
            os.environ["HUSARNET_ROS_SUPER"] = old
    assert traffic.ping(lab, a, addr_b, count=3, wait=2).received >= 1
    return a, b, da, db, addr_b


@pytest.mark.parametrize("super_b", [True, False], ids=["both-offload", "receiver-without-super"])
def test_tcp_transfer_checksum_matches(super_b: bool) -> None:
    with Lab("super") as lab:
        a, b, da, db, addr_b = start_pair(lab, super_b)
        # Two transfers: the first lets the receiver measure the path clean (per segment), the
        # second then runs in super-packet mode where both ends agreed.
        first = traffic.tcp_transfer(lab, b, a, addr_b, 20, port=5301)
        assert first.ok, first
        second = traffic.tcp_transfer(lab, b, a, addr_b, 40, port=5302, seed=2)
        assert second.ok, second
        ca, cb = da.counters(), db.counters()
        if super_b:
            assert ca.get("super_tx", 0) > 0, ca
            assert cb.get("super_rx", 0) == ca["super_tx"], (ca, cb)
        else:
            assert ca.get("super_tx", 0) == 0 and cb.get("super_rx", 0) == 0, (ca, cb)
        for c in (ca, cb):
            for bad in ("bad_mac", "bad_super_hdr", "fragment_malformed", "bad_inner_src", "malformed"):
                assert c.get(bad, 0) == 0, (bad, c)
        assert wait_until(lambda: da.proc.alive and db.proc.alive, 1)
