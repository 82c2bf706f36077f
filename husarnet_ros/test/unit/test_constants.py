"""Timers: the one place protocol intervals are scaled for tests, demos and the base server."""

from __future__ import annotations

import pytest

from husarnet_ros.core.constants import REKEY_AFTER_TIME, REKEY_TIMEOUT, Timers


def test_scaled_multiplies_every_interval_and_keeps_message_limits() -> None:
    base = Timers()
    t = base.scaled(0.1)
    assert t.rekey_after_time == pytest.approx(REKEY_AFTER_TIME * 0.1)
    assert t.rekey_timeout == pytest.approx(REKEY_TIMEOUT * 0.1)
    assert t.base_reconnect_max == pytest.approx(base.base_reconnect_max * 0.1)
    assert t.rekey_after_messages == base.rekey_after_messages
    assert t.reject_after_messages == base.reject_after_messages
    assert base.scaled(1.0) == base


@pytest.mark.parametrize("scale", [0.0, -1.0, 101.0])
def test_scaled_refuses_intervals_that_would_spin_or_stall(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        Timers().scaled(scale)
