"""Keep the light-traffic code paths in the CPU caches while traffic flows (issue #6).

Why: an echo, a DDS heartbeat or a service call crosses the overlay one packet at a time, often
milliseconds apart.  By then the CPU caches no longer hold the code and data the per-packet path
touches (on a shared or busy machine other work evicts them within a few milliseconds), and every
hop runs from memory: on the benchmark machines one AES-GCM seal costs 0.6 us in a loop and about
40 us after 10 ms idle, and the whole lone path of one hop (:meth:`Datapath._send_lone`,
:meth:`Datapath.receive_lone`) tens of microseconds more.  A compiled tunnel touches far less
memory per packet and so loses less.

The cure trading systems use is to run the hot path now and then on a dummy order.  Here a
:class:`PathWarmer` thread runs one packet through a *shadow* pair of data paths every
``interval`` seconds: the same functions as the real data path (so the same code, the same
interpreter paths, the same cipher code in OpenSSL), on objects of its own: two shadow nodes with
fresh random keys, a send that only hands the datagram over, a TUN write that does nothing.
Nothing of it touches the real peers, keys, counters, sockets or TUN, and nothing leaves the
process.

The kernel's half of a hop goes cold the same way: the UDP send, IP output, softirq receive and
socket receive code a datagram runs through.  So each warm-up also sends a datagram through
:class:`LoopbackEcho`: sockets bound to this host's loopback, each connected to itself (the kernel
hands them nothing but their own datagrams), one over IPv4 (as the dual-stack underlay socket sends
to IPv4 peers) and one over IPv6 (the IPv6 receive path a packet written to the TUN takes too).
Paired ping runs (``bench/latency_ab.py``, 40 rounds): 0.662 ms without it, 0.574 ms with it,
wireguard-go 0.591 ms.  The TUN's own kernel paths are not warmed: that would take packets through
the real interface, where users and firewalls see them.

It costs CPU only while the node carries light traffic: it sleeps (checking every
``idle_check`` seconds) once no packet has moved for ``idle_after`` seconds, and while the real
path is busy (above ``busy_rate``), which keeps it hot by itself.  And it is paced by the traffic:
after each exchange (a request and its answer: lone packets less than :data:`datapath.BURST_GAP`
apart) it sleeps until a few milliseconds before the earliest the next exchange can come
(:class:`Cadence`), then warms every ``interval`` until it comes.  A 10 Hz topic costs a few
warm-ups per message instead of fifty; irregular traffic is warmed every ``interval``.  Traffic
slower than ``idle_after`` (a heartbeat every few seconds) is idle between its exchanges, but is
still warmed for the next one while that is not overdue, once its interval came twice
(:meth:`Cadence.next_after`): idle, each of its packets met cold caches, 0.3 ms behind wireguard-go at
one every 2 s.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import socket
import struct
import threading
from collections.abc import Callable

from .constants import Timers
from .counters import Counters
from .datapath import Datapath
from .gil import QuickHandover
from .handshake import KeyMaterial
from .offload import (
    IPPROTO_UDP,
    IPV6_HDR_LEN,
    UDP_CSUM_OFFSET,
    UDP_HDR_LEN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VNET_HDR_LEN,
    VnetHdr,
    build_vnet_hdr,
    checksum,
    fold,
    ipv6_pseudo_sum,
)
from .peer import IndexTable, Peer
from .session import CIPHER_AES, CIPHER_CHACHA, Keypair
from .threads import NamedThread

log = logging.getLogger(__name__)

#: Default seconds between two warm-ups: caches here go cold within a few milliseconds (issue #6).
DEFAULT_INTERVAL = 0.002
#: Default seconds before the earliest the next exchange can come from which the warmer warms (every
#: interval, the first at the lead).  Measured (``bench/latency_ab.py``, 100 Hz pings, 20-30 rounds,
#: against warming all the time): a lead of 0.5 ms (one warm-up just before) was 8-15 % slower; 4.5 ms
#: from 3 % slower to 12 % faster; 8.5 ms (four warm-ups, the last about 0.5 ms before) 2-11 % faster in
#: three runs.  So the last few milliseconds before a packet count, not just the last warm-up.  At 10 Hz
#: the same lead costs a fifth of the CPU.
DEFAULT_LEAD = 0.0085
#: Seconds past the expected time of periodic traffic's next exchange for which the warmer still warms
#: for it although nothing moved for ``idle_after``: timers wake late by milliseconds, and a flow that
#: stopped costs at most (lead + this) / interval warm-ups, about 30.  Also how close two intervals must
#: be to count as one pace (:meth:`Cadence.next_after`): closer than the lateness the grace allows for.
OVERDUE_GRACE = 0.05
#: Seconds the warmer waits, instead of warming, while a real packet is on a lone path: it would take
#: the GIL from that packet, and a lone path takes a few hundred microseconds at most.
BUSY_DEFER = 0.0005
#: The interval's range (0 is off): at most 2000 wake-ups a second; at least 10, or it warms nothing.
MIN_INTERVAL, MAX_INTERVAL = 0.0005, 0.1
#: The shadow nodes' addresses: in fc94::/16 like real ones; they exist only inside the shadow's own objects.
_SHADOW_A = bytes.fromhex("fc94ffffffffffffffffffffffff0001")
_SHADOW_B = bytes.fromhex("fc94ffffffffffffffffffffffff0002")
_SHADOW_EP = ("198.18.255.254", 9)  # only ever a dictionary key: the shadow send hands datagrams over
#: The shadow packet's UDP payload: about a DDS heartbeat or a small service call.
_PAYLOAD_LEN = 64
#: Where the shadow's UDP datagram goes (the discard port): it never leaves the shadow's own objects.
_SHADOW_PORT = 9


#: The loopback addresses :class:`LoopbackEcho` sends through, on dual-stack IPv6 sockets like the
#: underlay's: IPv4 (as IPv4-mapped, the path to IPv4 peers) and IPv6.
LOOPBACKS = ("::ffff:127.0.0.1", "::1")
#: The echo's datagram: about what a ping or a DDS heartbeat is on the underlay.
_ECHO_LEN = 128
#: Failed rounds in a row after which a loopback socket is given up (its address went away).
_ECHO_MAX_FAILURES = 10


def check_interval(interval: float) -> None:
    """Raise ValueError unless ``interval`` is 0 (off) or within [MIN_INTERVAL, MAX_INTERVAL] seconds."""
    if interval != 0 and not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        raise ValueError(
            f"warm interval {interval} s: 0 (off) or {MIN_INTERVAL * 1000:g} to {MAX_INTERVAL * 1000:g} ms"
        )


def traffic_units(counters: Counters) -> int:
    """What the real data path moved so far, for :class:`PathWarmer`: its packets, and one more per kilobyte.

    So a 64 kB super-packet weighs about what the packets it carries do, and a bulk transfer reads
    as busy even though it moves few (super-)packets.
    """
    get = counters.get
    return get("rx_packets") + get("tx_packets") + (get("rx_bytes") + get("tx_bytes")) // 1024


def _shadow_read(src: bytes, dst: bytes, vnet_hdr: bool) -> bytes:
    """The TUN read a shadow round sends: a UDP datagram as a ROS 2 node's socket hands the TUN one.

    UDP, not an echo: ROS 2 traffic is UDP, and with offloads (``vnet_hdr``) the kernel leaves a local
    socket's UDP checksum to us (NEEDS_CSUM, the field holding the pseudo-header sum), so the lone send
    runs the code that completes it (:func:`offload.read_packet`) as well as what every packet runs.
    An echo request's read is plain, a subset of this one's path.
    """
    length = UDP_HDR_LEN + _PAYLOAD_LEN
    header = struct.pack("!IHBB", 6 << 28, length, IPPROTO_UDP, 64) + src + dst
    partial = fold(ipv6_pseudo_sum(src + dst, IPPROTO_UDP, length)) if vnet_hdr else 0
    udp = struct.pack("!HHHH", _SHADOW_PORT, _SHADOW_PORT, length, partial) + bytes(_PAYLOAD_LEN)
    if not vnet_hdr:  # without offloads the kernel completed it
        full = checksum(udp, ipv6_pseudo_sum(src + dst, IPPROTO_UDP, length))
        return header + udp[:UDP_CSUM_OFFSET] + struct.pack("!H", full) + udp[UDP_CSUM_OFFSET + 2 :]
    vnet = build_vnet_hdr(
        VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 0, IPV6_HDR_LEN, UDP_CSUM_OFFSET)
    )
    return vnet + header + udp


class _ShadowHooks:
    """The control hooks of a shadow data path: everything allowed, nothing reaches the real engine."""

    def __init__(self, peer_address: bytes) -> None:
        self._peer_address = peer_address

    def send_datagrams(self, datagrams: list[bytes], endpoint: object) -> None:
        pass

    def send_control(self, datagram: bytes, endpoint: object) -> None:
        pass

    def send_segmented(self, parts: list[bytes | memoryview], segment: int, endpoint: object) -> None:
        pass

    def need_handshake(self, address: bytes, packet: bytes | None) -> None:
        pass

    def keypair_confirmed(self, peer: Peer) -> None:
        pass

    def probe_reply(self, peer: Peer, endpoint: object, nonce: bytes, now: float) -> None:
        pass

    def base_plaintext(self, owner: object, keypair: Keypair, plaintext: bytes, endpoint: object) -> None:
        pass

    def path_kind(self, endpoint: object) -> str:
        return "direct"

    def is_allowed(self, address: bytes) -> bool:
        return address == self._peer_address


class ShadowPair:
    """Two shadow data paths, A and B, with one session between them; :meth:`round` sends one packet A -> B.

    Built with the real data path's settings that change which code runs (TUN reads with a
    virtio-net header or without, the MTU, the cipher, super-packet mode), so a round runs the same
    branches a light packet does.  Rebuilt with fresh keys by :meth:`rekey`, e.g. when its keys expire.
    """

    def __init__(
        self,
        *,
        vnet_hdr: bool,
        mtu: int,
        cipher: str = CIPHER_AES,
        super_packets: bool = False,
        timers: Timers | None = None,
        clock: Callable[[], float],
        wallclock: Callable[[], float],
    ) -> None:
        if cipher not in (CIPHER_AES, CIPHER_CHACHA):
            raise ValueError(f"unknown cipher {cipher!r}")
        self.cipher = cipher
        self._timers = timers or Timers()
        self._clock = clock
        self._skip = VNET_HDR_LEN if vnet_hdr else 0
        self._read = _shadow_read(_SHADOW_A, _SHADOW_B, vnet_hdr)
        self.sent: list[bytes] = []  # what A "sent": the datagram B is given next
        self.delivered = 0  # packets B "wrote to its TUN"
        self.a = self._side(_SHADOW_A, _SHADOW_B, mtu, wallclock)
        self.b = self._side(_SHADOW_B, _SHADOW_A, mtu, wallclock)
        self.a.sendto = lambda datagram, _flags, _addr: self.sent.append(datagram)
        self.a.sockaddr = self.b.sockaddr = lambda endpoint: endpoint
        self.b.write_direct = self._delivered
        self.a.super_packets = self.b.super_packets = super_packets  # B's receive then counts as the real one does
        self.rekey()

    def _side(self, me: bytes, other: bytes, mtu: int, wallclock: Callable[[], float]) -> Datapath:
        dp = Datapath(
            me,
            {other: Peer(other)},
            IndexTable(),
            Counters(),
            _ShadowHooks(other),
            lambda packets: None,
            timers=self._timers,
            clock=self._clock,
            wallclock=wallclock,
            mtu=mtu,
        )
        peer = dp.peers[other]
        now = self._clock()
        peer.paths.add_candidate(_SHADOW_EP, "direct", "static", now)
        peer.paths.on_authenticated(_SHADOW_EP, "direct", now)
        return dp

    def _delivered(self, packet: bytes) -> None:
        self.delivered += 1

    def rekey(self) -> None:
        """A fresh session between A and B (random keys that never leave this object)."""
        k_ab, k_ba = secrets.token_bytes(32), secrets.token_bytes(32)
        now = self._clock()
        for dp, send, recv, local, remote, initiator in (
            (self.a, k_ab, k_ba, 1, 2, True),
            (self.b, k_ba, k_ab, 2, 1, False),
        ):
            (peer,) = dp.peers.values()
            km = KeyMaterial(
                send_key=send,
                recv_key=recv,
                cipher=self.cipher,
                local_index=local,
                remote_index=remote,
                is_initiator=initiator,
                peer_public_key=bytes(32),
                peer_address=peer.address,
            )
            kp = Keypair(km, now, peer, timers=self._timers, clock=self._clock)
            dp.index.set(local, kp)
            peer.current = kp
            peer.lane = None

    def round(self) -> bool:
        """One packet from A's TUN read to B's TUN write, through the lone paths; False if it did not arrive."""
        self.sent.clear()
        before = self.delivered
        if not self.a._send_lone(self._read, self._skip) or len(self.sent) != 1:
            return False
        return self.b.receive_lone(self.sent[0], _SHADOW_EP) and self.delivered == before + 1


class LoopbackEcho:
    """Sockets that each send a datagram to themselves over loopback: :meth:`round` warms the kernel's UDP path.

    Each socket is bound to a loopback address (nothing outside the host can reach it) and connected
    to itself, so the kernel delivers it only its own datagrams.  A loopback address this host does
    not have (IPv6 off, no IPv4 loopback) is skipped when :meth:`open` runs; one that keeps failing
    (its address went away) is given up after a few rounds.  Used by one thread at a time (the warmer's).
    """

    def __init__(self, hosts: tuple[str, ...] = LOOPBACKS, size: int = _ECHO_LEN) -> None:
        if not 0 < size <= 1200:
            raise ValueError(f"echo datagram size {size}: 1 to 1200 bytes")
        self.hosts = hosts
        self._payload = bytes(size)
        self._socks: list[socket.socket] = []
        self._failures: dict[socket.socket, int] = {}
        self.rounds = 0  # rounds in which every open socket got its datagram back

    @property
    def open_hosts(self) -> list[str]:
        """The loopback addresses with a working socket (after :meth:`open`)."""
        return [sock.getsockname()[0] for sock in self._socks]

    def open(self) -> None:
        """Make the sockets (again after :meth:`close`); addresses this host lacks are left out, with a debug note."""
        if self._socks:
            return
        for host in self.hosts:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind((host, 0))
                sock.connect(sock.getsockname())
                sock.setblocking(False)
            except OSError as e:
                sock.close()
                log.debug("no loopback echo on %s: %s", host, e)
                continue
            self._socks.append(sock)
            self._failures[sock] = 0

    def round(self, stop: Callable[[], bool] | None = None) -> bool:
        """One datagram out and back through each socket; True if every one came back (False with none open).

        ``stop`` is asked before each socket but the first: True ends the round there (the warmer
        yields to a real packet), and counts against no socket.
        """
        socks = self._socks
        if not socks:
            return False
        ok = True
        size = len(self._payload)
        for i, sock in enumerate(tuple(socks)):  # a copy: a socket given up leaves the list mid-round
            if i and stop is not None and stop():
                return False
            try:
                sock.send(self._payload)
                if len(sock.recv(2048)) == size:
                    self._failures[sock] = 0
                    continue
            except BlockingIOError:  # late (the softirq ran elsewhere): it stays queued, the next round takes it
                ok = False
                continue
            except OSError as e:
                log.debug("loopback echo on %s failed: %s", sock.getsockname()[0], e)
            ok = False
            self._failures[sock] += 1
            if self._failures[sock] >= _ECHO_MAX_FAILURES:
                log.debug("loopback echo on %s given up", sock.getsockname()[0])
                self._drop(sock)
        if ok:
            self.rounds += 1
        return ok

    def _drop(self, sock: socket.socket) -> None:
        self._socks.remove(sock)
        del self._failures[sock]
        sock.close()

    def close(self) -> None:
        """Close the sockets; safe to call more than once."""
        for sock in list(self._socks):
            self._drop(sock)


class Cadence:
    """When the next exchange of light traffic can come at the earliest, learnt from when the last ones began.

    Why: most light traffic on a robot is periodic (a sensor topic, a DDS heartbeat, a control loop,
    a ping), and a warm-up helps the packet that follows it soon.  Warming only from shortly before
    the earliest time the next exchange can come (its last start plus the shortest of the last
    ``history`` intervals) keeps the caches as warm for it as warming all the time does, at a
    fraction of the CPU, and leaves the GIL to the packets in between.  Timers on these machines
    wake late by milliseconds, so the shortest interval, not a mean, is the bound: jitter and a
    missing exchange only make it cautious, and irregular traffic (a short interval among long ones)
    brings it down to warming all the time.
    """

    def __init__(self, history: int = 4) -> None:
        if history < 1:
            raise ValueError(f"cadence history {history}: at least 1 interval")
        self._intervals: collections.deque[float] = collections.deque(maxlen=history)
        self._count = 0
        self._last = float("-inf")

    def observe(self, exchanges: int, started: float) -> None:
        """``exchanges`` began so far, the latest at ``started`` (the data path's running count and stamp).

        One more than last time: its interval is learnt.  Several more (they began while the warmer
        slept): their intervals are unknown and shorter than any seen, so the history is forgotten,
        and the warmer warms every interval until it has learnt the new pace.
        """
        new = exchanges - self._count
        if new <= 0:
            return
        if new > 1:
            self._intervals.clear()
        elif self._last != float("-inf"):
            self._intervals.append(started - self._last)
        self._count, self._last = exchanges, started

    def next_at(self) -> float | None:
        """The earliest the next exchange can come (``clock`` seconds); None until ``history`` intervals were seen."""
        intervals = self._intervals
        if len(intervals) < (intervals.maxlen or 0):
            return None
        return self._last + min(intervals)

    def next_after(self, t: float, tolerance: float) -> float | None:
        """The earliest time after ``t`` the next exchange of periodic traffic can come; None if none is expected.

        For traffic that has been quiet for a while: every interval its quiet spell already outlasted
        is ruled out, and what is left counts only if it came twice (two intervals within
        ``tolerance`` of each other): a pace, such as a heartbeat's every few seconds, and not the
        one gap before a stray packet (a path probe after the last ping).  Two intervals, not four as
        for :meth:`next_at`: a heartbeat has little jitter, and waiting for four would leave four of
        its exchanges cold after each relearn.
        """
        last = self._last
        ahead = sorted(interval for interval in self._intervals if last + interval > t)
        for shorter, longer in itertools.pairwise(ahead):
            if longer - shorter <= tolerance:
                return last + shorter
        return None


class PathWarmer:
    """The thread that runs a shadow round (and an echo round) every ``interval`` while the next light packet may come.

    ``traffic`` returns a number that grows with the traffic the real data path moves (the engine
    passes :func:`traffic_units` of its counters).  Above ``busy_rate`` of those a second the real
    path is hot by itself, and the warmer only looks again every ``idle_check`` seconds: it must
    not take CPU time (or the GIL) from a bulk transfer.  ``bursts`` returns how many exchanges of
    light traffic began and when the latest did (:attr:`Datapath.bursts`, :attr:`Datapath.burst_at`):
    after an exchange the warmer sleeps until ``lead`` seconds before the next one can come (its
    :class:`Cadence`), then warms every ``interval`` until it does.  ``lone_at`` returns when the
    latest lone packet left (:attr:`Datapath.lone_at`): an exchange that has run for an ``interval``
    with no pause and is still running is traffic faster than the warmer (a 1 kHz control loop), which
    keeps the path warm by itself, and the warmer leaves it alone (:attr:`streaming`).  :meth:`tick` is
    one step of the thread's loop, callable directly (tests drive it with their own clock).
    """

    def __init__(
        self,
        shadow: ShadowPair,
        traffic: Callable[[], int],
        clock: Callable[[], float],
        *,
        interval: float = DEFAULT_INTERVAL,
        idle_after: float = 1.0,
        idle_check: float = 0.1,
        busy_rate: float = 8000.0,
        echo: LoopbackEcho | None = None,
        bursts: Callable[[], tuple[int, float]] | None = None,
        lead: float = DEFAULT_LEAD,
        lone: Callable[[], tuple[int, int]] | None = None,
        handover: QuickHandover | None = None,
        lone_at: Callable[[], float] | None = None,
    ) -> None:
        check_interval(interval)
        if not 0 < interval <= idle_check:
            raise ValueError(f"warm interval {interval} s: must be on, and at most the idle check ({idle_check} s)")
        if not 0 < lead <= idle_check:
            raise ValueError(f"warm-up lead {lead} s: above 0 and at most the idle check ({idle_check} s)")
        self.shadow = shadow
        self.echo = echo  # the kernel's half of the warm-up (opened by start, closed by stop)
        self.interval = interval
        self.lead = lead
        self.rounds = 0  # warm-ups run (for tests and the benchmark's report)
        self.paced_rounds = 0  # of those, the ones timed to an expected exchange
        self.deferred = 0  # warm-ups put off because a real packet was on a lone path
        self.yielded = 0  # warm-ups cut short because a real packet came while they ran
        self.streaming = 0  # ticks that left it to traffic faster than the warmer (no warm-up)
        self._lone_at = lone_at  # None: not watched for
        self._lone = lone  # None: real packets are not watched for
        self._stale = -1  # the lone_started count a deferral was last made for
        self.handover = handover  # wanted while not busy: light traffic's packets get the GIL quickly
        self._busy = False
        self._traffic = traffic
        self._bursts = bursts  # None: no pacing (every interval while light traffic flows)
        self._cadence = Cadence()
        self._pacing = False  # the last tick slept until just before an expected exchange
        self._clock = clock
        self._idle_after = idle_after
        self._idle_check = idle_check
        self._busy_rate = busy_rate
        self._seen = traffic()
        self._last_tick = clock()
        self._last_traffic = float("-inf")
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends a sleep early: stop, or a nudge while idle
        self._idle = False  # the last tick found no recent traffic (a nudge may wake it)
        self._thread: threading.Thread | None = None

    def tick(self) -> float:
        """Warm up if light traffic moved recently and it is time; return how long to sleep before the next tick."""
        now = self._clock()
        seen = self._traffic()
        moved = seen - self._seen
        elapsed = max(now - self._last_tick, self.interval)  # a tick never covers less
        self._seen, self._last_tick = seen, now
        if moved:
            self._last_traffic = now
        busy = moved > self._busy_rate * elapsed
        if busy is not self._busy:
            self._busy = busy
            if self.handover is not None:
                self.handover.want(not busy)
        # Quiet for idle_after is idle, unless the traffic is periodic and its next exchange is not yet
        # overdue: a heartbeat every few seconds is as predictable as a 100 Hz topic, and as cold without us.
        quiet = now - self._last_traffic > self._idle_after
        due = None
        started = None  # when the current exchange began
        if self._bursts is not None and not busy:
            cadence = self._cadence
            count, started = self._bursts()
            cadence.observe(count, started)
            due = cadence.next_after(now - OVERDUE_GRACE, OVERDUE_GRACE) if quiet else cadence.next_at()
        self._idle = quiet and due is None
        if self._idle:
            return self._idle_check  # idle: no work, few wake-ups (or a nudge)
        if busy:
            return self._idle_check  # busy: the real path is hot by itself
        # Light traffic: without us each of its packets would meet cold caches.
        if due is not None and now < due - self.lead:
            # No exchange can come before then: asleep till just before, but looking again after
            # idle_check at most, so that traffic which turns faster meanwhile is not left cold for long.
            self._pacing = True
            return min(due - self.lead - now, self._idle_check)
        if started is not None and self._lone_at is not None:
            last = self._lone_at()
            if now - last < self.interval and last - started >= self.interval:
                # One exchange with no pause of BURST_GAP for an interval and more, its latest packet within
                # the last interval: packets come faster than warm-ups would, and each leaves the path warm.
                # A warm-up would only take the CPU and the GIL from the next (1 kHz UDP requests: the warmer
                # thread 3.3 -> 1.0-1.3 % of a core per daemon, latency side by side unchanged).
                self.streaming += 1
                return self.interval
        if self._packet_on_its_way():
            self.deferred += 1
            return min(BUSY_DEFER, self.interval)
        if self._warm() and self._pacing:
            self.paced_rounds += 1
        self._pacing = False
        return self.interval  # the exchange may come any time now: warm every interval till it does

    def _packet_on_its_way(self) -> bool:
        """True if a real packet entered a lone path and has not left it (each such packet defers once).

        A lone path the packet does not finish (declined: the batch path takes it) leaves the counts
        unequal for good, so a second look at the same count no longer defers.
        """
        if self._lone is None:
            return False
        started, finished = self._lone()
        if started == finished or started == self._stale:
            return False
        self._stale = started
        return True

    def _warm(self) -> bool:
        """One warm-up: the shadow round, then the echo; False if the shadow path broke and warming stopped.

        A real packet that enters a lone path meanwhile (it got the GIL while the warm-up was in a
        system call) ends the warm-up at the next step: each step would otherwise take the GIL back
        from it for tens of microseconds.
        """
        lone = self._lone
        started = lone()[0] if lone is not None else 0

        def interrupted() -> bool:
            return lone is not None and lone()[0] != started

        if not self.shadow.round():
            self.shadow.rekey()  # its keys expired: fresh ones, and the round again
            if not self.shadow.round():
                # Fresh keys and still refused: the lone paths changed under the shadow.  A bug, which
                # costs only latency: say so once and stop, rather than rekey every tick.
                log.warning("the path warmer's shadow packet no longer goes through; warming stopped")
                self._stop.set()
                return False
        if self.echo is not None and not interrupted():
            self.echo.round(interrupted)
        if interrupted():
            self.yielded += 1
            return True
        self.rounds += 1
        return True

    def start(self) -> None:
        """Start the thread (once; again after :meth:`stop`)."""
        if self._thread is not None:
            return
        self._stop.clear()
        if self.handover is not None:
            self.handover.want(not self._busy)
        if self.echo is not None:
            self.echo.open()
        self._thread = NamedThread(target=self._run, name="path-warmer", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """An exchange of light traffic began: if the warmer sleeps idle, wake it now.

        Idle, it looks for traffic only every ``idle_check`` (0.1 s): traffic that starts after a
        quiet spell (a burst of service calls, a topic coming back) would meet cold caches for that
        long, 10 packets of a 100 Hz flow.  Called by the data path when an exchange begins
        (:attr:`Datapath.on_exchange`), after its packet left; costs one attribute read unless idle.
        """
        if self._idle:
            self._idle = False
            self._wake.set()

    def _run(self) -> None:
        wake = self._wake
        try:
            while not self._stop.is_set():
                wake.clear()  # before the tick: a nudge during it ends the next sleep at once
                wake.wait(self.tick())
        except Exception:  # never take the node down: it only costs latency
            log.exception("the path warmer stopped")

    @property
    def running(self) -> bool:
        """True while the thread runs (it ends on :meth:`stop`, or by itself if its shadow path broke)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stop(self) -> None:
        """End the thread and wait for it: the shadow path is never mid-round once this returns."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        if self.handover is not None:
            self.handover.want(False)  # after the join: the thread's last tick may have wanted it
        if thread is not None and thread.is_alive():
            return  # stuck (never seen): its echo sockets stay with it rather than close under it
        if self.echo is not None:
            self.echo.close()
