"""Keep freed heap memory in the process instead of handing it back to the kernel at once (issue #6).

A bulk transfer moves super-packets of up to 64 kB through every data-plane thread: a TUN read,
a ciphertext, a GRO buffer, a plaintext, each allocated and freed within microseconds.  glibc gives
the top of a thread's heap back to the kernel as soon as more than ``M_TRIM_THRESHOLD`` (128 kB by
default) is free there (``madvise(MADV_DONTNEED)``), so the next allocation of the same size faults
its pages in again and the kernel zeroes every one of them.  Profiled under one iperf3 stream, page
faults, zeroing and ``madvise`` were a tenth of the receive thread's time.  Raising the threshold
keeps those pages mapped: a few MB more resident memory, and 8-18 % more TCP throughput in paired
runs on the 2-core bench machine.

Process-wide and glibc-only: :class:`~husarnet_ros.core.engine.Engine` calls :func:`keep_freed_heap`
once its TUN data plane starts.  With a C library that has no ``mallopt`` (e.g. musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: mallopt() parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2

#: Free memory at the top of a heap that glibc keeps before it trims: many times a burst of
#: super-packets (64 x 64 kB in flight per batch), small next to a robot's memory.
TRIM_THRESHOLD = 32 * 1024 * 1024
#: Extra memory a heap grows by when it must grow, so bursts do not grow it page by page.
TOP_PAD = 1024 * 1024

_applied = False


def keep_freed_heap(trim_threshold: int = TRIM_THRESHOLD, top_pad: int = TOP_PAD) -> bool:
    """Raise glibc's trim threshold and top pad for this process; True if glibc took both.

    Idempotent (the first successful call wins).  ValueError only for values ``mallopt`` cannot take;
    a C library without ``mallopt`` (e.g. musl) gives False and keeps its own behaviour, only slower.
    """
    global _applied
    if not 0 < trim_threshold < 2**31 or not 0 <= top_pad < 2**31:
        raise ValueError("trim_threshold and top_pad must fit mallopt's int")
    if _applied:
        return True
    try:
        # The C library this process already runs on (its malloc is the one to tune): no search for
        # a library file, which ctypes.util.find_library does by running ldconfig (~5 ms of start-up).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in this process's C library: heap trimming left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and mallopt(M_TOP_PAD, top_pad) == 1
    if ok:
        _applied = True
    else:
        log.debug("mallopt refused the heap settings: heap trimming left as it is")
    return ok
