#!/usr/bin/env python3
"""``make demo``: a base server and simulated robots in network namespaces, connected by husarnet_ros.

What a newcomer sees, in well under two minutes (DESIGN.md section 1.6):

1. a small "Internet" built from network namespaces: a base server, robot1 and robot2 behind two
   different NAT routers, and robot3 with a laptop on a LAN that has no route to the base at all;
2. every node's self-certifying fc94 address (derived from its key);
3. the nodes finding each other: robot1 <-> robot2 through both NATs (the base introduces them, then
   they punch holes and talk directly), robot3 <-> laptop by LAN multicast, with no base;
4. pings over the overlay and each node's peer table (address, hostname, path, endpoint, RTT);
5. robot1 runs the real ``husarnet`` lifecycle node (what ``ros2 launch husarnet_ros husarnet.launch.py``
   starts, here ``python -m husarnet_ros.node --ros-args --params-file ...`` with ``autostart``) instead
   of the daemon, and the demo shows what ``ros2 topic echo /husarnet/peers --once`` and
   ``ros2 service call /husarnet/whitelist/list`` / ``/husarnet/ping`` print there (an rclpy client,
   :mod:`husarnet_ros.testing.ros_probe`, on a ROS domain local to robot1's namespace);
6. a ROS 2 topic crossing the overlay: an rclpy talker on robot1 and a listener on robot2, both using
   the Fast DDS profile husarnet_ros writes for them (UDPv6 on the overlay only).

Without a ROS environment (or with ``--no-ros``) robot1 runs the daemon like the others and steps 5-6
are left out.

``--quick`` shows only the first step of it all: two namespaces, two daemons, addresses and a ping.
Everything runs as root in namespaces whose names carry this PID; they, the daemons and the ROS
processes are removed on exit, also after Ctrl-C or a failure. Nothing touches the real network.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "husarnet_ros"))

from husarnet_ros import dds  # noqa: E402
from husarnet_ros.testing import e2e, traffic  # noqa: E402
from husarnet_ros.testing.netns import Daemon, Host, Lab, LabError, Proc, reference_topology, wait_until  # noqa: E402

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
    peer_rows(peers)


def peer_rows(peers: list[dict]) -> None:
    """Daemon control-socket peers and husarnet_msgs/Peer (as dicts) alike; no RTT is 0 or -1."""
    info(f"  {'HOSTNAME':<8} {'ADDRESS':<40} {'PATH':<7} {'ENDPOINT':<22} {'RTT':>8}")
    for p in peers:
        rtt = f"{p['rtt_ms']:.1f} ms" if (p.get("rtt_ms") or 0) > 0 else "-"
        info(f"  {p.get('hostname') or '?':<8} {p['address']:<40} {p['path']:<7} {p['endpoint']!s:<22} {rtt:>8}")


def show_ping(lab: Lab, src_name: str, src, dst_name: str, dst: str) -> bool:
    r = traffic.ping(lab, src, dst, count=3, interval=0.3, wait=2)
    rtts = ", ".join(f"{x:.2f}" for x in r.rtts_ms) or "none"
    line = f"ping {src_name} -> {dst_name} ({dst}): {r.received}/{r.transmitted} replies, RTT ms: {rtts}"
    (ok if r.received else fail)(line)
    return r.received > 0


# ------------------------------------------------------------------------------------------------ ROS node

#: ROS domain of robot1's own husarnet node and of the probe that reads it. With
#: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and no overlay profile they only find each other on
#: robot1's loopback, the way `ros2 topic echo` finds a node on the same machine.
NODE_DOMAIN = "17"
#: ROS domain of the talker/listener, which use the overlay profile instead.
TALK_DOMAIN = "42"


def node_env(lab: Lab, name: str) -> dict[str, str]:
    return {
        "ROS_DOMAIN_ID": NODE_DOMAIN,
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_LOG_DIR": str(lab.tmp / f"roslog-{name}-node"),
        "RCUTILS_COLORIZED_OUTPUT": "0",
    }


def start_node(lab: Lab, host: Host, name: str, address: str, params: dict) -> Proc:
    """``python -m husarnet_ros.node --ros-args --params-file <yaml>`` in ``host``; wait for its hnet0.

    The YAML has the layout of config/husarnet.yaml, so it is what a user would pass to the launch
    file as ``config_file:=...``.
    """
    params_file = lab.tmp / f"husarnet-{name}.yaml"
    params_file.write_text(yaml.safe_dump({"husarnet": {"ros__parameters": params}}, sort_keys=False))
    proc = lab.spawn(
        host,
        [sys.executable, "-m", "husarnet_ros.node", "--ros-args", "--params-file", str(params_file)],
        env=node_env(lab, name),
        log=lab.tmp / f"node-{name}.log",
    )
    NODES.append(proc)

    def up() -> bool:
        res = lab.run(host, ["ip", "-6", "-o", "addr", "show", "dev", "hnet0"], check=False)
        return res.returncode == 0 and f" {address}/" in res.stdout

    if not wait_until(up, 30, 0.2, alive=proc):
        raise LabError(f"husarnet node in {name} did not bring hnet0 up with {address}:\n{proc.tail(15)}")
    info(f"{DIM}parameters: {params_file}{RESET}")
    return proc


#: husarnet lifecycle node processes the demo started (stopped in main's cleanup, before the lab's).
NODES: list[Proc] = []


class Probe:
    """husarnet_ros.testing.ros_probe running next to a node; its JSON lines by event name."""

    def __init__(self, proc: Proc):
        self.proc = proc

    def events(self) -> dict[str, dict]:
        out = {}
        for line in self.proc.output().splitlines():
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                out[ev.get("event", "?")] = ev
        return out

    def wait(self, event: str, timeout: float) -> dict | None:
        """The event, or None after ``timeout``, an error event or the probe's exit."""
        wait_until(lambda: bool({event, "error"} & self.events().keys()), timeout, 0.2, alive=self.proc)
        return self.events().get(event)

    def why(self) -> str:
        err = self.events().get("error")
        return err["message"] if err else f"probe exited {self.proc.returncode}:\n{self.proc.tail(8)}"


