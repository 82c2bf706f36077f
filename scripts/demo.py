#!/usr/bin/env python3
"""``make demo``: a base server and simulated robots in network namespaces, connected by husarnet_ros.

What a newcomer sees, in well under two minutes (DESIGN.md section 1.6):

1. a small "Internet" built from network namespaces: a base server, robot1 and robot2 behind two
   different NAT routers, and robot3 with a laptop on a LAN that has no route to the base at all;
2. every node's self-certifying fc94 address (derived from its key);
3. the nodes finding each other: robot1 <-> robot2 through both NATs (the base introduces them, then
   they punch holes and talk directly), robot3 <-> laptop by LAN multicast, with no base;
4. pings over the overlay and each node's peer table (address, hostname, path, endpoint, RTT);
5. a ROS 2 topic crossing the overlay: an rclpy talker on robot1 and a listener on robot2, both using
   the Fast DDS profile husarnet_ros writes for them (UDPv6 on the overlay only).

``--quick`` shows only the first step of it all: two namespaces, two daemons, addresses and a ping.
Everything runs as root in namespaces whose names carry this PID; they, the daemons and the ROS
processes are removed on exit, also after Ctrl-C or a failure. Nothing touches the real network.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "husarnet_ros"))

from husarnet_ros import dds  # noqa: E402
from husarnet_ros.testing import e2e, traffic  # noqa: E402
from husarnet_ros.testing.netns import Daemon, Lab, LabError, reference_topology, wait_until  # noqa: E402

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = GREEN = RED = RESET = ""

START = time.monotonic()


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET} {DIM}(t={time.monotonic() - START:.0f}s){RESET}", flush=True)


def info(text: str = "") -> None:
    print(f"   {text}", flush=True)


def ok(text: str) -> None:
    print(f"   {GREEN}ok{RESET} {text}", flush=True)


def fail(text: str) -> None:
    print(f"   {RED}FAILED{RESET} {text}", flush=True)


def peer_table(name: str, d: Daemon) -> None:
    peers = d.peers()
    info(f"{BOLD}{name}{RESET} ({d.address}) knows {len(peers)} peer(s):")
    info(f"  {'HOSTNAME':<8} {'ADDRESS':<40} {'PATH':<7} {'ENDPOINT':<22} {'RTT':>8}")
    for p in peers:
        rtt = f"{p.get('rtt_ms', 0):.1f} ms" if p.get("rtt_ms") else "-"
        info(f"  {p.get('hostname') or '?':<8} {p['address']:<40} {p['path']:<7} {p['endpoint']!s:<22} {rtt:>8}")


def show_ping(lab: Lab, src_name: str, src, dst_name: str, dst: Daemon) -> bool:
    r = traffic.ping(lab, src, dst.address, count=3, interval=0.3, wait=2)
    rtts = ", ".join(f"{x:.2f}" for x in r.rtts_ms) or "none"
    line = f"ping {src_name} -> {dst_name} ({dst.address}): {r.received}/{r.transmitted} replies, RTT ms: {rtts}"
    (ok if r.received else fail)(line)
    return r.received > 0


# ------------------------------------------------------------------------------------------------ quick


def quick_demo(lab: Lab, scale: float) -> bool:
    step("Two network namespaces on one virtual switch")
    sw = lab.bridge("switch")
    a, b = lab.host("robot1"), lab.host("robot2")
    lab.link(a, sw, "198.18.10.1/24")
    lab.link(b, sw, "198.18.10.2/24")
    info("robot1 198.18.10.1 --- switch --- robot2 198.18.10.2")
    step("One husarnet_ros daemon in each; they whitelist each other")
    addr = {n: lab.daemon_address(lab.tmp / f"state-{n}") for n in ("robot1", "robot2")}
    da = lab.start_daemon(
        a,
        lab.tmp / "state-robot1",
        whitelist=[f"{addr['robot2']}=robot2"],
        peer=[f"{addr['robot2']}@198.18.10.2:5582"],
        timers_scale=scale,
    )
    db = lab.start_daemon(
        b,
        lab.tmp / "state-robot2",
        whitelist=[f"{addr['robot1']}=robot1"],
        peer=[f"{addr['robot1']}@198.18.10.1:5582"],
        timers_scale=scale,
    )
    info(f"robot1 = {da.address}")
    info(f"robot2 = {db.address}")
    step("Ping over the overlay (hnet0)")
    good = show_ping(lab, "robot1", a, "robot2", db)
    peer_table("robot1", da)
    return good


# ------------------------------------------------------------------------------------------------ full


def ros_available() -> str | None:
    res = subprocess.run([sys.executable, "-c", "import rclpy, std_msgs.msg"], capture_output=True, text=True)
    if res.returncode != 0:
        return (res.stderr.strip().splitlines() or ["?"])[-1]
    return None


def full_demo(lab: Lab, scale: float, with_ros: bool) -> bool:
    good = True
    step("Building the network (namespaces, veths, two NAT routers)")
    t = reference_topology(lab)
    info("  base 198.18.0.1 ----+                      +---- natA 198.18.0.2 ==== robot1 198.18.1.2")
    info("                      +---- wan switch ------+---- natB 198.18.0.3 ==== robot2 198.18.2.2")
    info("  robot3 198.18.3.2 --+---- lan switch ------+---- laptop 198.18.3.3   (this LAN has no route to base)")
    info(f"{DIM}namespaces: {lab.prefix}-*; NATs masquerade and drop unsolicited inbound UDP{RESET}")

    step("Starting the base server (rendezvous + relay) in 'base'")
    base = e2e.start_base(lab, t, timers_scale=scale)
    info(f"base listens on 198.18.0.1 TCP 443 / UDP 5582, key {base.pubkey[:16]}... (pinned by the robots)")

    step("Every node gets a key; its fc94 address is the key's hash (nobody can claim it without the key)")
    hosts = {"robot1": t.peerA, "robot2": t.peerB, "robot3": t.peerC, "laptop": t.peerD}
    addr = {n: lab.daemon_address(lab.tmp / f"state-{n}") for n in hosts}
    for n, a in addr.items():
        info(f"{n:<7} {a}")

    step("Starting the daemons: robot1/robot2 use the base; robot3/laptop only LAN discovery")
    trust = {"robot1": ["robot2"], "robot2": ["robot1"], "robot3": ["laptop"], "laptop": ["robot3"]}
    ds: dict[str, Daemon] = {}
    for n, h in hosts.items():
        opts: dict = {
            "whitelist": [f"{addr[o]}={o}" for o in trust[n]],
            "peer": [addr[o] for o in trust[n]],
            "timers_scale": scale,
            "hostname": n,
        }
        if n in ("robot1", "robot2"):
            opts["base"] = [base.spec]
        ds[n] = lab.start_daemon(h, lab.tmp / f"state-{n}", **opts)
        info(f"{n:<7} daemon up, hnet0 = {addr[n]}/16, whitelist = {', '.join(trust[n])}")

    step("Waiting for connections")
    for n in ("robot1", "robot2"):
        if wait_until(lambda n=n: ds[n].status()["base"] != "none", 15):
            ok(f"{n} logged in to the base ({ds[n].status()['base'].upper()})")
        else:
            fail(f"{n} could not log in to the base")
            good = False
    traffic.ping(lab, t.peerA, addr["robot2"], count=1, wait=2)  # first packet triggers the handshake
    traffic.ping(lab, t.peerC, addr["laptop"], count=1, wait=2)
    for a, b, paths, what in (
        ("robot1", "robot2", ("direct",), "direct through both NATs (hole punched)"),
        ("robot3", "laptop", ("lan",), "on the LAN (found by multicast beacons, no base)"),
    ):
        try:
            ds[a].wait_path(addr[b], paths=paths, timeout=30)
            ok(f"{a} <-> {b}: {what}")
        except LabError as exc:
            fail(str(exc))
            good = False

    step("Pings over the overlay")
    good &= show_ping(lab, "robot1", t.peerA, "robot2", ds["robot2"])
    good &= show_ping(lab, "laptop", t.peerD, "robot3", ds["robot3"])

    step("Peer tables (from each daemon's control socket)")
    for n in hosts:
        peer_table(n, ds[n])

    if with_ros:
        good &= ros_topic(lab, t, ds)
    return good


def ros_topic(lab: Lab, t, ds: dict[str, Daemon]) -> bool:
    step("A ROS 2 topic crossing the overlay: talker on robot1 -> listener on robot2")
    why = ros_available()
    if why:
        fail(f"rclpy is not importable here ({why}); run through `make demo`, which sources the ROS env")
        return False
    envs = {}
    for me, other in (("robot1", "robot2"), ("robot2", "robot1")):
        d = ds[me]
        out = d.state_dir / "dds"
        dds.write_dds_config(out, d.address, [ds[other].address])
        env = dds.parse_dds_env((out / dds.ENV_FILE).read_text())
        envs[me] = {**env, "ROS_DOMAIN_ID": "42", "ROS_LOG_DIR": str(lab.tmp / f"roslog-{me}")}
        info(
            f"{me}: Fast DDS profile {out / dds.FASTDDS_FILE} (written by husarnet_ros.dds: UDPv6 on "
            f"{d.address} only, initial peer {ds[other].address})"
        )
    listener = lab.spawn(
        t.peerB,
        [sys.executable, "-m", "husarnet_ros.testing.ros_chat", "listen", "--count", "5", "--timeout", "45"],
        env=envs["robot2"],
        log=lab.tmp / "listener.log",
    )
    talker = lab.spawn(
        t.peerA,
        [
            sys.executable,
            "-m",
            "husarnet_ros.testing.ros_chat",
            "talk",
            "--prefix",
            "robot1",
            "--count",
            "120",
            "--period",
            "0.4",
        ],
        env=envs["robot1"],
        log=lab.tmp / "talker.log",
    )
    info("waiting for DDS discovery over the overlay (a few seconds)...")
    shown = 0
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline:
        lines = [ln for ln in listener.output().splitlines() if ln.startswith("heard:")]
        for ln in lines[shown:]:
            ok(f"robot2 {ln}")
        shown = len(lines)
        if not listener.alive:
            break
        time.sleep(0.2)
    talker.stop()
    code = listener.wait(timeout=5) if not listener.alive else listener.stop()
    if code == 0 and shown >= 5:
        ok(f"robot2 received {shown} messages from robot1 over fc94 addresses only (no shared memory, no LAN)")
        return True
    fail(f"listener got {shown} message(s); last output:\n{listener.tail(10)}\n--- talker:\n{talker.tail(5)}")
    return False


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only two namespaces, two daemons and a ping")
    ap.add_argument("--no-ros", action="store_true", help="skip the ROS 2 topic step")
    ap.add_argument(
        "--timers-scale",
        type=float,
        default=0.1,
        help="shrink protocol timers so the demo is quick (default %(default)s)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces and TUN devices): run it with sudo.", file=sys.stderr)
        return 1

    def on_term(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    print(f"{BOLD}husarnet_ros demo{RESET}: peer-to-peer IPv6 overlay for ROS 2 robots (timers x{args.timers_scale})")
    good = False
    lab = Lab("demo")
    try:
        good = quick_demo(lab, args.timers_scale) if args.quick else full_demo(lab, args.timers_scale, not args.no_ros)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    except LabError as exc:
        fail(str(exc))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the cleanup even if Ctrl-C is pressed again
        step("Cleaning up: stopping daemons, base and ROS processes; deleting namespaces")
        for d in lab.daemons:
            code = d.stop()
            if code not in (0, None):
                info(f"daemon in {d.host.name} exited with {code}")
        leaks = lab.cleanup()
        if leaks or lab.existing_namespaces():
            fail(f"left behind: {leaks or lab.existing_namespaces()}")
        else:
            ok("nothing left behind")
    print(
        f"\n{BOLD}{'demo finished' if good else 'demo finished with failures'}{RESET} "
        f"in {time.monotonic() - START:.0f}s",
        flush=True,
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
