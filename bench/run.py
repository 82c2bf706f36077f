"""make bench: raw veth vs wireguard-go vs this overlay, side by side, in one run on the same namespaces.

Two namespaces joined by a veth (198.18.0.1 <-> 198.18.0.2, fd00:1::/64).  Columns: raw veth, wireguard-go,
husarnet_ros (super-packet mode where the path is clean, the default) and husarnet_ros per-seg (every
segment sealed on its own, HUSARNET_ROS_SUPER=0).  For each column:

* TCP throughput, 1 and 4 streams (iperf3, 10 s; ``--quick`` 3 s);
* UDP datagrams/s delivered at 64 and 1200 bytes (iperf3 -u -b 0);
* ping average and p99 (10 ms interval);
* ping again, side by side: wireguard-go and husarnet_ros running at once on pairs of their own, pinged
  in turns for ``--latency-rounds`` rounds (bench/latency_ab.py): one column after the other, minutes
  apart, differ by 10-30 % on a shared machine, side by side they do not; then the same again with
  husarnet_ros's path warmer off (core/warmer.py), to show its share;
* CPU seconds per GB moved by the tunnel processes (both ends, utime+stime from /proc/<pid>/stat,
  over the 1-stream TCP run);
* set-up time (process start to first answered ping) for the tunnels;
* ratio to wireguard-go.

``--loss P`` adds P % random loss (nft numgen, input hook of both namespaces, per datagram: GSO/TSO/GRO
turned off on the veth so a batch is never dropped as one).  ``--fastpath`` adds the standalone
prototype of issue #6 (bench/fastpath_proto.py) as a column.  Results: a table on stdout and
bench/results/latest.json.

Then the connectivity metrics of issue #3 (bench/connectivity.py, results under the "connectivity" key):
set-up time LAN / through two NATs / relayed (median of 3), relay throughput, base capacity with the
load generator (2000 nodes, ``--full`` 10000).  ``--connectivity-only`` runs just those and merges them
into the existing results file; ``--no-connectivity`` (or ``--only``) skips them.

Needs root.  Numbers on a shared 2-core machine are noisy: the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c
import latency_ab

RESULTS = Path(__file__).resolve().parent / "results"


def measure(pair: c.Pair, dst: str, pids: list[int], seconds: float, pings: int) -> dict[str, Any]:
    """Every metric for one column; a metric that fails records its error instead of a number."""
    lab, a = pair.lab, pair.a
    r: dict[str, Any] = {}

    def attempt(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # one failed metric must not lose the others
            r[f"{name}_error"] = str(e)[:300]
            c.log(f"  {name}: {e}")

    def do_ping() -> None:
        r["ping_avg_ms"], r["ping_p99_ms"], r["ping_loss"] = c.ping(lab, a, dst, pings)

    def do_tcp1() -> None:
        cpu0 = c.cpu_seconds(pids)
        gbps, nbytes = c.tcp_result(c.iperf(lab, a, dst, seconds))
        cpu = c.cpu_seconds(pids) - cpu0
        r["tcp1_gbps"] = gbps
        if pids and nbytes:
            r["cpu_s_per_gb"] = cpu / (nbytes / 1e9)
            r["cpu_util_cores"] = cpu / seconds

    def do_tcp4() -> None:
        r["tcp4_gbps"], _ = c.tcp_result(c.iperf(lab, a, dst, seconds, streams=4))

    def do_udp(size: int) -> Callable[[], None]:
        def run() -> None:
            r[f"udp{size}_pps"] = c.udp_pps(c.iperf(lab, a, dst, min(seconds, 5), udp_len=size))

        return run

    attempt("ping", do_ping)
    attempt("tcp1", do_tcp1)
    attempt("tcp4", do_tcp4)
    attempt("udp64", do_udp(64))
    attempt("udp1200", do_udp(1200))
    return r


def column_raw(pair: c.Pair, args: argparse.Namespace) -> dict[str, Any]:
    return measure(pair, c.B6, [], args.seconds, args.pings)


def column_wireguard(pair: c.Pair, args: argparse.Namespace) -> dict[str, Any]:
    why = c.have_wireguard_go()
    if why:
        return {"skipped": why}
    t0 = time.monotonic()
    try:
        procs = c.start_wireguard_go(pair)
    except Exception as e:
        return {"skipped": f"wireguard-go could not start: {e}"}
    try:
        setup = c.wait_ping(pair.lab, pair.a, c.WG_B, 15)
        if setup is None:
            return {"skipped": "wireguard-go tunnel did not pass a ping in 15 s:\n" + procs[0].tail()}
        ready = time.monotonic() - t0
        r = measure(pair, c.WG_B, [p.pid for p in procs], args.seconds, args.pings)
        r["setup_s"] = ready
        return r
    finally:
        c.stop_procs(procs)


def column_overlay(pair: c.Pair, args: argparse.Namespace, super_mode: bool = True) -> dict[str, Any]:
    """The daemon pair; ``super_mode`` False forces per-segment sealing (HUSARNET_ROS_SUPER=0, issue #6)."""
    lab = pair.lab
    os.environ["HUSARNET_ROS_SUPER"] = "1" if super_mode else "0"  # inherited by the daemons
    try:
        import husarnet_ros.daemon  # noqa: F401
    except Exception as e:
        return {"skipped": f"husarnet_ros.daemon not importable yet ({e})"}
    daemons = []
    try:
        sa, sb = lab.tmp / "ov-a", lab.tmp / "ov-b"
        addr_a, addr_b = lab.daemon_address(sa), lab.daemon_address(sb)  # identities exist before the clock starts
        t0 = time.monotonic()
        common = {"udp_port": 5582, "no_lan_discovery": True, "interface": "hnet0"}
        daemons.append(lab.start_daemon(pair.a, sa, peer=[f"{addr_b}@{c.B4}:5582"], whitelist=[addr_b], **common))
        daemons.append(lab.start_daemon(pair.b, sb, peer=[f"{addr_a}@{c.A4}:5582"], whitelist=[addr_a], **common))
        setup = c.wait_ping(lab, pair.a, addr_b, 20)
        if setup is None:
            tail = "\n".join(d.tail(15) for d in daemons)
            return {"skipped": f"overlay did not pass a ping in 20 s; daemon logs:\n{tail}"}
        ready = time.monotonic() - t0
        r = measure(pair, addr_b, [p for d in daemons for p in c.descendants(d.proc.pid)], args.seconds, args.pings)
        r["setup_s"] = ready
        r["counters_a"] = {k: v for k, v in daemons[0].counters().items() if v}
        r["counters_b"] = {k: v for k, v in daemons[1].counters().items() if v}
        return r
    except Exception as e:
        return {"skipped": f"overlay could not run: {e}"}
    finally:
        for d in daemons:
            d.stop()


def column_fastpath(pair: c.Pair, args: argparse.Namespace) -> dict[str, Any]:
    import fastpath_proto as fp

    procs = fp.start(pair, workers=args.workers)
    try:
        if c.wait_ping(pair.lab, pair.a, fp.FP_B, 15) is None:
            return {"skipped": "fastpath prototype did not pass a ping:\n" + procs[0].tail()}
        r = measure(pair, fp.FP_B, [p.pid for p in procs], args.seconds, args.pings)
        r["profile"] = fp.stop(procs)
        return r
    finally:
        fp.stop(procs)


COLUMNS: dict[str, Callable[[c.Pair, argparse.Namespace], dict[str, Any]]] = {
    "raw veth": column_raw,
    "wireguard-go": column_wireguard,
    "husarnet_ros": column_overlay,  # super-packet mode where the path is clean (the default)
    "husarnet_ros per-seg": lambda pair, args: column_overlay(pair, args, super_mode=False),
    "fastpath proto": column_fastpath,
}

ROWS = [
    ("tcp1_gbps", "TCP 1 stream (Gbit/s)", "{:.2f}"),
    ("tcp4_gbps", "TCP 4 streams (Gbit/s)", "{:.2f}"),
    ("udp64_pps", "UDP 64 B delivered (kpps)", "k"),
    ("udp1200_pps", "UDP 1200 B delivered (kpps)", "k"),
    ("ping_avg_ms", "ping avg (ms)", "{:.3f}"),
    ("ping_p99_ms", "ping p99 (ms)", "{:.3f}"),
    ("cpu_s_per_gb", "tunnel CPU s per GB", "{:.2f}"),
    ("cpu_util_cores", "tunnel CPU (cores busy)", "{:.2f}"),
    ("setup_s", "set-up to first ping (s)", "{:.2f}"),
]


def fmt(v: Any, spec: str) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v / 1000:.1f}" if spec == "k" else spec.format(v)


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    w0 = max(len(r[1]) for r in ROWS) + 2
    widths = [max(14, len(n) + 2) for n in names]
    lines = ["".ljust(w0) + "".join(n.rjust(w) for n, w in zip(names, widths, strict=True))]
    wg = results.get("wireguard-go", {})
    for key, label, spec in ROWS:
        lines.append(
            label.ljust(w0)
            + "".join(fmt(results[n].get(key), spec).rjust(w) for n, w in zip(names, widths, strict=True))
        )
        if key in ("tcp1_gbps", "tcp4_gbps", "udp1200_pps") and isinstance(wg.get(key), (int, float)) and wg[key]:
            ratios = []
            for n in names:
                v = results[n].get(key)
                ratios.append(f"x{v / wg[key]:.2f}" if isinstance(v, (int, float)) else "-")
            lines.append(
                ("  ratio to wireguard-go").ljust(w0) + "".join(x.rjust(w) for x, w in zip(ratios, widths, strict=True))
            )
    for n in names:
        if "skipped" in results[n]:
            lines.append(f"note: {n} skipped: {results[n]['skipped'].strip().splitlines()[0]}")
        errs = {k: v for k, v in results[n].items() if k.endswith("_error")}
        for k, v in errs.items():
            lines.append(f"note: {n} {k[:-6]} failed: {v.splitlines()[0] if v else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 s per throughput test instead of 10, fewer pings")
    p.add_argument("--loss", type=float, default=0.0, metavar="PERCENT", help="random loss on the veth path, both ways")
    p.add_argument(
        "--only", action="append", choices=["raw", "wireguard", "overlay", "overlay-seg", "fastpath"], help="repeatable"
    )
    p.add_argument("--fastpath", action="store_true", help="also run the issue #6 prototype column")
    p.add_argument("--workers", type=int, default=2, help="fastpath prototype threads per direction")
    p.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness increment for the whole run, inherited by every process it starts (e.g. -10 on a busy "
        "shared machine: every column gets the same priority, so the comparison stays fair)",
    )
    p.add_argument("--connectivity-only", action="store_true", help="only the issue #3 connectivity metrics")
    p.add_argument("--no-connectivity", action="store_true", help="skip the issue #3 connectivity metrics")
    p.add_argument("--full", action="store_true", help="base capacity with 10000 nodes instead of 2000")
    p.add_argument("--runs", type=int, default=3, help="set-up time runs per connectivity scenario")
    p.add_argument(
        "--latency-rounds",
        type=int,
        default=None,
        help="rounds of the side-by-side ping comparison (default 10, --quick 4; 0 skips it)",
    )
    args = p.parse_args(argv)
    args.seconds = 3 if args.quick else 10
    args.pings = 50 if args.quick else 200
    if os.geteuid() != 0:
        print("make bench needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    keys = {
        "raw": "raw veth",
        "wireguard": "wireguard-go",
        "overlay": "husarnet_ros",
        "overlay-seg": "husarnet_ros per-seg",
        "fastpath": "fastpath proto",
    }
    default = ["raw veth", "wireguard-go", "husarnet_ros", "husarnet_ros per-seg"]
    wanted = [keys[k] for k in args.only] if args.only else default
    if args.fastpath and "fastpath proto" not in wanted:
        wanted.append("fastpath proto")
    if args.nice:
        os.nice(args.nice)
    if args.connectivity_only:
        return connectivity_main(args)
    info = c.machine_info()
    info["nice"] = os.nice(0)
    results: dict[str, dict[str, Any]] = {}
    with c.Lab(tag="bench") as lab:
        pair = c.make_pair(lab)
        if args.loss:
            c.set_offloads(pair, on=False)
            c.add_loss(pair, args.loss)
        c.start_iperf_server(lab, pair.b)
        for name in wanted:
            c.log(f"measuring {name} ({args.seconds} s per throughput test, loss {args.loss} %)")
            results[name] = COLUMNS[name](pair, args)
            c.log(f"  {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in results[name].items() if isinstance(v, float)))
        latency = side_by_side_latency(lab, args, results)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    conn = None if args.only or args.no_connectivity else run_connectivity(args)
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds_per_test": args.seconds,
        "loss_percent": args.loss,
        "machine": info,
        "results": results,
    }
    if conn is not None:
        out["connectivity"] = conn
    if latency is not None:
        out["latency_side_by_side"] = latency
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(
        f"\nloss {args.loss} %, {args.seconds} s per test, "
        f"load average {info.get('loadavg_start')} -> {info['loadavg_end']}"
    )
    print(table(results))
    if latency is not None:
        print("\n" + latency_table(latency, results))
    if conn is not None:
        import connectivity as cx

        print("\n" + cx.table(conn))
    print(f"\nwritten: {args.output}")
    return 0


