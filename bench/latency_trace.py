"""Where a ping's round trip goes: per-hop wake-up and work times of the overlay daemons (issue #6).

Runs the two-daemon pair of ``make bench``, records scheduler and system-call events with ``perf``
during a series of pings, and splits each round trip into its hops:

    kernel->A tun wake, A tun work (TUN read .. UDP send), wire->B udp wake, B udp work (UDP receive ..
    TUN write), B answer (TUN write .. the echo reply sent, by whichever thread read it), wire->A udp wake,
    A udp work, kernel->ping

Also measures how much one AEAD call costs right after the thread slept for 10 ms compared with a
tight loop (``--cold``): on these shared virtual machines everything a thread touches after an idle
gap runs from cold caches, so the latency of light traffic is set by how much code each hop runs,
not by the per-packet cost a throughput test sees.

``--compare`` traces wireguard-go and this overlay the same way, each on its own pair, and splits
each round trip at the points both tunnels share, whatever their threads: when the echo request is
read from A's TUN, sent by A, received by B, written to B's TUN; the same for the reply; then when
the kernel wakes ``ping`` and when ``ping`` gets a CPU.  That last gap is the time the CPU ``ping`` was
woken on stayed busy with another thread, e.g. a tunnel thread still working after its send.

``--wakeups CONFIG`` lists, for one configuration, how long each woken thread (a daemon thread, ping)
waited for a CPU, by who woke it and whether it was placed on the waker's CPU.

Tracing slows every system call, so the absolute numbers are larger than ``make bench``'s; compare
hops and runs with each other.  ``--probe udp`` (with ``--compare`` or ``--wakeups``) sends UDP
requests that a process on B answers (``bench/udp_echo.py``), ROS 2's kind of traffic, and adds the
two stages of that process.  Needs root and ``perf``.  Usage: ``bench/latency_trace.py [--pings N]
[--interval S] [--cold] [--compare] [--wakeups CONFIG] [--probe ping|udp]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c
import latency_ab
import udp_echo

T = TypeVar("T")

_EVENTS = "sched:sched_switch,sched:sched_wakeup,raw_syscalls:sys_enter,raw_syscalls:sys_exit"
# A ``perf script -F comm,pid,tid,cpu,time,event,trace`` line: comm, pid, tid, CPU, time, event, the rest.
_LINE = re.compile(r"^\s*(\S+)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
# x86-64 system call numbers the daemons' data threads and the probes use.
_READ, _WRITE, _POLL, _SENDTO, _RECVFROM, _SENDMSG, _RECVMSG = 0, 1, 7, 44, 45, 46, 47
# The processes that send a request and take its answer (ping, or ``udp_echo.py client`` for
# ``--probe udp``), and the one that answers a UDP request: parse() marks their events.
CLIENTS = ("ping", udp_echo.CLIENT_NAME)
SERVER = udp_echo.SERVER_NAME
HOPS = (
    "kernel -> A tun wake",
    "A tun work (read .. send)",
    "wire -> B udp wake",
    "B udp work (recv .. TUN write)",
    "B answer (TUN write .. send)",
    "wire -> A udp wake",
    "A udp work (recv .. TUN write)",
    "kernel -> ping",
)


def parse(script_output: str) -> list[tuple[float, str, str, str, str]]:
    """(time us, pid, tid, event, rest) of every line of ``perf script``.

    ``rest`` starts with "probe " for the client's events (ping, or the UDP client) and with "server "
    for the UDP echo server's, so the stages can be told apart by process without its pid.
    """
    out = []
    for line in script_output.splitlines():
        m = _LINE.match(line)
        if m:
            comm, pid, tid, _cpu, t, event, rest = m.groups()
            mark = "probe " if comm in CLIENTS else "server " if comm == SERVER else ""
            out.append((float(t) * 1e6, pid, tid, event, mark + rest))
    return out


def _nr(rest: str) -> int | None:
    m = re.match(r"(?:probe |server )?NR (-?\d+)", rest)
    return int(m.group(1)) if m else None


def _returned_data(rest: str) -> bool:
    """True for a system call exit that returned a positive count (not a failed, empty receive)."""
    m = re.search(r"= (-?\d+)", rest)
    return m is not None and int(m.group(1)) > 0


def roles(events: list[tuple[float, str, str, str, str]], pids: list[int]) -> dict[str, str]:
    """Which thread of each daemon reads the TUN (most reads) and which receives UDP (most recvmsg)."""
    counts: dict[tuple[str, str], dict[int, int]] = {}
    for _t, pid, tid, event, rest in events:
        if int(pid) in pids and event.endswith("sys_enter"):
            nr = _nr(rest)
            if nr is not None:
                per = counts.setdefault((pid, tid), {})
                per[nr] = per.get(nr, 0) + 1
    out: dict[str, str] = {}
    for side, pid in zip("AB", pids, strict=True):
        mine = {tid: n for (p, tid), n in counts.items() if p == str(pid)}
        out[f"{side}tun"] = max(mine, key=lambda t: mine[t].get(_READ, 0))
        out[f"{side}udp"] = max(mine, key=lambda t: mine[t].get(_RECVMSG, 0))
    return out


def split_round_trips(events: list[tuple[float, str, str, str, str]], role: dict[str, str]) -> list[list[float]]:
    """Per round trip, the nine time stamps that bound the hops in HOPS (complete round trips only).

    The echo reply usually leaves from B's UDP thread, which reads it from the TUN right after its
    write (``Datapath._send_answer``); when B's TUN thread was quicker, from that one: either counts.
    """
    by_tid = {tid: name for name, tid in role.items()}
    # (thread, the wake: exit of the TUN thread's poll or of a UDP receive that returned data | enter of
    # the send/write that ends its work) for each stage, in order.  The UDP thread sleeps inside recvmsg.
    wanted = [
        ("Atun", "exit", _POLL),
        ("Atun", "enter", _SENDTO),
        ("Budp", "exit", _RECVMSG),
        ("Budp", "enter", _WRITE),
        ("B", "enter", _SENDTO),
        ("Audp", "exit", _RECVMSG),
        ("Audp", "enter", _WRITE),
    ]
    trips: list[list[float]] = []
    cur: list[float] | None = None
    for t, _pid, tid, event, rest in events:
        nr = _nr(rest)
        if rest.startswith("probe "):
            if event.endswith("sys_enter") and nr == _SENDTO:
                cur = [t]
            elif cur is not None and event.endswith("sys_exit") and nr == _RECVMSG and "= 64" in rest:
                if len(cur) == 8:
                    trips.append([*cur, t])
                cur = None
            continue
        if cur is None or len(cur) > 7:
            continue
        name, kind, want = wanted[len(cur) - 1]
        mine = by_tid.get(tid, "").startswith(name) and event.endswith("sys_" + kind) and nr == want
        if mine and (want != _RECVMSG or _returned_data(rest)):
            cur.append(t)
    return trips


def recorded(events: str, work: Callable[[], T]) -> tuple[T, str]:
    """``work()``'s result and ``perf script``'s text of ``events`` recorded on all CPUs while it ran.

    Without ``--exclude-perf`` perf records its own writes of the trace: each write is a system call
    that is traced and written again: 86 % of the events of a 300-ping trace were perf's own, and
    perf kept a CPU busy that the daemons' threads would otherwise have been woken on.  The larger
    buffer (``-m``) lets perf wake less often to drain it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-m", "4096", "-o", data, "-e", events, "--exclude-perf"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # perf is recording by then
        try:
            result = work()
        finally:
            perf.send_signal(2)
            perf.wait(timeout=60)
        script = subprocess.run(
            ["perf", "script", "-i", data, "-F", "comm,pid,tid,cpu,time,event,trace"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return result, script


def trace(pings: int) -> int:
    lab_ctx = c.Lab(tag="lattrace")
    with lab_ctx as lab:
        pair = c.make_pair(lab)
        sa, sb = lab.tmp / "ov-a", lab.tmp / "ov-b"
        addr_a, addr_b = lab.daemon_address(sa), lab.daemon_address(sb)
        common = {"udp_port": 5582, "no_lan_discovery": True, "interface": "hnet0"}
        daemons = [
            lab.start_daemon(pair.a, sa, peer=[f"{addr_b}@{c.B4}:5582"], whitelist=[addr_b], **common),
            lab.start_daemon(pair.b, sb, peer=[f"{addr_a}@{c.A4}:5582"], whitelist=[addr_a], **common),
        ]
        try:
            if c.wait_ping(lab, pair.a, addr_b, 20) is None:
                print("the overlay did not pass a ping in 20 s", file=sys.stderr)
                return 1
            pids = [d.proc.pid for d in daemons]
            (avg, p99, _loss), script = recorded(_EVENTS, lambda: c.ping(lab, pair.a, addr_b, pings))
        finally:
            for d in daemons:
                d.stop()
    events = parse(script)
    role = roles(events, pids)
    trips = split_round_trips(events, role)
    print(f"ping under tracing: avg {avg:.3f} ms, p99 {p99:.3f} ms; {len(trips)} of {pings} round trips complete")
    if not trips:
        return 1
    for i, hop in enumerate(HOPS):
        print(f"  {hop:34s} median {statistics.median(t[i + 1] - t[i] for t in trips):7.1f} us")
    print(f"  {'round trip':34s} median {statistics.median(t[-1] - t[0] for t in trips):7.1f} us")
    return 0


# Where both tunnels' round trips can be cut: (side, event, system calls) in the order a round trip
# passes them; a read or receive counts when it returned data, a write or send when it started.
STAGES = (
    ("A", "exit", (_READ,), "A reads the request from its TUN"),
    ("A", "enter", (_SENDTO, _SENDMSG), "A sends it"),
    ("B", "exit", (_RECVMSG,), "B receives it"),
    ("B", "enter", (_WRITE,), "B writes it to its TUN"),
    ("B", "exit", (_READ,), "B reads the reply from its TUN"),
    ("B", "enter", (_SENDTO, _SENDMSG), "B sends it"),
    ("A", "exit", (_RECVMSG,), "A receives it"),
    ("A", "enter", (_WRITE,), "A writes it to its TUN"),
)


# With ``--probe udp`` a process on B answers: between B's TUN write and B's TUN read of the reply.
SERVER_STAGES = (
    ("S", "exit", (_RECVFROM,), "the server has the request"),
    ("S", "enter", (_SENDTO,), "the server sends the reply"),
)


def stages(probe: str) -> tuple[tuple[str, str, tuple[int, ...], str], ...]:
    """The stages a round trip of ``probe`` ("ping" or "udp") passes, in order."""
    return STAGES if probe == "ping" else STAGES[:4] + SERVER_STAGES + STAGES[4:]


def stage_times(
    events: list[tuple[float, str, str, str, str]], side_pids: dict[str, int], probe: str = "ping"
) -> list[list[float]]:
    """Per complete round trip: the client's send, the stages, client woken, on a CPU, its receive (us)."""
    side_of = {pid: side for side, pid in side_pids.items()}
    passes = stages(probe)
    client = "ping" if probe == "ping" else udp_echo.CLIENT_NAME
    trips: list[list[float]] = []
    cur: list[float] | None = None
    for t, pid, _tid, event, rest in events:
        nr = _nr(rest)
        is_client = rest.startswith("probe ")  # parse() marks the client's own events so
        if is_client and event.endswith("sys_enter") and nr == _SENDTO:
            cur = [t]
            continue
        if cur is None:
            continue
        n = len(cur) - 1  # stages passed so far
        if n < len(passes):
            side, kind, calls = passes[n][:3]
            where = "S" if rest.startswith("server ") else side_of.get(int(pid))
            ok = where == side and event.endswith("sys_" + kind) and nr in calls
            if ok and kind == "exit":
                ok = _returned_data(rest)
            if ok:
                cur.append(t)
        elif n < len(passes) + 2:  # the kernel wakes the client, then it gets a CPU
            woken = n == len(passes)
            if (
                event.endswith("sched_wakeup" if woken else "sched_switch")
                and (f"comm={client} " if woken else f"next_comm={client} ") in rest + " "
            ):
                cur.append(t)
        elif n == len(passes) + 2 and is_client and event.endswith("sys_exit") and nr in (_RECVMSG, _RECVFROM):
            trips.append([*cur, t])
            cur = None
    return trips


def traced_pings(
    lab: c.Lab, config: str, tag: str, pings: int, interval: float = 0.01, probe: str = "ping"
) -> tuple[float, dict[str, int], str]:
    """Round trip average (ms), each side's daemon pid and ``perf script`` text of ``pings`` round trips.

    ``probe`` "udp" sends UDP requests that ``udp_echo.py`` answers on B instead of pings.
    """
    run = latency_ab.Running(lab, c.make_pair(lab, tag=tag), config, probe=probe)
    try:
        # One process per side, A's started first (through ``ip netns exec``, which may fork); a UDP
        # probe's echo server comes after them.
        procs = [d.proc for d in run.daemons] or run.procs[:2]
        side_pids = {side: max(c.descendants(p.pid)) for side, p in zip("AB", procs, strict=True)}
        (avg, _p99), script = recorded(_EVENTS, functools.partial(run.ping, pings, interval))
    finally:
        run.stop()
    return avg, side_pids, script


def compare(pings: int, interval: float = 0.01, configs: tuple[str, ...] = ("wg", "ours"), probe: str = "ping") -> int:
    """Trace each configuration the same way and print each round trip's stages side by side."""
    why = c.have_wireguard_go() if "wg" in configs else None
    if why:
        print(why, file=sys.stderr)
        return 2
    names = [f"{i}. {stage[3]}" for i, stage in enumerate(stages(probe), 1)]
    client = "ping" if probe == "ping" else "the client"
    names += [f"the kernel wakes {client}", f"{client} gets a CPU", f"{client} has the reply"]
    medians: dict[str, list[float]] = {}
    with c.Lab(tag="latcmp") as lab:
        for i, config in enumerate(configs):
            avg, side_pids, script = traced_pings(lab, config, f"cmp{i}", pings, interval, probe)
            trips = stage_times(parse(script), side_pids, probe)
            print(f"{config}: {probe} under tracing avg {avg:.3f} ms; {len(trips)} of {pings} round trips complete")
            if not trips:
                return 1
            medians[config] = [statistics.median(t[k + 1] - t[k] for t in trips) for k in range(len(names))]
            medians[config].append(statistics.median(t[-1] - t[0] for t in trips))
    width = max(12, *(len(config) for config in configs))
    print(f"\n{'median us, from the previous stage to':42s}" + "".join(f" {config:>{width}s}" for config in configs))
    for k, name in enumerate([*names, "round trip"]):
        print(f"  {name:40s}" + "".join(f" {medians[config][k]:{width}.1f}" for config in configs))
    return 0


_WAKEUP = re.compile(r"comm=(\S+) pid=(\d+) .*target_cpu=(\d+)")
_NEXT_PID = re.compile(r"next_pid=(\d+)")


def wakeup_gaps(script_output: str, side_pids: dict[str, int]) -> dict[tuple[str, str, bool], list[float]]:
    """Wake-to-run times (us) by (waker, wakee, placed on the waker's CPU) from ``perf script`` with CPUs.

    A daemon thread is named by its side and its kernel name ("A:udp-rx:5582", see
    ``core/threads.py``; the thread id where it has none of its own), the probes by their names ("ping",
    "udpecho-client", "udpecho-serve"), a wakeup from an
    interrupt or the idle task as "irq", anything else as "other"; only wakees of the daemons and ping
    count.  On a 2-vCPU virtual machine the kernel wakes almost everything on the waker's CPU, so the
    wakee runs only once the waker sleeps (or its slice ends): the time each thread keeps the CPU after
    it handed a packet over is then part of the round trip, and this table shows it per hand-over.
    """
    side_of = {pid: side for side, pid in side_pids.items()}
    pid_of: dict[int, int] = {}
    comm_of: dict[int, str] = {}
    events = []
    for line in script_output.splitlines():
        m = _LINE.match(line)
        if m:
            comm, pid, tid, cpu, t, event, rest = m.groups()
            pid_of[int(tid)] = int(pid)
            comm_of[int(tid)] = comm
            events.append((float(t) * 1e6, int(pid), int(tid), int(cpu), event, rest))

    def name(pid: int, tid: int | None = None) -> str:
        side = side_of.get(pid)
        if side is None:
            comm = comm_of.get(tid, "") if tid is not None else ""
            return comm if comm in (*CLIENTS, SERVER) else "irq" if pid == 0 else "other"
        if tid is None:
            return side
        comm = comm_of.get(tid, "")
        return f"{side}:{comm}" if comm and not comm.startswith("python") else f"{side}:{tid}"

    pending: dict[int, tuple[float, str, str, bool]] = {}
    out: dict[tuple[str, str, bool], list[float]] = {}
    for t, pid, tid, cpu, event, rest in events:
        if event.endswith("sched_wakeup"):
            m = _WAKEUP.search(rest)
            if m is None:
                continue
            comm, wtid, target = m.group(1), int(m.group(2)), int(m.group(3))
            wakee = comm if comm in (*CLIENTS, SERVER) else name(pid_of.get(wtid, -1), wtid)
            if wakee not in ("irq", "other"):
                pending[wtid] = (t, name(pid, tid), wakee, target == cpu)
        elif event.endswith("sched_switch"):
            m = _NEXT_PID.search(rest)
            woken = pending.pop(int(m.group(1)), None) if m else None
            if woken is not None:
                t0, waker, wakee, same = woken
                out.setdefault((waker, wakee, same), []).append(t - t0)
    return out


def wakeups(pings: int, config: str, interval: float = 0.01, probe: str = "ping") -> int:
    """Trace one configuration's pair during round trips and print :func:`wakeup_gaps` as a table."""
    with c.Lab(tag="latwake") as lab:
        avg, side_pids, script = traced_pings(lab, config, "wk0", pings, interval, probe)
    gaps = wakeup_gaps(script, side_pids)
    print(f"{config}: {probe} under tracing avg {avg:.3f} ms; wake -> run, us (median)")
    print(f"  {'waker':18s} {'wakee':18s} {'CPU':7s} {'count':>6s} {'median':>8s}")
    for (waker, wakee, same), times in sorted(gaps.items()):
        if len(times) >= pings // 10:
            where = "waker's" if same else "other"
            print(f"  {waker:18s} {wakee:18s} {where:7s} {len(times):6d} {statistics.median(times):8.1f}")
    return 0 if gaps else 1


def cold() -> None:
    """One AES-GCM seal of 104 bytes, hot versus after an idle gap of the calling thread."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(os.urandom(32))
    nonce, pkt = bytes(12), os.urandom(104)
    for gap in (0.0, 0.0001, 0.001, 0.01):
        times = []
        for _ in range(200):
            if gap:
                time.sleep(gap)
            t = time.perf_counter_ns()
            aead.encrypt(nonce, pkt, None)
            times.append(time.perf_counter_ns() - t)
        print(f"  AES-GCM seal after {gap * 1e3:5.1f} ms idle: median {statistics.median(times) / 1000:6.1f} us")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pings", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.01, help="seconds between pings")
    p.add_argument("--cold", action="store_true", help="also measure cold versus hot AEAD calls")
    p.add_argument(
        "--probe",
        choices=("ping", "udp"),
        default="ping",
        help="with --compare or --wakeups: pings, or UDP requests a process answers (bench/udp_echo.py)",
    )
    p.add_argument(
        "--compare",
        nargs="*",
        metavar="CONFIG",
        help="trace configurations (default: wg ours; as in latency_ab.py) stage by stage",
    )
    p.add_argument(
        "--wakeups",
        metavar="CONFIG",
        help="wake-to-run time of every hand-over between threads, for one configuration (wg, ours, ours:...)",
    )
    args = p.parse_args(argv)
    if args.cold:
        cold()
    if os.geteuid() != 0:
        print("latency_trace needs root (network namespaces, perf -a)", file=sys.stderr)
        return 2
    if shutil.which("perf") is None:
        print("latency_trace needs perf (Debian: apt install linux-perf)", file=sys.stderr)
        return 2
    if args.wakeups:
        return wakeups(args.pings, args.wakeups, args.interval, args.probe)
    if args.compare is not None:
        return compare(args.pings, args.interval, tuple(args.compare) or ("wg", "ours"), args.probe)
    return trace(args.pings)


if __name__ == "__main__":
    sys.exit(main())
