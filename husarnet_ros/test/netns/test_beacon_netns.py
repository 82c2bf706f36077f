"""LAN discovery between two network namespaces on a bridge (root only).

Two robots, A and B, sit on one bridge (198.18.77.0/24, fd00:77::/64 and IPv6
link-local).  Each runs a real BeaconService in its own namespace.  Both must
receive the other's beacon over IPv4 and over IPv6 link-local (scoped to the
receiving interface).  B also sends spoofed beacons: one with a bad
signature, one from an IPv4 source and one from an IPv6 source that are not on
A's subnets; A must reject and count all three and never report them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

PKG_DIR = Path(__file__).resolve().parents[2]  # .../husarnet_ros (the package root holding husarnet_ros/)

RUNNER = r"""
import asyncio, json, sys, time
from husarnet_ros.core.beacon import BeaconService
from husarnet_ros.core.counters import Counters
from husarnet_ros.core.identity import Identity

ident = Identity.parse(open(sys.argv[1]).read())
duration = float(sys.argv[2])
got = []
counters = Counters()

async def main():
    loop = asyncio.get_running_loop()
    svc = BeaconService(ident, 5582, loop=loop, counters=counters, interval=0.5,
                        on_beacon=lambda a, p, ep: got.append([a.hex(), p.hex(), ep[0], ep[1]]))
    svc.start()
    await asyncio.sleep(duration)
    svc.close()

asyncio.run(main())
print(json.dumps({"got": got, "counters": counters.snapshot()}))
"""

SPOOFER = r"""
import socket, struct, sys, time
from husarnet_ros.core.beacon import build_beacon
from husarnet_ros.core.identity import Identity

ident = Identity.parse(open(sys.argv[1]).read())
ifname = sys.argv[2]
idx = socket.if_nametoindex(ifname)
now = int(time.time() * 1000)

bad = bytearray(build_beacon(ident, 7777, now + 10))
bad[-3] ^= 0x10
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("=4s4si", bytes(4), bytes(4), idx))
s.bind(("198.18.77.2", 0))
s.sendto(bytes(bad), ("224.3.252.148", 5581))
s.close()

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("=4s4si", bytes(4), bytes(4), idx))
s.bind(("198.19.5.5", 0))
s.sendto(build_beacon(ident, 7778, now + 20), ("224.3.252.148", 5581))
s.close()

s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
s.bind(("fd00:99::5", 0))
s.sendto(build_beacon(ident, 7779, now + 30), ("ff02:88bb:31e4:95f7:2b87:6b52:e112:19ac", 5581, 0, idx))
s.close()
print("sent")
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture
def lab(tmp_path):
    pid = os.getpid()
    ns = {"a": f"hrb-a-{pid}", "b": f"hrb-b-{pid}", "br": f"hrb-br-{pid}"}
    procs: list[subprocess.Popen] = []
    try:
        for n in ns.values():
            sh("ip", "netns", "add", n)
            sh("ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
            sh("ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "-n", ns["br"], "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns["br"], "link", "set", "br0", "up")
        for side, host in (("a", 1), ("b", 2)):
            dev = f"v{side}"
            sh("ip", "-n", ns[side], "link", "add", dev, "type", "veth", "peer", "name", f"p{side}", "netns", ns["br"])
            sh("ip", "-n", ns["br"], "link", "set", f"p{side}", "master", "br0", "up")
            sh("ip", "-n", ns[side], "addr", "add", f"198.18.77.{host}/24", "dev", dev)
            sh("ip", "-n", ns[side], "addr", "add", f"fd00:77::{host}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns[side], "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns[side], "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
            sh("ip", "netns", "exec", ns[side], "sysctl", "-qw", f"net.ipv4.conf.{dev}.rp_filter=0")
        # Mallory's extra source addresses on B: not on A's subnets.
        sh("ip", "-n", ns["b"], "addr", "add", "198.19.5.5/32", "dev", "vb")
        sh("ip", "-n", ns["b"], "addr", "add", "fd00:99::5/128", "dev", "vb", "nodad")
        yield ns, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def _py(ns: str, script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(PKG_DIR))
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_beacons_both_ways_and_spoofs_rejected(lab, tmp_path) -> None:
    from husarnet_ros.core.identity import Identity

    ns, procs = lab
    ida, idb = Identity.generate(), Identity.generate()
    (tmp_path / "a").write_bytes(ida.serialize())
    (tmp_path / "b").write_bytes(idb.serialize())
    ra = _py(ns["a"], RUNNER, str(tmp_path / "a"), "4")
    rb = _py(ns["b"], RUNNER, str(tmp_path / "b"), "4")
    procs += [ra, rb]
    time.sleep(1.5)
    sp = _py(ns["b"], SPOOFER, str(tmp_path / "b"), "vb")
    procs.append(sp)
    out, err = sp.communicate(timeout=30)
    assert sp.returncode == 0, err
    res = {}
    for name, p in (("a", ra), ("b", rb)):
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        res[name] = json.loads(out.strip().splitlines()[-1])

    got_a = {(g[0], g[2], g[3]) for g in res["a"]["got"]}
    got_b = {(g[0], g[2], g[3]) for g in res["b"]["got"]}
    # IPv4 both ways, with the sender's real source and advertised port.
    assert (idb.address.hex(), "198.18.77.2", 5582) in got_a
    assert (ida.address.hex(), "198.18.77.1", 5582) in got_b
    # IPv6 link-local both ways, scoped to the receiving interface.
    assert any(h.startswith("fe80:") and h.endswith("%va") and a == idb.address.hex() for a, h, _ in got_a)
    assert any(h.startswith("fe80:") and h.endswith("%vb") and a == ida.address.hex() for a, h, _ in got_b)
    # Every report carries the right key for its address.
    assert all(g[1] == idb.public_key.hex() for g in res["a"]["got"])
    # Spoofs: nothing from the off-subnet sources or the forged port was ever reported ...
    assert not any(h in ("198.19.5.5", "fd00:99::5") or port in (7777, 7778, 7779) for _, h, port in got_a)
    # ... and each was counted under its reason.
    ca = res["a"]["counters"]
    assert ca["beacon_bad_sig"] >= 1
    assert ca["beacon_off_subnet"] >= 2
    assert ca["beacon_accepted"] >= 2
