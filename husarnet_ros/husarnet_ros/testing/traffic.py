"""Traffic tools for namespace tests.

Ping over the overlay, TCP transfers with SHA-256 check, a UDP recorder that notes every source
address, crafted IPv4/IPv6 packets and malformed-datagram generators.

Why: the end-to-end tests must judge what really crossed the overlay (bytes, hashes, source addresses)
rather than trust logs. Everything here is plain sockets; nothing needs scapy.

Command line (runs inside a namespace, used by :func:`tcp_transfer`)::

    python -m husarnet_ros.testing.traffic serve --bind fc94::1 --port 5201 [--ready FILE]
    python -m husarnet_ros.testing.traffic send --to fc94::1 --port 5201 --mb 50 [--seed 1]

Both print one JSON line ``{"bytes": N, "sha256": "..."}``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .netns import Lab, Netns

_ETH_P_IPV6 = 0x86DD


# --------------------------------------------------------------------------------------------------
# ping


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    rtts_ms: tuple[float, ...]
    output: str

    @property
    def loss(self) -> float:
        """Fraction lost, 0.0 .. 1.0 (1.0 when nothing was sent)."""
        if self.transmitted == 0:
            return 1.0
        return 1.0 - self.received / self.transmitted


_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT = re.compile(r"time[=<]([\d.]+) ms")


def parse_ping(text: str) -> PingResult:
    """Parse iputils ping output (summary line and per-reply RTTs)."""
    m = _SUMMARY.search(text)
    tx, rx = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    rtts = tuple(float(x) for x in _RTT.findall(text))
    return PingResult(tx, rx, rtts, text)


def ping(
    lab: Lab, ns: Netns, dst: str, count: int = 5, interval: float = 0.2, wait: float = 1.0, size: int | None = None
) -> PingResult:
    """Ping ``dst`` (IPv6 if it has a colon) from ``ns``; never raises on loss, check ``.loss``."""
    argv = ["ping", "-6" if ":" in dst else "-4", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait)]
    if size is not None:
        argv += ["-s", str(size)]
    res = lab.run(ns, [*argv, dst], check=False, timeout=count * (interval + wait) + 10)
    return parse_ping(res.stdout + res.stderr)


# --------------------------------------------------------------------------------------------------
# TCP transfer with SHA-256


def pattern_chunks(total: int, seed: int = 1, chunk: int = 1 << 16) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes (SHAKE-256 stream), so both ends can agree on the hash."""
    xof = hashlib.shake_256(f"husarnet_ros traffic {seed}".encode())
    block = xof.digest(chunk)
    sent = 0
    i = 0
    while sent < total:
        n = min(chunk, total - sent)
        # Vary each chunk cheaply: prefix the counter so reordering or duplication changes the hash.
        data = struct.pack("<Q", i) + block[8:n] if n >= 8 else block[:n]
        yield data[:n]
        sent += n
        i += 1


def serve_once(bind: str, port: int, ready: Path | None = None, timeout: float = 120.0) -> dict:
    """Accept one TCP connection, read until EOF, return bytes and SHA-256 of what arrived."""
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((bind, port))
        srv.listen(1)
        srv.settimeout(timeout)
        if ready is not None:
            ready.write_text("ready")
        conn, peer = srv.accept()
        h = hashlib.sha256()
        n = 0
        with conn:
            conn.settimeout(timeout)
            while True:
                data = conn.recv(1 << 18)
                if not data:
                    break
                h.update(data)
                n += len(data)
            with contextlib.suppress(OSError):
                conn.sendall(b"done\n")
    return {"bytes": n, "sha256": h.hexdigest(), "peer": peer[0]}


def send_once(to: str, port: int, total: int, seed: int = 1, timeout: float = 120.0) -> dict:
    """Connect, send ``total`` deterministic bytes, half-close, wait for the server's ack."""
    fam = socket.AF_INET6 if ":" in to else socket.AF_INET
    h = hashlib.sha256()
    start = time.monotonic()
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((to, port))
        for chunk in pattern_chunks(total, seed):
            s.sendall(chunk)
            h.update(chunk)
        s.shutdown(socket.SHUT_WR)
        ack = s.recv(16)
    return {
        "bytes": total,
        "sha256": h.hexdigest(),
        "ack": ack.decode(errors="replace").strip(),
        "seconds": time.monotonic() - start,
    }


