"""The overlay's TUN device: open or attach, configure with pyroute2, read and write packets.

Why this shape:

* Root (or CAP_NET_ADMIN) creates the device, sets MTU, adds the fc94 address
  (``nodad``: the address is derived from our key, so duplicate address
  detection only delays traffic) and brings it up.  The device is not
  persistent, so it disappears with its file descriptor, even after a crash.
* A normal user cannot create devices.  ``setup_persistent_tun`` (run once,
  privileged, by ``husarnet-ros setup-tun``) creates a persistent device owned
  by that user with its address and route; ``TunDevice.open`` then only
  attaches and checks that the address and route are there.
* ``IFF_VNET_HDR`` plus ``TUNSETOFFLOAD`` lets the kernel hand us TCP (and UDP)
  super-packets of up to 64 kB with a virtio-net header, and accept them back;
  :mod:`husarnet_ros.core.offload` splits and coalesces them.  This is what
  makes a Python data plane fast enough (one syscall per 64 kB instead of per
  1.4 kB).
* The fd is non-blocking; :meth:`TunDevice.read` waits in ``poll`` together
  with a wake-up pipe, so :meth:`TunDevice.close` from another thread ends a
  blocked reader at once (closing an fd does not wake a thread blocked on it).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Collection

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .offload import PLAIN_VNET_HDR
from .waiter import FdWaiter

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"

# ioctl numbers from <linux/if_tun.h> (_IOW('T', n, int) on every Linux ABI we run on).
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SIOCGIFFLAGS = 0x8913  # struct ifreq: name, then the interface flags
IFF_UP = 0x1

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

VNET_HDR_LEN = 10  # struct virtio_net_hdr, without num_buffers
IFA_F_NODAD = 0x02
IFNAMSIZ = 16
CAP_NET_ADMIN = 12

SETUP_COMMAND = "sudo husarnet-ros setup-tun --user $USER"
SETUP_HINT = f"run as root, or once: {SETUP_COMMAND}"
#: Distributions ship /dev/net/tun as 0666; some hardened images and containers ship it 0600.
TUN_MODE_HINT = (
    f"make {TUN_PATH} read-write for everyone as most distributions ship it (sudo chmod 0666 {TUN_PATH}; "
    'across reboots, a udev rule: KERNEL=="tun", MODE="0666")'
)

# Offload sets tried in order; older kernels reject USO (added in Linux 6.2) with EINVAL.
_OFFLOAD_CHOICES = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM,
)


class TunError(Exception):
    """The TUN device cannot be opened or configured; the message says what to do."""


def _has_net_admin() -> bool:
    """True when this process may configure links (root, or CAP_NET_ADMIN in its namespace)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def _check_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise TunError(f"invalid interface name {name!r} (1-15 characters, no '/' or spaces)")
    return raw


def _address_text(address: bytes) -> str:
    if len(address) != 16:
        raise TunError(f"address must be 16 bytes, got {len(address)}")
    return str(ipaddress.IPv6Address(address))


def _open_tun_fd(name: str, flags: int) -> int:
    """open(/dev/net/tun) + TUNSETIFF; translate errno into what the user should do."""
    raw = _check_name(name)
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError(f"{TUN_PATH} does not exist: load the tun module (sudo modprobe tun)") from None
    except PermissionError:
        problem = tun_node_access(os.geteuid(), {os.getegid(), *os.getgroups()})
        if problem is None:  # the mode allows it: an LSM or a device cgroup said no
            raise TunError(f"cannot open {TUN_PATH}: permission denied; {SETUP_HINT}") from None
        raise TunError(
            f"cannot open {TUN_PATH}: permission denied ({problem}); run as root, or {TUN_MODE_HINT} "
            f"and once: {SETUP_COMMAND}"
        ) from None
    except OSError as e:
        raise TunError(f"cannot open {TUN_PATH}: {e.strerror}; try: sudo modprobe tun") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", raw, flags))
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise TunError(
                f"not allowed to create or attach TUN device {name!r} (no persistent device owned by this user); "
                f"{SETUP_HINT}"
            ) from None
        if e.errno == errno.EBUSY:
            raise TunError(
                f"TUN device {name!r} is busy: another process has it open (another husarnet_ros instance?); "
                "stop it or choose another interface name"
            ) from None
        if e.errno == errno.EINVAL:
            raise TunError(
                f"cannot use {name!r} as a TUN device: an interface with that name exists and is not a "
                "compatible TUN device; choose another name or remove it"
            ) from None
        raise TunError(f"TUNSETIFF {name!r} failed: {e.strerror}") from None
    return fd


