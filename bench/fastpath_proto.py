"""Prototype of the fast data path of issue #6, measured against wireguard-go in the same run.

Not the product: no handshake (fixed test keys), one peer, no paths.  It exists to show what
``core/datapath.py`` must do to reach >= 5x wireguard-go TCP throughput, using the real modules:

  send:    TunDevice(vnet_hdr, TSO) .read_ready -> offload.split_for_send (MTU-sized IPv6 packets,
           full checksums) -> one AES-256-GCM seal per packet (WireGuard Data layout, counter nonce)
           -> UdpSocket.send_many (UDP GSO: one sendmsg per run of equal-size datagrams)
  receive: UdpSocket.recv_batch (UDP GRO) -> parse header, replay window check, one open per
           datagram, commit -> offload.Coalescer (TCP segments -> GSO super-packets) -> TUN write

Each side is one process (``--serve``) with one thread per direction (``--workers 2`` adds a TUN/UDP
I/O thread per direction so system calls overlap with Python work; the GIL is released in them).
Per-stage time.perf_counter counters are written as JSON on SIGTERM.

  .venv/bin/python bench/fastpath_proto.py [--quick] [--loss 1] [--workers 1|2]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import signal
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "husarnet_ros"))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from husarnet_ros.core import offload, tun, udp  # noqa: E402
from husarnet_ros.core.replay import ReplayFilter  # noqa: E402

FP_A, FP_B = "fd00:88::1", "fd00:88::2"
PORT = 5590
MTU = 1420
HDR = struct.Struct("<BxxxIQ")  # WireGuard Data: type 4, reserved, receiver index, counter
NONCE = struct.Struct("<4xQ")
KEY_AB = bytes(range(32))  # test keys only: this prototype has no handshake
KEY_BA = bytes(range(32, 64))


class Stages:
    """Cumulative seconds and counts per pipeline stage (cheap: two perf_counter calls per batch)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def add(self, name: str, dt: float, n: int = 1) -> None:
        self.t[name] = self.t.get(name, 0.0) + dt
        self.n[name] = self.n.get(name, 0) + n

    def report(self) -> dict[str, Any]:
        return {k: {"seconds": round(v, 4), "items": self.n.get(k, 0)} for k, v in self.t.items()}


