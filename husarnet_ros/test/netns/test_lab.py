"""The namespace lab itself: NAT, loss, rebinding, sniffing, crafted packets and leak-free cleanup.

The end-to-end security tests trust this lab to build hostile networks and to leave nothing behind, so
the lab gets its own proofs first.
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

import pytest

from husarnet_ros.testing import traffic
from husarnet_ros.testing.netns import (
    Lab,
    LabError,
    check_test_address,
    daemon_argv,
    decode_udp,
    reference_topology,
    root_interfaces_with,
    wait_until,
)


def _root_links() -> set[str]:
    """Veths and bridges in the root namespace: the kinds of device the lab makes.

    (Other kinds, such as TUN devices, come and go with other tests that may run at the same time.)
    """
    return set(root_interfaces_with("", "veth")) | set(root_interfaces_with("", "bridge"))


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text().lower()


def _udp_pair(lab, server_ns, server_ip, client_ns, port=4000, client_port=4001):
    srv = lab.socket(server_ns, socket.AF_INET, socket.SOCK_DGRAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    srv.bind((server_ip, port))
    srv.settimeout(2)
    cli = lab.socket(client_ns, socket.AF_INET, socket.SOCK_DGRAM)
    cli.bind(("0.0.0.0", client_port))
    return srv, cli


# ------------------------------------------------------------------ no root needed


def test_address_guard_refuses_real_networks():
    for bad in ("10.0.0.1/24", "192.168.1.1", "172.16.0.1/12", "8.8.8.8", "2001:db8::1/64", "fc00::1"):
        with pytest.raises(LabError):
            check_test_address(bad)
    for good in ("198.18.0.1/24", "198.19.255.254", "fd00::1/64", "fc94::1"):
        check_test_address(good)


def test_daemon_argv_maps_options_to_flags(tmp_path):
    argv = daemon_argv(
        tmp_path,
        tmp_path / "c.sock",
        {
            "peer": ["fc94::1@198.18.0.2:5582", "fc94::2"],
            "no_whitelist": True,
            "lan_discovery": False,
            "timers_scale": 0.1,
            "hostname": "a",
            "base": None,
        },
    )
    assert argv[1:3] == ["-m", "husarnet_ros.daemon"]
    assert argv.count("--peer") == 2
    assert "--no-whitelist" in argv
    assert "--lan-discovery" not in argv
    assert argv[argv.index("--timers-scale") + 1] == "0.1"
    assert argv[argv.index("--control") + 1] == str(tmp_path / "c.sock")
    assert "--base" not in argv


def test_crafted_packets_decode_back():
    pkt6 = traffic.build_ipv6_udp("fc94::1", "fc94::2", 1000, 2000, b"hello")
    got = decode_udp(pkt6, ethernet=False)
    assert got is not None and (got.src, got.sport, got.dst, got.dport, got.payload) == (
        "fc94::1",
        1000,
        "fc94::2",
        2000,
        b"hello",
    )
    pkt4 = traffic.build_ipv4_udp("198.18.0.9", "198.18.0.1", 7, 9, b"x" * 33)
    got4 = decode_udp(pkt4, ethernet=False)
    assert got4 is not None and got4.src == "198.18.0.9" and got4.payload == b"x" * 33
    assert decode_udp(pkt4[:27], ethernet=False) is None  # truncated UDP is rejected, not misread


def test_parse_ping_output():
    text = (
        "64 bytes from fc94::1: icmp_seq=1 ttl=64 time=0.512 ms\n"
        "64 bytes from fc94::1: icmp_seq=2 ttl=64 time=1.25 ms\n"
        "--- fc94::1 ping statistics ---\n3 packets transmitted, 2 received, 33.3333% packet loss, time 2003ms\n"
    )
    r = traffic.parse_ping(text)
    assert (r.transmitted, r.received, r.rtts_ms) == (3, 2, (0.512, 1.25))
    assert abs(r.loss - 1 / 3) < 1e-9


def test_fuzz_generator_is_seeded_and_varied():
    samples = [bytes(range(64))]
    a = [next(g) for g in [traffic.fuzz_datagrams(random.Random(3), samples)] for _ in range(50)]
    b = [next(g) for g in [traffic.fuzz_datagrams(random.Random(3), samples)] for _ in range(50)]
    assert a == b
    assert len(set(a)) > 40
    assert any(len(x) < 64 for x in a) and any(len(x) == 64 and x != samples[0] for x in a)


# ------------------------------------------------------------------ root: real namespaces


@pytest.mark.netns
def test_nat_masquerade_seen_from_outside():
    with Lab() as lab:
        t = reference_topology(lab)
        srv, cli = _udp_pair(lab, t.base, t.BASE_IP, t.peerA)
        cli.sendto(b"hi", (t.BASE_IP, 4000))
        data, (src, _sport) = srv.recvfrom(100)
        assert data == b"hi"
        assert src == t.NAT_A_IP  # the base sees natA's outside address, never peerA's
        # peerC on the LAN has no route to the base at all.
        res = t.peerC.run(["ping", "-c1", "-W1", t.BASE_IP], check=False)
        assert res.returncode != 0
        # mallory reaches both segments.
        assert t.mallory.run(["ping", "-c1", "-W2", t.PEER_C_IP], check=False).returncode == 0
        assert t.mallory.run(["ping", "-c1", "-W2", t.BASE_IP], check=False).returncode == 0
        srv.close()
        cli.close()
    assert lab.leaks == []


@pytest.mark.netns
def test_conntrack_flush_changes_the_external_port():
    with Lab() as lab:
        t = reference_topology(lab, symmetric_nat=True)
        srv, cli = _udp_pair(lab, t.base, t.BASE_IP, t.peerA)
        cli.sendto(b"1", (t.BASE_IP, 4000))
        _, (_, port1) = srv.recvfrom(10)
        cli.sendto(b"2", (t.BASE_IP, 4000))
        _, (_, port_same) = srv.recvfrom(10)
        assert port_same == port1  # the mapping is stable while conntrack remembers it
        lab.conntrack_flush(t.natA)
        cli.sendto(b"3", (t.BASE_IP, 4000))
        _, (_, port2) = srv.recvfrom(10)
        assert port2 != port1  # masquerade random: a fresh mapping after the flush
        srv.close()
        cli.close()


@pytest.mark.netns
@pytest.mark.parametrize("symmetric", [False, True])
def test_nat_mapping_kind(symmetric):
    """Port-preserving NAT: one external port for all destinations; symmetric NAT: one per destination."""
    with Lab() as lab:
        t = reference_topology(lab, symmetric_nat=symmetric)
        rec_base = traffic.UdpRecorder.start(lab, t.base, t.BASE_IP, 4000, echo=False)
        rec_mal = traffic.UdpRecorder.start(lab, t.mallory, t.MALLORY_WAN_IP, 4000, echo=False)
        cli = lab.socket(t.peerA, socket.AF_INET, socket.SOCK_DGRAM)
        cli.bind(("0.0.0.0", 5582))
        cli.sendto(b"1", (t.BASE_IP, 4000))
        cli.sendto(b"2", (t.MALLORY_WAN_IP, 4000))
        assert wait_until(lambda: rec_base.received and rec_mal.received, 3)
        p_base, p_mal = rec_base.received[0][1], rec_mal.received[0][1]
        cli.close()
        if symmetric:
            assert p_base != p_mal
        else:
            assert p_base == p_mal == 5582


@pytest.mark.netns
def test_loss_rule_drops_about_ten_percent():
    with Lab() as lab:
        t = reference_topology(lab)
        srv, cli = _udp_pair(lab, t.base, t.BASE_IP, t.peerA)
        srv.settimeout(0.5)
        rule = lab.loss(t.wan, 10)
        n = 1000
        got = 0
        for i in range(n):
            cli.sendto(b"%d" % i, (t.BASE_IP, 4000))
            if i % 50 == 49:
                time.sleep(0.005)  # pace so the receive buffer never overflows (only the rule may drop)
        try:
            while True:
                srv.recvfrom(100)
                got += 1
        except TimeoutError:
            pass
        dropped = lab.rule_packets(rule)
        assert got + dropped == n
        assert 45 <= dropped <= 170, dropped  # binomial(1000, 0.1): mean 100, sd 9.5
        lab.delete_rule(rule)
        cli.sendto(b"after", (t.BASE_IP, 4000))
        assert srv.recvfrom(100)[0] == b"after"
        srv.close()
        cli.close()


@pytest.mark.netns
def test_block_udp_and_unblock_between_nats():
    with Lab() as lab:
        t = reference_topology(lab)
        srv, cli = _udp_pair(lab, t.base, t.BASE_IP, t.peerA)
        srv.settimeout(0.5)
        rules = lab.block_udp(t.wan, t.NAT_A_IP, t.BASE_IP)
        cli.sendto(b"blocked", (t.BASE_IP, 4000))
        with pytest.raises(TimeoutError):
            srv.recvfrom(100)
        assert sum(lab.rule_packets(r) for r in rules) == 1
        lab.unblock(rules)
        cli.sendto(b"open", (t.BASE_IP, 4000))
        assert srv.recvfrom(100)[0] == b"open"
        srv.close()
        cli.close()


@pytest.mark.netns
def test_sniffer_and_spoofed_source_from_mallory():
    with Lab() as lab:
        t = reference_topology(lab)
        rec = traffic.UdpRecorder.start(lab, t.base, t.BASE_IP, 4000, echo=False)
        sniff = lab.sniff(t.wan, "br0")
        pkt = traffic.build_ipv4_udp(t.NAT_B_IP, t.BASE_IP, 5582, 4000, b"spoofed")
        traffic.send_raw_ipv4(lab, t.mallory, pkt)
        assert wait_until(lambda: rec.received, 3)
        assert rec.received[0][0] == t.NAT_B_IP and rec.received[0][2] == b"spoofed"
        assert wait_until(lambda: any(p.payload == b"spoofed" for p in sniff.udp(port=4000)), 3)


@pytest.mark.netns
def test_sysctl_and_ipv6_on_the_lan():
    with Lab() as lab:
        t = reference_topology(lab)
        lab.set_sysctl(t.natA, "net.netfilter.nf_conntrack_udp_timeout", 2)
        val = t.natA.run(["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"]).stdout.strip()
        assert val == "2"
        r = traffic.ping(lab, t.peerC, "fd00:3::3", count=2, interval=0.2)
        assert r.received == 2 and len(r.rtts_ms) == 2


@pytest.mark.netns
def test_each_host_has_its_own_machine_id():
    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        ida = a.run(["cat", "/etc/machine-id"]).stdout.strip()
        idb = b.run(["cat", "/etc/machine-id"]).stdout.strip()
        assert len(ida) == 32 and ida != idb
        assert ida != Path("/etc/machine-id").read_text().strip()
        etc = Path("/etc/netns") / a.ns
        assert etc.exists()
    assert not etc.exists()


@pytest.mark.netns
def test_tcp_transfer_hash_matches():
    with Lab() as lab:
        t = reference_topology(lab)
        res = traffic.tcp_transfer(lab, t.peerD, t.peerC, "fd00:3::3", mb=2)
        assert res.ok, res
        assert res.received_bytes == 2_000_000


@pytest.mark.netns
def test_cleanup_leaves_nothing_and_kills_only_our_processes():
    before = _root_links()
    outsider = None
    lab = Lab()
    try:
        t = reference_topology(lab)
        # A process tree: the leader and a child in the same group; both must die.
        p = lab.spawn(t.peerA, ["sh", "-c", "sleep 300 & echo child $!; sleep 300"])
        assert wait_until(lambda: "child" in p.output(), 5)
        child_pid = int(p.output().split()[1])
        lab.sniff(t.wan, "br0")
        lab.loss(t.wan, 10)
        # A process we did NOT start (own session, not registered with the lab) in one of our namespaces.
        outsider = __import__("subprocess").Popen(
            ["ip", "netns", "exec", t.base.ns, "sleep", "300"], start_new_session=True
        )
        assert wait_until(lambda: outsider.pid in lab.ns_pids(t.base), 5)
        prefix = lab.prefix
        assert len(lab.existing_namespaces()) == 10
    finally:
        leaks = lab.cleanup()
    try:
        assert lab.existing_namespaces() == []
        assert not any(ln.startswith(prefix) for ln in os.popen("ip netns list").read().split())
        assert not p.alive
        assert (
            not os.path.exists(f"/proc/{child_pid}")
            or "zombie" in Path(f"/proc/{child_pid}/status").read_text().lower()
        )
        # the outsider was reported, not killed
        assert outsider.poll() is None
        assert any(str(outsider.pid) in leak for leak in leaks)
        assert _root_links() == before
        assert not lab.tmp.exists()
        assert not any(p.name.startswith(prefix) for p in Path("/etc/netns").glob("*"))
    finally:
        if outsider is not None:
            outsider.kill()
            outsider.wait()


@pytest.mark.netns
def test_cleanup_runs_on_exception():
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        h = lab.host("x")
        p = lab.spawn(h, ["sleep", "300"])
        raise RuntimeError("boom")
    assert lab.existing_namespaces() == []
    assert not p.alive