@dataclass(frozen=True)
class TransferResult:
    sent_bytes: int
    received_bytes: int
    sent_sha256: str
    received_sha256: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.sent_bytes == self.received_bytes and self.sent_sha256 == self.received_sha256


def tcp_transfer(
    lab: Lab,
    server: Netns,
    client: Netns,
    server_addr: str,
    mb: float,
    *,
    port: int = 5201,
    seed: int = 1,
    timeout: float = 120.0,
) -> TransferResult:
    """Send ``mb`` MB from ``client`` to ``server_addr`` (listening in ``server``); compare SHA-256."""
    ready = lab.tmp / f"tcp-ready-{port}-{time.monotonic_ns()}"
    srv = lab.spawn(
        server,
        [
            sys.executable,
            "-m",
            "husarnet_ros.testing.traffic",
            "serve",
            "--bind",
            server_addr,
            "--port",
            str(port),
            "--ready",
            str(ready),
            "--timeout",
            str(timeout),
        ],
    )
    deadline = time.monotonic() + 15
    while not ready.exists():
        if not srv.alive or time.monotonic() > deadline:
            srv.stop()
            raise RuntimeError(f"TCP server did not start:\n{srv.tail()}")
        time.sleep(0.05)
    total = int(mb * 1_000_000)
    res = lab.run(
        client,
        [
            sys.executable,
            "-m",
            "husarnet_ros.testing.traffic",
            "send",
            "--to",
            server_addr,
            "--port",
            str(port),
            "--bytes",
            str(total),
            "--seed",
            str(seed),
            "--timeout",
            str(timeout),
        ],
        check=False,
        timeout=timeout + 10,
    )
    with contextlib.suppress(Exception):  # a server that hangs is reported through its output below
        srv.wait(timeout=15)
    srv.stop()
    if res.returncode != 0:
        raise RuntimeError(f"TCP sender failed: {res.stderr.strip()[-2000:]}")
    sent = json.loads(res.stdout.strip().splitlines()[-1])
    lines = [ln for ln in srv.output().splitlines() if ln.startswith("{")]
    got = json.loads(lines[-1]) if lines else {"bytes": 0, "sha256": ""}
    return TransferResult(sent["bytes"], got["bytes"], sent["sha256"], got["sha256"], sent["seconds"])


# --------------------------------------------------------------------------------------------------
# UDP recorder (echo) that notes every source


@dataclass
class UdpRecorder:
    """A UDP socket inside a namespace that records (source, payload) of everything it receives.

    With ``echo`` it answers each datagram with the same payload. Use :meth:`sources` to prove that a
    forged source address never reached the application.
    """

    sock: socket.socket
    echo: bool = True
    received: list[tuple[str, int, bytes]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, lab: Lab, ns: Netns, bind: str = "::", port: int = 0, echo: bool = True) -> UdpRecorder:
        fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
        s = lab.socket(ns, fam, socket.SOCK_DGRAM)
        s.bind((bind, port))
        s.settimeout(0.2)
        rec = cls(s, echo)
        rec._thread = threading.Thread(target=rec._loop, daemon=True, name="udp-recorder")
        rec._thread.start()
        lab.on_cleanup(rec.stop)
        return rec

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((addr[0], addr[1], data))
            if self.echo:
                with contextlib.suppress(OSError):
                    self.sock.sendto(data, addr)

    def sources(self) -> set[str]:
        return {src.split("%")[0] for src, _, _ in self.received}

    def payloads(self) -> list[bytes]:
        return [p for _, _, p in self.received]

    def stop(self) -> list[tuple[str, int, bytes]]:
        if not self._stop.is_set():
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=2)
            self.sock.close()
        return list(self.received)


