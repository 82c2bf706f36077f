"""Load generator for the base server: N simulated nodes log in on loopback; report logins/s, CPU and RSS.

    python -m husarnet_ros.base.loadgen --nodes 10000 [--base HOST:TCP:UDP#KEY] [--json]

Without ``--base`` it starts its own ``husarnet-base`` subprocess on
127.0.0.1 (random ports) so the base's CPU time and memory can be read from
/proc and reported separately from the load generator's.  Every simulated
node is a real :class:`~husarnet_ros.core.base_client.BaseClient` (full Noise
handshake, signed login, UDP ping), all sharing one UDP socket; node
identities are expensive to generate (about 1300 key derivations each, to
find keys with a valid fc94 address) so they are cached in ``--ids-cache``.

Reported (``--json`` prints one object; used by ``make bench``):

* ``login_wall_s`` / ``logins_per_s``: wall time until every node is logged
  in (load generator and base share the machine, so this is a lower bound);
* ``base_cpu_login_s`` / ``base_logins_per_cpu_s``: the base's own CPU time
  for those logins, i.e. logins per second one base core can sustain;
* ``base_rss_mb`` (after login and after the hold), ``base_cpu_hold_pct``:
  memory and steady-state CPU with every node registered and sending its
  periodic UDP pings and keepalives;
* optional relay throughput between two of the nodes (``--relay-packets``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.constants import Timers
from ..core.identity import Identity, address_from_pubkey
from .simnode import SharedUdp, SimIndex, SimNode

log = logging.getLogger("husarnet_ros.base.loadgen")

DEFAULT_IDS_CACHE = Path(tempfile.gettempdir()) / "husarnet_ros_loadgen_ids.bin"


def _find_seeds(count: int) -> list[bytes]:
    from nacl.bindings import crypto_sign_seed_keypair

    out = []
    while len(out) < count:
        seed = os.urandom(32)
        pub, _ = crypto_sign_seed_keypair(seed)
        if address_from_pubkey(pub) is not None:
            out.append(seed)
    return out


def load_identities(count: int, cache: Path, workers: int = 0) -> list[Identity]:
    """``count`` identities from ``cache`` (32-byte seeds), generating and appending any that are missing."""
    seeds: list[bytes] = []
    if cache.exists():
        raw = cache.read_bytes()
        seeds = [raw[i : i + 32] for i in range(0, len(raw) - len(raw) % 32, 32)]
    missing = count - len(seeds)
    if missing > 0:
        workers = workers or max(1, os.cpu_count() or 1)
        log.info("generating %d identities with %d processes (cached in %s)", missing, workers, cache)
        chunk = max(1, min(250, missing // workers or 1))
        sizes = [chunk] * (missing // chunk) + ([missing % chunk] if missing % chunk else [])
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for part in pool.imap_unordered(_find_seeds, sizes):
                seeds.extend(part)
                with open(cache, "ab") as f:
                    f.write(b"".join(part))
    return [Identity.from_seed(s) for s in seeds[:count]]


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class SpawnedBase:
    """A ``husarnet-base`` subprocess on loopback with random ports (found through its stats file)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.stats = workdir / "stats.json"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        cmd = [sys.executable, "-m", "husarnet_ros.base", "--state-dir", str(workdir / "base"), "--bind", "127.0.0.1"]
        cmd += ["--tcp-port", "0", "--udp-port", "0", "--stats-file", str(self.stats), "--stats-interval", "1"]
        cmd += ["--log-level", "WARNING", "--relay-rate", "1e9", "--relay-burst", "1e8"]
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.time() + 30
        while not self.stats.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("base server did not start")
            time.sleep(0.05)
        info = json.loads(self.stats.read_text())
        self.spec = f"127.0.0.1:{info['tcp_port']}:{info['udp_port']}#{info['public_key']}"

    def read_stats(self) -> dict[str, Any]:
        return json.loads(self.stats.read_text())

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def run_load(
    spec: str,
    identities: list[Identity],
    *,
    concurrency: int,
    hold: float,
    base_pid: int | None,
    relay_packets: int,
    relay_size: int,
    workdir: Path,
) -> dict[str, Any]:
    index = SimIndex()
    udp = await SharedUdp.open(index)
    timers = Timers()
    nodes = [
        SimNode(spec, workdir, identity=ident, timers=timers, udp=udp, index=index, connect_timeout=60.0)
        for ident in identities
    ]
    result: dict[str, Any] = {"nodes": len(nodes), "concurrency": concurrency}
    cpu0 = proc_cpu_seconds(base_pid) if base_pid else 0.0
    t0 = time.monotonic()
    sem = asyncio.Semaphore(concurrency)

    async def login(node: SimNode) -> None:
        async with sem:
            await node.start()
            await node.wait_state("tcp", "udp", timeout=120)

    await asyncio.gather(*(login(n) for n in nodes))
    logged = sum(1 for n in nodes if n.client is not None and n.client.state != "none")
    wall = time.monotonic() - t0
    result.update(logged_in=logged, login_wall_s=round(wall, 3), logins_per_s=round(logged / wall, 1))
    if base_pid:
        cpu = proc_cpu_seconds(base_pid) - cpu0
        result.update(
            base_cpu_login_s=round(cpu, 3),
            base_logins_per_cpu_s=round(logged / cpu, 1) if cpu else None,
            base_rss_mb_after_login=round(proc_rss_mb(base_pid), 1),
        )
    result["loadgen_rss_mb"] = round(proc_rss_mb(os.getpid()), 1)
    if hold > 0:
        cpu1 = proc_cpu_seconds(base_pid) if base_pid else 0.0
        await asyncio.sleep(hold)
        still = sum(1 for n in nodes if n.client is not None and n.client.state != "none")
        result.update(hold_s=hold, still_logged_in=still)
        result["udp_state_nodes"] = sum(1 for n in nodes if n.client is not None and n.client.state == "udp")
        if base_pid:
            result["base_cpu_hold_pct"] = round(100 * (proc_cpu_seconds(base_pid) - cpu1) / hold, 1)
            result["base_rss_mb_after_hold"] = round(proc_rss_mb(base_pid), 1)
    if relay_packets > 0 and len(nodes) >= 2:
        src, dst = nodes[0], nodes[1]
        got = 0
        done = asyncio.Event()

        def count(_s: bytes, _d: bytes) -> None:
            nonlocal got
            got += 1
            if got >= relay_packets:
                done.set()

        dst._on_relayed = count
        payload = b"\x04\x00\x00\x00" + bytes(max(0, relay_size - 4))
        assert src.client is not None
        cpu2 = proc_cpu_seconds(base_pid) if base_pid else 0.0
        t1 = time.monotonic()
        sent = 0
        window = 128  # packets in flight: keeps socket buffers from overflowing on loopback
        deadline = time.monotonic() + 60
        while sent < relay_packets and time.monotonic() < deadline:
            if sent - got < window:
                if src.client.relay(dst.address, payload):
                    sent += 1
            else:
                await asyncio.sleep(0.0005)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 5)
        dt = time.monotonic() - t1
        result.update(
            relay_sent=sent,
            relay_received=got,
            relay_size=relay_size,
            relay_pps=round(got / dt, 1),
            relay_mbit_s=round(got * relay_size * 8 / dt / 1e6, 2),
        )
        if base_pid:
            cpu = proc_cpu_seconds(base_pid) - cpu2
            result["base_cpu_relay_s"] = round(cpu, 3)
            result["base_relay_pps_per_cpu_s"] = round(got / cpu, 1) if cpu else None
    for n in nodes:
        if n.client is not None:
            n.client.close()
    await asyncio.gather(*(n.task for n in nodes if n.task is not None), return_exceptions=True)
    udp.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m husarnet_ros.base.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--base", default=None, help="HOST:TCP:UDP#KEY of a running base (default: spawn one)")
    p.add_argument("--concurrency", type=int, default=256, help="logins in flight at once")
    p.add_argument("--hold", type=float, default=20.0, help="seconds to stay logged in (steady-state CPU)")
    p.add_argument("--relay-packets", type=int, default=0, help="relay this many packets node0 -> node1")
    p.add_argument("--relay-size", type=int, default=1200)
    p.add_argument("--ids-cache", default=str(DEFAULT_IDS_CACHE), help="file of cached identity seeds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING))
    limit = _raise_fd_limit()
    if args.nodes + 64 > limit:
        print(f"loadgen: {args.nodes} nodes need more than the fd limit {limit}", file=sys.stderr)
        return 2
    identities = load_identities(args.nodes, Path(args.ids_cache))
    with tempfile.TemporaryDirectory(prefix="husarnet-loadgen-") as tmp:
        workdir = Path(tmp)
        base = None if args.base else SpawnedBase(workdir)
        spec = args.base or base.spec  # type: ignore[union-attr]
        try:
            result = asyncio.run(
                run_load(
                    spec,
                    identities,
                    concurrency=args.concurrency,
                    hold=args.hold,
                    base_pid=base.proc.pid if base else None,
                    relay_packets=args.relay_packets,
                    relay_size=args.relay_size,
                    workdir=workdir,
                )
            )
            if base is not None:
                time.sleep(1.2)
                stats = base.read_stats()
                result["base_counters"] = {
                    k: v for k, v in stats["counters"].items() if v and k not in ("rx_bytes", "tx_bytes")
                }
        finally:
            if base is not None:
                result_rc = base.stop()
                if result_rc != 0:
                    print(f"loadgen: base exited with {result_rc}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0 if result.get("logged_in") == args.nodes else 1


if __name__ == "__main__":
    sys.exit(main())
