"""Ping latency, A/B: configurations run side by side and take turns being pinged (issue #6).

On a shared virtual machine one series of pings moves by 30 % with the load of the moment, so two
runs made minutes apart compare badly, and even runs a few seconds apart differ by 10 %.  Here every
configuration runs at once, each on its own veth pair (the idle ones cost nothing: no traffic, a few
timer wake-ups a second), and the pings go to one configuration after the other in short blocks,
round after round, every other round in reverse order.  The script prints each round's average round
trip, and per configuration the median over rounds, in how many rounds it beat the first
configuration, and the median of its per-round ratio to the first with a 95 % interval
(:func:`median_interval`): the interval, not the median alone, says whether two configurations differ.

Configurations:
  wg                        wireguard-go (Debian's), as in ``make bench``
  ours                      this checkout's daemon
  ours:VAR=VAL[,VAR=VAL]    the same with environment variables, e.g. ``ours:HUSARNET_ROS_SUPER=0``, or
                            daemon flags, e.g. ``ours:--warm-interval=0`` (the path warmer off)
  tree:PATH                 the daemon of another checkout (its repository root), e.g. a ``git worktree``
                            of an older commit
  node                      this checkout's lifecycle node (``python -m husarnet_ros.node``, autostart): the
                            engine beside rclpy's executor threads in one process, as ``ros2 launch`` runs it
  node:PATH                 the lifecycle node of another checkout

After each configuration's block of pings the script waits ``--settle`` seconds (default 1.2): a
daemon's path warmer goes on warming for a second after its last packet (``core/warmer.py``), and
without the pause it would warm the code the next configuration's hops share with it (the kernel's
UDP and IP paths, and for another tree of ours the Python and OpenSSL libraries) during that one's pings.

``--interval S`` spaces the pings (default 0.01 s, as in ``make bench``): how long the CPUs idle between
packets decides how cold each hop starts, so e.g. 0.001 (1 kHz, a fast control loop) and 0.1 (10 Hz)
show how the comparison moves with the traffic rate.

``--probe udp`` measures UDP requests that a process answers (``bench/udp_echo.py``) instead of pings.
The kernel answers an ICMPv6 echo inside the tunnel's write to its TUN; a UDP request (a ROS 2 service
call, DDS) wakes a process whose answer comes after the write returned, through the tunnel's TUN
reader.  Both ends of the probe are Python: their cost is in every number, alike for each tunnel.

Needs root.  Usage: ``bench/latency_ab.py [--rounds N] [--count N] [--interval S] [--settle S]
[--probe ping|udp] CONFIG ...``, e.g.
``bench/latency_ab.py wg ours tree:/tmp/old``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c


def daemon_env(config: str) -> dict[str, str] | None:
    """The environment a configuration's daemons (or nodes) get on top of the usual one (None: unchanged)."""
    kind, _, arg = config.partition(":")
    if kind == "ours":
        env = {name: value for name, value in _ours_items(config) if not name.startswith("--")}
        return env or None
    if kind == "tree" or (kind == "node" and arg):
        package = Path(arg).resolve() / "husarnet_ros"
        if not (package / "husarnet_ros" / "daemon.py").is_file():
            raise SystemExit(f"{config!r}: {package} holds no husarnet_ros package")
        pp = os.environ.get("PYTHONPATH", "")
        return {"PYTHONPATH": str(package) + (os.pathsep + pp if pp else "")}
    if kind == "node":
        return None
    raise SystemExit(f"unknown configuration {config!r} (wg, ours, ours:VAR=VAL, tree:PATH, node, node:PATH)")


def node_argv(state: Path, peer: str, peer_ip: str) -> list[str]:
    """The lifecycle node's command line: autostart, the benchmark's port and interface, one static peer."""
    params = {
        "autostart": "true",
        "state_dir": str(state),
        "interface_name": "hnet0",
        "udp_port": "5582",
        "lan_discovery": "false",
        "hosts_file": "''",
        "peers": f"['{peer}@{peer_ip}:5582']",
        "whitelist": f"['{peer}']",
    }
    argv = [sys.executable, "-m", "husarnet_ros.node", "--ros-args"]
    for name, value in params.items():
        argv += ["-p", f"{name}:={value}"]
    return argv


def _ours_items(config: str) -> list[tuple[str, str]]:
    """The ``NAME=VALUE`` items of an ``ours:...`` configuration (environment variables and ``--flags``)."""
    arg = config.partition(":")[2]
    if not arg:
        return []
    pairs = [item.partition("=") for item in arg.split(",")]
    if any(not name or not sep for name, sep, _ in pairs):
        raise SystemExit(f"{config!r}: expected ours:NAME=VAL[,NAME=VAL] (NAME a variable or a --flag)")
    return [(name, value) for name, _, value in pairs]


