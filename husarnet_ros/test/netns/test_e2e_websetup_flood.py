"""Websetup flood over the real overlay (TESTPLAN row 15): the operator still gets in, the daemon stays cheap.

Layout: three hosts on one LAN. A runs the managed daemon; D (the operator's dashboard) and M (mallory)
are overlay peers that A whitelists, and both are on A's *websetup* whitelist, so M's datagrams pass the
cheap address checks and reach the failure limiter: M has an overlay identity but not the secret.

M floods A's websetup port over the overlay with wrong-MAC commands at about 5000 per second; in the
middle of it D sends a valid command with the real client (:class:`WebsetupClient`). Verdicts: D's reply
and the change in A's whitelist within a bound; A's websetup counters (only the per-sender burst and
refill of M's messages were verified, every other one was dropped before the MAC check); A's CPU time
(utime + stime of all its threads, from /proc) per flood datagram delivered.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from husarnet_ros.testing import e2e
from husarnet_ros.testing.netns import Daemon, Lab, in_netns, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

WS_PORT = 5580
FLOOD_RATE = 5000  # datagrams per second, TESTPLAN row 15
FLOOD_SECONDS = 3.0
VALID_AFTER = 1.0  # the operator's command goes out this long into the flood, when M's burst is long spent
#: Round trip of the operator's command under the flood. Unloaded it takes a few milliseconds; the
#: failure limiter never slows down a sender that did not fail, so only CPU contention can delay it.
VALID_LATENCY_BOUND = 2.0
#: CPU seconds of the whole daemon (decrypting M's packets, writing them to TUN, dropping them at the
#: limiter) per flood datagram that reached the websetup socket. Measured on the shared 2-core VM:
#: 57-61 us, also with two CPU burners running (CPU time, unlike wall time, hardly moves with load).
#: A daemon without the failure limiter costs 166 us (MAC check in the worker thread for every datagram
#: its in-flight cap lets through), so 150 us leaves 2.5x headroom and still catches any per-datagram
#: work of that order (a MAC, a log line, a state write) on the flood's path.
CPU_PER_DATAGRAM_BOUND = 150e-6


def _packed(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed


def _cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (fields 14 and 15 of /proc/<pid>/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ws_counters(daemon: Daemon) -> dict[str, int]:
    return dict(daemon.status()["websetup"]["counters"])


def _listed(daemon: Daemon, addr: str) -> bool:
    want = ipaddress.IPv6Address(addr)
    return any(ipaddress.IPv6Address(a) == want for a in daemon.control("whitelist")["entries"])


class Flood:
    """M's sender: wrong-MAC websetup commands from M's overlay address to A's, paced at ``rate`` per second."""

    def __init__(self, sock: socket.socket, target: str, datagrams: list[bytes], rate: int) -> None:
        self.sock, self.target, self.datagrams, self.rate = sock, target, datagrams, rate
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ws-flood", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while self.sent < due:
                # A full queue on M's side loses the datagram, as on a real link; A's counters say what arrived.
                with contextlib.suppress(OSError):
                    self.sock.sendto(self.datagrams[self.sent % len(self.datagrams)], (self.target, WS_PORT))
                self.sent += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_websetup_flood_is_rate_limited_and_the_operator_gets_through() -> None:
    """A valid command during a 5k/s wrong-MAC flood is applied within 2 s; the flood costs A little CPU.

    Checked by running A with the failure limiter disabled (``FailureLimiter.allowed`` always true): the
    counter bounds fail (8613 MAC checks instead of at most 15) and so does the CPU bound (166 us/datagram).
    With a limiter that locks every sender out after anybody's failure, the operator's command times out.
    """
    from husarnet_ros.core import websetup
    from husarnet_ros.core.identity import Identity
    from husarnet_ros.core.websetup_proto import build_command

    with Lab("wsflood") as lab:
        lan = lab.bridge("lan")
        hosts = {name: lab.host(name) for name in ("A", "D", "M")}
        ips = {"A": "198.18.5.1", "D": "198.18.5.2", "M": "198.18.5.66"}
        for name, host in hosts.items():
            lab.link(host, lan, f"{ips[name]}/24")
        addrs = {name: lab.daemon_address(lab.tmp / f"state-{name}") for name in hosts}
        daemons = e2e.start_mesh(
            lab,
            hosts,
            static=ips,
            trust=[("A", "D"), ("A", "M"), ("D", "A"), ("M", "A")],
            extra={"A": {"websetup_whitelist": [addrs["D"], addrs["M"]], "no_lan_discovery": True}},
        )
        a = daemons["A"]
        for name in ("D", "M"):
            daemons[name].wait_path(addrs["A"], timeout=20)
        assert wait_until(lambda: a.status()["websetup"]["listening"], 10)

        secret = websetup.read_secret(lab.tmp / "state-A")
        with in_netns(hosts["D"].ns):
            probe = websetup.WebsetupClient(secret, lab.tmp / "dashboard.json", source_address=_packed(addrs["D"]))
            assert probe.send(addrs["A"], "ping", timeout=10).ok  # the path is up before the clock starts

        m_sock = lab.socket(hosts["M"], socket.AF_INET6, socket.SOCK_DGRAM)
        lab.on_cleanup(m_sock.close)
        m_sock.bind((addrs["M"], 0))
        junk = [build_command(bytes(32), _packed(addrs["M"]), c, "whitelist-disable") for c in range(1, 65)]
        flood = Flood(m_sock, addrs["A"], junk, FLOOD_RATE)
        target = Identity.generate().address_str

        before, cpu0, t0 = _ws_counters(a), _cpu_seconds(a.proc.pid), time.monotonic()
        flood.start()
        try:
            time.sleep(VALID_AFTER)  # lets the flood run; not a timing assertion
            sent_at = time.monotonic()
            with in_netns(hosts["D"].ns):
                reply = probe.send(addrs["A"], "whitelist-add", (target, "cam"), timeout=VALID_LATENCY_BOUND)
            latency = time.monotonic() - sent_at
            time.sleep(max(0.0, FLOOD_SECONDS - (time.monotonic() - t0)))
        finally:
            flood.stop()
        time.sleep(0.3)  # the datagrams still queued in M's and A's daemons land in the counters and CPU time
        cpu, window = _cpu_seconds(a.proc.pid) - cpu0, time.monotonic() - t0
        after = _ws_counters(a)
        got = {k: after[k] - before[k] for k in after}

        assert reply.ok and _listed(a, target), reply
        delivered = sum(v for k, v in got.items() if k != "accepted")
        print(
            f"flood: sent {flood.sent} in {window:.2f} s, {delivered} reached websetup {got}; "
            f"A's CPU {cpu:.2f} s = {cpu / max(delivered, 1) * 1e6:.0f} us per datagram; "
            f"valid command answered in {latency * 1000:.0f} ms"
        )
        # The flood really reached the limiter: most of what was sent arrived and was dropped there.
        assert delivered >= flood.sent // 4, (flood.sent, got)
        assert got["rate_limited"] >= delivered * 0.9, got
        # Only M's burst and its refill (1 per second) got as far as the MAC check.
        assert got["bad_mac"] <= websetup.PER_SOURCE_BURST + websetup.PER_SOURCE_RATE * window + 2, got
        assert got["accepted"] == 1, got  # the operator's command (the warm-up ping came before)
        assert cpu / delivered <= CPU_PER_DATAGRAM_BOUND, (cpu, delivered)
        assert not e2e.stop_all_and_check(lab, daemons.values())
    e2e.assert_lab_clean(lab)
