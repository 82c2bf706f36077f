"""A UDP request and its answer through a tunnel, as a ROS 2 service call or a DDS exchange makes them (issue #6).

``ping`` measures an ICMPv6 echo, which the kernel answers inside the tunnel's own write to its TUN
device.  ROS 2 traffic is UDP, and a process answers it: the tunnel's write only wakes that process,
which sends its answer after the write returned, through the tunnel's TUN reader.  This pair measures
that round trip:

    udp_echo.py serve HOST PORT                          answer every datagram with itself
    udp_echo.py client HOST PORT COUNT INTERVAL [SIZE]    COUNT requests of SIZE bytes (64), INTERVAL s apart

The client prints one ``time=X ms`` line per answer, as ``ping`` does, so the benchmark reads both
the same way; a request unanswered after a second is lost (no line).  Both ends are Python, so their own
cost is in every number, the same for every tunnel measured.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time

# The kernel's names of the two ends (15 characters at most), which perf reports as ``comm``.
SERVER_NAME = "udpecho-serve"
CLIENT_NAME = "udpecho-client"


def name_process(name: str) -> None:
    """Give this process a name of its own, so ``bench/latency_trace.py --probe udp`` tells its events apart."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(name)


def serve(host: str, port: int) -> None:
    name_process(SERVER_NAME)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    echo(sock)


def echo(sock: socket.socket) -> None:
    """Answer every datagram on ``sock`` with itself, for ever."""
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def client(host: str, port: int, count: int, interval: float, size: int = 64) -> int:
    name_process(CLIENT_NAME)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.settimeout(1.0)
    answered = 0
    start = time.monotonic()
    for i in range(count):
        request = i.to_bytes(4, "big") + bytes(max(0, size - 4))
        sent = time.perf_counter()
        sock.send(request)
        try:
            while sock.recv(65535)[:4] != request[:4]:  # a late answer to an earlier request: not this one
                pass
        except TimeoutError:
            continue
        print(f"seq={i} time={(time.perf_counter() - sent) * 1000:.3f} ms")
        answered += 1
        pause = start + (i + 1) * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    sys.stdout.flush()
    return 0 if answered else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "serve":
        serve(argv[1], int(argv[2]))
        return 0
    if len(argv) in (5, 6) and argv[0] == "client":
        size = int(argv[5]) if len(argv) == 6 else 64
        return client(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), size)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
