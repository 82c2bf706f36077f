"""DDS configuration that confines ROS 2 traffic to the overlay.

DDS finds peers by multicast, which a TUN overlay does not carry, and by
default it talks on every interface.  So the node writes, into
``<state_dir>/dds/``, profiles that make every ROS 2 process that uses them

* speak UDP over IPv6 on the overlay address only (Fast DDS: a UDPv6 transport
  whose interface whitelist is our fc94 address, builtin transports off;
  Cyclone DDS: ``udp6`` on the overlay interface, multicast off), and
* send discovery unicast to ourselves and to every allowed peer, trying enough
  participant indices (32) for a robot running many ROS processes.

``dds.env`` points Fast DDS (both its current and its Humble-era variable
names) and Cyclone DDS at the files and sets
``ROS_AUTOMATIC_DISCOVERY_RANGE=SYSTEM_DEFAULT`` so the RMW applies the
profile instead of its own discovery defaults.  ``ROS_STATIC_PEERS`` is not
used: rmw_fastrtps cannot take IPv6 there.

Fast DDS derives its host id from ``/etc/machine-id`` and treats participants
with the same host id as local; with the interface whitelist such a "local"
peer is unreachable.  Real robots have distinct machine ids; containers or
namespaces that share one must be given their own (the overlay test does).

A DDS process reads its configuration once, at start.  Files are rewritten
(atomically) only when their content changes, and
:func:`stale_processes` finds processes that started before the last change
so the node can say that a restart is needed.

Everything here is plain Python (no rclpy), so it can be unit-tested and
reused by the CLI and the demo.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .core.constants import DEFAULT_INTERFACE, DEFAULT_MTU
from .core.fsutil import atomic_write, ensure_dir_open_to

FASTDDS_FILE = "fastdds.xml"
CYCLONEDDS_FILE = "cyclonedds.xml"
ENV_FILE = "dds.env"
DIR_MODE = 0o755  # with FILE_MODE: readable by every local user, the point of sourcing dds.env
FILE_MODE = 0o644

FASTDDS_NAMESPACE = "http://www.eprosima.com"
CYCLONEDDS_NAMESPACE = "https://cdds.io/config"
TRANSPORT_ID = "husarnet_udpv6"
PARTICIPANT_PROFILE = "husarnet_overlay"

# Participant indices probed per peer address (Fast DDS maxInitialPeersRange,
# Cyclone MaxAutoParticipantIndex).  Each ROS 2 process is one participant.
DEFAULT_PARTICIPANTS = 32
MIN_PARTICIPANTS = 32
MAX_PARTICIPANTS = 120  # RTPS port formula: 7400 + 250*domain + 10 + 2*index must stay in the domain's range
MIN_MTU = 1280  # IPv6 minimum link MTU
MAX_MTU = 65535
IPV6_UDP_HEADERS = 40 + 8
# Room for the RTPS header and a DATA_FRAG submessage header (Cyclone's FragmentSize is payload only).
RTPS_FRAGMENT_OVERHEAD = 96
MAX_PEERS = 4096  # bounds the file size: every peer is 32 discovery destinations

ENV_VARIABLES = (
    "FASTDDS_DEFAULT_PROFILES_FILE",
    "FASTRTPS_DEFAULT_PROFILES_FILE",
    "CYCLONEDDS_URI",
    "ROS_AUTOMATIC_DISCOVERY_RANGE",
)
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@dataclass(frozen=True)
class DdsFiles:
    """Where the generated files live inside ``<state_dir>/dds``."""

    directory: Path

    @property
    def fastdds(self) -> Path:
        return self.directory / FASTDDS_FILE

    @property
    def cyclonedds(self) -> Path:
        return self.directory / CYCLONEDDS_FILE

    @property
    def env(self) -> Path:
        return self.directory / ENV_FILE

    def all(self) -> tuple[Path, Path, Path]:
        return (self.fastdds, self.cyclonedds, self.env)


def canonical_addresses(own_address: str, peers: Iterable[str]) -> tuple[str, list[str]]:
    """Validate and canonicalise the addresses: own first, then sorted unique peers without own.

    Raises ValueError naming the bad entry.  Any IPv6 address is accepted so the
    profiles can also be generated for loopback tests; the node passes fc94 ones.
    """
    own = _ipv6(own_address)
    out: set[str] = set()
    for p in peers:
        a = _ipv6(p)
        if a != own:
            out.add(a)
        if len(out) > MAX_PEERS:
            raise ValueError(f"more than {MAX_PEERS} DDS peers")
    return own, sorted(out, key=lambda s: ipaddress.IPv6Address(s).packed)


def build_fastdds_xml(
    own_address: str,
    peers: Iterable[str],
    *,
    mtu: int = DEFAULT_MTU,
    max_participants: int = DEFAULT_PARTICIPANTS,
) -> bytes:
    """Fast DDS profile: UDPv6 on ``own_address`` only, unicast discovery to self and ``peers``.

    Uses ``interfaceWhiteList``/``address``, understood by Fast DDS 2.6 (Humble)
    through 3.x (Kilted); the newer ``interfaces/allowlist`` is not in Humble.
    ``maxMessageSize`` keeps each RTPS datagram inside one overlay packet, so a
    lost underlay packet costs one fragment, not a whole IP-fragmented sample.
    """
    own, peer_list = canonical_addresses(own_address, peers)
    _check_mtu(mtu)
    _check_participants(max_participants)

    dds = ET.Element("dds", {"xmlns": FASTDDS_NAMESPACE})
    profiles = ET.SubElement(dds, "profiles")
    descriptors = ET.SubElement(profiles, "transport_descriptors")
    td = ET.SubElement(descriptors, "transport_descriptor")
    _text(td, "transport_id", TRANSPORT_ID)
    _text(td, "type", "UDPv6")
    _text(td, "maxMessageSize", str(mtu - IPV6_UDP_HEADERS))
    _text(td, "maxInitialPeersRange", str(max_participants))
    whitelist = ET.SubElement(td, "interfaceWhiteList")
    _text(whitelist, "address", own)

    participant = ET.SubElement(
        profiles, "participant", {"profile_name": PARTICIPANT_PROFILE, "is_default_profile": "true"}
    )
    rtps = ET.SubElement(participant, "rtps")
    _locators(rtps, "defaultUnicastLocatorList", [own])
    builtin = ET.SubElement(rtps, "builtin")
    _locators(builtin, "metatrafficUnicastLocatorList", [own])
    _locators(builtin, "initialPeersList", [own, *peer_list])
    user = ET.SubElement(rtps, "userTransports")
    _text(user, "transport_id", TRANSPORT_ID)
    _text(rtps, "useBuiltinTransports", "false")
    return _serialize(dds, "Generated by husarnet_ros: DDS over the overlay only. Do not edit; rewritten on change.")


def build_cyclonedds_xml(
    own_address: str,
    peers: Iterable[str],
    *,
    interface: str = DEFAULT_INTERFACE,
    mtu: int = DEFAULT_MTU,
    max_participants: int = DEFAULT_PARTICIPANTS,
) -> bytes:
    """Cyclone DDS config: udp6 on ``interface``, no multicast, unicast discovery to self and ``peers``."""
    own, peer_list = canonical_addresses(own_address, peers)
    _check_interface(interface)
    _check_mtu(mtu)
    _check_participants(max_participants)
    max_message = mtu - IPV6_UDP_HEADERS
    fragment = max_message - RTPS_FRAGMENT_OVERHEAD

    root = ET.Element("CycloneDDS", {"xmlns": CYCLONEDDS_NAMESPACE})
    domain = ET.SubElement(root, "Domain", {"Id": "any"})
    general = ET.SubElement(domain, "General")
    interfaces = ET.SubElement(general, "Interfaces")
    ET.SubElement(interfaces, "NetworkInterface", {"name": interface})
    _text(general, "Transport", "udp6")
    _text(general, "AllowMulticast", "false")
    _text(general, "MaxMessageSize", f"{max_message}B")
    _text(general, "FragmentSize", f"{fragment}B")
    discovery = ET.SubElement(domain, "Discovery")
    _text(discovery, "ParticipantIndex", "auto")
    _text(discovery, "MaxAutoParticipantIndex", str(max_participants))
    peers_el = ET.SubElement(discovery, "Peers")
    for a in [own, *peer_list]:
        ET.SubElement(peers_el, "Peer", {"Address": a})
    return _serialize(root, "Generated by husarnet_ros: DDS over the overlay only. Do not edit; rewritten on change.")


def build_dds_env(files: DdsFiles) -> bytes:
    """Shell file to ``source`` before starting ROS 2 processes that should use the overlay."""
    values = {
        "FASTDDS_DEFAULT_PROFILES_FILE": str(files.fastdds),
        # Fast DDS 2.x (Humble) only reads the old name; 3.x reads both.
        "FASTRTPS_DEFAULT_PROFILES_FILE": str(files.fastdds),
        "CYCLONEDDS_URI": files.cyclonedds.resolve().as_uri(),
        # Let the RMW apply the profile as written (Jazzy and later).
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "SYSTEM_DEFAULT",
    }
    lines = [
        "# Generated by husarnet_ros. Source it before starting ROS 2 processes that must talk over the",
        "# overlay: . " + shlex.quote(str(files.env)),
        "# DDS reads this once per process: restart processes after the allowed peers change.",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    return ("\n".join(lines) + "\n").encode()


def parse_dds_env(text: str | bytes) -> dict[str, str]:
    """Read back ``KEY=value`` / ``export KEY=value`` lines (comments and blanks skipped).

    Strict: any other line is an error, so a hand-edited file that a shell would
    interpret differently is reported instead of half-understood.
    """
    if isinstance(text, bytes):
        text = text.decode()
    if len(text) > 1 << 16:
        raise ValueError("dds.env larger than 64 KiB")
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _ENV_LINE.match(line)
        if not m:
            raise ValueError(f"dds.env line {n}: not KEY=value: {raw!r}")
        parts = shlex.split(m.group(2))
        if len(parts) > 1:
            raise ValueError(f"dds.env line {n}: value of {m.group(1)} is not one word")
        out[m.group(1)] = parts[0] if parts else ""
    return out


def write_dds_config(
    directory: str | os.PathLike[str],
    own_address: str,
    peers: Iterable[str],
    *,
    interface: str = DEFAULT_INTERFACE,
    mtu: int = DEFAULT_MTU,
    max_participants: int = DEFAULT_PARTICIPANTS,
) -> bool:
    """Write the three files atomically where their content differs; True when any changed.

    Everything is built (and validated) before anything is written, so bad
    input leaves the previous files untouched.  Files are 0644 in a 0755
    directory: other users' ROS processes on the robot must be able to read
    them (the state directory above lets them through, see ``ensure_state_dir``).
    """
    files = DdsFiles(Path(directory))
    peer_list = list(peers)
    contents = {
        files.fastdds: build_fastdds_xml(own_address, peer_list, mtu=mtu, max_participants=max_participants),
        files.cyclonedds: build_cyclonedds_xml(
            own_address, peer_list, interface=interface, mtu=mtu, max_participants=max_participants
        ),
        files.env: build_dds_env(files),
    }
    ensure_dir_open_to(files.directory, DIR_MODE)  # a umask of 077 (common for root) would close it
    changed = False
    for path, data in contents.items():
        try:
            if path.read_bytes() == data:
                continue
        except FileNotFoundError:
            pass
        atomic_write(path, data, mode=FILE_MODE)
        changed = True
    return changed


def peers_in_fastdds_xml(data: bytes) -> list[str]:
    """The initial peer addresses of a profile written by :func:`build_fastdds_xml` (for status and tests)."""
    root = ET.fromstring(data)
    ns = {"f": FASTDDS_NAMESPACE}
    return [e.text or "" for e in root.iterfind(".//f:initialPeersList/f:locator/f:udpv6/f:address", ns)]


def stale_processes(profile: str | os.PathLike[str], *, proc: str = "/proc") -> list[int]:
    """Return the processes configured with ``profile`` that started before its last change.

    A process is "configured with" the profile when its environment names it in
    FASTDDS_DEFAULT_PROFILES_FILE, FASTRTPS_DEFAULT_PROFILES_FILE or
    CYCLONEDDS_URI.  Only processes whose environment we may read are seen
    (all of them as root, our own otherwise).  Start times come from
    /proc/<pid>/stat (clock ticks since boot) and /proc/stat's btime.
    """
    path = Path(profile)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return []
    names = {str(path).encode(), str(path.resolve()).encode()}
    cyclone_path = path.with_name(CYCLONEDDS_FILE)
    uris = {cyclone_path.resolve().as_uri().encode(), str(cyclone_path).encode()}
    btime = _boot_time(proc)
    if btime is None:
        return []
    ticks = os.sysconf("SC_CLK_TCK")
    out = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{proc}/{entry.name}/environ", "rb") as f:
                env = f.read(1 << 20)
            with open(f"{proc}/{entry.name}/stat", "rb") as f:
                stat = f.read(4096)
        except OSError:
            continue
        if not _env_uses(env, names, uris):
            continue
        started = _start_ticks(stat)
        if started is not None and btime + started / ticks < mtime:
            out.append(int(entry.name))
    return sorted(out)


# --- helpers -----------------------------------------------------------------


def _ipv6(text: str) -> str:
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError(f"not an IPv6 address: {text!r}")
    try:
        return str(ipaddress.IPv6Address(text.strip()))
    except ValueError:
        raise ValueError(f"not an IPv6 address: {text!r}") from None


def _check_mtu(mtu: int) -> None:
    if not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"mtu must be an integer in {MIN_MTU}..{MAX_MTU}, got {mtu!r}")


def _check_participants(n: int) -> None:
    if not isinstance(n, int) or not MIN_PARTICIPANTS <= n <= MAX_PARTICIPANTS:
        raise ValueError(f"participant range must be {MIN_PARTICIPANTS}..{MAX_PARTICIPANTS}, got {n!r}")


def _check_interface(name: str) -> None:
    if not isinstance(name, str) or not _IFNAME.match(name):
        raise ValueError(f"not a network interface name: {name!r}")


def _text(parent: ET.Element, tag: str, text: str) -> ET.Element:
    e = ET.SubElement(parent, tag)
    e.text = text
    return e


def _locators(parent: ET.Element, tag: str, addresses: list[str]) -> None:
    lst = ET.SubElement(parent, tag)
    for a in addresses:
        udpv6 = ET.SubElement(ET.SubElement(lst, "locator"), "udpv6")
        _text(udpv6, "address", a)


def _serialize(root: ET.Element, comment: str) -> bytes:
    ET.indent(root, space="  ")
    body = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<!-- {comment} -->\n{body}\n'.encode()


def _env_uses(env: bytes, names: set[bytes], uris: set[bytes]) -> bool:
    for item in env.split(b"\0"):
        key, _, value = item.partition(b"=")
        if key in (b"FASTDDS_DEFAULT_PROFILES_FILE", b"FASTRTPS_DEFAULT_PROFILES_FILE") and value in names:
            return True
        if key == b"CYCLONEDDS_URI" and value in uris:
            return True
    return False


def _boot_time(proc: str) -> float | None:
    try:
        with open(f"{proc}/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _start_ticks(stat: bytes) -> int | None:
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    end = stat.rfind(b")")
    if end < 0:
        return None
    fields = stat[end + 2 :].split()
    # After the name, fields start at 3 (state); starttime is field 22.
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None