def start_probe(lab: Lab, host: Host, name: str, peer: str, peer_name: str) -> Probe:
    argv = [sys.executable, "-m", "husarnet_ros.testing.ros_probe", "--wait-base", "--peer", peer]
    argv += ["--path", "direct", "--whitelist", "--ping", peer_name, "--timeout", "60"]
    proc = lab.spawn(host, argv, env=node_env(lab, f"{name}-probe"), log=lab.tmp / f"probe-{name}.log")
    return Probe(proc)


def cli(command: str) -> None:
    """The ros2 command whose output the next lines stand for."""
    info(f"{DIM}${RESET} {BOLD}{command}{RESET}")


def show_node_services(probe: Probe) -> bool:
    step("robot1's husarnet node through its ROS 2 services (probe in robot1's namespace)")
    good = True
    cli("ros2 service call /husarnet/whitelist/list husarnet_msgs/srv/ListWhitelist")
    wl = probe.wait("whitelist", 15)
    if wl:
        n = len(wl["addresses"])
        ok(f"whitelist {'enabled' if wl['enabled'] else 'DISABLED'}, {n} {'entry' if n == 1 else 'entries'}:")
        for a, h in zip(wl["addresses"], wl["hostnames"], strict=True):
            info(f"  {h or '?':<8} {a}")
    else:
        fail(f"no answer from /husarnet/whitelist/list: {probe.why()}")
        good = False
    cli('ros2 service call /husarnet/ping husarnet_msgs/srv/PingPeer "{address: robot2}"')
    ping = probe.wait("ping", 15)
    if ping and ping["success"]:
        ok(f"rtt_ms: {ping['rtt_ms']:.2f} ({ping['message']}, authenticated probe inside the session)")
    else:
        fail(f"/husarnet/ping: {ping['message'] if ping else probe.why()}")
        good = False
    return good


