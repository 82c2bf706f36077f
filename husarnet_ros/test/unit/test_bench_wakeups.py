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
