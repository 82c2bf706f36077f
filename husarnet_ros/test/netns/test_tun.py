"""TUN device in a private network namespace: creation, traffic, cleanup and the error messages."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.netns

ADDR = bytes.fromhex("fc94" + "00" * 13 + "01")  # fc94::1
PEER = "fc94::2"
PYTHON = sys.executable
PKG_ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TUN_DEVICE_NUMBER = (10, 200)  # misc major, the tun clone device's minor (Documentation/admin-guide/devices.txt)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh namespace named with our PID; this thread runs inside it during the test."""
    from pyroute2 import netns as pnetns

    name = f"hrtun{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    pnetns.pushns(name)
    try:
        yield name
    finally:
        pnetns.popns()
        subprocess.run(["ip", "netns", "del", name], check=False)


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _run_in_ns(ns: str, code: str, *, tun_mode: int = 0o666) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in ``ns``; it imports as root, then drops to nobody (the interpreter lives in /root).

    The child sees a /dev/net/tun of mode ``tun_mode``: distributions ship 0666 (what the unprivileged
    path relies on), some machines 0600, and the tests must not depend on which one runs them.  The node
    is a fresh character device bind-mounted in the mount namespace ``ip netns exec`` gives the child,
    so the host's own /dev/net/tun is never touched.
    """
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        node = os.path.join(d, "tun")
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(*TUN_DEVICE_NUMBER))
        os.chmod(node, tun_mode)
        bind_then_exec = 'mount --bind "$0" /dev/net/tun && exec "$@"'
        return subprocess.run(
            ["ip", "netns", "exec", ns, "sh", "-c", bind_then_exec, node, PYTHON, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.path.abspath(PKG_ROOT)},
        )


def _ping(ns: str, count: int = 3) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "ping", "-6", "-c", str(count), "-i", "0.2", "-W", "1", PEER],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _read_echo_request(dev: object, vnet: bool) -> bytes:
    for _ in range(20):
        pkt = dev.read(timeout=2.0)  # type: ignore[attr-defined]
        assert pkt, "no packet from the TUN within 2 s"
        ip = pkt[10:] if vnet else pkt
        # Skip router/neighbour chatter; keep our ICMPv6 echo request to the peer.
        if ip[0] >> 4 == 6 and ip[6] == 58 and ip[40] == 128:
            return ip
    raise AssertionError("no echo request seen")


def _echo_reply(req: bytes) -> bytes:
    """ICMPv6 echo reply for an echo request, checksum computed the slow textbook way."""
    src, dst = req[24:40], req[8:24]
    body = bytearray(req[40:])
    body[0] = 129
    body[2:4] = b"\0\0"
    pseudo = src + dst + len(body).to_bytes(4, "big") + b"\0\0\0\x3a"
    data = pseudo + body + (b"\0" if len(body) % 2 else b"")
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    body[2:4] = (~s & 0xFFFF).to_bytes(2, "big")
    return req[:8] + src + dst + bytes(body)


@pytest.mark.parametrize("vnet", [False, True])
def test_open_configures_device_and_ping_reaches_read(netns: str, vnet: bool) -> None:
    from husarnet_ros.core import tun

    dev = tun.TunDevice.open("hnt0", ADDR, 1420, vnet_hdr=vnet)
    try:
        assert dev.vnet_hdr is vnet
        if vnet:
            assert dev.offload_flags & tun.TUN_F_TSO6, "kernel refused TSO6 offload"
        show = subprocess.run(["ip", "-6", "addr", "show", "dev", "hnt0"], capture_output=True, text=True).stdout
        assert "inet6 fc94::1/16" in show
        assert "mtu 1420" in subprocess.run(["ip", "link", "show", "hnt0"], capture_output=True, text=True).stdout
        routes = subprocess.run(["ip", "-6", "route", "show", "dev", "hnt0"], capture_output=True, text=True).stdout
        assert "fc94::/16" in routes
        p = _ping(netns)
        try:
            ip = _read_echo_request(dev, vnet)
        finally:
            p.wait(timeout=10)
        assert ip[8:24] == ADDR
        assert ip[24:40] == bytes.fromhex("fc94" + "00" * 13 + "02")
    finally:
        dev.close()
    dev.close()  # idempotent
    assert "hnt0" not in _links()


@pytest.mark.parametrize(("vnet", "lone"), [(True, False), (False, True), (True, True)])
def test_write_delivers_to_the_stack(netns: str, vnet: bool, lone: bool) -> None:
    """An echo reply written to the TUN reaches ping: with ``write`` (the caller's virtio-net header) and
    with the data path's ``write_packet`` (a plain packet; the zero header added when the device has them).
    """
    from husarnet_ros.core import tun

    dev = tun.TunDevice.open("hnt0", ADDR, 1420, vnet_hdr=vnet)
    try:
        p = subprocess.Popen(
            ["ip", "netns", "exec", netns, "ping", "-6", "-c", "1", "-W", "3", PEER],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        reply = _echo_reply(_read_echo_request(dev, vnet))
        if lone:
            dev.write_packet(reply)
        else:
            dev.write(bytes(10) + reply)  # all-zero virtio-net header: a plain packet
        out, _ = p.communicate(timeout=10)
        assert p.returncode == 0, out
        assert b"1 received" in out
        if lone:
            dev.write_packet(b"\x60junk")  # refused by the kernel: a drop, not an exception
    finally:
        dev.close()
    if lone:
        dev.write_packet(bytes(48))  # after close: nothing happens


def test_read_ready_never_waits_and_wait_readable_times_out(netns: str) -> None:
    """The data path's TUN loop reads under a lock and sleeps outside it: both halves, and close, behave."""
    import socket
    import time

    from husarnet_ros.core import tun

    dev = tun.TunDevice.open("hnt0", ADDR, 1420, vnet_hdr=False)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        while dev.read(timeout=0.3):  # chatter after the device came up
            pass
        t0 = time.monotonic()
        assert dev.read_ready() == []
        assert dev.wait_readable(0.2) is False
        assert time.monotonic() - t0 >= 0.15
        for i in range(3):
            tx.sendto(b"r%d" % i, (PEER, 9))
        assert dev.wait_readable(2.0) is True
        time.sleep(0.05)
        assert [p[-2:] for p in dev.read_ready(2) if p[6] == 17] == [b"r0", b"r1"]  # at most max_packets
        assert [p[-2:] for p in dev.read_ready() if p[6] == 17] == [b"r2"]
        # read_one: the read after a wake-up, one packet or None, never a wait.
        assert dev.read_one() is None
        tx.sendto(b"r3", (PEER, 9))
        assert dev.wait_readable(2.0) is True
        one = dev.read_one()
        while one is not None and one[6] != 17:  # skip the kernel's own chatter
            one = dev.read_one()
        assert one is not None and one[-2:] == b"r3"
    finally:
        tx.close()
        dev.close()
    with pytest.raises(tun.TunError, match="closed"):
        dev.read_ready()
    with pytest.raises(tun.TunError, match="closed"):
        dev.read_one()
    with pytest.raises(tun.TunError, match="closed"):
        dev.wait_readable(0.1)


def test_busy_name_is_clear(netns: str) -> None:
    from husarnet_ros.core import tun

    dev = tun.TunDevice.open("hnt0", ADDR, 1420)
    try:
        with pytest.raises(tun.TunError, match="busy"):
            tun.TunDevice.open("hnt0", ADDR, 1420)
    finally:
        dev.close()


def test_read_wakes_on_close_from_other_thread(netns: str) -> None:
    import threading

    from husarnet_ros.core import tun

    dev = tun.TunDevice.open("hnt0", None, 1420)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while True:  # link-up chatter (MLD, router solicitations) may arrive first
                dev.read()
        except tun.TunError as e:
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    t.join(0.2)
    dev.close()
    t.join(5)
    assert not t.is_alive()
    assert errors and "closed" in str(errors[0])


OPEN_AS_NOBODY = """
import os
from husarnet_ros.core.tun import TunDevice, TunError
os.setgroups([]); os.setgid(65534); os.setuid(65534)
try:
    TunDevice.open("hnt0", bytes.fromhex("fc94" + "00"*13 + "01"), 1420)
except TunError as e:
    print("TUNERROR", e)
"""


def test_unprivileged_without_setup_says_what_to_run(netns: str) -> None:
    r = _run_in_ns(netns, OPEN_AS_NOBODY)
    assert "TUNERROR" in r.stdout, r.stderr
    assert "not allowed to create or attach TUN device 'hnt0'" in r.stdout
    assert "sudo husarnet-ros setup-tun --user $USER" in r.stdout


def test_unprivileged_with_a_0600_clone_device_says_to_open_it_up(netns: str) -> None:
    """A 0600 /dev/net/tun stops a normal user before any device is involved; the message names the mode."""
    r = _run_in_ns(netns, OPEN_AS_NOBODY, tun_mode=0o600)
    assert "TUNERROR cannot open /dev/net/tun: permission denied (/dev/net/tun is mode 0600" in r.stdout, r.stderr
    assert "sudo chmod 0666 /dev/net/tun" in r.stdout and "setup-tun --user $USER" in r.stdout


@pytest.mark.parametrize("mode", [0o600, 0o666])
def test_setup_tun_warns_when_the_user_could_not_open_the_clone_device(netns: str, mode: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        r = _run_in_ns(
            netns,
            f"""
            import sys
            from husarnet_ros import cli
            args = ["setup-tun", "--user", "nobody", "--state-dir", {d + "/state"!r}, "--interface", "hnt3"]
            sys.exit(cli.main(args))
            """,
            tun_mode=mode,
        )
    from husarnet_ros.core import tun

    try:
        assert r.returncode == 0, r.stderr
        assert "hnt3 is ready for user nobody" in r.stdout
        warned = "warning: nobody cannot attach to hnt3 yet: /dev/net/tun is mode 0600" in r.stderr
        assert warned == (mode == 0o600), r.stderr
        if warned:
            assert "sudo chmod 0666 /dev/net/tun" in r.stderr
        assert "hnt3" in _links()  # the device lives in the namespace, not in the child's mount namespace
    finally:
        tun.remove_tun("hnt3")


def test_persistent_device_attach_as_owner(netns: str) -> None:
    from husarnet_ros.core import tun

    tun.setup_persistent_tun("hnt1", 65534, ADDR, 1400)
    try:
        assert "hnt1" in _links()
        # Pings outlast the unprivileged reader's start-up (Python import on a loaded machine takes
        # seconds); echo requests sent before it attaches are dropped by the kernel.
        p = _ping(netns, count=60)
        r = _run_in_ns(
            netns,
            """
            import os
            from husarnet_ros.core.tun import TunDevice
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            dev = TunDevice.open("hnt1", bytes.fromhex("fc94" + "00"*13 + "01"), 1400, vnet_hdr=True)
            print("MTU", dev.mtu)
            for _ in range(20):
                pkt = dev.read(timeout=3)
                if pkt and pkt[10 + 6] == 58 and pkt[10 + 40] == 128:
                    print("ECHO")
                    break
            dev.close()
            """,
        )
        p.terminate()
        p.wait(timeout=10)
        assert "MTU 1400" in r.stdout, r.stderr
        assert "ECHO" in r.stdout, r.stderr
        # Persistent: still there after the unprivileged user closed it.
        assert "hnt1" in _links()
    finally:
        tun.remove_tun("hnt1")
    assert "hnt1" not in _links()
    tun.remove_tun("hnt1")  # idempotent


def test_persistent_device_without_address_is_reported(netns: str) -> None:
    from husarnet_ros.core import tun

    tun.setup_persistent_tun("hnt2", 65534, ADDR, 1420)
    try:
        subprocess.run(["ip", "-6", "addr", "flush", "dev", "hnt2"], check=True)
        r = _run_in_ns(
            netns,
            """
            import os
            from husarnet_ros.core.tun import TunDevice, TunError
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            try:
                TunDevice.open("hnt2", bytes.fromhex("fc94" + "00"*13 + "01"), 1420)
            except TunError as e:
                print("TUNERROR", e)
            """,
        )
        assert "TUNERROR" in r.stdout, r.stderr
        assert "no address fc94::1/16" in r.stdout
        assert "setup-tun" in r.stdout
    finally:
        tun.remove_tun("hnt2")