def show_hosts_file(path: Path, name: str, address: str) -> bool:
    """The node's hosts_file parameter (a temp file standing in for /etc/hosts) names its peers."""
    info(f"{DIM}${RESET} {BOLD}getent hosts {name}{RESET}   (hosts_file here: {path}, not /etc/hosts)")

    def entry() -> list[str] | None:
        rows = [ln.split() for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        return next((r for r in rows if r and r[0] == address and name in r[1:]), None)

    if wait_until(lambda: entry() is not None, 5):
        ok(" ".join(entry() or []))
        return True
    fail(f"{path} has no line for {name} -> {address}:\n{path.read_text()}")
    return False


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
    good = show_ping(lab, "robot1", a, "robot2", db.address)
    peer_table("robot1", da)
    return good


# ------------------------------------------------------------------------------------------------ full


def ros_available() -> str | None:
    """None when rclpy, std_msgs and the built husarnet_msgs import (in a child: the parent stays ROS-free).

    Importing the classes matters: from the repo root the source dir husarnet_msgs/ imports as an
    empty namespace package.
    """
    probe = (
        "import rclpy, std_msgs.msg; from husarnet_msgs.msg import PeerArray; from husarnet_msgs.srv import PingPeer"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return (res.stderr.strip().splitlines() or ["?"])[-1]
    return None


def full_demo(lab: Lab, scale: float, with_ros: bool) -> bool:
    good = True
    why = ros_available() if with_ros else "--no-ros"
    if with_ros and why:
        fail(f"no ROS 2 here ({why}); run through `make demo`, which sources the ROS env")
        good = False
    use_node = not why
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
    state = {n: lab.tmp / f"state-{n}" for n in hosts}
    addr = {n: lab.daemon_address(state[n]) for n in hosts}
    for n, a in addr.items():
        info(f"{n:<7} {a}")

    if use_node:
        step("Starting robot1 as a ROS 2 lifecycle node, the others as daemons; robot3/laptop only LAN discovery")
    else:
        step("Starting the daemons: robot1/robot2 use the base; robot3/laptop only LAN discovery")
    trust = {"robot1": ["robot2"], "robot2": ["robot1"], "robot3": ["laptop"], "laptop": ["robot3"]}
    ds: dict[str, Daemon] = {}
    probe: Probe | None = None
    for n, h in hosts.items():
        if n == "robot1" and use_node:
            hosts_file = lab.tmp / "hosts-robot1"
            hosts_file.touch()
            cli("ros2 launch husarnet_ros husarnet.launch.py config_file:=<yaml>  (here: python -m husarnet_ros.node)")
            start_node(
                lab,
                h,
                n,
                addr[n],
                {
                    "state_dir": str(state[n]),
                    "hostname": n,
                    "base_servers": [base.spec],
                    "whitelist": [f"{addr[o]} {o}" for o in trust[n]],
                    "peers": [addr[o] for o in trust[n]],
                    "udp_port": 5582,
                    "lan_discovery": True,
                    "hosts_file": str(hosts_file),
                    "dds": {"enabled": True},
                    "autostart": True,
                    "publish_period": 0.5,
                },
            )
            probe = start_probe(lab, h, n, addr["robot2"], "robot2")
            info(f"{n:<7} husarnet node active, hnet0 = {addr[n]}/16, whitelist = {', '.join(trust[n])}")
            continue
        opts: dict = {
            "whitelist": [f"{addr[o]}={o}" for o in trust[n]],
            "peer": [addr[o] for o in trust[n]],
            "timers_scale": scale,
            "hostname": n,
        }
        if n in ("robot1", "robot2"):
            opts["base"] = [base.spec]
        ds[n] = lab.start_daemon(h, state[n], **opts)
        info(f"{n:<7} daemon up, hnet0 = {addr[n]}/16, whitelist = {', '.join(trust[n])}")

    step("Waiting for connections")
    for n in ("robot1", "robot2"):
        if n not in ds:
            assert probe is not None
            st = probe.wait("status", 30)
            if st:
                ok(f"{n} logged in to the base ({st['base_connection'].upper()}), as /husarnet/status says")
            else:
                fail(f"{n} could not log in to the base: {probe.why()}")
                good = False
        elif wait_until(lambda n=n: ds[n].status()["base"] != "none", 15):
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
        seen_by = a if a in ds else b  # a node has no control socket: ask the daemon at the other end
        other = b if seen_by == a else a
        try:
            ds[seen_by].wait_path(addr[other], paths=paths, timeout=30)
            ok(f"{a} <-> {b}: {what}")
        except LabError as exc:
            fail(str(exc))
            good = False

    step("Pings over the overlay")
    good &= show_ping(lab, "robot1", t.peerA, "robot2", addr["robot2"])
    good &= show_ping(lab, "laptop", t.peerD, "robot3", addr["robot3"])

    step("Peer tables (daemons: control socket; robot1's node: its ROS topic)")
    for n in hosts:
        if n in ds:
            peer_table(n, ds[n])
            continue
        assert probe is not None
        cli("ros2 topic echo /husarnet/peers --once   (in robot1's namespace)")
        ev = probe.wait("peers", 30)
        if ev:
            info(f"{BOLD}{n}{RESET} ({addr[n]}) knows {len(ev['peers'])} peer(s):")
            peer_rows(ev["peers"])
            direct = [p for p in ev["peers"] if p["address"] == addr["robot2"] and p["path"] == "direct"]
            if direct:
                ok(f"robot1's PeerArray on /husarnet/peers: robot2 path direct, rtt {direct[0]['rtt_ms']:.1f} ms")
            else:
                fail("robot1's PeerArray on /husarnet/peers has no direct path to robot2")
                good = False
        else:
            fail(f"no PeerArray on /husarnet/peers with a direct path to robot2: {probe.why()}")
            good = False

    if probe is not None:
        good &= show_node_services(probe)
        good &= show_hosts_file(lab.tmp / "hosts-robot1", "robot2", addr["robot2"])
    if use_node:
        good &= ros_topic(lab, t, addr, state, node_wrote={"robot1"})
    return good


def ros_topic(lab: Lab, t, addr: dict[str, str], state: dict[str, Path], node_wrote: set[str]) -> bool:
    step("A ROS 2 topic crossing the overlay: talker on robot1 -> listener on robot2")
    envs = {}
    for me, other in (("robot1", "robot2"), ("robot2", "robot1")):
        out = state[me] / "dds"
        if me in node_wrote:
            # The node keeps <state_dir>/dds in step with its whitelist; use its files as a user would.
            if not wait_until(lambda out=out: (out / dds.ENV_FILE).exists(), 10):
                fail(f"the husarnet node on {me} wrote no {out / dds.ENV_FILE}")
                return False
            who = "written by robot1's husarnet node"
        else:
            dds.write_dds_config(out, addr[me], [addr[other]])
            who = "written by husarnet_ros.dds"
        env = dds.parse_dds_env((out / dds.ENV_FILE).read_text())
        envs[me] = {**env, "ROS_DOMAIN_ID": TALK_DOMAIN, "ROS_LOG_DIR": str(lab.tmp / f"roslog-{me}")}
        peers = dds.peers_in_fastdds_xml((out / dds.FASTDDS_FILE).read_bytes())
        info(
            f"{me}: Fast DDS profile {out / dds.FASTDDS_FILE} ({who}: UDPv6 on "
            f"{addr[me]} only, initial peer {', '.join(sorted(set(peers) - {addr[me]}))})"
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
    # A shell that sourced some dds.env must not put robot1's node (which has to stay reachable on its
    # own loopback) on an overlay profile: the talker and listener get theirs explicitly.
    for var in dds.ENV_VARIABLES:
        os.environ.pop(var, None)
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
        for proc in NODES:
            code = proc.stop(timeout=10)
            if code not in (0, None):
                info(f"husarnet node in {proc.ns.name} exited with {code}: {proc.tail(3)}")
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
