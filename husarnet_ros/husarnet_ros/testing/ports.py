"""Test UDP ports that no port-0 bind can take between choosing them and binding them."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def _dds_well_known(port: int) -> bool:
    """Whether RTPS could use ``port`` for some domain (port base 7400, domain gain 250)."""
    return port >= 7400 and (port - 7400) % 250 < 100


def free_udp_ports(count: int) -> list[int]:
    """``count`` distinct UDP ports that are free now and outside the kernel's ephemeral range.

    A port the kernel handed out as ephemeral and we then released can be handed out again to
    any socket bound to port 0 (node a's sockets, DDS, another test) before node b binds it; CI
    saw exactly that ("UDP port ... is in use").  The kernel never picks ports below the ephemeral
    range for port-0 binds, so a port chosen there stays ours unless someone names it explicitly.
    DDS does name ports (7400 + 250 * domain + a few dozen per participant), so those are skipped too.
    """
    low, _high = _ephemeral_range()
    candidates = [p for p in range(max(1024, low - 12000), low) if not _dds_well_known(p)]
    random.shuffle(candidates)
    held: list[socket.socket] = []
    try:
        for port in candidates:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                s.bind(("::", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == count:
                return [h.getsockname()[1] for h in held]
        raise RuntimeError(f"no {count} free UDP ports below the ephemeral range {low}")
    finally:
        for s in held:
            s.close()
