"""Shared pieces of the benchmarks: the two-namespace lab, iperf3/ping runners, CPU accounting, wireguard-go.

The lab is :class:`husarnet_ros.testing.netns.Lab` (names carry the PID, cleanup stops only the processes
it started and deletes its namespaces, also on Ctrl-C).  Addresses: 198.18.0.0/15 and fd00::/8 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "husarnet_ros"))

from husarnet_ros.testing.netns import Host, Lab, Proc  # noqa: E402

A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "fd00:1::1", "fd00:1::2"
WG_A, WG_B = "fd00:77::1", "fd00:77::2"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Pair:
    """Two hosts joined by one veth (the underlay)."""

    lab: Lab
    a: Host
    b: Host
    a_if: str
    b_if: str
    procs: dict[str, list[Proc]] = field(default_factory=dict)


def make_pair(lab: Lab, mtu: int = 1500, tag: str = "") -> Pair:
    """Hosts ``a<tag>`` and ``b<tag>`` on one veth; pairs of different tags share nothing but the CPUs."""
    a = lab.host(f"a{tag}")
    b = lab.host(f"b{tag}")
    a_if = lab.link(a, b, f"{A4}/24", f"{A6}/64", other_addr4=f"{B4}/24", other_addr6=f"{B6}/64", mtu=mtu)
    b_if = next(iter(b.addrs4))
    return Pair(lab, a, b, a_if, b_if)


def set_offloads(pair: Pair, on: bool) -> None:
    """Per-datagram loss needs per-datagram skbs: no GSO/TSO on transmit, no GRO on receive.

    A UDP GSO send (or a TSO burst, or a GRO aggregate) crosses a veth as one skb, and nft numgen then
    drops the whole batch at once, which is not what 1 % loss on a wire looks like.
    """
    state = "on" if on else "off"
    feats = ["tso", "gso", "gro", "tx-udp-segmentation"]
    for ns, dev in ((pair.a, pair.a_if), (pair.b, pair.b_if)):
        args = ["ethtool", "-K", dev]
        for f in feats:
            args += [f, state]
        pair.lab.run(ns, args, check=False)


def add_loss(pair: Pair, percent: float) -> None:
    """Drop ``percent`` % of IPv4 packets arriving in each namespace (input hook: after segmentation)."""
    per_mille = round(percent * 10)
    for ns in (pair.a, pair.b):
        pair.lab.nft(
            ns,
            "table inet hrbenchloss {\n"
            " chain in { type filter hook input priority -10; policy accept;\n"
            f"  meta nfproto ipv4 numgen random mod 1000 < {per_mille} counter drop\n"
            " }\n}\n",
        )


def remove_loss(pair: Pair) -> None:
    for ns in (pair.a, pair.b):
        pair.lab.run(ns, ["nft", "delete", "table", "inet", "hrbenchloss"], check=False)


def wait_port(lab: Lab, ns: Host, port: int, proto: str = "tcp", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    flag = "-ltn" if proto == "tcp" else "-lun"
    while time.monotonic() < deadline:
        out = lab.run(ns, ["ss", flag], check=False).stdout
        if re.search(rf"[:\]]{port}\s", out):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {proto} port {port} in {ns.name}")


def start_iperf_server(lab: Lab, ns: Host) -> Proc:
    p = lab.spawn(ns, ["iperf3", "-s", "-p", "5201"])
    wait_port(lab, ns, 5201)
    return p


def iperf(lab: Lab, ns: Host, dst: str, seconds: float, *, streams: int = 1, udp_len: int | None = None) -> dict:
    """Run an iperf3 client; return the parsed JSON (raises with iperf's own error text)."""
    argv = ["iperf3", "-c", dst, "-p", "5201", "-t", str(seconds), "-J", "-P", str(streams)]
    if udp_len is not None:
        argv += ["-u", "-b", "0", "-l", str(udp_len)]
    for attempt in range(3):
        res = lab.run(ns, argv, check=False, timeout=seconds + 40)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"iperf3 failed: {res.stderr.strip() or res.stdout[-300:]}") from None
        if "error" not in data:
            return data
        # The server needs a moment between tests (and a reset control connection is retried once more).
        retryable = "unable to connect" in data["error"] or "busy" in data["error"]
        if not retryable or attempt == 2:
            raise RuntimeError(f"iperf3: {data['error']}")
        time.sleep(1.0)
    raise AssertionError("unreachable")


def tcp_result(data: dict) -> tuple[float, int]:
    """(Gbit/s at the receiver, bytes received)."""
    s = data["end"]["sum_received"]
    return s["bits_per_second"] / 1e9, int(s["bytes"])


