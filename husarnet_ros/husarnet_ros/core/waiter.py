"""Block until a file descriptor is readable, or until another thread closes the owner.

The TUN device and the UDP socket both have one reader thread that sleeps in
``poll()`` between packets and must wake when the device or socket is closed
from another thread.  A self-pipe does the waking.  The poll object is made
once: on light traffic every packet ends one wait, and building and
registering a fresh poll object each time was a measurable part of a hop's cost
on a cold CPU (issue #6).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading


class FdWaiter:
    """``wait()`` for ``fd`` to become readable; ``wake()`` ends a wait early (for close).

    One thread waits at a time (the owner's reader); ``wake`` and ``close`` may come from any thread.
    """

    def __init__(self, fd: int) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)

    def wait(self, timeout: float | None) -> bool:
        """True when something is readable (or we were woken), False on timeout or a failed poll."""
        try:
            return bool(self._poll.poll(-1 if timeout is None else max(0, int(timeout * 1000))))
        except (OSError, ValueError, RuntimeError):
            return False

    def wake(self) -> None:
        """End a wait in progress (and every later one: the pipe stays readable)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Wake any waiter and release the pipe; idempotent (a descriptor number is never closed twice)."""
        self.wake()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._wake_w, self._wake_r):
                with contextlib.suppress(OSError):
                    os.close(fd)
