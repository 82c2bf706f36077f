"""A quick GIL hand-over while light traffic flows (issue #6).

Why: a thread that wants the GIL waits for the holder to release it.  When the holder gives it up
only for a moment (around a system call) and takes it straight back, CPython lets the waiter wait
up to the *switch interval* (5 ms by default) before it makes the holder hand over.  A packet that
arrives while another thread of the node holds the GIL (the path warmer, the control loop, an rclpy
executor in the same process) could so wait milliseconds: in paired 100 Hz pings beside a thread
that held the GIL for milliseconds at a time, the slowest 1 % of round trips took 12-14 ms with the
default and 4.3-4.7 ms with 0.2 ms, the median unchanged.  A short interval costs bulk transfers a
little (more hand-overs between the busy threads: 5 % of one TCP stream in one run), so it is asked
for only while traffic is light.

The interval is one setting for the whole interpreter, and several engines may share a process
(tests, or a node hosting more than one): each holds a :class:`QuickHandover` and wants it on or
off; the interval is short while any of them wants it, and the value found before the first
returns when none does.
"""

from __future__ import annotations

import sys
import threading

#: Seconds a thread waits for the GIL before the holder must hand it over, while light traffic flows.
QUICK_SWITCH_INTERVAL = 0.0002

_lock = threading.Lock()
_wanting: set[QuickHandover] = set()
_saved: float | None = None  # the interval before the first want, restored after the last


class QuickHandover:
    """One engine's wish for a short switch interval (:data:`QUICK_SWITCH_INTERVAL`)."""

    def __init__(self, interval: float = QUICK_SWITCH_INTERVAL) -> None:
        if not 0 < interval <= 0.005:
            raise ValueError(f"switch interval {interval} s: above 0 and at most CPython's default 0.005 s")
        self.interval = interval

    def want(self, on: bool) -> None:
        """Ask for the short interval (light traffic) or withdraw the wish (bulk transfer, or stopping)."""
        global _saved
        with _lock:
            if on:
                _wanting.add(self)
            else:
                _wanting.discard(self)
            if _wanting:
                if _saved is None:
                    _saved = sys.getswitchinterval()
                sys.setswitchinterval(min(h.interval for h in _wanting))
            elif _saved is not None:
                sys.setswitchinterval(_saved)
                _saved = None
