"""Data-plane threads carry their names into the kernel (``top -H``, ``perf``), cut to its 15-byte limit."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from husarnet_ros.core.threads import COMM_MAX, NamedThread, kernel_name, set_native_name

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_NAME and /proc are Linux's")


def _comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().rstrip("\n")


def test_kernel_name_is_cut_to_the_limit_without_splitting_a_character() -> None:
    assert kernel_name("udp-rx:5582") == b"udp-rx:5582"
    assert kernel_name("tun-rx:a-very-long-interface") == b"tun-rx:a-very-l"
    cut = kernel_name("tun-rx:hnet\u00e9\u00e9\u00e9\u00e9")  # 2-byte characters across the 15th byte
    assert len(cut) <= COMM_MAX
    assert cut.decode("utf-8") == "tun-rx:hnet\u00e9\u00e9"


@linux_only
def test_named_thread_shows_its_name_to_the_kernel() -> None:
    seen: list[str] = []

    def body() -> None:
        seen.append(_comm(threading.get_native_id()))

    t = NamedThread(target=body, name="udp-rx:5582-and-more", daemon=True)
    t.start()
    t.join(5)
    assert seen == ["udp-rx:5582-and"]
    assert _comm(threading.get_native_id()) != "udp-rx:5582-and"  # the starting thread keeps its own


@linux_only
def test_set_native_name_names_only_the_calling_thread() -> None:
    result: list[object] = []

    def body() -> None:
        result.append(set_native_name("warmer-test"))
        result.append(_comm(threading.get_native_id()))

    t = threading.Thread(target=body)
    t.start()
    t.join(5)
    assert result == [True, "warmer-test"]