def serve(args: argparse.Namespace) -> int:
    me, peer_ep = (FP_A, (args.peer, PORT)) if args.side == "a" else (FP_B, (args.peer, PORT))
    seal_key, open_key = (KEY_AB, KEY_BA) if args.side == "a" else (KEY_BA, KEY_AB)
    import ipaddress

    dev = tun.TunDevice.open("fp0", ipaddress.IPv6Address(me).packed, MTU, vnet_hdr=True, prefixlen=64)
    sock = udp.UdpSocket(PORT, gso=not args.no_gso, gro=not args.no_gro)
    vnet = dev.vnet_hdr
    stop = threading.Event()
    tx_stats, rx_stats = Stages(), Stages()
    sealer = AESGCM(seal_key)
    opener = AESGCM(open_key)
    counter = itertools.count()
    window = ReplayFilter()
    drops = {"bad_mac": 0, "replay": 0, "malformed": 0, "split_error": 0}

    def read_batch() -> list[bytes]:
        """Up to ``--batch`` queued TUN reads, after waiting up to 0.5 s for the first ([] on timeout)."""
        reads = dev.read_ready(args.batch)
        if not reads and dev.wait_readable(0.5):
            reads = dev.read_ready(args.batch)
        return reads

    def seal_batch(reads: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        t0 = time.perf_counter()
        pkts: list[bytes] = []
        for r in reads:
            try:
                pkts += offload.split_for_send(r, vnet, MTU)
            except ValueError:
                drops["split_error"] += 1
        t1 = time.perf_counter()
        enc = sealer.encrypt
        hdr = HDR.pack
        nonce = NONCE.pack
        for p in pkts:
            n = next(counter)
            out.append(hdr(4, 1, n) + enc(nonce(n), p, None))
        t2 = time.perf_counter()
        tx_stats.add("split", t1 - t0, len(reads))
        tx_stats.add("seal", t2 - t1, len(pkts))
        return out

    def tx_loop() -> None:
        """TUN -> split -> seal -> GSO send, all in this thread."""
        with contextlib.suppress(tun.TunError):
            while not stop.is_set():
                t0 = time.perf_counter()
                reads = read_batch()
                if not reads:
                    continue
                t1 = time.perf_counter()
                datagrams = seal_batch(reads)
                t2 = time.perf_counter()
                sock.send_many(datagrams, peer_ep)
                t3 = time.perf_counter()
                tx_stats.add("tun_read", t1 - t0, len(reads))
                tx_stats.add("udp_send", t3 - t2, len(datagrams))

    def open_batch(batch: list[tuple[bytes, udp.Endpoint]]) -> list[bytes]:
        t0 = time.perf_counter()
        co = offload.Coalescer(vnet=vnet)
        dec = opener.decrypt
        nonce = NONCE.pack
        unpack = HDR.unpack_from
        check, commit = window.check, window.commit
        n_ok = 0
        t_open = 0.0
        for d, _ep in batch:
            if len(d) < 32 or d[0] != 4:
                drops["malformed"] += 1
                continue
            _t, _idx, n = unpack(d)
            if check(n) is not None:
                drops["replay"] += 1
                continue
            try:
                p = dec(nonce(n), memoryview(d)[16:], None)
            except Exception:
                drops["bad_mac"] += 1
                continue
            if not commit(n):
                drops["replay"] += 1
                continue
            co.add(p)
            n_ok += 1
        t1 = time.perf_counter()
        writes = co.flush()
        t2 = time.perf_counter()
        del t_open
        rx_stats.add("open+add", t1 - t0, n_ok)
        rx_stats.add("coalesce_flush", t2 - t1, len(writes))
        return writes

    def rx_loop() -> None:
        """GRO receive -> open -> coalesce -> TUN write, all in this thread."""
        while not stop.is_set():
            t0 = time.perf_counter()
            batch = sock.recv_batch(timeout=0.5, max_calls=args.batch)
            if not batch:
                continue
            t1 = time.perf_counter()
            writes = open_batch(batch)
            t2 = time.perf_counter()
            try:
                for w in writes:
                    try:
                        dev.write(w)
                    except OSError:
                        drops["malformed"] += 1
            except tun.TunError:
                return
            t3 = time.perf_counter()
            rx_stats.add("udp_recv", t1 - t0, len(batch))
            rx_stats.add("tun_write", t3 - t2, len(writes))

    def pipelined_tx() -> list[threading.Thread]:
        """Reader thread (TUN read) feeding a worker (split+seal+send): syscalls overlap Python work."""
        q: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=8)

        def reader() -> None:
            with contextlib.suppress(tun.TunError):
                while not stop.is_set():
                    reads = read_batch()
                    if reads:
                        q.put(reads)
            q.put(None)

        def worker() -> None:
            while (reads := q.get()) is not None:
                datagrams = seal_batch(reads)
                t2 = time.perf_counter()
                sock.send_many(datagrams, peer_ep)
                tx_stats.add("udp_send", time.perf_counter() - t2, len(datagrams))

        return [threading.Thread(target=reader, name="tun-read"), threading.Thread(target=worker, name="seal-send")]

    def pipelined_rx() -> list[threading.Thread]:
        q: queue.Queue[list[tuple[bytes, udp.Endpoint]] | None] = queue.Queue(maxsize=8)

        def reader() -> None:
            while not stop.is_set():
                batch = sock.recv_batch(timeout=0.5, max_calls=args.batch)
                if batch:
                    q.put(batch)
            q.put(None)

        def worker() -> None:
            while (batch := q.get()) is not None:
                writes = open_batch(batch)
                t2 = time.perf_counter()
                with contextlib.suppress(tun.TunError):
                    for w in writes:
                        try:
                            dev.write(w)
                        except OSError:
                            drops["malformed"] += 1
                rx_stats.add("tun_write", time.perf_counter() - t2, len(writes))

        return [threading.Thread(target=reader, name="udp-read"), threading.Thread(target=worker, name="open-write")]

    if args.workers >= 2:
        threads = pipelined_tx() + pipelined_rx()
    else:
        threads = [threading.Thread(target=tx_loop, name="tx"), threading.Thread(target=rx_loop, name="rx")]
    for t in threads:
        t.daemon = True
        t.start()
    started = time.monotonic()

    def finish(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    print(
        f"fastpath {args.side} up: tun fp0 {me} offload 0x{dev.offload_flags:x} gso {sock.gso} gro {sock.gro}",
        flush=True,
    )
    while not stop.is_set():
        stop.wait(0.5)
    for t in threads:
        t.join(2)
    dev.close()
    sock.close()
    if args.stats:
        cpu = os.times()
        Path(args.stats).write_text(
            json.dumps(
                {
                    "side": args.side,
                    "wall_s": time.monotonic() - started,
                    "cpu_user_s": cpu.user,
                    "cpu_sys_s": cpu.system,
                    "tx": tx_stats.report(),
                    "rx": rx_stats.report(),
                    "drops": drops,
                },
                indent=1,
            )
        )
    return 0


# --- harness (used by bench/run.py --fastpath too) ------------------------------------------


def start(pair: Any, workers: int = 1, extra: list[str] | None = None) -> list[Any]:
    """Start one prototype process per namespace; returns the lab Procs (stats files next to their logs)."""
    import common as c

    procs = []
    for ns, side, peer in ((pair.a, "a", c.B4), (pair.b, "b", c.A4)):
        stats = pair.lab.tmp / f"fastpath-{side}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve", "--side", side, "--peer", peer]
        argv += ["--workers", str(workers), "--stats", str(stats), *(extra or [])]
        p = pair.lab.spawn(ns, argv)
        p.stats_path = stats  # type: ignore[attr-defined]
        procs.append(p)
    for p in procs:
        deadline = time.monotonic() + 15
        while "up:" not in p.output():
            if not p.alive or time.monotonic() > deadline:
                raise RuntimeError("fastpath prototype failed to start:\n" + p.tail())
            time.sleep(0.05)
    return procs


