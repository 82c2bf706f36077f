"""The path warmer (issue #6): a shadow packet through the real lone paths, and only while light traffic flows."""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time

import pytest

from husarnet_ros.core.constants import Timers
from husarnet_ros.core.counters import Counters
from husarnet_ros.core.datapath import BURST_GAP, Datapath
from husarnet_ros.core.engine import Engine, EngineConfig, EngineError
from husarnet_ros.core.session import CIPHER_AES, CIPHER_CHACHA
from husarnet_ros.core.warmer import (
    BUSY_DEFER,
    DEFAULT_LEAD,
    LOOPBACKS,
    OVERDUE_GRACE,
    Cadence,
    LoopbackEcho,
    PathWarmer,
    ShadowPair,
    check_interval,
    traffic_units,
)
from husarnet_ros.daemon import build_parser, config_from_args


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shadow(clock: Clock | None = None, **kw: object) -> ShadowPair:
    kw.setdefault("vnet_hdr", True)
    kw.setdefault("mtu", 1371)
    return ShadowPair(clock=clock or time.monotonic, wallclock=time.time, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("vnet_hdr", [True, False])
@pytest.mark.parametrize("cipher", [CIPHER_AES, CIPHER_CHACHA])
@pytest.mark.parametrize("super_packets", [True, False])
def test_a_round_goes_through_the_real_lone_paths(vnet_hdr: bool, cipher: str, super_packets: bool) -> None:
    sh = shadow(vnet_hdr=vnet_hdr, cipher=cipher, super_packets=super_packets)
    # The shadow nodes are real data paths: the round calls the very methods a light packet takes.
    assert type(sh.a) is Datapath and type(sh.b) is Datapath
    for n in (1, 2, 3):
        assert sh.round()
        assert sh.delivered == n
        assert sh.a.counters["tx_packets"] == n and sh.b.counters["rx_packets"] == n
    # Sealed and opened: what crossed was a Data datagram, not the plaintext.
    packet = sh._read[sh._skip :]
    assert len(sh.sent) == 1 and sh.sent[0][:4] == b"\x04\x00\x00\x00" and packet[40:] not in sh.sent[0]
    assert len(sh.sent[0]) == 16 + len(packet) + 16  # header, ciphertext, tag
    drops = {k: v for k, v in sh.b.counters.snapshot().items() if v and k not in ("rx_packets", "rx_bytes")}
    assert drops == {}


@pytest.mark.parametrize("vnet_hdr", [True, False])
def test_the_shadow_packet_is_udp_and_with_offloads_its_checksum_is_left_to_the_send(
    vnet_hdr: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ROS 2 traffic is UDP, and a local socket's UDP checksum comes to the TUN reader unfinished (NEEDS_CSUM):
    a warm-up runs the code that completes it, as well as what every light packet runs."""
    from husarnet_ros.core import datapath, offload

    completed: list[int] = []
    complete = offload.read_packet

    def counting(buf):  # type: ignore[no-untyped-def]
        completed.append(offload.parse_vnet_hdr(buf).csum_offset)
        return complete(buf)

    monkeypatch.setattr(datapath, "read_packet", counting)
    sh = shadow(vnet_hdr=vnet_hdr)
    written: list[bytes] = []
    deliver = sh.b.write_direct
    sh.b.write_direct = lambda p: (written.append(bytes(p)), deliver(p))  # type: ignore[func-returns-value]
    assert sh.round()
    assert completed == ([offload.UDP_CSUM_OFFSET] if vnet_hdr else [])
    (packet,) = written
    assert packet[6] == offload.IPPROTO_UDP and datapath._kernel_may_answer(packet) is False
    assert (
        offload.checksum(packet[40:], offload.ipv6_pseudo_sum(packet[8:40], offload.IPPROTO_UDP, len(packet) - 40)) == 0
    )


def test_a_round_that_the_receive_rules_refuse_is_reported() -> None:
    sh = shadow()
    assert sh.round()
    sh.b.peers[next(iter(sh.b.peers))].current._replay.commit(10**6)  # B's window moved far ahead
    assert not sh.round()  # the next counter is now too old for B: refused, and said so
    assert sh.b.counters["too_old"] == 1


def test_shadow_keys_are_fresh_random_and_rekey_replaces_them() -> None:
    one, two = shadow(), shadow()
    (kp1,) = (p.current for p in one.a.peers.values())
    assert one.round() and two.round()
    assert one.sent[0] != two.sent[0]  # same plaintext, same counter: different keys
    one.rekey()
    (kp3,) = (p.current for p in one.a.peers.values())
    assert kp3 is not kp1 and one.round()


def test_bad_cipher_refused() -> None:
    with pytest.raises(ValueError, match="cipher"):
        shadow(cipher="rot13")


class Traffic:
    def __init__(self) -> None:
        self.packets = 0

    def __call__(self) -> int:
        return self.packets


def warmer(clock: Clock, traffic: Traffic, sh: ShadowPair | None = None, **kw: object) -> PathWarmer:
    return PathWarmer(sh or shadow(clock), traffic, clock, interval=0.002, idle_after=1.0, idle_check=0.1, **kw)


#: (packets moved since the last tick, seconds since it, the sleep tick returns, rounds run so far): a story.
TICKS = [
    (0, 0.0, 0.1, 0),  # idle from the start: no work, the long sleep
    (1, 0.1, 0.002, 1),  # a packet moved: warm, and tick again soon
    (0, 0.5, 0.002, 2),  # traffic is recent (within idle_after): warm again
    (17, 0.002, 0.1, 2),  # busy (above 8000 a second): hot by itself, no round, the long sleep
    (17, 0.1, 0.002, 3),  # the same amount over the long sleep is a low rate again: light, warm
    (15, 0.002, 0.002, 4),  # just under the rate: still light
    (0, 1.5, 0.1, 4),  # nothing for longer than idle_after: idle again
]


def test_tick_warms_only_while_light_traffic_flows() -> None:
    clock, traffic = Clock(), Traffic()
    w = warmer(clock, traffic, busy_rate=8000)
    for step, (moved, elapsed, sleep, rounds) in enumerate(TICKS):
        traffic.packets += moved
        clock.now += elapsed
        assert (w.tick(), w.rounds) == (sleep, rounds), f"step {step}: {TICKS[step]}"


def test_traffic_units_weigh_a_super_packet_like_the_packets_it_carries() -> None:
    c = Counters()
    assert traffic_units(c) == 0
    c.inc_traffic("rx_packets", "rx_bytes", 104)  # a ping
    assert traffic_units(c) == 1
    c.inc_traffic("tx_packets", "tx_bytes", 65000)  # one super-packet: ~45 full-size packets
    assert traffic_units(c) == 2 + (104 + 65000) // 1024
    # One of those per 2 ms tick is far above the default busy rate (8000 a second: 16 per tick).
    clock, traffic = Clock(), Traffic()
    w = warmer(clock, traffic)
    traffic.packets = 1
    w.tick()
    traffic.packets += traffic_units(c)
    clock.now += 0.002
    assert w.tick() == 0.1 and w.rounds == 1


def test_real_counters_sockets_and_peers_are_untouched() -> None:
    clock, traffic = Clock(), Traffic()
    real = Counters()
    before = real.snapshot()
    sh = shadow(clock)
    w = warmer(clock, traffic, sh)
    traffic.packets = 1
    for _ in range(20):
        clock.now += 0.002
        w.tick()
    assert w.rounds == 20
    assert real.snapshot() == before
    assert sh.a.sendto is not None and sh.a.sendto.__name__ == "<lambda>"  # the hand-over, not a socket
    assert sh.b.write_direct == sh._delivered


def test_expired_shadow_keys_are_replaced_and_warming_goes_on() -> None:
    clock, traffic = Clock(), Traffic()
    sh = shadow(clock, timers=Timers())
    w = warmer(clock, traffic, sh)
    traffic.packets = 1
    w.tick()
    (old,) = (p.current for p in sh.a.peers.values())
    clock.now += Timers().reject_after_time + 1  # the keys are past their time limit: seal refuses
    traffic.packets += 1
    assert w.tick() == 0.002
    (new,) = (p.current for p in sh.a.peers.values())
    assert new is not old and w.rounds == 2 and w.running is False  # never started: tick only


def test_a_shadow_path_that_never_goes_through_stops_the_warmer_with_a_warning(caplog) -> None:
    clock, traffic = Clock(), Traffic()
    sh = shadow(clock)
    sh.round = lambda: False  # type: ignore[method-assign]
    w = warmer(clock, traffic, sh)
    w.start()
    try:
        traffic.packets = 1
        deadline = time.monotonic() + 10
        while w.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not w.running
        assert "no longer goes through" in caplog.text
        assert w.rounds == 0
    finally:
        w.stop()


def test_thread_runs_rounds_and_stop_ends_it() -> None:
    traffic = Traffic()
    w = PathWarmer(shadow(), traffic, time.monotonic, interval=0.002)
    w.start()
    try:
        assert w.running and "path-warmer" in {t.name for t in threading.enumerate()}
        deadline = time.monotonic() + 10
        while w.rounds < 5 and time.monotonic() < deadline:
            traffic.packets += 1
            time.sleep(0.01)
        assert w.rounds >= 5
    finally:
        w.stop()
    assert not w.running and "path-warmer" not in {t.name for t in threading.enumerate()}
    w.stop()  # twice is fine


@pytest.mark.parametrize("interval", [0.0005, 0.002, 0.1])
def test_interval_range_accepts(interval: float) -> None:
    check_interval(interval)
    check_interval(0)  # off


@pytest.mark.parametrize("interval", [-1, 0.0001, 0.5, 10])
def test_interval_range_refuses_with_the_range(interval: float) -> None:
    with pytest.raises(ValueError, match=r"0 \(off\) or 0.5 to 100 ms"):
        check_interval(interval)


def test_a_warmer_is_never_built_switched_off() -> None:
    with pytest.raises(ValueError):
        PathWarmer(shadow(), Traffic(), time.monotonic, interval=0)


def test_engine_refuses_a_bad_interval_before_creating_anything(tmp_path) -> None:
    state = tmp_path / "state"
    eng = Engine(EngineConfig(state_dir=state, use_tun=False, lan_discovery=False, udp_port=0, warm_interval=5.0))
    with pytest.raises(EngineError, match="warm interval"):
        eng.start()
    assert not state.exists()


def test_engine_without_a_tun_has_no_warmer(tmp_path) -> None:
    eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False, udp_port=0))
    eng.start()
    try:
        assert eng.warm_rounds == 0
        assert "path-warmer" not in {t.name for t in threading.enumerate()}
    finally:
        eng.stop()


def test_daemon_flag_is_milliseconds_and_zero_is_off(tmp_path) -> None:
    parse = build_parser().parse_args
    assert config_from_args(parse(["--state-dir", str(tmp_path)])).warm_interval == pytest.approx(0.002)
    assert config_from_args(parse(["--state-dir", str(tmp_path), "--warm-interval", "5"])).warm_interval == 0.005
    assert config_from_args(parse(["--state-dir", str(tmp_path), "--warm-interval", "0"])).warm_interval == 0


# --- pacing: warm-ups only from shortly before the next exchange can come ------------------------------


def test_lone_paths_stamp_when_an_exchange_begins() -> None:
    clock = Clock()
    sh = shadow(clock)
    began: list[int] = []
    sh.a.on_exchange = lambda: began.append(sh.a.bursts)  # after the count: the warmer may read it
    assert (sh.a.bursts, sh.a.burst_at) == (0, float("-inf"))
    assert sh.round()  # A sends, B receives: each side's first packet begins an exchange
    first = clock.now
    assert (sh.a.bursts, sh.a.burst_at) == (sh.b.bursts, sh.b.burst_at) == (1, first)
    clock.now += BURST_GAP / 2  # an answer within the gap belongs to the same exchange
    assert sh.round()
    assert (sh.a.bursts, sh.a.burst_at) == (sh.b.bursts, sh.b.burst_at) == (1, first)
    clock.now += BURST_GAP * 1.5  # a quiet gap: the next packet begins another
    assert sh.round()
    assert (sh.a.bursts, sh.a.burst_at) == (sh.b.bursts, sh.b.burst_at) == (2, clock.now)
    assert began == [1, 2]  # told once per exchange, not per packet


def test_a_keepalive_is_no_exchange_and_does_not_hide_the_next_one() -> None:
    """Control datagrams (keepalives, probes) move no traffic counter: counted as exchanges, they made a
    quiet warmer expect more of them, and one just before a request merged the request into it."""
    clock = Clock()
    sh = shadow(clock)
    (peer,) = sh.a.peers.values()
    began: list[int] = []
    sh.b.on_exchange = lambda: began.append(sh.b.bursts)
    assert sh.b.receive_lone(peer.current.seal(b""), ("198.18.255.254", 9))  # a keepalive from A
    assert (sh.b.bursts, began) == (0, [])
    assert sh.b.lone_finished == sh.b.lone_started == 1  # but its lone path did finish
    clock.now += BURST_GAP / 2  # a request right after it ...
    assert sh.round()
    assert (sh.b.bursts, sh.b.burst_at, began) == (1, clock.now, [1])  # ... begins an exchange


def test_lone_paths_count_a_packet_on_its_way_until_it_left() -> None:
    sh = shadow()
    a, b = sh.a, sh.b
    assert (a.lone_started, a.lone_finished) == (0, 0)
    seen: list[tuple[int, int]] = []
    send = a.sendto
    a.sendto = lambda d, f, addr: (seen.append((a.lone_started, a.lone_finished)), send(d, f, addr))  # type: ignore[assignment]
    assert sh.round()
    assert seen == [(1, 0)]  # while the packet was on its way out: started, not finished
    assert (a.lone_started, a.lone_finished) == (1, 1) and (b.lone_started, b.lone_finished) == (1, 1)
    assert not a._send_lone(b"\x60" + bytes(60), sh._skip)  # declined: left to the batch path, unequal
    assert (a.lone_started, a.lone_finished) == (2, 1)
    assert not b.receive_lone(b"\x01" + bytes(40), ("198.18.0.9", 9))  # not Data: declined likewise
    assert (b.lone_started, b.lone_finished) == (2, 1)


def test_cadence_bounds_the_next_exchange_by_the_shortest_recent_interval() -> None:
    c = Cadence(history=3)
    n = 0

    def exchange(t: float) -> None:
        nonlocal n
        n += 1
        c.observe(n, t)

    for t in (0.0, 0.010, 0.021):
        exchange(t)
        assert c.next_at() is None  # fewer than three intervals: no bound yet
    c.observe(n, 0.021)  # the same exchange seen again
    assert c.next_at() is None
    exchange(0.030)
    assert c.next_at() == pytest.approx(0.030 + 0.009)  # the shortest of 10, 11, 9 ms
    exchange(0.050)  # a missing exchange (20 ms) does not move the bound ...
    assert c.next_at() == pytest.approx(0.050 + 0.009)
    exchange(0.052)  # ... a second flow's short interval brings it down
    assert c.next_at() == pytest.approx(0.052 + 0.002)
    for t in (0.062, 0.072, 0.082):
        exchange(t)
    assert c.next_at() == pytest.approx(0.092)  # the short interval aged out of the history
    n += 2  # two exchanges began between two looks: their intervals are unknown ...
    c.observe(n, 0.090)
    assert c.next_at() is None  # ... and shorter than any seen: relearn
    for t in (0.094, 0.098, 0.102):
        exchange(t)
    assert c.next_at() == pytest.approx(0.106)
    with pytest.raises(ValueError, match="history"):
        Cadence(history=0)


def test_after_a_quiet_spell_only_a_pace_not_yet_outlasted_is_expected() -> None:
    c = Cadence(history=4)
    c.observe(1, 10.0)
    assert c.next_after(11.0, 0.05) is None  # no interval yet
    c.observe(2, 12.0)
    assert c.next_after(13.0, 0.05) is None  # one 2 s gap is not a pace yet (a stray packet after a flow)
    c.observe(3, 13.99)
    assert c.next_at() is None  # two intervals: too few for fast traffic's jitter ...
    assert c.next_after(15.0, 0.05) == pytest.approx(15.98)  # ... but a pace once quiet: 2.0 and 1.99 s
    assert c.next_after(16.1, 0.05) is None  # outlasted: nothing expected any more
    c.observe(4, 14.29)  # another flow's short interval (0.3 s) among them came once: not a pace ...
    assert c.next_after(14.29, 0.05) == pytest.approx(16.28)  # ... the 2 s one still is
    assert c.next_after(15.3, 0.001) is None  # with a tighter tolerance 2.0 and 1.99 s are not one pace
    assert c.next_after(15.3, 0.05) == pytest.approx(16.28)  # asking changed nothing
    assert c.next_at() is None  # three intervals: fast traffic's bound still waits for four


def test_a_stray_exchange_after_a_flow_does_not_keep_the_warmer_from_idling() -> None:
    # 50 ms pings, then one more exchange 1.3 s after the last (a path probe): once quiet, nothing is due.
    exchanges = [k * 0.05 for k in range(1, 41)] + [2.0 + 1.3]
    idle: list[float] = []
    _, warmups = simulate(exchanges, until=6.0, idle_ticks=idle)
    assert not [x for x in warmups if x > 3.3 + 1.1]  # none for a "next" stray exchange (due at 4.6)
    assert idle[-1] == pytest.approx(6.0, abs=0.11)


def recorded(w: PathWarmer, clock: Clock) -> list[float]:
    """The times of ``w``'s warm-ups from now on (seconds from now), filled in as it runs them."""
    start = clock.now
    warmups: list[float] = []
    warm = w._warm
    w._warm = lambda: warmups.append(clock.now - start) or warm()  # type: ignore[method-assign, func-returns-value]
    return warmups


def simulate(
    exchanges: list[float], *, lead: float = DEFAULT_LEAD, until: float, idle_ticks: list[float] | None = None
) -> tuple[PathWarmer, list[float]]:
    """Tick a warmer on a simulated clock through ``exchanges`` (times from 0); return it and its warm-up times.

    ``idle_ticks`` (if given) collects the times of the ticks after which the warmer was idle.
    """
    clock, traffic = Clock(), Traffic()
    start = clock.now
    burst = {"count": 0, "at": float("-inf")}
    w = warmer(clock, traffic, bursts=lambda: (burst["count"], burst["at"]), lead=lead)
    warmups = recorded(w, clock)
    pending = sorted(exchanges)
    while clock.now - start < until:
        sleep = w.tick()
        if idle_ticks is not None and w._idle:
            idle_ticks.append(clock.now - start)
        wake = clock.now + max(sleep, 1e-6)  # a real wait takes at least that
        while pending and start + pending[0] <= wake:  # the exchanges that happen while it sleeps
            clock.now = start + pending.pop(0)
            burst["count"] += 1
            burst["at"] = clock.now
            traffic.packets += 2  # a request and its answer
        clock.now = wake
    return w, warmups


@pytest.mark.parametrize(("period", "streams"), [(0.001, True), (0.0015, True), (0.003, False), (0.010, False)])
def test_traffic_faster_than_the_warmer_is_left_to_keep_the_path_warm(period: float, streams: bool) -> None:
    """A request and its answer every ``period``, stamped by a real data path (its BURST_GAP makes the exchanges).

    Faster than the warm interval (a 1 kHz control loop) the packets keep the path warm themselves, and
    warm-ups would only take the CPU and the GIL from them; at 333 Hz and 100 Hz the warmer works as before.
    When the stream stops, the warmer warms again for whatever comes next.
    """
    clock, traffic = Clock(), Traffic()
    start = clock.now
    dp = shadow(clock).a  # only its stamps are used: _stamp_exchange, as both lone paths call it
    w = warmer(clock, traffic, bursts=lambda: (dp.bursts, dp.burst_at), lone_at=lambda: dp.lone_at)
    warmups = recorded(w, clock)
    packets = sorted(
        [k * period for k in range(1, int(0.3 / period))] + [k * period + 0.0002 for k in range(1, int(0.3 / period))]
    )
    while clock.now - start < 0.4:
        wake = clock.now + max(w.tick(), 1e-6)
        while packets and start + packets[0] <= wake:
            clock.now = start + packets.pop(0)
            dp._stamp_exchange(clock.now)
            traffic.packets += 1
        clock.now = wake
    during = [t for t in warmups if 0.02 < t < 0.3 - period]
    if streams:
        assert during == [] and w.streaming > 50
    else:
        assert len(during) > 0.25 / 0.010 and w.streaming == 0
    assert [t for t in warmups if 0.3 < t < 0.3 + 3 * 0.002]  # stopped: warmed for the next exchange at once


def last_warmup_before(warmups: list[float], t: float) -> float:
    return max((w for w in warmups if w <= t), default=float("-inf"))


def settled(exchanges: list[float], warmups: list[float], period: float) -> list[float]:
    """The exchanges after the warmer woke to the traffic (its first warm-up) and learnt four intervals."""
    return [t for t in exchanges if t > warmups[0] + 5 * period]


@pytest.mark.parametrize("jitter", [0.0, 0.001])
def test_periodic_traffic_is_warmed_just_before_each_exchange_and_not_between(jitter: float) -> None:
    # 100 Hz, each exchange up to `jitter` late (timers here wake late by up to milliseconds).
    rng = random.Random(6)
    exchanges = [k * 0.010 + rng.uniform(0, jitter) for k in range(1, 100)]
    w, warmups = simulate(exchanges, lead=0.0045, until=1.0)
    steady = settled(exchanges, warmups, 0.010)
    assert len(steady) > 80
    # Once four intervals are known, every exchange meets a warm-up at most one interval old ...
    for t in steady:
        assert t - last_warmup_before(warmups, t) <= 0.002 + 1e-9, t
    # ... and between two exchanges the warmer runs only from `lead` before the earliest the next can
    # come: about 3 warm-ups a period instead of 5 (fixed interval), more with jitter.
    later = [x for x in warmups if steady[0] < x <= steady[-1]]
    per_period = len(later) / (len(steady) - 1)
    assert per_period <= (3.1 if not jitter else 3.8), per_period
    assert w.paced_rounds >= len(steady) - 1  # a wake-up timed to each exchange
    assert w.rounds == len(warmups)


def test_slow_periodic_traffic_costs_a_few_warm_ups_per_exchange() -> None:
    assert DEFAULT_LEAD <= 0.0085  # what the bound below allows
    exchanges = [k * 0.1 for k in range(1, 30)]  # 10 Hz: the fixed interval would warm 50 times a period
    w, warmups = simulate(exchanges, until=3.0)
    steady = settled(exchanges, warmups, 0.1)
    assert len(steady) > 20 and w.paced_rounds >= len(steady) - 1
    later = [x for x in warmups if steady[0] < x <= steady[-1]]
    assert len(later) <= 5 * (len(steady) - 1), len(later)  # the default lead: 8.5 ms, a warm-up each 2 ms
    for t in steady:
        assert t - last_warmup_before(warmups, t) <= 0.002 + 1e-9, t


def test_periodic_traffic_slower_than_idle_after_is_still_warmed_before_each_exchange() -> None:
    # A heartbeat every 2 s: quiet for longer than idle_after (1 s) between exchanges.  Idle there, the
    # warmer met each exchange cold, and (woken by it) warmed while its answer was on the way.
    exchanges = [k * 2.0 for k in range(1, 12)]
    idle: list[float] = []
    w, warmups = simulate(exchanges, until=exchanges[-1] + 0.01, idle_ticks=idle)
    steady = settled(exchanges, warmups, 2.0)
    assert len(steady) >= 5 and w.paced_rounds >= len(steady) - 1
    for t in steady:
        assert t - last_warmup_before(warmups, t) <= 0.002 + 1e-9, t  # warm, as at 100 Hz
    later = [x for x in warmups if steady[0] < x <= steady[-1]]
    assert len(later) <= 5 * (len(steady) - 1), len(later)  # a few warm-ups per exchange, none between
    assert not [t for t in idle if t > steady[0]]  # never idle: no exchange wakes it (nudge) any more


def test_slow_periodic_traffic_is_warm_again_two_exchanges_after_a_relearn() -> None:
    # Two exchanges in one look (say a probe round of each end at once) make the cadence relearn.
    # For 2 s traffic, waiting for four intervals again would leave four exchanges cold; two are.
    exchanges = [k * 2.0 for k in range(1, 7)] + [12.03, 12.035] + [12.0 + k * 2.0 for k in range(1, 8)]
    _, warmups = simulate(exchanges, until=exchanges[-1] + 0.01)
    after = [t for t in exchanges if t > 12.1]
    cold = [t for t in after if t - last_warmup_before(warmups, t) > 0.002 + 1e-9]
    assert cold == [14.0, 16.0], cold  # two intervals after the relearn make a pace again
    # Once four intervals are known again, a few warm-ups per exchange: from the lead before 1.965 s after
    # the last, 22, not the 500 of the second after each exchange while the pace is being learnt.
    paced = [x for x in warmups if x > 20.1]
    assert len(paced) <= 3 * ((0.035 + DEFAULT_LEAD) / 0.002 + 1), len(paced)


def test_periodic_traffic_that_stops_leaves_the_warmer_idle_once_its_next_exchange_is_overdue() -> None:
    exchanges = [k * 2.0 for k in range(1, 9)]
    idle: list[float] = []
    _, warmups = simulate(exchanges, until=exchanges[-1] + 6.0, idle_ticks=idle)
    expected = exchanges[-1] + 2.0  # the exchange that never came
    after = [x for x in warmups if x > exchanges[-1]]
    assert after and min(after) >= expected - DEFAULT_LEAD - 1e-9  # warmed for it ...
    assert max(after) <= expected + OVERDUE_GRACE + 1e-9  # ... until it was overdue, then no more
    assert len(after) <= (DEFAULT_LEAD + OVERDUE_GRACE) / 0.002 + 1
    assert idle and min(t for t in idle if t > exchanges[-1]) <= expected + OVERDUE_GRACE + 0.1
    assert idle[-1] == pytest.approx(exchanges[-1] + 6.0, abs=0.11)  # and idle from then on


def test_traffic_that_turns_faster_during_a_long_sleep_is_relearnt() -> None:
    # 2 Hz for 3 s (the warmer sleeps through most of each 0.5 s), then 50 Hz: within one idle check it
    # looks again, sees that several exchanges began unseen, warms every interval and learns the pace.
    slow = [k * 0.5 for k in range(1, 7)]
    fast = [3.0 + k * 0.020 for k in range(1, 60)]
    w, warmups = simulate(slow + fast, until=4.2)
    assert w.paced_rounds >= 4  # it did sleep through the slow period
    cold = [t for t in fast if t - last_warmup_before(warmups, t) > 0.002 + 1e-9]
    assert cold and max(cold) <= 3.0 + 0.1 + 0.001, cold  # only those before its next look went cold
    steady = [t for t in fast if t > 3.0 + 0.1 + 5 * 0.020]
    assert all(t - last_warmup_before(warmups, t) <= 0.002 + 1e-9 for t in steady)
    later = [x for x in warmups if steady[0] < x <= steady[-1]]
    assert len(later) <= 5 * (len(steady) - 1)


def test_irregular_traffic_is_warmed_every_interval() -> None:
    # Two flows whose exchanges come 3 ms apart now and then: no time is safe to sleep through.
    exchanges = sorted([k * 0.010 for k in range(1, 50)] + [k * 0.030 + 0.003 for k in range(1, 16)])
    _, warmups = simulate(exchanges, until=0.5)
    both = [x for x in warmups if x < exchanges[-1] - 0.04]  # while both flows run (the 30 ms one ends first)
    gaps = [b - a for a, b in itertools.pairwise(both)]
    assert max(gaps) == pytest.approx(0.002)  # the shortest interval (3 ms) is within the lead: never asleep
    assert len(both) > 150


def test_the_lead_is_bounded() -> None:
    for lead in (0, -1, 0.2):
        with pytest.raises(ValueError, match="lead"):
            PathWarmer(shadow(), Traffic(), time.monotonic, interval=0.002, lead=lead)


def test_a_nudge_wakes_only_an_idle_warmer() -> None:
    clock, traffic = Clock(), Traffic()
    w = warmer(clock, traffic)
    traffic.packets += 1
    w.tick()  # light traffic: warming, not idle
    w.nudge()
    assert not w._wake.is_set()  # a flow's every exchange costs no wake-up
    clock.now += 1.5
    assert w.tick() == 0.1  # idle: it would look again only after idle_check
    w.nudge()
    assert w._wake.is_set()
    w._wake.clear()
    w.nudge()  # once per idle spell
    assert not w._wake.is_set()


def test_traffic_after_a_quiet_spell_is_warmed_at_once_not_after_the_idle_check() -> None:
    traffic = Traffic()
    w = PathWarmer(shadow(), traffic, time.monotonic, interval=0.002, idle_after=1.0, idle_check=60.0)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while not w._idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w._idle and w.rounds == 0  # asleep for a minute
        traffic.packets += 1
        w.nudge()  # what the data path does when the exchange begins
        while w.rounds == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.rounds > 0
    finally:
        w.stop()
    assert not w.running


def test_stop_ends_an_idle_sleep_at_once() -> None:
    w = PathWarmer(shadow(), Traffic(), time.monotonic, interval=0.002, idle_check=60.0)
    w.start()
    deadline = time.monotonic() + 10
    while not w._idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w._idle  # asleep for a minute
    thread = w._thread
    w.stop()  # joins for 5 s at most: without waking the sleep, the thread would still be there
    assert thread is not None and not thread.is_alive()


# --- leaving the GIL to real packets ---------------------------------------------------------------


class Lone:
    """What the engine passes as ``lone``: the data path's (started, finished) counts, set by the test."""

    def __init__(self) -> None:
        self.started = self.finished = 0

    def __call__(self) -> tuple[int, int]:
        return self.started, self.finished


def test_a_packet_on_a_lone_path_defers_the_warm_up_once() -> None:
    clock, traffic, lone = Clock(), Traffic(), Lone()
    w = warmer(clock, traffic, lone=lone)
    traffic.packets += 1
    assert w.tick() == 0.002 and (w.rounds, w.deferred) == (1, 0)  # nothing on its way: warm
    lone.started += 1  # a real packet entered a lone path
    clock.now += 0.002
    assert w.tick() == BUSY_DEFER and (w.rounds, w.deferred) == (1, 1)  # put off, not run
    lone.finished = lone.started  # it left
    clock.now += BUSY_DEFER
    assert w.tick() == 0.002 and (w.rounds, w.deferred) == (2, 1)
    lone.started += 1  # one the lone path declines: the counts stay unequal for good
    for rounds, deferred in ((2, 2), (3, 2), (4, 2)):
        clock.now += 0.002
        w.tick()
        assert (w.rounds, w.deferred) == (rounds, deferred)  # deferred once, then warmed as usual


def test_a_packet_that_comes_during_the_shadow_round_ends_the_warm_up_before_the_echo() -> None:
    clock, traffic, lone, echo = Clock(), Traffic(), Lone(), FakeEcho()
    sh = shadow(clock)
    w = warmer(clock, traffic, sh, lone=lone, echo=echo)
    real_round = sh.round

    def round_meeting_a_packet() -> bool:
        lone.started += 1  # it got the GIL while the shadow round ran
        return real_round()

    sh.round = round_meeting_a_packet  # type: ignore[method-assign]
    traffic.packets += 1
    assert w.tick() == 0.002
    assert (w.rounds, w.yielded, echo.rounds) == (0, 1, 0)
    sh.round = real_round  # type: ignore[method-assign]
    lone.finished = lone.started
    clock.now += 0.002
    assert w.tick() == 0.002 and (w.rounds, w.yielded, echo.rounds) == (1, 1, 1)


def test_a_packet_that_comes_during_the_echo_ends_it_before_the_next_socket() -> None:
    echo = LoopbackEcho()
    echo.open()
    if len(echo.open_hosts) < 2:
        echo.close()
        pytest.skip("this host lacks an IPv4 or IPv6 loopback")
    try:
        asked: list[int] = []
        first, second = echo._socks
        echo._failures[second] = 3
        assert echo.round(lambda: asked.append(1) or True) is False  # stopped before the second socket
        assert asked == [1]  # asked once: before the second socket, not before the first
        assert echo._failures == {first: 0, second: 3}  # no failure counted against the one left out
        with pytest.raises(BlockingIOError):
            second.recv(2048)  # nothing was sent through it
        assert echo.round(lambda: False) is True and echo._failures[second] == 0
    finally:
        echo.close()


class FakeHandover:
    def __init__(self) -> None:
        self.wants: list[bool] = []

    def want(self, on: bool) -> None:
        self.wants.append(on)


def test_the_quick_gil_hand_over_is_wanted_except_while_busy_and_withdrawn_at_stop() -> None:
    clock, traffic, handover = Clock(), Traffic(), FakeHandover()
    w = warmer(clock, traffic, handover=handover)
    w.start()
    w.stop()
    assert handover.wants == [True, False]
    handover.wants.clear()
    for moved, elapsed in TICKS_FOR_HANDOVER:
        traffic.packets += moved
        clock.now += elapsed
        w.tick()
    assert handover.wants == [False, True]  # busy: the default interval; light again: the quick one


#: Light, busy (17 packets in 2 ms is above 8000 a second), busy, light, idle: one change each way.
TICKS_FOR_HANDOVER = [(1, 0.1), (17, 0.002), (17, 0.002), (1, 0.1), (0, 1.5)]


# --- the kernel's half: LoopbackEcho ---------------------------------------------------------------


class FakeEcho:
    def __init__(self) -> None:
        self.rounds = 0
        self.opened = self.closed = 0

    def open(self) -> None:
        self.opened += 1

    def round(self, stop: object = None) -> bool:
        self.rounds += 1
        return True

    def close(self) -> None:
        self.closed += 1


def test_the_echo_runs_exactly_when_the_shadow_round_does() -> None:
    clock, traffic = Clock(), Traffic()
    echo = FakeEcho()
    w = warmer(clock, traffic, echo=echo)
    for step, (moved, elapsed, sleep, rounds) in enumerate(TICKS):
        traffic.packets += moved
        clock.now += elapsed
        assert (w.tick(), w.rounds, echo.rounds) == (sleep, rounds, rounds), f"step {step}: {TICKS[step]}"


def test_the_thread_opens_the_echo_and_stop_closes_it() -> None:
    traffic, echo = Traffic(), FakeEcho()
    w = PathWarmer(shadow(), traffic, time.monotonic, interval=0.002, echo=echo)  # type: ignore[arg-type]
    w.start()
    try:
        assert echo.opened == 1
        deadline = time.monotonic() + 10
        while echo.rounds < 3 and time.monotonic() < deadline:
            traffic.packets += 1
            time.sleep(0.01)
        assert echo.rounds >= 3 and echo.closed == 0
    finally:
        w.stop()
    assert echo.closed == 1


def test_echo_datagrams_go_out_and_back_through_loopback_only() -> None:
    echo = LoopbackEcho()
    echo.open()
    try:
        hosts = echo.open_hosts
        assert hosts, "this host has no loopback at all"
        assert set(hosts) <= set(LOOPBACKS)
        for _ in range(5):
            assert echo.round() is True
        assert echo.rounds == 5
        for sock in echo._socks:  # nothing left queued: every datagram was taken back
            with pytest.raises(BlockingIOError):
                sock.recv(2048)
    finally:
        echo.close()
    assert echo.open_hosts == [] and echo.round() is False


def test_echo_sockets_take_nothing_from_anyone_else() -> None:
    echo = LoopbackEcho(hosts=("::1",))
    echo.open()
    if not echo.open_hosts:
        pytest.skip("no IPv6 loopback on this host")
    other = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        (sock,) = echo._socks
        other.sendto(b"not yours", sock.getsockname())  # connected to itself: the kernel drops this
        assert echo.round() is True
        with pytest.raises(BlockingIOError):
            sock.recv(2048)
    finally:
        other.close()
        echo.close()


def test_a_loopback_this_host_lacks_is_left_out() -> None:
    echo = LoopbackEcho(hosts=("::ffff:198.18.255.253", "::1"))  # not an address of this host: no bind
    echo.open()
    try:
        assert "::ffff:198.18.255.253" not in echo.open_hosts
    finally:
        echo.close()
    nothing = LoopbackEcho(hosts=("::ffff:198.18.255.253",))
    nothing.open()
    assert nothing.open_hosts == [] and nothing.round() is False and nothing.rounds == 0


class BrokenSocket:
    """A socket whose sends fail: the address went away under the echo."""

    def __init__(self) -> None:
        self.closed = False

    def send(self, data: bytes) -> int:
        raise OSError(101, "Network is unreachable")

    def getsockname(self) -> tuple[str, int]:
        return ("::1", 9)

    def close(self) -> None:
        self.closed = True


def test_a_socket_that_keeps_failing_is_given_up() -> None:
    echo = LoopbackEcho(hosts=())
    broken = BrokenSocket()
    echo._socks.append(broken)  # type: ignore[arg-type]
    echo._failures[broken] = 0  # type: ignore[index]
    for _ in range(9):
        assert echo.round() is False
    assert echo._socks == [broken] and not broken.closed
    assert echo.round() is False  # the tenth failure in a row
    assert echo._socks == [] and broken.closed


def test_giving_a_socket_up_does_not_skip_the_next_one() -> None:
    echo = LoopbackEcho(hosts=("::1",))
    echo.open()
    if not echo.open_hosts:
        pytest.skip("no IPv6 loopback on this host")
    try:
        (good,) = echo._socks
        broken = BrokenSocket()
        echo._socks.insert(0, broken)  # type: ignore[arg-type]
        echo._failures[broken] = 9  # type: ignore[index]
        echo._failures[good] = 3  # a round of its own resets this
        assert echo.round() is False and broken.closed  # given up in this round ...
        assert echo._failures[good] == 0  # ... and the socket after it still had its round
        with pytest.raises(BlockingIOError):
            good.recv(2048)
        assert echo._socks == [good]
        assert echo.round() is True
    finally:
        echo.close()


def test_echo_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="1 to 1200"):
        LoopbackEcho(size=0)
    with pytest.raises(ValueError, match="1 to 1200"):
        LoopbackEcho(size=9000)
