"""Network-namespace test lab: topologies of hosts, bridges and NAT routers with guaranteed cleanup.

Why a lab of its own: end-to-end security and fault tests (TESTPLAN.md) need real kernels, sockets, TUN
devices and NATs, but they must never touch the machine's real network and must never leave anything
behind. Every name this lab creates carries a per-lab prefix with the PID (``hr<pid>x<n>-<name>``), every
interface lives inside one of its namespaces (veths are created directly in their namespaces, never in the
root namespace), and :meth:`Lab.cleanup` (also run from ``__exit__`` and ``atexit``) stops only the
process groups the lab itself started, then deletes its namespaces.

Only the ranges the project allows are used: IPv4 from 198.18.0.0/15 and IPv6 from fd00::/8
(:func:`check_test_address` refuses anything else).

Building blocks::

    with Lab() as lab:
        wan = lab.bridge("wan")
        a = lab.host("a")
        lab.link(a, wan, "198.18.0.2/24", "fd00::2/64")
        proc = lab.spawn(a, ["ping", "-c1", "198.18.0.3"])
        d = lab.start_daemon(a, lab.tmp / "a", no_whitelist=True)
        d.control("status")

Packets are seen through :class:`Sniffer` (an AF_PACKET socket opened inside the namespace, read by a
thread) and sockets for crafted traffic come from :meth:`Lab.socket`, which opens any socket inside a
namespace (``setns`` on the calling thread for the duration of the ``socket()`` call only).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
PACKAGE_ROOT = REPO_ROOT / "husarnet_ros"

ALLOWED_V4 = ipaddress.ip_network("198.18.0.0/15")
ALLOWED_V6 = (ipaddress.ip_network("fd00::/8"), ipaddress.ip_network("fc94::/16"))

_CLONE_NEWNET = 0x40000000
_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_ADD_MEMBERSHIP = 1
_PACKET_MR_PROMISC = 1
_lab_counter = itertools.count()
ETC_NETNS = Path("/etc/netns")
_setns_lock = threading.Lock()


class LabError(RuntimeError):
    """A lab operation failed; the message carries the command and its output."""


def check_test_address(addr: str) -> None:
    """Refuse any address outside the test ranges, so no test can ever aim at a real network."""
    ip = ipaddress.ip_interface(addr).ip
    if ip.version == 4:
        if ip not in ALLOWED_V4:
            raise LabError(f"{addr}: IPv4 test addresses must be inside {ALLOWED_V4}")
    elif not ip.is_link_local and not any(ip in net for net in ALLOWED_V6):
        raise LabError(f"{addr}: IPv6 test addresses must be inside fd00::/8 or fc94::/16")


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
    env: dict[str, str] | None = None,
):
    res = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, env=env, cwd=str(REPO_ROOT)
    )
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(ns_name: str):
    """Run the body with the *calling thread* inside a named network namespace, then switch back.

    Only sockets created inside the body are affected (a socket keeps the namespace it was created in);
    a lock keeps two threads from interleaving their switches.
    """
    libc = _libc()
    with _setns_lock:
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns_name}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise LabError(f"setns({ns_name}) failed: {os.strerror(err)}")
            try:
                yield
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover - would leave the thread misplaced
                    err = ctypes.get_errno()
                    raise LabError(f"setns back to own namespace failed: {os.strerror(err)}")
        finally:
            os.close(target)
            os.close(own)


# --------------------------------------------------------------------------------------------------
# Namespaces, processes


@dataclass(eq=False)
class Netns:
    """A network namespace owned by a lab (a host, a router or a bridge)."""

    lab: Lab
    name: str  # short name given by the test ("peerA")
    ns: str  # real namespace name with the lab prefix
    addrs4: dict[str, str] = field(default_factory=dict)  # iface -> "198.18.0.2/24"
    addrs6: dict[str, str] = field(default_factory=dict)
    _ifcount: itertools.count = field(default_factory=itertools.count)

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return self.lab.run(self, argv, **kw)

    def spawn(self, argv: Sequence[str], **kw) -> Proc:
        return self.lab.spawn(self, argv, **kw)

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        return self.lab.socket(self, family, type, proto)

    @property
    def ip4(self) -> str:
        """The first IPv4 address (without prefix length)."""
        if not self.addrs4:
            raise LabError(f"{self.name} has no IPv4 address")
        return str(ipaddress.ip_interface(next(iter(self.addrs4.values()))).ip)

    @property
    def ip6(self) -> str:
        if not self.addrs6:
            raise LabError(f"{self.name} has no IPv6 address")
        return str(ipaddress.ip_interface(next(iter(self.addrs6.values()))).ip)

    def ip4_on(self, iface: str) -> str:
        return str(ipaddress.ip_interface(self.addrs4[iface]).ip)

    def _next_ifname(self, stem: str) -> str:
        return f"{stem}{next(self._ifcount)}"


class Host(Netns):
    """A host (or router) namespace."""


@dataclass(eq=False)
class Bridge(Netns):
    """A namespace that holds one Linux bridge ``br0`` acting as an L2 switch."""

    bridge_if: str = "br0"


class Proc:
    """A process the lab started in its own process group; stop() signals only that group."""

    def __init__(self, popen: subprocess.Popen, ns: Netns, argv: Sequence[str], log: Path | None):
        self.popen = popen
        self.ns = ns
        self.argv = list(argv)
        self.log = log
        self.pid = popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)

    def send_signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the group, wait, then SIGKILL the group if it is still there. Returns the exit code."""
        if self.alive:
            self.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=5)
        # Children that outlived the leader but stayed in its group are still ours.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        return self.popen.poll()

    def output(self) -> str:
        """The process log (stdout+stderr) as text, empty if it was not logged."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def __repr__(self) -> str:
        return f"<Proc {self.pid} in {self.ns.name}: {' '.join(self.argv)[:80]}>"


# --------------------------------------------------------------------------------------------------
# Packet capture (AF_PACKET inside the namespace)


def _ifindex_in(lab: Lab, ns: Netns, iface: str) -> int:
    with in_netns(ns.ns):
        return socket.if_nametoindex(iface)


@dataclass(frozen=True)
class Frame:
    time: float
    iface: str
    data: bytes  # starts at the link header (Ethernet on veth/bridge, IP on TUN)
    outgoing: bool


class Sniffer:
    """Capture every frame on one interface of a namespace with an AF_PACKET socket and a thread.

    Frames are kept in memory (bounded by ``limit``) so tests can inspect and replay them.
    """

    def __init__(self, lab: Lab, ns: Netns, iface: str, limit: int = 200_000, promisc: bool = True):
        self.iface = iface
        self.ns = ns
        self.frames: list[Frame] = []
        self.limit = limit
        self._sock = lab.socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        self._sock.bind((iface, 0))
        if promisc:
            # A bridge passes forwarded frames up to its own device only when that device is promiscuous.
            ifindex = _ifindex_in(lab, ns, iface)
            mreq = struct.pack("iHH8s", ifindex, _PACKET_MR_PROMISC, 0, b"")
            self._sock.setsockopt(_SOL_PACKET, _PACKET_ADD_MEMBERSHIP, mreq)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sniff-{ns.name}-{iface}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(self.frames) < self.limit:
                self.frames.append(Frame(time.time(), self.iface, data, addr[2] == socket.PACKET_OUTGOING))

    def stop(self) -> list[Frame]:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=2)
            self._sock.close()
        return list(self.frames)

    def udp(self, *, port: int | None = None) -> list[UdpPacket]:
        """Decoded UDP datagrams seen so far (optionally only those to or from ``port``)."""
        out = []
        for fr in list(self.frames):
            pkt = decode_udp(fr.data, ethernet=not self.iface.startswith("hnet"))
            if pkt is None:
                continue
            if port is None or port in (pkt.sport, pkt.dport):
                out.append(pkt)
        return out


@dataclass(frozen=True)
class UdpPacket:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def decode_udp(frame: bytes, *, ethernet: bool = True) -> UdpPacket | None:
    """Decode an Ethernet (or raw IP) frame carrying UDP over IPv4/IPv6; None for anything else."""
    data = frame
    if ethernet:
        if len(data) < 14:
            return None
        ethertype = int.from_bytes(data[12:14], "big")
        data = data[14:]
        if ethertype == 0x8100 and len(data) >= 4:  # VLAN
            ethertype = int.from_bytes(data[2:4], "big")
            data = data[4:]
    elif data:
        ethertype = 0x0800 if data[0] >> 4 == 4 else 0x86DD
    else:
        return None
    if ethertype == 0x0800:
        if len(data) < 20 or data[0] >> 4 != 4:
            return None
        ihl = (data[0] & 0x0F) * 4
        if data[9] != 17 or len(data) < ihl + 8:
            return None
        if int.from_bytes(data[6:8], "big") & 0x1FFF:  # not a first fragment
            return None
        src, dst = socket.inet_ntop(socket.AF_INET, data[12:16]), socket.inet_ntop(socket.AF_INET, data[16:20])
        udp = data[ihl:]
    elif ethertype == 0x86DD:
        if len(data) < 48 or data[6] != 17:
            return None
        src, dst = socket.inet_ntop(socket.AF_INET6, data[8:24]), socket.inet_ntop(socket.AF_INET6, data[24:40])
        udp = data[40:]
    else:
        return None
    ulen = int.from_bytes(udp[4:6], "big")
    if ulen < 8 or ulen > len(udp):
        return None
    return UdpPacket(src, int.from_bytes(udp[0:2], "big"), dst, int.from_bytes(udp[2:4], "big"), bytes(udp[8:ulen]))


# --------------------------------------------------------------------------------------------------
# Daemon (python -m husarnet_ros.daemon) and its control socket


def control(path: str | Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict:
    """Send one JSON command line to a daemon control socket and return the JSON reply (LabError if none)."""
    from husarnet_ros.daemon import control as daemon_control

    try:
        return daemon_control(path, cmd, socket_timeout=timeout, **args)
    except ConnectionError as exc:
        raise LabError(f"control socket {path}: {exc} (command {cmd})") from exc


def daemon_argv(
    state_dir: Path, control_path: Path, options: dict[str, Any], module: str = "husarnet_ros.daemon"
) -> list[str]:
    """Turn keyword options into daemon flags: ``peer=[..]`` -> ``--peer X --peer Y``; ``True`` -> flag.

    ``module`` runs another entry point that takes the daemon's flags.
    """
    argv = [sys.executable, "-m", module, "--state-dir", str(state_dir), "--control", str(control_path)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + pp if pp else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Daemon:
    """One husarnet_ros daemon process in a lab host, driven through its control socket."""

    def __init__(self, lab: Lab, host: Host, state_dir: Path, proc: Proc, control_path: Path, address: str):
        self.lab = lab
        self.host = host
        self.state_dir = state_dir
        self.proc = proc
        self.control_path = control_path
        self.address = address  # fc94 text form

    def control(self, cmd: str, **args: Any) -> dict:
        """Send a command; raise LabError when the daemon answers ``ok: false``."""
        reply = control(self.control_path, cmd, **args)
        if not reply.get("ok", False):
            raise LabError(f"{self.host.name} {cmd}: {reply.get('error', reply)}")
        return reply

    def status(self) -> dict:
        """StatusInfo fields (address as text, plus udp_port)."""
        reply = self.control("status")
        return dict(reply.get("status", reply))

    def counters(self) -> dict[str, int]:
        reply = self.control("counters")
        return dict(reply.get("counters", reply))

    def peers(self) -> list[dict]:
        return list(self.control("peers").get("peers", []))

    def peer(self, address: str) -> dict | None:
        want = ipaddress.IPv6Address(address)
        for p in self.peers():
            with contextlib.suppress(ValueError):
                if ipaddress.IPv6Address(p.get("address", "")) == want:
                    return p
        return None

    def path_to(self, address: str) -> str:
        p = self.peer(address)
        return p.get("path", "none") if p else "none"

    def wait_path(self, address: str, paths: Iterable[str] = ("lan", "direct"), timeout: float = 30.0) -> dict:
        """Wait until the peer is reachable over one of ``paths``; return its peer entry."""
        want = set(paths)
        last: dict | None = None

        def ok() -> bool:
            nonlocal last
            last = self.peer(address)
            return last is not None and last.get("path") in want

        if not wait_until(ok, timeout, interval=0.2, alive=self.proc):
            raise LabError(f"{self.host.name}: no {sorted(want)} path to {address} in {timeout}s (last: {last})")
        assert last is not None
        return last

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.proc.stop(timeout=timeout)

    def tail(self, n: int = 40) -> str:
        return self.proc.tail(n)


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1, alive: Proc | None = None) -> bool:
    """Poll ``pred`` until true or timeout; stop early (False) if ``alive`` died. Never sleeps past the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, LabError, ValueError):
            if pred():
                return True
        if alive is not None and not alive.alive:
            return False
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(interval, deadline - now))