def stop(procs: list[Any]) -> dict[str, Any]:
    """Stop the processes (SIGTERM: they write their stage counters) and return the counters."""
    out: dict[str, Any] = {}
    for p in procs:
        p.stop(timeout=10)
        path = getattr(p, "stats_path", None)
        if path is not None and Path(path).exists():
            data = json.loads(Path(path).read_text())
            out[data["side"]] = data
    return out


def profile_table(profile: dict[str, Any]) -> str:
    lines = []
    for side in sorted(profile):
        d = profile[side]
        lines.append(
            f"side {side}: wall {d['wall_s']:.1f} s, cpu user {d['cpu_user_s']:.1f} s sys {d['cpu_sys_s']:.1f} s, "
            f"drops {d['drops']}"
        )
        for direction in ("tx", "rx"):
            for stage, v in d[direction].items():
                per = v["seconds"] / v["items"] * 1e6 if v["items"] else 0.0
                lines.append(
                    f"  {direction} {stage:15s} {v['seconds']:8.3f} s  {v['items']:9d} items  {per:8.2f} us/item"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["a", "b"], help=argparse.SUPPRESS)
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help="1: one thread per direction; 2: plus an I/O thread each")
    p.add_argument("--batch", type=int, default=64, help="TUN reads / UDP receives per batch")
    p.add_argument("--no-gso", action="store_true")
    p.add_argument("--no-gro", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--skip-wireguard", action="store_true")
    p.add_argument("--nice", type=int, default=0, help="niceness increment for the run and everything it starts")
    args = p.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.nice:
        os.nice(args.nice)

    import common as c
    import run

    ns = argparse.Namespace(seconds=3 if args.quick else 10, pings=50 if args.quick else 200, workers=args.workers)
    extra = ["--batch", str(args.batch)] + (["--no-gso"] if args.no_gso else []) + (["--no-gro"] if args.no_gro else [])
    results: dict[str, dict[str, Any]] = {}
    with c.Lab(tag="fastpath") as lab:
        pair = c.make_pair(lab)
        if args.loss:
            c.set_offloads(pair, on=False)
            c.add_loss(pair, args.loss)
        c.start_iperf_server(lab, pair.b)
        if not args.skip_wireguard:
            c.log("measuring wireguard-go")
            results["wireguard-go"] = run.column_wireguard(pair, ns)
        c.log(f"measuring the fastpath prototype (workers {args.workers})")
        procs = start(pair, args.workers, extra)
        try:
            if c.wait_ping(lab, pair.a, FP_B, 15) is None:
                results["fastpath proto"] = {"skipped": "no ping through the prototype:\n" + procs[0].tail()}
            else:
                results["fastpath proto"] = run.measure(pair, FP_B, [x.pid for x in procs], ns.seconds, ns.pings)
        finally:
            prof = stop(procs)
        results["fastpath proto"]["profile"] = prof
    print(
        f"\nloss {args.loss} %, {ns.seconds} s per test, workers {args.workers}, nice {os.nice(0)}, "
        f"load {os.getloadavg()}"
    )
    print(run.table(results))
    print("\nper-stage profile (whole run, both sides):")
    print(profile_table(prof))
    out = HERE / "results" / "fastpath_latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
