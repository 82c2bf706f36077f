"""UdpSocket: GSO send and GRO receive between two namespaces joined by a veth, and on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from husarnet_ros.core import udp

A4, B4 = "198.18.77.1", "198.18.77.2"
A6, B6 = "fd00:77::1", "fd00:77::2"


class CallCounter:
    """Stands in for the socket object and counts the calls UdpSocket makes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._sock, name)
        if name in ("sendmsg", "sendto", "recvmsg", "recvfrom"):

            def wrapped(*a: Any, **kw: Any) -> Any:
                self.calls[name] = self.calls.get(name, 0) + 1
                return attr(*a, **kw)

            return wrapped
        return attr


def counted(s: udp.UdpSocket) -> CallCounter:
    c = CallCounter(s.sock)
    s.sock = c  # type: ignore[assignment]
    return c


@pytest.fixture
def veth_pair() -> Iterator[tuple[str, str]]:
    """Namespaces a and b (names carry our PID) joined by a veth; removed afterwards."""
    pid = os.getpid()
    a, b = f"hrudpa{pid}", f"hrudpb{pid}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True)

    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip(
            "link",
            "add",
            f"hru{pid % 100000}a",
            "netns",
            a,
            "type",
            "veth",
            "peer",
            "name",
            f"hru{pid % 100000}b",
            "netns",
            b,
        )
        for ns, dev, v4, v6 in ((a, f"hru{pid % 100000}a", A4, A6), (b, f"hru{pid % 100000}b", B4, B6)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    from pyroute2 import netns as pnetns

    pnetns.pushns(ns)
    try:
        yield
    finally:
        pnetns.popns()


def receive(sock: udp.UdpSocket, count: int, timeout: float = 5.0) -> list[tuple[bytes, udp.Endpoint]]:
    got: list[tuple[bytes, udp.Endpoint]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += sock.recv_batch(timeout=0.5)
    return got


def payloads(n: int, size: int, last: int | None = None) -> list[bytes]:
    out = [bytes([i]) * size for i in range(n)]
    if last is not None:
        out[-1] = bytes([n - 1]) * last
    return out


@pytest.mark.netns
@pytest.mark.parametrize(("dst", "src"), [(B4, A4), (B6, A6)])
def test_gso_send_arrives_as_40_datagrams_with_gro_split(veth_pair: tuple[str, str], dst: str, src: str) -> None:
    a, b = veth_pair
    with inside(a):
        tx = udp.UdpSocket()
    with inside(b):
        rx = udp.UdpSocket()
    try:
        assert tx.gso and rx.gro, "kernel lacks UDP GSO/GRO"
        txc, rxc = counted(tx), counted(rx)
        data = payloads(40, 1200, last=517)
        tx.send_many(data, (dst, rx.local_port))
        got = receive(rx, 40)
        assert [d for d, _ in got] == data
        assert {ep for _, ep in got} == {(src, tx.local_port)}
        assert txc.calls == {"sendmsg": 1}  # one GSO send for the whole run
        assert rxc.calls.get("recvmsg", 0) < 40  # GRO handed them over in fewer buffers
    finally:
        tx.close()
        rx.close()


@pytest.mark.netns
def test_without_gro_each_datagram_arrives_alone(veth_pair: tuple[str, str]) -> None:
    a, b = veth_pair
    with inside(a):
        tx = udp.UdpSocket()
    with inside(b):
        rx = udp.UdpSocket(gro=False)
    try:
        data = payloads(40, 1000)
        tx.send_many(data, (B4, rx.local_port))
        got = receive(rx, 40)
        assert [d for d, _ in got] == data
    finally:
        tx.close()
        rx.close()


@pytest.mark.netns
def test_segments_larger_than_the_path_fall_back_and_never_exceed_mtu(veth_pair: tuple[str, str]) -> None:
    """Path MTU 1280 and 1400-byte datagrams: the kernel refuses GSO, we send one by one, IP fragments."""
    a, b = veth_pair
    pid = os.getpid()
    subprocess.run(["ip", "-n", a, "link", "set", f"hru{pid % 100000}a", "mtu", "1280"], check=True)
    subprocess.run(["ip", "-n", b, "link", "set", f"hru{pid % 100000}b", "mtu", "1280"], check=True)
    with inside(a):
        tx = udp.UdpSocket()
    with inside(b):
        rx = udp.UdpSocket()
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        cap.bind((f"hru{pid % 100000}b", 0))
        cap.setblocking(False)
    try:
        txc = counted(tx)
        data = payloads(40, 1400)
        tx.send_many(data, (B4, rx.local_port))
        got = receive(rx, 40)
        assert [d for d, _ in got] == data
        assert txc.calls.get("sendto") == 40  # fell back
        frames = []
        with contextlib.suppress(BlockingIOError):
            while True:
                frames.append(len(cap.recv(70000)))
        assert len(frames) >= 80  # every datagram arrived as fragments
        assert max(frames) <= 1280 + 14
    finally:
        cap.close()
        tx.close()
        rx.close()


# --- loopback (no root needed) ---------------------------------------------------------


def test_loopback_mixed_sizes_keep_order_and_runs() -> None:
    with udp.UdpSocket(host="::1") as tx, udp.UdpSocket(host="::1") as rx:
        txc = counted(tx)
        data = payloads(10, 300) + payloads(5, 200) + [b"x" * 900] + payloads(70, 100)
        tx.send_many(data, ("::1", rx.local_port))
        got = receive(rx, len(data))
        assert [d for d, _ in got] == data
        assert {ep for _, ep in got} == {("::1", tx.local_port)}
        if tx.gso:
            # runs: 10x300 + the first 200 (a shorter one ends a run), 4x200, 900 + one 100,
            # then 64x100 (the per-send segment limit) and the last 5x100
            assert txc.calls == {"sendmsg": 5}


def test_ipv4_mapped_endpoint_is_plain_ipv4() -> None:
    with udp.UdpSocket() as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
        s4.bind(("127.0.0.1", 0))
        s4.sendto(b"hello", ("127.0.0.1", rx.local_port))
        got = receive(rx, 1)
        assert got == [(b"hello", ("127.0.0.1", s4.getsockname()[1]))]
        rx.send(b"back", ("127.0.0.1", s4.getsockname()[1]))
        s4.settimeout(2)
        assert s4.recvfrom(100) == (b"back", ("127.0.0.1", rx.local_port))


def test_recv_timeout_and_close_wakes_receiver() -> None:
    import threading

    rx = udp.UdpSocket(host="::1")
    t0 = time.monotonic()
    assert rx.recv_batch(timeout=0.2) == []
    assert time.monotonic() - t0 >= 0.15
    result: list[list[tuple[bytes, udp.Endpoint]]] = []
    t = threading.Thread(target=lambda: result.append(rx.recv_batch(timeout=None)))
    t.start()
    time.sleep(0.1)
    rx.close()
    t.join(3)
    assert not t.is_alive()
    assert result == [[]]
    rx.close()


def test_normalize_and_sockaddr() -> None:
    assert udp.normalize_host("::ffff:198.18.0.5") == "198.18.0.5"
    assert udp.normalize_host("fd00::1") == "fd00::1"
    assert udp._sockaddr(("198.18.0.5", 5582)) == ("::ffff:198.18.0.5", 5582, 0, 0)
    assert udp._sockaddr(("fe80::1%1", 1)) == ("fe80::1", 1, 0, 1)
    with pytest.raises(ValueError):
        udp._sockaddr(("198.18.0.5", 0))
    with pytest.raises(ValueError):
        udp._sockaddr(("not-an-ip", 1))


def test_scoped_host_only_scopes_link_local() -> None:
    assert udp.scoped_host("fd00::1", 1) == "fd00::1"
    assert udp.scoped_host("198.18.0.1", 1) == "198.18.0.1"
    assert udp.scoped_host("fe80::1", 0) == "fe80::1"
    assert udp.scoped_host("fe80::1%lo", 1) == "fe80::1%lo"
    assert udp.scoped_host("fe80::1", socket.if_nametoindex("lo")) == "fe80::1%lo"
    assert udp.scoped_host("febf::1", 999999) == "febf::1%999999"  # no such interface: the index


@pytest.mark.netns
def test_link_local_sender_keeps_its_scope_and_gets_a_reply(veth_pair: tuple[str, str]) -> None:
    a, b = veth_pair
    pid = os.getpid()
    dev_a, dev_b = f"hru{pid % 100000}a", f"hru{pid % 100000}b"
    subprocess.run(["ip", "-n", a, "addr", "add", "fe80::77:1/64", "dev", dev_a, "nodad"], check=True)
    subprocess.run(["ip", "-n", b, "addr", "add", "fe80::77:2/64", "dev", dev_b, "nodad"], check=True)
    with inside(a):
        tx = udp.UdpSocket()
    with inside(b):
        rx = udp.UdpSocket()
    try:
        # Interface names resolve in the namespace we are in, as they do in a daemon running there.
        with inside(a):
            tx.send(b"hi", (f"fe80::77:2%{dev_a}", rx.local_port))
        with inside(b):
            got = receive(rx, 1)
            assert got == [(b"hi", (f"fe80::77:1%{dev_b}", tx.local_port))]
            rx.send(b"back", got[0][1])  # the reported endpoint is usable as is
        with inside(a):
            back = receive(tx, 1)
        assert back == [(b"back", (f"fe80::77:2%{dev_a}", rx.local_port))]
        # A datagram offered alone to the data path (recv_batch's ``lone``) names its sender in the form
        # sockaddr() gives the reported endpoint: the form a data path lane keeps and compares with.
        offered: list[tuple[bytes, object]] = []
        waiting = threading.Event()
        wait_readable = rx._wait_readable
        rx._wait_readable = lambda timeout: waiting.set() or wait_readable(timeout)  # type: ignore[method-assign]
        waiter = threading.Thread(
            target=rx.recv_batch, args=(5.0,), kwargs={"lone": lambda d, addr: offered.append((d, addr)) or True}
        )
        waiter.start()
        assert waiting.wait(5)  # the receiver is waiting: what arrives now arrives alone
        with inside(a):
            tx.send(b"alone", (f"fe80::77:2%{dev_a}", rx.local_port))
        waiter.join(5)
        with inside(b):
            expected = rx.sockaddr((f"fe80::77:1%{dev_b}", tx.local_port))
        assert offered == [(b"alone", expected)]
    finally:
        tx.close()
        rx.close()
