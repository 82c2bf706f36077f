"""heap: glibc keeps freed super-packet-sized buffers mapped once keep_freed_heap() ran (issue #6)."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

import pytest

from husarnet_ros.core import heap

# A data-plane thread's pattern: a few ~64 kB buffers alive at once, then all freed, over and over.
# Page faults are counted for that thread alone, after a warm-up.  Run in a fresh interpreter so the
# process-wide setting of one case cannot leak into the other (or into the test process).
_CHURN = """
import json, resource, sys, threading
from husarnet_ros.core.heap import keep_freed_heap
applied = keep_freed_heap() if sys.argv[1] == "tuned" else None
out = {"applied": applied}
def churn():
    for _ in range(50):
        bufs = [b"x" * 70000 for _ in range(4)]
        del bufs
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(500):
        bufs = [b"x" * 70000 for _ in range(4)]
        del bufs
    out["faults"] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
t = threading.Thread(target=churn)
t.start()
t.join()
print(json.dumps(out))
"""


def _churn(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="mallopt's trim threshold is glibc's; other C libraries keep their own")
def test_freed_buffers_stay_mapped_so_the_next_ones_do_not_fault() -> None:
    default = _churn("default")
    tuned = _churn("tuned")
    assert tuned["applied"] is True
    # glibc's default trims the thread's heap as the buffers are freed: each round faults its pages in again.
    assert default["faults"] >= 500, default
    # Kept: the same rounds reuse the same pages (a handful of faults at most, e.g. for the interpreter).
    assert tuned["faults"] < default["faults"] // 20, (default, tuned)


def test_values_mallopt_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError):
        heap.keep_freed_heap(trim_threshold=0)
    with pytest.raises(ValueError):
        heap.keep_freed_heap(trim_threshold=2**31)
    with pytest.raises(ValueError):
        heap.keep_freed_heap(top_pad=-1)


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoMallopt:
        def __init__(self, name: object) -> None:
            pass

        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    monkeypatch.setattr(heap, "_applied", False)
    monkeypatch.setattr(heap.ctypes, "CDLL", NoMallopt)
    assert heap.keep_freed_heap() is False
    assert heap._applied is False