def tun_node_access(uid: int, gids: Collection[int], path: str = TUN_PATH) -> str | None:
    """Why ``uid`` (with groups ``gids``) may not open ``path`` read-write by its mode; None if it may.

    A persistent device from setup-tun is only half of what a normal user needs: the node still opens
    the clone device to attach, so a 0600 node makes setup-tun useless, and the user should hear that
    from setup-tun rather than from a node that fails later.  ACLs are not consulted.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if uid == 0:
        return None
    if st.st_uid == uid:
        bits = 0o600
    elif st.st_gid in gids:
        bits = 0o060
    else:
        bits = 0o006
    if st.st_mode & bits == bits:
        return None
    return f"{path} is mode {st.st_mode & 0o777:04o}, owner uid {st.st_uid}, group gid {st.st_gid}"


def _set_offload(fd: int) -> int:
    """Enable the largest offload set the kernel accepts; 0 if none (still correct, just slower)."""
    for choice in _OFFLOAD_CHOICES:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, choice)
            return choice
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return 0


def _link_index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise TunError(f"interface {name!r} vanished while configuring it")
    return int(found[0])


def _configure(name: str, address: bytes | None, mtu: int, prefixlen: int, gso_max_size: int | None = None) -> int:
    """MTU, TSO size limit, address (nodad) and up; the kernel adds the prefix route with the address."""
    try:
        with IPRoute() as ipr:
            idx = _link_index(ipr, name)
            ipr.link("set", index=idx, mtu=mtu)
            if gso_max_size is not None:
                try:
                    ipr.link("set", index=idx, gso_max_size=gso_max_size)
                except NetlinkError as e:  # an older kernel: 64 kB super-packets still work, in two sends
                    log.info("could not set gso_max_size %d on %s: %s", gso_max_size, name, os.strerror(e.code))
            if address is not None:
                try:
                    ipr.addr("add", index=idx, address=_address_text(address), prefixlen=prefixlen, flags=IFA_F_NODAD)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
            ipr.link("set", index=idx, state="up")
            return idx
    except NetlinkError as e:
        if e.code == errno.EPERM:
            raise TunError(f"not allowed to configure {name!r}; {SETUP_HINT}") from None
        raise TunError(f"configuring {name!r} failed: {os.strerror(e.code)}") from None


def _inspect(name: str) -> tuple[int, int, bool, set[tuple[str, int]], set[tuple[str, int]]]:
    """Read-only view (works unprivileged): index, mtu, up, addresses, IPv6 routes on the device."""
    with IPRoute() as ipr:
        idx = _link_index(ipr, name)
        link = ipr.get_links(idx)[0]
        mtu = int(link.get("IFLA_MTU"))
        up = bool(link["flags"] & 1)
        addrs = {(a.get("IFA_ADDRESS"), int(a["prefixlen"])) for a in ipr.get_addr(index=idx, family=10)}
        routes = {(r.get("RTA_DST"), int(r["dst_len"])) for r in ipr.get_routes(family=10, oif=idx)}
        return idx, mtu, up, addrs, routes


def _verify_attached(name: str, address: bytes | None, mtu: int, prefixlen: int) -> tuple[int, int]:
    """Unprivileged attach: the one-time setup must have left the address and route in place."""
    idx, actual_mtu, up, addrs, routes = _inspect(name)
    fix = f"run once: {SETUP_COMMAND} --interface {name}"
    if address is not None:
        text = _address_text(address)
        if (text, prefixlen) not in addrs:
            raise TunError(f"{name!r} has no address {text}/{prefixlen} and this process may not add it; {fix}")
        net = ipaddress.IPv6Network(f"{text}/{prefixlen}", strict=False)
        if (str(net.network_address), prefixlen) not in routes:
            raise TunError(f"{name!r} has no route to {net} and this process may not add it; {fix}")
    if not up:
        raise TunError(f"{name!r} is down and this process may not bring it up; {fix}")
    if actual_mtu != mtu:
        log.warning("%s has MTU %d, not the configured %d; using %d", name, actual_mtu, mtu, actual_mtu)
    return idx, actual_mtu


class TunDevice:
    """One open TUN device (IPv6 packets, no packet-info header, optional virtio-net header)."""

    name: str
    fd: int
    vnet_hdr: bool
    mtu: int
    ifindex: int
    offload_flags: int  # TUN_F_* accepted by the kernel (0 without vnet_hdr)
    #: Packets the kernel refused for a reason other than a full queue (EIO: the link is down).  Written by
    #: the threads that deliver, read by the engine's interface check: a count, not an exact total.
    write_errors: int

    def __init__(
        self,
        name: str,
        fd: int,
        vnet_hdr: bool,
        mtu: int,
        ifindex: int,
        offload_flags: int,
        address: bytes | None = None,
        prefixlen: int = 16,
    ) -> None:
        self.name = name
        self.address = address
        self.prefixlen = prefixlen
        self.write_errors = 0
        self.fd = fd
        self.vnet_hdr = vnet_hdr
        self.mtu = mtu
        self.ifindex = ifindex
        self.offload_flags = offload_flags
        self._waiter = FdWaiter(fd)
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        name: str,
        address: bytes | None,
        mtu: int,
        *,
        vnet_hdr: bool = False,
        prefixlen: int = 16,
        gso_max_size: int | None = None,
    ) -> TunDevice:
        """Create (root) or attach to (owner of a persistent device) ``name`` and make it usable.

        With ``vnet_hdr`` every read starts with a 10-byte virtio-net header and may be a TSO/USO
        super-packet (at most ``gso_max_size`` bytes when given and we may configure the device);
        every write must start with such a header.
        """
        if not 1280 <= mtu <= 65535:
            raise TunError(f"MTU {mtu} out of range (IPv6 needs at least 1280)")
        if not 0 < prefixlen <= 128:
            raise TunError(f"prefix length {prefixlen} out of range")
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        fd = _open_tun_fd(name, flags)
        try:
            offload = 0
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                offload = _set_offload(fd)
            if _has_net_admin():
                idx = _configure(name, address, mtu, prefixlen, gso_max_size if vnet_hdr else None)
                actual_mtu = mtu
            else:
                idx, actual_mtu = _verify_attached(name, address, mtu, prefixlen)
            os.set_blocking(fd, False)
        except BaseException:
            os.close(fd)
            raise
        log.info("TUN %s open (mtu %d, vnet_hdr %s, offload 0x%x)", name, actual_mtu, vnet_hdr, offload)
        return cls(name, fd, vnet_hdr, actual_mtu, idx, offload, address, prefixlen)

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (a read error after that is the normal end of the reader)."""
        return self._closed

    def _read_error(self, e: OSError) -> TunError:
        if e.errno == errno.EBADFD:  # the kernel detached the queue: the interface was deleted under us
            return TunError(
                f"TUN device {self.name!r} is gone: it was deleted while husarnet_ros was using it; "
                "restart husarnet_ros (or deactivate and activate the node) to create it again"
            )
        return TunError(f"reading {self.name!r} failed: {e.strerror}")

    def read(self, bufsize: int = 65536 + VNET_HDR_LEN, timeout: float | None = None) -> bytes:
        """One packet (with its virtio-net header when ``vnet_hdr``); b"" on timeout.

        Raises :class:`TunError` once the device is closed (also when closed by another thread
        while this one waits).  The data path reads with :meth:`read_ready` and :meth:`wait_readable`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = self.read_ready(1, bufsize)
            if out:
                return out[0]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return b""
            self.wait_readable(left)

    def read_ready(self, max_packets: int = 64, bufsize: int = 65536 + VNET_HDR_LEN) -> list[bytes]:
        """The packets queued now, at most ``max_packets``, without waiting ([] when there are none).

        Raises :class:`TunError` once the device is closed.
        """
        if self._closed:
            raise TunError(f"TUN device {self.name!r} is closed")
        out: list[bytes] = []
        read = os.read
        fd = self.fd
        while len(out) < max_packets:
            try:
                out.append(read(fd, bufsize))
            except BlockingIOError:
                break
            except OSError as e:
                if self._closed:
                    raise TunError(f"TUN device {self.name!r} is closed") from None
                if out:
                    break
                raise self._read_error(e) from None
        return out

    def read_one(self, bufsize: int = 65536 + VNET_HDR_LEN) -> bytes | None:
        """The next queued packet, or None when there is none (no waiting): one ``read``, nothing around it.

        The data path's read after a wake-up, when one packet is what it expects (issue #6).  Raises
        :class:`TunError` once the device is closed.
        """
        if self._closed:
            raise TunError(f"TUN device {self.name!r} is closed")
        try:
            return os.read(self.fd, bufsize)
        except BlockingIOError:
            return None
        except OSError as e:
            if self._closed:
                raise TunError(f"TUN device {self.name!r} is closed") from None
            raise self._read_error(e) from None

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Sleep until a packet is queued (True) or ``timeout`` passes (False).

        Raises :class:`TunError` once the device is closed, also when closed by another thread
        during the wait.
        """
        ready = self._waiter.wait(timeout)
        if self._closed:
            raise TunError(f"TUN device {self.name!r} is closed")
        return ready

    def write(self, packet: bytes | bytearray | memoryview) -> None:
        """Hand one packet (with its virtio-net header when ``vnet_hdr``) to the kernel.

        Raises ``OSError`` (e.g. EINVAL) when the kernel rejects a malformed packet, and
        :class:`TunError` after close.
        """
        if self._closed:
            raise TunError(f"TUN device {self.name!r} is closed")
        # A full device queue (EAGAIN) drops the packet, as a router would; TCP above recovers.  A plain
        # try, not contextlib.suppress: this is the per-packet receive path, and every object counts.
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            pass
        except OSError:
            self.write_errors += 1
            raise

    def write_packet(self, packet: bytes) -> None:
        """Hand one plain IPv6 packet to the kernel (a zero virtio-net header first when ``vnet_hdr``).

        The data path's lone-packet path; a packet the kernel refuses, or a full queue, is a drop.
        """
        if self._closed:
            return
        try:
            os.write(self.fd, PLAIN_VNET_HDR + packet if self.vnet_hdr else packet)
        except BlockingIOError:
            pass
        except OSError as e:
            self.write_errors += 1
            log.debug("TUN write failed: %s", e)

    def link_state(self) -> tuple[bool, bool]:
        """(the link is up, our address is on it): what the engine's interface check needs.

        Someone may set the device down (an operator, a network manager); IPv6 then removes our
        address and its route, and setting it up again does not bring them back.  Raises
        :class:`TunError` when the device is gone.
        """
        # An ioctl and one small /proc file, not netlink dumps: this runs every second for the node's lifetime.
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                raw = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sH", self.name.encode(), 0))
            up = bool(struct.unpack_from("16sH", raw)[1] & IFF_UP)
            if self.address is None:
                return up, True
            with open("/proc/net/if_inet6") as f:
                table = f.read()
        except OSError as e:
            raise TunError(f"cannot read the state of {self.name!r}: {e.strerror or e}") from None
        # Lines: address (32 hex digits), ifindex, prefix length (hex), scope, flags, interface name.
        want = (self.address.hex(), f"{self.prefixlen:02x}", self.name)
        rows = (line.split() for line in table.splitlines())
        has_address = any(len(f) == 6 and (f[0], f[2], f[5]) == want for f in rows)
        return up, has_address

    def restore_address(self) -> None:
        """Put our address back on the device (the kernel adds the prefix route with it); needs CAP_NET_ADMIN."""
        if self.address is None:
            return
        try:
            with IPRoute() as ipr:
                idx = _link_index(ipr, self.name)
                ipr.addr(
                    "add", index=idx, address=_address_text(self.address), prefixlen=self.prefixlen, flags=IFA_F_NODAD
                )
        except NetlinkError as e:
            if e.code == errno.EPERM:  # an unprivileged node on a persistent device (setup-tun)
                raise TunError(f"not allowed to put the address of {self.name!r} back; {SETUP_HINT}") from None
            if e.code != errno.EEXIST:
                raise TunError(f"cannot put the address of {self.name!r} back: {os.strerror(e.code)}") from None

    def close(self) -> None:
        """Release the fd (a non-persistent device disappears); safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._waiter.wake()
            os.close(self.fd)
            # Readers blocked in poll() wake on the pipe, see _closed and return.
            self._waiter.close()

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def setup_persistent_tun(
    name: str, owner_uid: int, address: bytes, mtu: int, prefixlen: int = 16, gso_max_size: int | None = None
) -> None:
    """Privileged one-time setup: a persistent device ``owner_uid`` may attach to, with address, route, up."""
    if not _has_net_admin():
        raise TunError("setting up a persistent TUN device needs root (sudo husarnet-ros setup-tun ...)")
    fd = _open_tun_fd(name, IFF_TUN | IFF_NO_PI)
    try:
        fcntl.ioctl(fd, TUNSETOWNER, owner_uid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as e:
        raise TunError(f"making {name!r} persistent failed: {e.strerror}") from None
    finally:
        os.close(fd)
    _configure(name, address, mtu, prefixlen, gso_max_size)


def remove_tun(name: str) -> None:
    """Delete ``name`` (persistent or not); no error if it does not exist."""
    _check_name(name)
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return
        if e.code == errno.EPERM:
            raise TunError(f"not allowed to remove {name!r}: needs root") from None
        raise TunError(f"removing {name!r} failed: {os.strerror(e.code)}") from None