# --------------------------------------------------------------------------------------------------
# The lab


class Lab:
    """Owner of namespaces and processes for one test; a context manager with guaranteed cleanup."""

    def __init__(self, tag: str = "", keep_files: bool | None = None):
        self.prefix = f"hr{os.getpid()}x{next(_lab_counter)}"
        if tag:
            self.prefix = f"{self.prefix}{re.sub(r'[^a-zA-Z0-9]', '', tag)[:8]}"
        self.namespaces: list[Netns] = []
        self.procs: list[Proc] = []
        self.sniffers: list[Sniffer] = []
        self.daemons: list[Daemon] = []
        self._closers: list[Callable[[], object]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.keep_files = os.environ.get("HR_LAB_KEEP") == "1" if keep_files is None else keep_files
        self.leaks: list[str] = []
        self._closed = False
        self._nft_tables: set[tuple[str, str]] = set()
        atexit.register(self.cleanup)

    # -- context manager
    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- namespaces
    def _new_ns(self, cls: type[Netns], name: str, **kw) -> Netns:
        if not re.fullmatch(r"[A-Za-z0-9_]{1,16}", name):
            raise LabError(f"bad namespace name {name!r}")
        if any(n.name == name for n in self.namespaces):
            raise LabError(f"{name} already exists in this lab")
        nsobj = cls(lab=self, name=name, ns=f"{self.prefix}-{name}", **kw)
        _run(["ip", "netns", "add", nsobj.ns])
        self.namespaces.append(nsobj)
        self.run(nsobj, ["ip", "link", "set", "lo", "up"])
        for key, val in (
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_ra", "0"),
        ):
            self.set_sysctl(nsobj, key, val)
        return nsobj

    def host(self, name: str) -> Host:
        """A fresh namespace with loopback up (and IPv6 DAD off so addresses are usable at once).

        Each host also gets its own ``/etc/machine-id`` (through iproute2's ``/etc/netns/<ns>/`` files,
        which ``ip netns exec`` bind-mounts over ``/etc``), as separate robots have: Fast DDS derives its
        host id from it and treats participants with equal ids as local, which breaks DDS between
        namespaces of one machine.
        """
        h = self._new_ns(Host, name)
        etc = ETC_NETNS / h.ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "machine-id").write_text(f"{int.from_bytes(os.urandom(16), 'big'):032x}\n")
        return h  # type: ignore[return-value]

    def bridge(self, name: str) -> Bridge:
        """A namespace with a bridge ``br0`` that links attach to (multicast snooping off: plain flooding)."""
        br = self._new_ns(Bridge, name)
        self.run(br, ["ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0", "stp_state", "0"])
        self.run(br, ["ip", "link", "set", "br0", "up"])
        return br  # type: ignore[return-value]

    def link(
        self,
        host: Netns,
        other: Netns,
        addr4: str | None = None,
        addr6: str | None = None,
        *,
        other_addr4: str | None = None,
        other_addr6: str | None = None,
        mtu: int | None = None,
        onlink: Sequence[str] = (),
    ) -> str:
        """Connect ``host`` to a bridge (or directly to another host) with a veth; return host's ifname.

        The veth is created inside ``host`` with its peer end inside ``other``; nothing appears in the
        root namespace, so nothing can leak there.

        ``onlink`` lists networks routed straight out of this link. With a host address (``/32``,
        ``/128``) this models the Internet: hosts reach each other on one switch, yet none shares a
        connected subnet with another, so a node classifies their paths as 'direct', not 'lan'.
        """
        for a in (addr4, addr6, other_addr4, other_addr6):
            if a is not None:
                check_test_address(a)
        ifname = host._next_ifname("eth")
        peer_if = other._next_ifname("p" if isinstance(other, Bridge) else "eth")
        argv = ["ip", "link", "add", ifname]
        if mtu:
            argv += ["mtu", str(mtu)]
        argv += ["type", "veth", "peer", "name", peer_if, "netns", other.ns]
        self.run(host, argv)
        if isinstance(other, Bridge):
            self.run(other, ["ip", "link", "set", peer_if, "master", other.bridge_if])
        self.run(other, ["ip", "link", "set", peer_if, "up"])
        self.run(host, ["ip", "link", "set", ifname, "up"])
        self._addr(host, ifname, addr4, addr6)
        self._addr(other, peer_if, other_addr4, other_addr6)
        for net in onlink:
            check_test_address(net)
            self.run(host, ["ip", "-6" if ":" in net else "-4", "route", "add", net, "dev", ifname])
        return ifname

    def _addr(self, ns: Netns, iface: str, addr4: str | None, addr6: str | None) -> None:
        if addr4:
            self.run(ns, ["ip", "-4", "addr", "add", addr4, "dev", iface])
            ns.addrs4[iface] = addr4
        if addr6:
            self.run(ns, ["ip", "-6", "addr", "add", addr6, "dev", iface, "nodad"])
            ns.addrs6[iface] = addr6

    def route(self, ns: Netns, dest: str, via: str) -> None:
        """Add a route (``dest`` may be ``default``)."""
        if dest != "default":
            check_test_address(dest)
        check_test_address(via)
        fam = "-6" if ":" in via else "-4"
        self.run(ns, ["ip", fam, "route", "add", dest, "via", via])

    def router(
        self,
        name: str,
        inside: Netns,
        outside: Netns,
        *,
        inside_addr4: str,
        outside_addr4: str,
        host_addr4: str | None = None,
        nat: bool = True,
        nat_random: bool = True,
        outside_onlink: Sequence[str] = (),
    ) -> Host:
        """A router namespace forwarding between ``inside`` and ``outside``, with nft ``masquerade random``.

        ``inside`` may be a bridge (several hosts behind the NAT) or a host (point-to-point link; then
        ``host_addr4`` is that host's address and its default route points at the router).
        """
        r = self.host(name)
        out_if = self.link(r, outside, outside_addr4, onlink=outside_onlink)
        if isinstance(inside, Bridge):
            self.link(r, inside, inside_addr4)
        else:
            self.link(r, inside, inside_addr4, other_addr4=host_addr4)
            if host_addr4:
                self.route(inside, "default", str(ipaddress.ip_interface(inside_addr4).ip))
        self.set_sysctl(r, "net.ipv4.ip_forward", "1")
        if nat:
            self.masquerade(r, out_if, random=nat_random)
        return r

    def masquerade(self, router: Netns, out_iface: str, *, random: bool = True) -> None:
        """Source-NAT everything leaving ``out_iface``.

        ``random=True`` (nft ``masquerade random``): every new flow gets a random external port, so the
        mapping depends on the destination (a *symmetric* NAT: hole punching cannot work, a relay must)
        and ``conntrack -F`` moves the port (NAT rebinding). ``random=False`` keeps the source port when
        it is free, so one socket keeps one external port for every destination (endpoint-independent
        mapping, as most home routers): hole punching works.

        Like a home router, the NAT drops unsolicited UDP addressed to itself from outside. This matters:
        such a packet would otherwise leave an unreplied conntrack entry (peer:port -> nat:port) that
        collides with the inside host's later outgoing flow to that peer, forcing a new external port
        and defeating hole punching. Dropped in the input hook, the entry is never confirmed.
        """
        flag = " random" if random else ""
        self.nft(
            router,
            f"""
table ip hrnat {{
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    oifname "{out_iface}" masquerade{flag}
  }}
  chain input {{ type filter hook input priority filter; policy accept;
    iifname "{out_iface}" meta l4proto udp ct state new drop
  }}
}}""",
        )

    # -- commands and processes
    def _ns(self, ns: Netns | str) -> str:
        return ns.ns if isinstance(ns, Netns) else ns

    def run(
        self,
        ns: Netns | str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command to completion inside a namespace; raise LabError on failure when ``check``."""
        return _run(
            ["ip", "netns", "exec", self._ns(ns), *argv], check=check, timeout=timeout, input=input, env=_child_env()
        )

    def spawn(
        self,
        ns: Netns,
        argv: Sequence[str],
        *,
        log: str | Path | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> Proc:
        """Start a tracked background process in its own process group inside ``ns``.

        Output goes to ``log`` (default: a file in the lab's temp dir) so a failing test can show it.
        """
        if log is None:
            stem = re.sub(r"[^A-Za-z0-9]", "_", Path(argv[0]).name)[:20]
            log = self.tmp / f"{ns.name}-{stem}-{len(self.procs)}.log"
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        full_env = _child_env()
        if env:
            full_env.update(env)
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", ns.ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=full_env,
                cwd=str(cwd or REPO_ROOT),
            )
        proc = Proc(popen, ns, argv, log)
        self.procs.append(proc)
        return proc

    def socket(self, ns: Netns, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket living in ``ns`` (created by switching only this thread into the namespace)."""
        with in_netns(ns.ns):
            return socket.socket(family, type, proto)

    def sniff(self, ns: Netns, iface: str) -> Sniffer:
        """Start capturing every frame on ``iface`` inside ``ns`` (see :class:`Sniffer`)."""
        s = Sniffer(self, ns, iface)
        self.sniffers.append(s)
        return s

    capture = sniff

    def set_sysctl(self, ns: Netns, key: str, value: str | int) -> None:
        """Set a sysctl inside a namespace (e.g. net.netfilter.nf_conntrack_udp_timeout=2)."""
        self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    # -- nftables impairments
    def nft(self, ns: Netns, script: str) -> None:
        self.run(ns, ["nft", "-f", "-"], input=script)

    def _filter_chain(self, ns: Netns) -> tuple[str, str]:
        """The lab's filter chain in ``ns``: bridge family on a switch, inet forward+input+output elsewhere."""
        fam = "bridge" if isinstance(ns, Bridge) else "inet"
        if (ns.ns, fam) not in self._nft_tables:
            if fam == "bridge":
                body = "chain impair { type filter hook forward priority 0; policy accept; }"
            else:
                body = (
                    "chain impair { type filter hook forward priority 0; policy accept; }\n"
                    "chain impair_in { type filter hook input priority 0; policy accept; jump impair_common; }\n"
                    "chain impair_out { type filter hook output priority 0; policy accept; jump impair_common; }\n"
                    "chain impair_common { }"
                )
            self.nft(ns, f"table {fam} hrlab {{\n{body}\n}}")
            self._nft_tables.add((ns.ns, fam))
        return fam, "impair"

    def add_rule(self, ns: Netns, rule: str, *, local: bool = False) -> Rule:
        """Add an nft rule to the lab's forward chain (``local``: to input/output of the host itself)."""
        fam, chain = self._filter_chain(ns)
        if local:
            if fam == "bridge":
                raise LabError("local rules make no sense on a bridge namespace")
            chain = "impair_common"
        res = self.run(ns, ["nft", "--echo", "--handle", "add", "rule", fam, "hrlab", chain, *rule.split()])
        m = re.search(r"# handle (\d+)", res.stdout)
        if not m:
            raise LabError(f"nft did not report a handle for {rule!r}: {res.stdout}")
        return Rule(ns, fam, chain, int(m.group(1)), rule)

    def delete_rule(self, rule: Rule) -> None:
        self.run(rule.ns, ["nft", "delete", "rule", rule.family, "hrlab", rule.chain, "handle", str(rule.handle)])

    def loss(self, ns: Netns, percent: int, *, match: str = "meta l4proto udp", local: bool = False) -> Rule:
        """Drop ``percent``% of matching packets crossing ``ns`` (nft ``numgen random mod 100``)."""
        if not 0 < percent <= 100:
            raise LabError("percent must be in 1..100")
        return self.add_rule(ns, f"{match} numgen random mod 100 < {percent} counter drop", local=local)

    def block_udp(
        self, ns: Netns, a: str | None = None, b: str | None = None, *, port: int | None = None, local: bool = False
    ) -> list[Rule]:
        """Drop UDP between addresses ``a`` and ``b`` in both directions (either may be None = any)."""
        rules = []
        directions = [(a, b, "dport"), (b, a, "sport")] if (a or b) else [(None, None, "dport"), (None, None, "sport")]
        if not (a or b) and port is None:
            directions = directions[:1]
        for src, dst, port_kw in directions:
            parts = []
            for kw, addr in (("saddr", src), ("daddr", dst)):
                if addr:
                    check_test_address(addr)
                    parts.append(f"{'ip6' if ':' in addr else 'ip'} {kw} {addr}")
            parts.append("meta l4proto udp")
            if port is not None:
                parts.append(f"udp {port_kw} {port}")
            rules.append(self.add_rule(ns, " ".join(parts) + " counter drop", local=local))
        return rules

    def unblock(self, rules: Rule | Iterable[Rule]) -> None:
        for r in [rules] if isinstance(rules, Rule) else list(rules):
            self.delete_rule(r)

    def rule_packets(self, rule: Rule) -> int:
        """How many packets a rule has matched (its nft counter)."""
        res = self.run(rule.ns, ["nft", "-a", "list", "chain", rule.family, "hrlab", rule.chain])
        for line in res.stdout.splitlines():
            if line.strip().endswith(f"# handle {rule.handle}"):
                m = re.search(r"counter packets (\d+)", line)
                return int(m.group(1)) if m else 0
        raise LabError(f"rule {rule.handle} not found")

    def conntrack_flush(self, ns: Netns) -> None:
        """Forget every NAT mapping in ``ns``: the next packet gets a new external port (NAT rebinding)."""
        res = self.run(ns, ["conntrack", "-F"], check=False)
        if res.returncode != 0 and "0 flow entries" not in (res.stderr + res.stdout):
            raise LabError(f"conntrack -F failed: {res.stderr.strip()}")

    # -- daemons
    def start_daemon(
        self,
        host: Host,
        state_dir: str | Path | None = None,
        *,
        timeout: float = 20.0,
        daemon_module: str = "husarnet_ros.daemon",
        env: dict[str, str] | None = None,
        **options: Any,
    ) -> Daemon:
        """Run ``python -m husarnet_ros.daemon`` in ``host`` and wait until its control socket answers.

        Keyword options become flags (``peer=[...]``, ``whitelist=[...]``, ``no_whitelist=True``,
        ``base=[...]``, ``no_lan_discovery=True``, ``timers_scale=0.1``, ``hostname=...``,
        ``websetup_whitelist=[...]``). ``daemon_module`` picks another entry point with the same flags;
        ``env`` adds to (or replaces, e.g. ``PYTHONPATH`` for another checkout) the daemon's environment.
        """
        state = Path(state_dir) if state_dir is not None else self.tmp / f"state-{host.name}"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        ctl = state / "control.sock"
        with contextlib.suppress(FileNotFoundError):
            ctl.unlink()
        options.setdefault("hostname", host.name)
        options.setdefault("log_level", "INFO")
        address = self.daemon_address(state)
        proc = self.spawn(
            host,
            daemon_argv(state, ctl, options, daemon_module),
            log=self.tmp / f"daemon-{host.name}-{len(self.procs)}.log",
            env=env,
        )
        d = Daemon(self, host, state, proc, ctl, address)
        ok = wait_until(lambda: control(ctl, "status", timeout=2).get("ok", False), timeout, 0.1, alive=proc)
        if not ok:
            tail = proc.tail()
            proc.stop()
            raise LabError(f"daemon in {host.name} did not answer on {ctl} within {timeout}s:\n{tail}")
        self.daemons.append(d)
        return d

    def daemon_address(self, state_dir: str | Path) -> str:
        """Create (or load) the identity in ``state_dir`` and return its fc94 address text."""
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        res = subprocess.run(
            [sys.executable, "-m", "husarnet_ros.daemon", "--state-dir", str(state), "--print-address"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_child_env(),
            cwd=str(REPO_ROOT),
        )
        if res.returncode != 0:
            raise LabError(f"--print-address failed: {res.stderr.strip()}")
        text = res.stdout.strip().split()[-1]
        ipaddress.IPv6Address(text)
        return text

    # -- inspection and cleanup
    def existing_namespaces(self) -> list[str]:
        res = _run(["ip", "netns", "list"], check=False)
        return [
            line.split()[0]
            for line in res.stdout.splitlines()
            if line.split() and line.split()[0].startswith(self.prefix + "-")
        ]

    def ns_pids(self, ns: Netns | str) -> list[int]:
        res = _run(["ip", "netns", "pids", self._ns(ns)], check=False)
        return [int(x) for x in res.stdout.split() if x.isdigit()]

    def on_cleanup(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` first thing in cleanup (threads and sockets that tools opened in our namespaces)."""
        self._closers.append(fn)

    def cleanup(self) -> list[str]:
        """Stop our processes (only ours), stop sniffers, delete our namespaces; idempotent.

        Returns (and keeps in ``self.leaks``) a description of anything that could not be removed or
        any process found in our namespaces that this lab did not start (left alone, reported).
        """
        if self._closed:
            return self.leaks
        self._closed = True
        # A second Ctrl-C must not abandon half of the cleanup: hold SIGINT off until it is done.
        masked = threading.current_thread() is threading.main_thread()
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if masked else None
        try:
            self._cleanup()
        finally:
            if masked:
                signal.signal(signal.SIGINT, old_int)
        return self.leaks

    def _cleanup(self) -> None:
        for fn in reversed(self._closers):
            with contextlib.suppress(Exception):
                fn()
        for s in self.sniffers:
            with contextlib.suppress(Exception):
                s.stop()
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
        our_groups = {p.pid for p in self.procs}
        for nsobj in self.namespaces:
            for pid in self.ns_pids(nsobj):
                try:
                    pgid = os.getpgid(pid)
                except ProcessLookupError:
                    continue
                if pgid in our_groups:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                else:
                    self.leaks.append(f"process {pid} in {nsobj.ns} was not started by this lab; left running")
        for nsobj in reversed(self.namespaces):
            res = _run(["ip", "netns", "del", nsobj.ns], check=False)
            if res.returncode != 0:
                self.leaks.append(f"namespace {nsobj.ns}: {res.stderr.strip()}")
        for nsobj in self.namespaces:
            shutil.rmtree(ETC_NETNS / nsobj.ns, ignore_errors=True)
            if (ETC_NETNS / nsobj.ns).exists():
                self.leaks.append(f"{ETC_NETNS / nsobj.ns} could not be removed")
        for ns in self.existing_namespaces():
            self.leaks.append(f"namespace {ns} still exists")
        if not self.keep_files:
            for _ in range(3):  # a process that just died may still have a file being closed
                shutil.rmtree(self.tmp, ignore_errors=True)
                if not self.tmp.exists():
                    break
                time.sleep(0.2)
            else:
                self.leaks.append(f"{self.tmp} could not be removed")
        with contextlib.suppress(Exception):
            atexit.unregister(self.cleanup)


@dataclass(frozen=True)
class Rule:
    """An nft rule the lab added (delete it with :meth:`Lab.delete_rule` / :meth:`Lab.unblock`)."""

    ns: Netns
    family: str
    chain: str
    handle: int
    text: str


def root_interfaces_with(prefix: str, kind: str | None = None) -> list[str]:
    """Interfaces in the root namespace whose name contains ``prefix`` (a leak check).

    ``kind`` limits the list to one link type (``veth``, ``bridge``, ``tun``): the kinds the lab makes.
    """
    res = _run(["ip", "-o", "link", "show", *(["type", kind] if kind else [])], check=False)
    names = [line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines() if ":" in line]
    return [n for n in names if prefix in n]


# --------------------------------------------------------------------------------------------------
# Reference topology of TESTPLAN.md


@dataclass
class Topology:
    """The TESTPLAN reference topology; attribute names follow the plan."""

    lab: Lab
    wan: Bridge
    lan: Bridge
    base: Host
    natA: Host  # noqa: N815 - the plan's names
    natB: Host  # noqa: N815
    peerA: Host  # noqa: N815
    peerB: Host  # noqa: N815
    peerC: Host  # noqa: N815
    peerD: Host  # noqa: N815
    mallory: Host

    BASE_IP = "198.18.0.1"
    NAT_A_IP = "198.18.0.2"
    NAT_B_IP = "198.18.0.3"
    MALLORY_WAN_IP = "198.18.0.66"
    PEER_A_IP = "198.18.1.2"
    PEER_B_IP = "198.18.2.2"
    PEER_C_IP = "198.18.3.2"
    PEER_D_IP = "198.18.3.3"
    MALLORY_LAN_IP = "198.18.3.66"


WAN_ONLINK = ("198.18.0.0/24", "fd00::/64")


def reference_topology(lab: Lab, *, symmetric_nat: bool = False) -> Topology:
    """Build the plan's topology.

    ::

        base 198.18.0.1 ---+                  +--- natA 198.18.0.2 === peerA 198.18.1.2 (behind NAT)
                           |--- wan bridge ---+--- natB 198.18.0.3 === peerB 198.18.2.2 (behind NAT)
        mallory .0.66 -----+
        mallory .3.66 -----+--- lan bridge ---+--- peerC 198.18.3.2 / fd00:3::2
                                              +--- peerD 198.18.3.3 / fd00:3::3   (no route to base)

    wan also carries fd00::/64 (base fd00::1, mallory fd00::66). natA/natB masquerade (random ports).
    WAN hosts hold /32 (/128) addresses with an on-link route, like hosts on the Internet: they share a
    switch but no connected subnet, so paths between them are 'direct', never 'lan'.
    mallory has rp_filter off so it can spoof sources.

    NATs keep source ports (endpoint-independent mapping, hole punching works) unless ``symmetric_nat``:
    then they use ``masquerade random`` (a new random port per flow and after ``conntrack -F``).
    """
    wan = lab.bridge("wan")
    lan = lab.bridge("lan")
    base = lab.host("base")
    lab.link(base, wan, f"{Topology.BASE_IP}/32", "fd00::1/128", onlink=WAN_ONLINK)
    peer_a = lab.host("peerA")
    peer_b = lab.host("peerB")
    nat_a = lab.router(
        "natA",
        peer_a,
        wan,
        inside_addr4="198.18.1.1/24",
        outside_addr4=f"{Topology.NAT_A_IP}/32",
        host_addr4=f"{Topology.PEER_A_IP}/24",
        nat_random=symmetric_nat,
        outside_onlink=WAN_ONLINK[:1],
    )
    nat_b = lab.router(
        "natB",
        peer_b,
        wan,
        inside_addr4="198.18.2.1/24",
        outside_addr4=f"{Topology.NAT_B_IP}/32",
        host_addr4=f"{Topology.PEER_B_IP}/24",
        nat_random=symmetric_nat,
        outside_onlink=WAN_ONLINK[:1],
    )
    peer_c = lab.host("peerC")
    peer_d = lab.host("peerD")
    lab.link(peer_c, lan, f"{Topology.PEER_C_IP}/24", "fd00:3::2/64")
    lab.link(peer_d, lan, f"{Topology.PEER_D_IP}/24", "fd00:3::3/64")
    mallory = lab.host("mallory")
    lab.link(mallory, wan, f"{Topology.MALLORY_WAN_IP}/32", "fd00::66/128", onlink=WAN_ONLINK)
    lab.link(mallory, lan, f"{Topology.MALLORY_LAN_IP}/24", "fd00:3::66/64")
    for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
        lab.set_sysctl(mallory, key, "0")
    return Topology(lab, wan, lan, base, nat_a, nat_b, peer_a, peer_b, peer_c, peer_d, mallory)