def daemon_options(config: str) -> dict[str, str]:
    """A configuration's daemon flags as :meth:`Lab.start_daemon` options (``--warm-interval`` -> warm_interval)."""
    if not config.startswith("ours"):
        return {}
    return {name[2:].replace("-", "_"): value for name, value in _ours_items(config) if name.startswith("--")}


#: Seconds between two blocks of pings: a path warmer stops a second after the last packet it saw
#: (PathWarmer's idle_after) and notices within its idle check (0.1 s).  Pings more than a second apart
#: are the exception: it still warms for the ping that would have come next (about 5-30 warm-ups, at
#: most 50 ms past when it was due), which falls into the next configuration's block, far from its pings.
SETTLE = 1.2


class Running:
    """One configuration started on its own pair: what to ping, and how to stop it."""

    def __init__(self, lab: c.Lab, pair: c.Pair, config: str, domain_id: int = 0, probe: str = "ping") -> None:
        self.pair = pair
        self.config = config
        self.probe = probe
        if config == "wg":
            self.procs = c.start_wireguard_go(pair)
            self.daemons = []
            self.target = c.WG_B
        elif config.partition(":")[0] == "node":
            # Each pair's nodes talk DDS only on their namespaces' loopback; the domain keeps pairs apart anyway.
            env = {**(daemon_env(config) or {}), "ROS_DOMAIN_ID": str(domain_id), "PYTHONUNBUFFERED": "1"}
            env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
            sa, sb = lab.tmp / f"node-{pair.a.name}", lab.tmp / f"node-{pair.b.name}"
            addr_a, addr_b = lab.daemon_address(sa), lab.daemon_address(sb)
            self.daemons = []
            self.procs = [
                lab.spawn(host, node_argv(state, peer, peer_ip), log=lab.tmp / f"node-{host.name}.log", env=env)
                for host, state, peer, peer_ip in ((pair.a, sa, addr_b, c.B4), (pair.b, sb, addr_a, c.A4))
            ]
            self.target = addr_b
        else:
            self.procs = []
            env = daemon_env(config)
            sa, sb = lab.tmp / f"ov-{pair.a.name}", lab.tmp / f"ov-{pair.b.name}"
            addr_a, addr_b = lab.daemon_address(sa), lab.daemon_address(sb)
            common = {"udp_port": 5582, "no_lan_discovery": True, "interface": "hnet0", "env": env}
            common.update(daemon_options(config))
            self.daemons = [
                lab.start_daemon(pair.a, sa, peer=[f"{addr_b}@{c.B4}:5582"], whitelist=[addr_b], **common),
                lab.start_daemon(pair.b, sb, peer=[f"{addr_a}@{c.A4}:5582"], whitelist=[addr_a], **common),
            ]
            self.target = addr_b
        if c.wait_ping(lab, pair.a, self.target, 60) is None:  # a node starts rclpy first: give it longer
            self.stop()
            raise SystemExit(f"{config}: no ping within 60 s")
        if probe == "udp":
            self.procs.append(c.start_udp_echo(lab, pair.b, self.target))
            deadline = time.monotonic() + 10
            while c.udp_rtt(lab, pair.a, self.target, 1)[2]:  # until the server answers
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"{config}: the UDP echo server did not answer within 10 s")

    def ping(self, count: int, interval: float = 0.01) -> tuple[float, float]:
        """(average, p99) ms of ``count`` pings (or UDP requests) ``interval`` seconds apart."""
        measure = c.udp_rtt if self.probe == "udp" else c.ping
        avg, p99, _ = measure(self.pair.lab, self.pair.a, self.target, count, interval)
        return avg, p99

    def stop(self) -> None:
        c.stop_procs(self.procs)
        for d in self.daemons:
            d.stop()