def side_by_side_latency(lab: c.Lab, args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict | None:
    """wireguard-go and husarnet_ros pinged in turns while both run (None when either column did not run)."""
    rounds = args.latency_rounds if args.latency_rounds is not None else (4 if args.quick else 10)
    ran = [n for n in ("wireguard-go", "husarnet_ros") if n in results and "skipped" not in results[n]]
    if rounds <= 0 or len(ran) < 2:
        return None
    count = 50 if args.quick else 100
    c.log(f"ping side by side: wireguard-go and husarnet_ros, {rounds} rounds of {count} pings each")
    res = latency_ab.side_by_side(lab, ["wg", "ours"], rounds, count, lambda line: c.log("  " + line))
    # The path warmer's share, in a run of its own: beside a daemon that warms, one that does not would
    # find the shared library code (libpython, libcrypto) warm too, and look better than it is.
    off = "ours:--warm-interval=0"
    c.log(f"ping side by side again, the path warmer off: {rounds} rounds of {count} pings each")
    res_off = latency_ab.side_by_side(lab, ["wg", off], rounds, count, lambda line: c.log("  " + line), tag="ao")
    return {
        "rounds": rounds,
        "pings_per_round": count,
        "wireguard-go": res["wg"],
        "husarnet_ros": res["ours"],
        "warmer_off": {"wireguard-go": res_off["wg"], "husarnet_ros": res_off[off]},
    }


def latency_table(latency: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """The side-by-side ping medians, the latency each adds to the raw veth's, and the ratio of the two."""
    raw = results.get("raw veth", {}).get("ping_avg_ms")
    lines = [
        f"ping side by side ({latency['rounds']} rounds x {latency['pings_per_round']} pings, both running, "
        "taking turns; medians over rounds)",
        f"{'':26s}{'avg (ms)':>10s}{'p99 (ms)':>10s}{'added (ms)':>12s}{'added / wg':>12s}",
    ]
    runs = [("", latency)]
    if "warmer_off" in latency:
        runs.append((", warmer off", latency["warmer_off"]))
    for label, run in runs:
        wg = run["wireguard-go"]
        for name in ("wireguard-go", "husarnet_ros"):
            r = run[name]
            if isinstance(raw, (int, float)):
                added = r["avg_ms"] - raw
                ratio = added / (wg["avg_ms"] - raw) if wg["avg_ms"] > raw else float("nan")
                tail = f"{added:12.3f}{'x' + format(ratio, '.2f'):>12s}"
            else:
                tail = f"{'-':>12s}{'-':>12s}"
            shown = name + (label if name == "husarnet_ros" else "")
            lines.append(f"{shown:26s}{r['avg_ms']:10.3f}{r['p99_ms']:10.3f}{tail}")
        per_round = ""
        if isinstance(raw, (int, float)) and "round_avgs_ms" in wg:  # older results lack the rounds
            ratios = latency_ab.round_ratios(run["husarnet_ros"]["round_avgs_ms"], wg["round_avgs_ms"], raw)
            per_round = latency_ab.ratio_summary(ratios, "added / wg per round")
        lines.append(
            f"husarnet_ros{label} lower than wireguard-go in {run['husarnet_ros']['rounds_below_first']} of "
            f"{latency['rounds']} rounds{per_round}"
        )
    return "\n".join(lines)


def run_connectivity(args: argparse.Namespace) -> dict[str, Any]:
    """Issue #3 metrics (bench/connectivity.py): set-up times, relay throughput, base capacity."""
    import connectivity as cx

    return cx.run_connectivity(runs=args.runs, nodes=10000 if args.full else 2000)


def connectivity_main(args: argparse.Namespace) -> int:
    """--connectivity-only: measure, merge under "connectivity" into the results file, print the summary."""
    import connectivity as cx

    conn = run_connectivity(args)
    conn["machine"] = c.machine_info()
    conn["machine"]["nice"] = os.nice(0)
    out: dict[str, Any] = {}
    if args.output.exists():
        try:
            out = json.loads(args.output.read_text())
        except json.JSONDecodeError:
            out = {}
    out["connectivity"] = conn
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(cx.table(conn))
    print(f"\nwritten: {args.output} (key 'connectivity')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
