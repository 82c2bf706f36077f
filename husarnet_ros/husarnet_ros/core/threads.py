"""Data-plane threads the kernel knows by name, so ``top -H``, ``ps -L`` and ``perf`` can tell them apart.

CPython before 3.14 leaves every thread's kernel name (``comm``) as the process's, so a robot's
operator looking at ``top -H`` for the thread that eats a core sees five ``python3`` lines, and a
scheduler trace of a ping's round trip (``bench/latency_trace.py``, issue #6) cannot say which hop
waited.  :class:`NamedThread` gives the kernel the thread's Python name (the first 15 bytes: the
kernel's limit) as the thread starts.  Only Linux has ``PR_SET_NAME``; elsewhere names stay as
they are.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: prctl(2) option from <linux/prctl.h>; the kernel keeps at most 15 bytes of a name (TASK_COMM_LEN 16).
PR_SET_NAME = 15
COMM_MAX = 15


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def kernel_name(name: str) -> bytes:
    """The name the kernel is given for ``name``: UTF-8, cut to 15 bytes without splitting a character."""
    raw = name.encode("utf-8", "replace")
    return raw[:COMM_MAX].decode("utf-8", "ignore").encode("utf-8")


def set_native_name(name: str) -> bool:
    """Name the calling thread in the kernel; True if it took the name (False where there is no prctl)."""
    if _prctl is None:
        return False
    if _prctl(PR_SET_NAME, ctypes.c_char_p(kernel_name(name)), 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_NAME) failed: errno %d", ctypes.get_errno())
        return False
    return True


class NamedThread(threading.Thread):
    """A :class:`threading.Thread` that also names itself in the kernel before it runs its target."""

    def run(self) -> None:
        set_native_name(self.name)
        super().run()