def udp_echo(lab: Lab, ns: Netns, dst: str, port: int, payloads: list[bytes], wait: float = 2.0) -> list[bytes | None]:
    """Send each payload from ``ns`` to an echoing :class:`UdpRecorder` at ``dst``, one at a time.

    Returns, for each payload, the echo (``None`` where the same bytes did not come back from ``dst`` within
    ``wait``), so loss, corruption and a wrong replying source all show as ``None``. One at a time, never
    retried: a lost datagram stays lost, as it must for a "no drops" verdict.
    """
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    out: list[bytes | None] = []
    with contextlib.closing(lab.socket(ns, fam, socket.SOCK_DGRAM)) as s:
        for payload in payloads:
            s.sendto(payload, (dst, port))
            deadline = time.monotonic() + wait
            got = None
            while got is None and (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, src = s.recvfrom(65535)
                except TimeoutError:
                    break
                if src[0].split("%")[0] == dst and data == payload:
                    got = data
            out.append(got)
    return out


# --------------------------------------------------------------------------------------------------
# Crafted packets


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_ipv6_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, hop_limit: int = 64) -> bytes:
    """An IPv6+UDP packet with a correct checksum, any source address (that is the point)."""
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    ulen = 8 + len(payload)
    pseudo = s + d + struct.pack("!I3xB", ulen, 17)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    c = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    return struct.pack("!IHBB", 6 << 28, ulen, 17, hop_limit) + s + d + udp


def build_ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, ttl: int = 64) -> bytes:
    """An IPv4+UDP packet (for IP_HDRINCL raw sockets: spoofed underlay sources)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ulen = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    c = _csum(s + d + struct.pack("!xBH", 17, ulen) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, random.getrandbits(16), 0, ttl, 17, 0, s, d)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + udp


def send_raw_ipv6(lab: Lab, ns: Netns, iface: str, packet: bytes) -> None:
    """Hand a complete IPv6 packet to ``iface`` (e.g. hnet0) as if the kernel routed it there.

    On a TUN device this makes the packet appear on the daemon's TUN fd exactly as an application's
    packet would, but with whatever source address the test chose.
    """
    with contextlib.closing(lab.socket(ns, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_IPV6))) as s:
        s.sendto(packet, (iface, _ETH_P_IPV6))


def send_raw_ipv4(lab: Lab, ns: Netns, packet: bytes) -> None:
    """Send a complete IPv4 packet (any source) from ``ns`` through a raw IP_HDRINCL socket."""
    dst = socket.inet_ntoa(packet[16:20])
    with contextlib.closing(lab.socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        s.sendto(packet, (dst, 0))


# --------------------------------------------------------------------------------------------------
# Malformed datagrams


def fuzz_datagrams(rng: random.Random, samples: list[bytes]) -> Iterator[bytes]:
    """Endless mix of random, truncated and bit-flipped datagrams (mutating real ``samples`` when given)."""
    while True:
        kind = rng.randrange(4)
        if kind == 0 or not samples:
            yield rng.randbytes(rng.randrange(0, 300))
            continue
        base = bytearray(rng.choice(samples))
        if kind == 1:
            yield bytes(base[: rng.randrange(0, len(base) + 1)])
        elif kind == 2:
            for _ in range(rng.randrange(1, 4)):
                if base:
                    i = rng.randrange(len(base))
                    base[i] ^= 1 << rng.randrange(8)
            yield bytes(base)
        else:  # valid-looking header (type byte kept), random body
            yield bytes(base[:1]) + rng.randbytes(rng.randrange(0, 200))


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m husarnet_ros.testing.traffic")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="accept one TCP connection and hash what arrives")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=5201)
    s.add_argument("--ready", type=Path)
    s.add_argument("--timeout", type=float, default=120.0)
    c = sub.add_parser("send", help="send deterministic bytes over TCP and hash them")
    c.add_argument("--to", required=True)
    c.add_argument("--port", type=int, default=5201)
    c.add_argument("--bytes", type=int)
    c.add_argument("--mb", type=float)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        out = serve_once(a.bind, a.port, a.ready, a.timeout)
    else:
        total = a.bytes if a.bytes is not None else int((a.mb or 1) * 1_000_000)
        out = send_once(a.to, a.port, total, a.seed, a.timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
