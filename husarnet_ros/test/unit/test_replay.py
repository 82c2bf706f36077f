"""RFC 6479 replay window: WireGuard's vectors, check/commit split, and a model-based test."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from husarnet_ros.core.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE
from husarnet_ros.core.replay import ReplayFilter

W = REPLAY_WINDOW_SIZE
T_LIM = W + 1
# The limit used by wireguard-go's replay_test.go (close to 2**64, so the vectors exercise wrap-size numbers).
WG_LIMIT = (1 << 64) - (1 << 4) - 1

# (counter, accepted) in order; ported from wireguard-go replay/replay_test.go (itself from the kernel).
WG_VECTORS = [
    (0, True),
    (1, True),
    (1, False),
    (9, True),
    (8, True),
    (7, True),
    (7, False),
    (T_LIM, True),
    (T_LIM - 1, True),
    (T_LIM - 1, False),
    (T_LIM - 2, True),
    (2, True),
    (2, False),
    (T_LIM + 16, True),
    (3, False),
    (T_LIM + 16, False),
    (T_LIM * 4, True),
    (T_LIM * 4 - (T_LIM - 1), True),
    (10, False),
    (T_LIM * 4 - T_LIM, False),
    (T_LIM * 4 - (T_LIM + 1), False),
    (T_LIM * 4 - (T_LIM - 2), True),
    (T_LIM * 4 + 1 - T_LIM, False),
    (0, False),
    (WG_LIMIT, False),
    (WG_LIMIT - 1, True),
    (WG_LIMIT, False),
    (WG_LIMIT - 1, False),
    (WG_LIMIT - 2, True),
    (WG_LIMIT + 1, False),
    (WG_LIMIT + 2, False),
    (WG_LIMIT - 2, False),
    (WG_LIMIT - 3, True),
    (0, False),
]


def test_wireguard_vectors() -> None:
    f = ReplayFilter(limit=WG_LIMIT)
    for number, (counter, expected) in enumerate(WG_VECTORS, 1):
        verdict = f.check(counter)
        assert (verdict is None) == expected, (number, counter, verdict)
        assert f.commit(counter) == expected, (number, counter)


def _run(f: ReplayFilter, counters: list[int]) -> list[bool]:
    return [f.commit(c) for c in counters]


@pytest.mark.parametrize(
    ("sequence", "tail"),
    [
        # bulk 1: 1..W then 0 is exactly W behind -> accepted once
        (list(range(1, W + 1)), [(0, True), (0, False)]),
        # bulk 2: 2..W+1 then 1 (W behind) accepted, 0 (W+1 behind) too old
        (list(range(2, W + 2)), [(1, True), (0, False)]),
        # bulk 3: descending from W+1 to 1, all accepted
        (list(range(W + 1, 0, -1)), []),
        # bulk 4: descending from W+2 to 2, then 0 is too old
        (list(range(W + 2, 1, -1)), [(0, False)]),
        # bulk 5: descending W..1, then W+1 moves forward, 0 too old
        (list(range(W, 0, -1)), [(W + 1, True), (0, False)]),
        # bulk 6: descending W..1, 0 still inside, then W+1
        (list(range(W, 0, -1)), [(0, True), (W + 1, True)]),
    ],
    ids=["bulk1", "bulk2", "bulk3", "bulk4", "bulk5", "bulk6"],
)
def test_wireguard_bulk(sequence: list[int], tail: list[tuple[int, bool]]) -> None:
    f = ReplayFilter()
    assert all(_run(f, sequence))
    for counter, expected in tail:
        assert f.commit(counter) == expected, counter


def test_check_reports_reason_and_changes_nothing() -> None:
    f = ReplayFilter()
    assert f.check(5) is None
    assert f.check(5) is None  # check alone never records
    assert f.commit(5)
    assert f.check(5) == "replay"
    assert f.commit(W + 100)
    assert f.check(99) == "too_old"  # W + 1 behind
    assert f.check(100) is None  # exactly W behind
    assert f.check(REJECT_AFTER_MESSAGES) == "too_old"
    assert not f.commit(REJECT_AFTER_MESSAGES)
    assert f.check(-1) == "too_old"
    assert f.last == W + 100


def test_large_jump_clears_the_whole_ring() -> None:
    f = ReplayFilter()
    for c in range(0, 3 * W, 7):
        assert f.commit(c)
    base = 10**12
    assert f.commit(base)
    # every counter in [base - W, base) is fresh after the jump, although the ring held stale bits
    assert all(f.check(c) is None for c in range(base - W, base))
    assert all(f.commit(c) for c in range(base - W, base))
    assert f.check(base - W - 1) == "too_old"


def test_reset_forgets() -> None:
    f = ReplayFilter()
    assert f.commit(1000)
    f.reset()
    assert f.last == 0
    assert f.commit(0) and f.commit(1000)


def test_size_must_be_multiple_of_64() -> None:
    with pytest.raises(ValueError):
        ReplayFilter(size=100)
    small = ReplayFilter(size=64)
    assert small.commit(200) and small.commit(136) and not small.commit(135)


def test_concurrent_commit_of_the_same_counter_wins_once() -> None:
    f = ReplayFilter()
    wins: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        mine = [c for c in range(5000) if f.commit(c)]
        with lock:
            wins.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(5000))


class WindowModel(RuleBasedStateMachine):
    """The bitmap must agree with the obvious definition: a set of seen counters and the highest one."""

    SIZE = 256  # small window so Hypothesis reaches the edges and ring wrap-around quickly
    LIMIT = 1 << 20

    def __init__(self) -> None:
        super().__init__()
        self.filter = ReplayFilter(size=self.SIZE, limit=self.LIMIT)
        self.seen: set[int] = set()
        self.last = 0

    def _model(self, counter: int) -> str | None:
        if counter >= self.LIMIT:
            return "too_old"
        if counter > self.last:
            return None
        if self.last - counter > self.SIZE:
            return "too_old"
        return "replay" if counter in self.seen else None

    def _apply(self, counter: int) -> None:
        expected = self._model(counter)
        assert self.filter.check(counter) == expected
        accepted = self.filter.commit(counter)
        assert accepted == (expected is None)
        if accepted:
            self.seen.add(counter)
            self.last = max(self.last, counter)

    @rule(delta=st.integers(min_value=-(2 * SIZE), max_value=2 * SIZE))
    def near_last(self, delta: int) -> None:
        self._apply(max(0, self.last + delta))

    @rule(jump=st.integers(min_value=0, max_value=10 * SIZE))
    def forward(self, jump: int) -> None:
        self._apply(self.last + jump)

    @rule(counter=st.integers(min_value=0, max_value=LIMIT + 5))
    def anywhere(self, counter: int) -> None:
        self._apply(counter)

    @invariant()
    def last_matches(self) -> None:
        assert self.filter.last == self.last


TestWindowModel = WindowModel.TestCase
TestWindowModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
