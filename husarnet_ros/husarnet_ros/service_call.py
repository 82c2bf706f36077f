"""One service call across processes, resent while its reply is overdue.

Fast DDS drops a reply when the server has not yet matched a new client's reply
reader 100 ms after the request arrived ("client will not receive response"):
on a loaded machine a fresh client's first request can go unanswered although
the service is ready.  By the time of a resend both sides have matched.  The CLI,
``ros_probe`` and the ROS tests all call through here; each brings its own way
of processing callbacks (``spin_until``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: ``spin_until(pred, timeout)``: process callbacks until ``pred()`` is truthy (return it) or
#: ``timeout`` seconds pass (return something falsy).
SpinUntil = Callable[[Callable[[], Any], float], Any]


def call_resending(
    client: Any, request: Any, spin_until: SpinUntil, wait: float, resend: float | None
) -> tuple[Any, bool] | None:
    """Send ``request`` on ``client``, again every ``resend`` s while unanswered, for up to ``wait`` s.

    Only for requests whose repetition is harmless; ``resend=None`` sends once.  Returns the reply
    and whether it answers a resent request (the first one's reply was lost, so the first request
    may already have taken effect), or None when nothing answered.
    """
    deadline = time.monotonic() + wait
    futures = [client.call_async(request)]
    while True:
        left = deadline - time.monotonic()
        step = left if resend is None else min(resend, left)
        done = spin_until(lambda: next((f for f in futures if f.done()), None), max(step, 0.0))
        if done:
            return done.result(), done is not futures[0]
        if time.monotonic() >= deadline:
            return None
        futures.append(client.call_async(request))
