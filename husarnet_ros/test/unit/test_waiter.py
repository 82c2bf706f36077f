"""FdWaiter: the one poll object the TUN and UDP readers sleep in, woken by data or by close."""

from __future__ import annotations

import os
import threading

from husarnet_ros.core.waiter import FdWaiter


def test_wait_reports_data_and_times_out_without() -> None:
    r, w = os.pipe()
    waiter = FdWaiter(r)
    try:
        assert waiter.wait(0.01) is False
        os.write(w, b"x")
        assert waiter.wait(0.01) is True
        assert waiter.wait(None) is True  # still readable: the same poll object answers again
    finally:
        waiter.close()
        os.close(r)
        os.close(w)


def test_wake_ends_a_wait_on_another_thread_and_close_is_idempotent() -> None:
    r, w = os.pipe()
    waiter = FdWaiter(r)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(waiter.wait(None)))
    t.start()
    waiter.close()
    t.join(5)
    assert not t.is_alive() and result == [True]
    waiter.close()  # a second close neither raises nor closes someone else's descriptors
    assert waiter.wait(0.01) in (True, False)
    os.close(r)
    os.close(w)
