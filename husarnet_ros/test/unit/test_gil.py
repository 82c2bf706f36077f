"""The quick GIL hand-over (issue #6): one interpreter setting shared by every engine of a process."""

from __future__ import annotations

import sys

import pytest

from husarnet_ros.core.gil import QUICK_SWITCH_INTERVAL, QuickHandover


@pytest.fixture(autouse=True)
def _default_interval():
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(before)


def test_wanted_it_is_short_and_withdrawn_the_value_before_returns() -> None:
    h = QuickHandover()
    h.want(True)
    assert sys.getswitchinterval() == pytest.approx(QUICK_SWITCH_INTERVAL)
    h.want(True)  # wanting twice is wanting once
    h.want(False)
    assert sys.getswitchinterval() == pytest.approx(0.005)
    h.want(False)  # withdrawing twice changes nothing
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_short_while_any_holder_wants_it_and_the_shortest_wins() -> None:
    one, two = QuickHandover(), QuickHandover(0.001)
    one.want(True)
    two.want(True)
    assert sys.getswitchinterval() == pytest.approx(QUICK_SWITCH_INTERVAL)
    one.want(False)  # e.g. one engine's bulk transfer: the other's light traffic still wants it
    assert sys.getswitchinterval() == pytest.approx(0.001)
    two.want(False)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_the_value_restored_is_the_one_found_before_the_first_want() -> None:
    sys.setswitchinterval(0.003)  # someone else's choice, e.g. the application hosting the node
    h = QuickHandover()
    h.want(True)
    h.want(False)
    assert sys.getswitchinterval() == pytest.approx(0.003)


@pytest.mark.parametrize("interval", [0, -0.001, 0.006])
def test_an_interval_out_of_range_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="at most CPython's default"):
        QuickHandover(interval)