def udp_pps(data: dict) -> float:
    """Datagrams per second that arrived (iperf3 reports the receiver's count in end.sum)."""
    s = data["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / max(s["seconds"], 1e-9)


def ping(lab: Lab, ns: Host, dst: str, count: int, interval: float = 0.01) -> tuple[float, float, float]:
    """(avg ms, p99 ms, loss fraction) of ``count`` pings ``interval`` seconds (10 ms) apart."""
    res = lab.run(
        ns,
        ["ping", "-c", str(count), "-i", f"{interval:g}", "-W", "1", dst],
        check=False,
        timeout=count * (interval + 0.09) + 30,
    )
    return _round_trips(res.stdout, count)


#: The port ``bench/udp_echo.py serve`` answers on, on a tunnel's far address.
UDP_ECHO_PORT = 7777
UDP_ECHO = Path(__file__).resolve().parent / "udp_echo.py"


def start_udp_echo(lab: Lab, ns: Host, host: str) -> Proc:
    """A UDP echo server in ``ns`` on ``host`` (a tunnel's far address): the far end of :func:`udp_rtt`."""
    return lab.spawn(ns, [sys.executable, str(UDP_ECHO), "serve", host, str(UDP_ECHO_PORT)])


def udp_rtt(lab: Lab, ns: Host, dst: str, count: int, interval: float = 0.01) -> tuple[float, float, float]:
    """As :func:`ping`, for UDP requests a process answers (``bench/udp_echo.py``): ROS 2's kind of traffic."""
    res = lab.run(
        ns,
        [sys.executable, str(UDP_ECHO), "client", dst, str(UDP_ECHO_PORT), str(count), f"{interval:g}"],
        check=False,
        timeout=count * (interval + 1.0) + 30,
    )
    return _round_trips(res.stdout, count)


def _round_trips(stdout: str, count: int) -> tuple[float, float, float]:
    """(avg ms, p99 ms, loss fraction) from ``time=X ms`` lines (``ping``'s and ``udp_echo.py``'s)."""
    times = [float(x) for x in re.findall(r"time=([\d.]+) ms", stdout)]
    if not times:
        return float("nan"), float("nan"), 1.0
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return statistics.fmean(times), p99, 1 - len(times) / count


def wait_ping(lab: Lab, ns: Host, dst: str, timeout: float) -> float | None:
    """Seconds until ``dst`` answers a ping, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if lab.run(ns, ["ping", "-c", "1", "-W", "1", dst], check=False).returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of whole processes (all threads), in seconds."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            raw = Path(f"/proc/{pid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def descendants(pid: int) -> list[int]:
    """pid and every process below it (``ip netns exec`` execs, but wrappers may fork)."""
    out = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += descendants(int(child))
    return out


# --- wireguard-go ------------------------------------------------------------------


def have_wireguard_go() -> str | None:
    """None when usable, else why not."""
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install wireguard-go wireguard-tools)"
    return None


def start_wireguard_go(pair: Pair, mtu: int = 1420) -> list[Proc]:
    """A wireguard-go device per namespace (in the foreground), fd00:77::1 <-> fd00:77::2 over the veth."""
    lab = pair.lab
    keys = {}
    for side in ("a", "b"):
        priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
        pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True).stdout.strip()
        keyfile = lab.tmp / f"wg-{side}.key"
        keyfile.write_text(priv + "\n")
        keyfile.chmod(0o600)
        keys[side] = (keyfile, pub)
    # The UAPI socket /var/run/wireguard/<ifname>.sock is shared by all namespaces: unique names per side.
    names = {"a": f"wg{os.getpid()}a", "b": f"wg{os.getpid()}b"}
    procs = []
    for ns, side in ((pair.a, "a"), (pair.b, "b")):
        procs.append(lab.spawn(ns, ["wireguard-go", "-f", names[side]], env={"WG_PROCESS_FOREGROUND": "1"}))
    for ns, side, other, addr, other_ip in ((pair.a, "a", "b", WG_A, B4), (pair.b, "b", "a", WG_B, A4)):
        dev = names[side]
        deadline = time.monotonic() + 10
        while lab.run(ns, ["ip", "link", "show", dev], check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("wireguard-go did not create wg0:\n" + procs[0].tail())
            time.sleep(0.05)
        peer_ip = other_ip
        lab.run(
            ns,
            [
                "wg", "set", dev, "private-key", str(keys[side][0]), "listen-port", "51820",
                "peer", keys[other][1], "allowed-ips", "fd00:77::/64", "endpoint", f"{peer_ip}:51820",
            ],
        )  # fmt: skip
        lab.run(ns, ["ip", "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad"])
        lab.run(ns, ["ip", "link", "set", dev, "mtu", str(mtu), "up"])
    return procs


def stop_procs(procs: list[Proc]) -> None:
    for p in procs:
        p.stop()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
    with contextlib.suppress(OSError):
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        info["wireguard_go"] = subprocess.run(
            ["wireguard-go", "--version"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    info["hostname"] = socket.gethostname()
    return info
