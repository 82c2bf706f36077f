"""Issue #3 connectivity benchmarks: connection set-up time (LAN, through two NATs, relayed), relay
throughput and base server capacity.

Why a module of its own: these numbers need the TESTPLAN reference topology (base on a "wan" bridge,
two peers behind two NAT routers, two peers on a LAN bridge) and real daemons with the *default*
protocol timers, while the throughput table of ``bench/run.py`` needs only one veth.

Set-up time, per run (a fresh lab each run, fresh identities)::

    daemon X up (and logged in to the base when there is one), whitelisting Y
    ping -D -i 0.01 from X to Y's fc94 address running (packets wait in X's staging queue)
    t0 = start of Y's daemon process
    set-up = first ICMPv6 echo reply seen by that ping - t0

The whole time a poller thread reads both control sockets (``peers``, ``status``) every 25 ms and
keeps a timeline (Y ready, Y logged in to the base, first 'relay'/'direct'/'lan' path on each side),
which is what explains a miss.  Scenarios:

* ``lan``: peerC and peerD on one bridge, no base, LAN beacons only; path must be 'lan'.
* ``nat``: peerA behind natA and peerB behind natB (endpoint-independent masquerade with the home-router
  input filter), base server on the wan: the base tells both to punch; set-up is the first reply at or
  after X's path to Y became 'direct' (a reply carried by the relay first does not count).
* ``relay``: as ``nat`` with direct UDP between the two NATs dropped on the wan bridge; path must be
  'relay'.  After the last run: iperf3 TCP for 5 s over the relayed overlay.

Each set-up time is reported twice: from Y's process start (the definition of issue #3) and from Y's
control socket answering (process start-up, identity load and TUN creation excluded).  Medians of
``runs`` runs, with the target and PASS/MISS.  Base capacity: ``python -m husarnet_ros.base.loadgen
--nodes N --json`` inside a lab namespace (its own loopback), identities from loadgen's cache.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common as c

import husarnet_ros
from husarnet_ros.testing import e2e
from husarnet_ros.testing.netns import Daemon, Host, Lab, LabError, Topology, daemon_argv, reference_topology

TARGETS_S = {"lan": 0.5, "nat": 2.0, "relay": 1.0}
EXPECTED_PATH = {"lan": "lan", "nat": "direct", "relay": "relay"}
POLL_S = 0.025
PING_INTERVAL_S = 0.01
SETUP_TIMEOUT_S = 40.0
PORT = 5582
BEACON_INTERVAL_S = 5.0  # core/beacon.py BeaconService default


def _wall() -> float:
    return time.time()


# --------------------------------------------------------------------------------------------------
# One set-up run


@dataclass
class Timeline:
    """First wall-clock time each event was seen by the poller (seconds since t0)."""

    t0: float
    events: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, name: str, when: float | None = None) -> None:
        with self.lock:
            self.events.setdefault(name, round((when if when is not None else _wall()) - self.t0, 4))

    def get(self, name: str) -> float | None:
        with self.lock:
            return self.events.get(name)


def _peer_entry(path: Path, address: str) -> dict | None:
    from husarnet_ros.testing.netns import control

    reply = control(path, "peers", timeout=2)
    for p in reply.get("peers", []):
        if p.get("address") == address:
            return p
    return None


def _poller(
    tl: Timeline, x: Daemon, y_ctl: Path, x_addr: str, y_addr: str, with_base: bool, stop: threading.Event
) -> None:
    """Record when each side first shows each path kind, and when Y logs in to the base."""
    from husarnet_ros.testing.netns import control

    while not stop.is_set():
        now = _wall()
        with contextlib.suppress(Exception):
            e = _peer_entry(x.control_path, y_addr)
            if e and e.get("path") not in (None, "none"):
                tl.mark(f"x_path_{e['path']}")
        if y_ctl.exists():
            with contextlib.suppress(Exception):
                st = control(y_ctl, "status", timeout=2).get("status", {})
                tl.mark("y_ready")
                if with_base and st.get("base") in ("tcp", "udp"):
                    tl.mark(f"y_base_{st['base']}")
                e = _peer_entry(y_ctl, x_addr)
                if e and e.get("path") not in (None, "none"):
                    tl.mark(f"y_path_{e['path']}")
        stop.wait(max(0.0, POLL_S - (_wall() - now)))


_PING_LINE = re.compile(r"^\[(\d+\.\d+)\] .*bytes from .*icmp_seq=(\d+)", re.M)


def _replies(text: str) -> list[tuple[float, int]]:
    """(wall time, icmp_seq) of every echo reply in ``ping -D`` output."""
    return [(float(ts), int(seq)) for ts, seq in _PING_LINE.findall(text)]


def _nat_input_filter(lab: Lab, topo: Topology) -> str:
    """Make sure each NAT drops new inbound UDP on its WAN side (a home router's input filter).

    Without it the first inbound punch leaves an unreplied conntrack entry that forces the inside
    host's own punch onto another external port (engineer E).  The lab's masquerade() has the rule;
    if it ever loses it, the bench adds its own table rather than measure a NAT no home has.
    """
    notes = []
    for nat, ip in ((topo.natA, topo.NAT_A_IP), (topo.natB, topo.NAT_B_IP)):
        wan_if = next(i for i, a in nat.addrs4.items() if a.split("/")[0] == ip)
        ruleset = lab.run(nat, ["nft", "list", "ruleset"]).stdout
        if re.search(rf'iifname "{wan_if}".*ct state new drop', ruleset):
            notes.append(f"{nat.name}: lab input filter present")
            continue
        lab.nft(
            nat,
            "table inet hrbenchfw {\n"
            f' chain input {{ type filter hook input priority filter; policy accept; iifname "{wan_if}"'
            " meta l4proto udp ct state new drop; }\n"
            f' chain forward {{ type filter hook forward priority filter; policy accept; iifname "{wan_if}"'
            " ct state new drop; }\n}\n",
        )
        notes.append(f"{nat.name}: bench added input/forward filter on {wan_if}")
    return "; ".join(notes)


def _spawn_daemon(lab: Lab, host: Host, state: Path, address: str, log: Path, **options: Any) -> Daemon:
    """Start a daemon without waiting (the poller notices when its control socket answers)."""
    ctl = state / "control.sock"
    with contextlib.suppress(FileNotFoundError):
        ctl.unlink()
    options.setdefault("hostname", host.name)
    options.setdefault("log_level", "INFO")
    proc = lab.spawn(host, daemon_argv(state, ctl, options), log=log)
    d = Daemon(lab, host, state, proc, ctl, address)
    lab.daemons.append(d)
    return d


def setup_run(kind: str, run: int, keep_logs: Path, *, mode: str = "start", relay_iperf: bool = False) -> dict:
    """One set-up measurement in a fresh lab; returns times (s since t0), paths and the timeline.

    ``mode="start"``: t0 = start of Y's daemon process (X already up, whitelisting Y).
    ``mode="whitelist"``: both daemons up (and logged in) without trusting each other; after a random
    0-5 s pause, t0 = Y, then X, add the other to the whitelist through the control socket.
    """
    out: dict[str, Any] = {"run": run, "mode": mode}
    with Lab(tag=f"cx{kind[:2]}{mode[0]}{run}") as lab:
        t = reference_topology(lab)
        base = None
        if kind in ("nat", "relay"):
            out["nat_filter"] = _nat_input_filter(lab, t)
            base = e2e.start_base(lab, t, timers_scale=1.0)
        if kind == "relay":
            lab.block_udp(t.wan, t.NAT_A_IP, t.NAT_B_IP)  # the base stays reachable from both
        hx, hy = (t.peerC, t.peerD) if kind == "lan" else (t.peerA, t.peerB)
        sx, sy = lab.tmp / "state-x", lab.tmp / "state-y"
        ax, ay = lab.daemon_address(sx), lab.daemon_address(sy)  # identities exist before the clock starts
        opts: dict[str, Any] = {"udp_port": PORT}
        if base is not None:
            opts["base"] = [base.spec]
        ylog = lab.tmp / "daemon-y.log"
        x = lab.start_daemon(hx, sx, whitelist=[ay] if mode == "start" else [], **opts)
        y = None if mode == "start" else lab.start_daemon(hy, sy, **opts)
        for d in (x, y):
            if d is not None and base is not None and not c_wait(lambda d=d: d.status().get("base") == "udp", 20):
                out["error"] = f"{d.host.name} did not reach the base over UDP: {d.status().get('base')}"
                return out
        pinger = lab.spawn(
            hx,
            ["ping", "-6", "-D", "-n", "-i", str(PING_INTERVAL_S), "-W", "1", "-w", str(int(SETUP_TIMEOUT_S) + 5), ay],
        )
        time.sleep(0.2)  # the ping is running (in "start" mode its packets are already staged in X)
        if mode == "whitelist":
            # A user whitelists at any moment: sample the phase of the daemons' periodic timers (LAN beacons
            # every 5 s) uniformly instead of always whitelisting right after start-up.
            time.sleep(random.uniform(0, BEACON_INTERVAL_S))
        stop = threading.Event()
        t0 = _wall()
        tl = Timeline(t0)
        if y is None:
            y = _spawn_daemon(lab, hy, sy, ay, ylog, whitelist=[ax], **opts)
        else:
            y.control("whitelist_add", address=ax)
            x.control("whitelist_add", address=ay)
            tl.mark("whitelisted")
        poll = threading.Thread(
            target=_poller, args=(tl, x, y.control_path, ax, ay, base is not None, stop), daemon=True
        )
        poll.start()
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        first: float | None = None
        while time.monotonic() < deadline and pinger.alive:
            reps = _replies(pinger.output())
            if reps and first is None:
                first = reps[0][0] - t0
            if first is not None and (kind != "nat" or tl.get("x_path_direct") is not None):
                break
            time.sleep(0.02)
        time.sleep(1.0)  # let the paths settle, then look at where the pair ended
        stop.set()
        poll.join(timeout=5)
        pinger.stop()
        reps = _replies(pinger.output())
        out["first_reply_s"] = first
        if mode == "start":
            out["y_ready_s"] = tl.get("y_ready")  # process start-up share of the set-up time
        with contextlib.suppress(Exception):
            out["path_x"] = x.path_to(ay)
            out["path_y"] = y.path_to(ax)
            ex = x.peer(ay) or {}
            out["endpoint_x"] = ex.get("endpoint")
        if kind == "nat":
            direct = tl.get("x_path_direct")
            # First reply received once X used the direct path (the poller's resolution is POLL_S).
            after = [ts - t0 for ts, _ in reps if direct is not None and ts - t0 >= direct - POLL_S]
            out["setup_s"] = max(after[0], direct) if after else None
        else:
            out["setup_s"] = first
        out["timeline"] = dict(sorted(tl.events.items(), key=lambda kv: kv[1]))
        if first is not None and reps:
            out["first_reply_seq"] = reps[0][1]  # seq n was sent about n*10 ms after the ping started
        for d, name in ((x, "x"), (y, "y")):
            with contextlib.suppress(Exception):
                cnt = d.counters()
                out[f"counters_{name}"] = {
                    k: v
                    for k, v in cnt.items()
                    if v
                    and any(s in k for s in ("handshake", "hello", "probe", "base_", "beacon_acc", "replay", "no_"))
                }
        if kind == "lan" and mode == "whitelist":
            out["next_beacon_after_t0_s"] = _next_beacon(t0, [x.proc.output(), y.proc.output()])
        if relay_iperf and kind == "relay" and out.get("path_x") == "relay":
            out["iperf"] = relay_throughput(lab, hx, hy, ay, x, base)
        keep_logs.mkdir(parents=True, exist_ok=True)
        for d, name in ((x, "x"), (y, "y")):
            with contextlib.suppress(OSError):
                shutil.copy(d.proc.log, keep_logs / f"{kind}-{mode}{run}-{name}-{d.host.name}.log")
        if base is not None:
            with contextlib.suppress(OSError):
                shutil.copy(base.proc.log, keep_logs / f"{kind}-{mode}{run}-base.log")
    return out


_ENGINE_UP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO \S+: engine up", re.M)


def _next_beacon(t0: float, logs: list[str]) -> float | None:
    """Seconds from t0 to the first LAN beacon either daemon sends after it (sent at start, then every 5 s).

    Beacons of a peer that is not yet whitelisted are dropped, so after a whitelist change the pair can
    only meet at the next beacon: when set-up tracks this number, the beacon interval is the cause.
    """
    best = None
    for text in logs:
        m = _ENGINE_UP.search(text)
        if not m:
            continue
        up = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        k = max(0, int((t0 - up) // BEACON_INTERVAL_S) + 1)
        nxt = up + k * BEACON_INTERVAL_S - t0
        best = nxt if best is None else min(best, nxt)
    return round(best, 3) if best is not None else None


def c_wait(pred: Callable[[], bool], timeout: float) -> bool:
    from husarnet_ros.testing.netns import wait_until

    return wait_until(pred, timeout, interval=0.05)


def _base_stats(base: e2e.BaseServer) -> dict[str, Any]:
    """The base's counters, through SIGUSR1 (it logs one ``stats {json}`` line)."""
    before = base.proc.output().count(" stats {")
    base.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        text = base.proc.output()
        if text.count(" stats {") > before:
            return json.loads(text[text.rindex(" stats {") + 7 :].splitlines()[0])
        time.sleep(0.05)
    return {}


def relay_throughput(
    lab: Lab, hx: Host, hy: Host, ay: str, x: Daemon, base: e2e.BaseServer | None, seconds: int = 5
) -> dict[str, Any]:
    """iperf3 TCP from X to Y over the relayed overlay, with the base's CPU and relay counters meanwhile."""
    r: dict[str, Any] = {"seconds": seconds}
    try:
        srv = c.start_iperf_server(lab, hy)
        try:
            s0 = _base_stats(base) if base else {}
            cpu0 = c.cpu_seconds(c.descendants(base.proc.pid)) if base else 0.0
            data = c.iperf(lab, hx, ay, seconds)
            if base:
                r["base_cpu_cores"] = round((c.cpu_seconds(c.descendants(base.proc.pid)) - cpu0) / seconds, 2)
                s1 = _base_stats(base)
                k0, k1 = s0.get("counters", {}), s1.get("counters", {})
                r["base_counters"] = {
                    k: k1.get(k, 0) - k0.get(k, 0)
                    for k in ("relayed_packets", "relayed_udp", "relayed_tcp", "rate_limited", "udp_backpressure")
                }
            r["tcp_mbit_s"] = round(data["end"]["sum_received"]["bits_per_second"] / 1e6, 2)
            r["retransmits"] = data["end"]["sum_sent"].get("retransmits")
        finally:
            srv.stop()
        r["path_after"] = x.path_to(ay)
        cnt = x.counters()
        r["x_base_relay_tx"] = cnt.get("base_relay_tx", 0)
        r["x_no_path"] = cnt.get("no_path", 0)
    except Exception as e:
        r["error"] = str(e)[:300]
    return r


# --------------------------------------------------------------------------------------------------
# Base capacity


def base_capacity(nodes: int, hold: float = 10.0) -> dict[str, Any]:
    """loadgen against its own base on the loopback of a lab namespace; identities from loadgen's cache."""
    from husarnet_ros.base import loadgen

    cache = loadgen.DEFAULT_IDS_CACHE
    cached = cache.stat().st_size // 32 if cache.exists() else 0
    r: dict[str, Any] = {"nodes": nodes, "ids_cache": str(cache), "ids_cached_before": cached}
    if cached < nodes:
        c.log(f"  loadgen: {nodes - cached} identities to generate first (cached in {cache}; takes minutes once)")
    with Lab(tag="cxload") as lab:
        h = lab.host("load")
        argv = [sys.executable, "-m", "husarnet_ros.base.loadgen", "--nodes", str(nodes), "--json"]
        argv += ["--hold", str(hold), "--ids-cache", str(cache)]
        t0 = time.monotonic()
        res = lab.run(h, argv, check=False, timeout=3600)
        r["wall_s"] = round(time.monotonic() - t0, 1)
        r["exit_code"] = res.returncode
        try:
            r.update(json.loads(res.stdout.strip().splitlines()[-1]))
        except (json.JSONDecodeError, IndexError):
            r["error"] = (res.stderr.strip() or res.stdout.strip())[-500:]
    return r


# --------------------------------------------------------------------------------------------------
# Driver and table


def _median(vals: list[float | None]) -> float | None:
    """Median of the runs, None unless every run produced a number (a failed run is not averaged away)."""
    got = [v for v in vals if v is not None]
    return statistics.median(got) if got and len(got) == len(vals) else None


MODES = ("start", "whitelist")


def _byte_compile_package() -> bool:
    """Byte-compile the daemon's package before any start-up is timed, as installing it does.

    Set-up time counts from the daemon's process start, so it includes Python's imports.  An installed
    package (pip, colcon) is byte-compiled once at install time; a checkout being edited, run with
    PYTHONDONTWRITEBYTECODE (as these machines are), recompiles every edited module at every start:
    about 0.1 s here that no user pays.
    """
    package = Path(husarnet_ros.__file__).resolve().parent
    return bool(compileall.compile_dir(str(package), quiet=1))


def _attempt_run(kind: str, run: int, logs: Path, mode: str, iperf: bool) -> dict[str, Any]:
    try:
        return setup_run(kind, run, logs, mode=mode, relay_iperf=iperf)
    except (LabError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        return {"run": run, "mode": mode, "error": str(e)[:800]}


def summarize(kind: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
    med = _median([r.get("setup_s") for r in rs])
    target = TARGETS_S[kind]
    paths_ok = all(r.get("path_x") == EXPECTED_PATH[kind] for r in rs)
    return {
        "target_s": target,
        "expected_path": EXPECTED_PATH[kind],
        "median_setup_s": med,
        "median_y_ready_s": _median([r.get("y_ready_s") for r in rs]),
        "verdict": "PASS" if med is not None and med < target and paths_ok else "MISS",
        "paths_ok": paths_ok,
        "runs": rs,
    }


def run_connectivity(
    *, runs: int = 3, nodes: int = 2000, only: list[str] | None = None, modes: tuple[str, ...] = MODES
) -> dict[str, Any]:
    """Every issue #3 metric; a run that fails records its error instead of numbers."""
    logs = Path(tempfile.mkdtemp(prefix="hr-bench-connectivity-"))
    compiled = _byte_compile_package()
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs_per_scenario": runs,
        "timers": "protocol defaults (timers_scale 1)",
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "byte_compiled": compiled,
        "logs": str(logs),
        "scenarios": {},
    }
    for mode in modes:
        for kind in [k for k in ("lan", "nat", "relay") if only is None or k in only]:
            rs = []
            for i in range(runs):
                c.log(f"connectivity {kind} ({mode}) run {i + 1}/{runs}")
                iperf = kind == "relay" and mode == modes[0] and i == runs - 1
                r = _attempt_run(kind, i + 1, logs, mode, iperf)
                if "error" in r:  # a shared checkout can be mid-edit for a moment: one retry, both recorded
                    c.log(f"  {kind} ({mode}) run {i + 1} failed, retrying once: {r['error'].splitlines()[-1]}")
                    first_error = r["error"]
                    r = _attempt_run(kind, i + 1, logs, mode, iperf)
                    r["retried_after"] = first_error
                c.log(
                    f"  {kind} ({mode}): set-up {_f(r.get('setup_s'))} s, 2nd daemon ready {_f(r.get('y_ready_s'))} s,"
                    f" path {r.get('path_x')}/{r.get('path_y')} {r.get('error', '')}"
                )
                rs.append(r)
                if "iperf" in r:
                    result["relay_throughput"] = r["iperf"]
            result["scenarios"][f"{kind}/{mode}"] = summarize(kind, rs)
    if only is None or "relay" in only:
        result.setdefault("relay_throughput", {"error": "no relayed run reached the iperf step"})
    if only is None or "capacity" in only:
        c.log(f"base capacity: loadgen with {nodes} nodes on loopback")
        try:
            result["base_capacity"] = base_capacity(nodes)
        except (LabError, OSError, RuntimeError) as e:
            result["base_capacity"] = {"nodes": nodes, "error": str(e)[:500]}
    result["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return result


def _f(v: Any, spec: str = "{:.3f}") -> str:
    return spec.format(v) if isinstance(v, (int, float)) else "-"


def table(res: dict[str, Any]) -> str:
    """Human-readable summary of :func:`run_connectivity`'s result."""
    if "skipped" in res:
        return f"connectivity: skipped ({res['skipped']})"
    lines = [
        f"connectivity (issue #3): median of {res['runs_per_scenario']} runs, {res['timers']}; "
        f"SHARED, LOADED 2-core machine, load average {res['loadavg_start']} -> {res['loadavg_end']}",
        "set-up = t0 -> first overlay ping reply (nat: first reply once the path is 'direct'); t0 = start of the",
        "2nd daemon process (start), or both daemons up and logged in, t0 = mutual whitelist_add (whitelist)",
        f"{'scenario':<16}{'target':>8}{'median s':>10}{'verdict':>9}{'2nd up s':>10}   runs: set-up s/path",
    ]
    for name, s in res["scenarios"].items():
        runs = "  ".join(
            f"{_f(r.get('setup_s'), '{:.2f}')}/{r.get('path_x', '?')}"
            + (" ERR" if "error" in r else "")
            + (f" (next beacon {_f(r['next_beacon_after_t0_s'], '{:.2f}')})" if "next_beacon_after_t0_s" in r else "")
            for r in s["runs"]
        )
        lines.append(
            f"{name:<16}{'<' + _f(s['target_s'], '{:.1f}') + ' s':>8}{_f(s['median_setup_s']):>10}"
            f"{s['verdict']:>9}{_f(s['median_y_ready_s']):>10}   {runs}"
        )
        for r in s["runs"]:
            for key, what in (("retried_after", "failed once, retried"), ("error", "failed")):
                if key in r:
                    lines.append(f"  note: {name} run {r['run']} {what}: {r[key].strip().splitlines()[-1]}")
    rt = res.get("relay_throughput")
    if rt:
        lines.append(
            f"relay throughput (iperf3 TCP {rt.get('seconds', 5)} s over the relayed overlay): "
            f"{_f(rt.get('tcp_mbit_s'), '{:.1f}')} Mbit/s, retransmits {rt.get('retransmits', '-')}, "
            f"path after {rt.get('path_after', '-')}" + (f"  error: {rt['error']}" if "error" in rt else "")
        )
        if "base_counters" in rt:
            lines.append(
                f"  base meanwhile: {_f(rt.get('base_cpu_cores'), '{:.2f}')} cores, "
                + ", ".join(f"{k} {v}" for k, v in rt["base_counters"].items())
                + " (per-node relay budget: base --relay-rate, default 8 MB/s = 64 Mbit/s)"
            )
    bc = res.get("base_capacity")
    if bc:
        if "logged_in" not in bc:
            lines.append(f"base capacity ({bc['nodes']} nodes): error: {bc.get('error')}")
        else:
            lines.append(
                f"base capacity: {bc.get('logged_in')}/{bc['nodes']} nodes registered ({bc.get('still_logged_in')} "
                f"still after a {bc.get('hold_s')} s hold, {bc.get('udp_state_nodes')} on UDP); "
                f"{_f(bc.get('logins_per_s'), '{:.0f}')} logins/s wall, "
                f"{_f(bc.get('base_logins_per_cpu_s'), '{:.0f}')} logins per base CPU-second"
            )
            lines.append(
                f"  base RSS {_f(bc.get('base_rss_mb_after_login'), '{:.0f}')} MB after login, "
                f"{_f(bc.get('base_rss_mb_after_hold'), '{:.0f}')} MB after the hold; base CPU "
                f"{_f(bc.get('base_cpu_login_s'), '{:.1f}')} s for the logins, "
                f"{_f(bc.get('base_cpu_hold_pct'), '{:.1f}')} % of a core while holding (loadgen on the same cores)"
            )
    lines.append(f"daemon and base logs of these runs: {res.get('logs')}")
    return "\n".join(lines)
