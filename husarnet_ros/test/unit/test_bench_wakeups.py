"""latency_trace's wake-to-run table: who woke whom, on which CPU, and how long the wakee waited (issue #6)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import latency_trace

# ``perf script -F comm,pid,tid,cpu,time,event,trace`` lines in the shape this kernel prints them:
# A's UDP thread (pid 10, tid 12) writes the echo reply to its TUN and wakes ping on its own CPU; ping
# runs only when A's thread sleeps 80 us later.  Then B's UDP thread (pid 20, tid 21, named in the kernel
# by core/threads.py) is woken by an interrupt on CPU 1, and wakes A's thread 12 (no name of its own: its
# thread id stands in) onto the other CPU, which runs it at once.
SCRIPT = """\
          python    10/12    [000]  100.000000: raw_syscalls:sys_enter: NR 1 (6, 7f, 72, 0, 0, 0)
          python    10/12    [000]  100.000020:     sched:sched_wakeup: comm=ping pid=30 prio=120 target_cpu=000
          python    10/12    [000]  100.000100:     sched:sched_switch: prev_comm=python prev_pid=12 prev_prio=120 \
prev_state=S ==> next_comm=ping next_pid=30 next_prio=120
         swapper     0/0     [001]  100.000200:     sched:sched_wakeup: comm=udp-rx:5582 pid=21 prio=120 target_cpu=001
         swapper     0/0     [001]  100.000210:     sched:sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 \
prev_state=R ==> next_comm=udp-rx:5582 next_pid=21 next_prio=120
     udp-rx:5582    20/21    [001]  100.000300:     sched:sched_wakeup: comm=python pid=12 prio=120 target_cpu=000
            bash    99/99    [000]  100.000305:     sched:sched_wakeup: comm=bash pid=98 prio=120 target_cpu=000
          python    10/12    [000]  100.000312:     sched:sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 \
prev_state=R ==> next_comm=python next_pid=12 next_prio=120
not a perf line
"""


def test_each_hand_over_is_timed_and_placed() -> None:
    gaps = latency_trace.wakeup_gaps(SCRIPT, {"A": 10, "B": 20})
    assert {k: [round(t, 3) for t in v] for k, v in gaps.items()} == {
        ("A:12", "ping", True): [80.0],
        ("irq", "B:udp-rx:5582", True): [10.0],
        ("B:udp-rx:5582", "A:12", False): [12.0],
    }


def test_threads_of_other_processes_are_not_counted() -> None:
    gaps = latency_trace.wakeup_gaps(SCRIPT, {"A": 77, "B": 78})
    assert {k: [round(t, 3) for t in v] for k, v in gaps.items()} == {("other", "ping", True): [80.0]}


def _line(comm: str, pid: int, tid: int, t_us: float, event: str, rest: str) -> str:
    return f"{comm:>16s} {pid:6d}/{tid:<6d} [000] {100 + t_us / 1e6:.6f}: {event}: {rest}"


def _udp_round_trip(with_server: bool = True) -> str:
    """One UDP request and its answer through a tunnel: client 5, A's daemon 10, B's 20, the echo server 40."""
    enter, leave = "raw_syscalls:sys_enter", "raw_syscalls:sys_exit"
    client, server = "udpecho-client", "udpecho-serve"
    lines = [
        _line(client, 5, 5, 0, enter, "NR 44 (3, 7f, 40, 0, 0, 0)"),  # send
        _line("tun-rx:hnet0", 10, 11, 10, leave, "NR 0 = 114"),  # A reads the request
        _line("tun-rx:hnet0", 10, 11, 15, enter, "NR 44 (5, 7f, 98, 40, 7f, 1c)"),  # A sends it
        _line("udp-rx:5582", 20, 22, 30, leave, "NR 47 = 152"),  # B receives it
        _line("udp-rx:5582", 20, 22, 33, enter, "NR 1 (6, 7f, 72, 0, 0, 0)"),  # B writes it
        _line(server, 40, 40, 45, leave, "NR 45 = 64"),  # the server has it
        _line(server, 40, 40, 50, enter, "NR 44 (3, 7f, 40, 0, 7f, 1c)"),  # and answers
        _line("tun-rx:hnet0", 20, 21, 60, leave, "NR 0 = 114"),  # B reads the reply
        _line("tun-rx:hnet0", 20, 21, 64, enter, "NR 44 (5, 7f, 98, 40, 7f, 1c)"),  # B sends it
        _line("udp-rx:5582", 10, 12, 80, leave, "NR 47 = 152"),  # A receives it
        _line("udp-rx:5582", 10, 12, 84, enter, "NR 1 (6, 7f, 72, 0, 0, 0)"),  # A writes it
        _line("udp-rx:5582", 10, 12, 90, "sched:sched_wakeup", f"comm={client} pid=5 prio=120 target_cpu=000"),
        _line(
            "udp-rx:5582",
            10,
            12,
            97,
            "sched:sched_switch",
            "prev_comm=udp-rx:5582 prev_pid=12 prev_prio=120 prev_state=S ==> "
            f"next_comm={client} next_pid=5 next_prio=120",
        ),
        _line(client, 5, 5, 100, leave, "NR 45 = 64"),  # the client has the answer
    ]
    if not with_server:
        lines = [line for line in lines if server not in line]
    return "\n".join(lines) + "\n"


def test_a_udp_round_trip_is_cut_into_its_stages_with_the_servers_two() -> None:
    events = latency_trace.parse(_udp_round_trip())
    [trip] = latency_trace.stage_times(events, {"A": 10, "B": 20}, probe="udp")
    names = [stage[3] for stage in latency_trace.stages("udp")]
    assert names[4:6] == ["the server has the request", "the server sends the reply"]
    assert [round(t - 100e6) for t in trip] == [0, 10, 15, 30, 33, 45, 50, 60, 64, 80, 84, 90, 97, 100]
    # The same trace read as pings finds no round trip (no ping), and without the server's events no UDP one.
    assert latency_trace.stage_times(events, {"A": 10, "B": 20}, probe="ping") == []
    assert latency_trace.stage_times(latency_trace.parse(_udp_round_trip(False)), {"A": 10, "B": 20}, "udp") == []


def test_the_udp_probes_are_named_in_the_wake_table() -> None:
    gaps = latency_trace.wakeup_gaps(_udp_round_trip(), {"A": 10, "B": 20})
    assert ("A:udp-rx:5582", "udpecho-client", True) in gaps