def side_by_side(
    lab: c.Lab,
    configs: list[str],
    rounds: int,
    count: int,
    report: Callable[[str], None] = print,
    interval: float = 0.01,
    tag: str = "ab",
    settle: float = SETTLE,
    probe: str = "ping",
) -> dict[str, dict[str, Any]]:
    """Start every configuration on its own pair, ping them in turn ``rounds`` times, stop them.

    Per configuration: the median over rounds of the average and of the p99 (ms), the per-round
    averages, and in how many rounds it beat the first configuration.  ``report`` gets one line per round.
    ``tag`` names the pairs' namespaces: another call in the same lab needs another tag.  After each
    block of pings it waits ``settle`` seconds, so the block's path warmers are idle when the next starts.
    """
    avgs: dict[str, list[float]] = {k: [] for k in configs}
    p99s: dict[str, list[float]] = {k: [] for k in configs}
    running: list[Running] = []
    try:
        for i, config in enumerate(configs):
            running.append(Running(lab, c.make_pair(lab, tag=f"{tag}{i}"), config, domain_id=40 + i, probe=probe))
        time.sleep(0.5)
        for r in range(rounds):
            # Every other round in reverse order: whatever a block's place in the round does (the host's
            # rhythm, the previous block's warm caches) falls on each configuration alike.
            for run in running if r % 2 == 0 else running[::-1]:
                avg, p99 = run.ping(count, interval)
                avgs[run.config].append(avg)
                p99s[run.config].append(p99)
                time.sleep(settle)
            report(f"round {r + 1}: " + "  ".join(f"{k}={v[-1]:.3f}" for k, v in avgs.items()))
    finally:
        for run in running:
            run.stop()
    first = configs[0]
    return {
        k: {
            "avg_ms": statistics.median(avgs[k]),
            "p99_ms": statistics.median(p99s[k]),
            "round_avgs_ms": avgs[k],
            "rounds_below_first": sum(a < b for a, b in zip(avgs[k], avgs[first], strict=True)),
        }
        for k in configs
    }


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """An interval that holds the true median of ``values`` with at least ``confidence``; None if too few.

    Why: on these machines a round's average moves by 10-30 % with the host's load, so a median of ten
    rounds alone does not say whether two configurations differ; the interval says how far the rounds
    pin it down.  Distribution-free (the sign test's order statistics): it assumes only independent
    rounds, not normal ones, which a heavy-tailed noisy hour is not.
    """
    n = len(values)
    xs = sorted(values)
    below = 0.0  # P(Binomial(n, 1/2) <= j): the chance that the true median lies below xs[j]
    j = -1
    for i in range(n):
        below += math.comb(n, i) / 2**n
        if below > (1 - confidence) / 2:
            break
        j = i
    if j < 0:
        return None
    return xs[j], xs[n - 1 - j]


def ratio_summary(ratios: list[float], what: str = "per round") -> str:
    """``, per round x0.97 (95 % interval x0.91-x1.04)``: the median of per-round ratios and its interval."""
    if not ratios:
        return ""
    text = f", {what} x{statistics.median(ratios):.2f}"
    ci = median_interval(ratios)
    return text + (f" (95 % interval x{ci[0]:.2f}-x{ci[1]:.2f})" if ci else " (too few rounds for an interval)")


def round_ratios(ours: list[float], theirs: list[float], base: float = 0.0) -> list[float]:
    """Per round, ``(ours - base) / (theirs - base)``: both pinged in the same round, so the host's load cancels."""
    return [(a - base) / (b - base) for a, b in zip(ours, theirs, strict=True) if b > base]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--count", type=int, default=100, help="pings per configuration and round")
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between pings (0.001 to 10)")
    ap.add_argument(
        "--settle", type=float, default=SETTLE, help="seconds between two blocks of pings (warmers go idle)"
    )
    ap.add_argument(
        "--probe",
        choices=("ping", "udp"),
        default="ping",
        help="ICMPv6 echo (the kernel answers it) or UDP requests a process answers (bench/udp_echo.py)",
    )
    ap.add_argument("configs", nargs="+")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    if not 0.001 <= args.interval <= 10:
        raise SystemExit("--interval: 0.001 to 10 s")
    if not 0 <= args.settle <= 10:
        raise SystemExit("--settle: 0 to 10 s")
    if len(set(args.configs)) != len(args.configs):
        raise SystemExit("each configuration once")
    for config in args.configs:
        if config != "wg":
            daemon_env(config)  # refuse a bad configuration before anything starts
    why = c.have_wireguard_go() if "wg" in args.configs else None
    if why:
        raise SystemExit(why)
    with c.Lab(tag="lab") as lab:
        res = side_by_side(
            lab,
            args.configs,
            args.rounds,
            args.count,
            lambda line: print(line, flush=True),
            args.interval,
            settle=args.settle,
            probe=args.probe,
        )
    first = args.configs[0]
    apart = f"{args.interval * 1000:g} ms apart"
    what = "pings" if args.probe == "ping" else "UDP requests"
    print(f"\n{args.probe} avg / p99 (ms), median of {args.rounds} rounds of {args.count} {what} {apart}")
    for config in args.configs:
        r = res[config]
        beat = ""
        if config != first:
            beat = f"   lower than {first} in {r['rounds_below_first']} of {args.rounds} rounds"
            beat += ratio_summary(round_ratios(r["round_avgs_ms"], res[first]["round_avgs_ms"]))
        print(f"  {config:40s} {r['avg_ms']:.3f} / {r['p99_ms']:.3f}{beat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
