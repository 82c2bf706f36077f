"""The in-memory network: delivery, seeded impairment, NAT, capture and replay."""

from __future__ import annotations

import threading
import time

import pytest

from husarnet_ros.core.memnet import Impairment, MemoryNetwork

A = ("198.18.0.1", 5582)
B = ("198.18.0.2", 5582)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


@pytest.fixture
def net():
    n = MemoryNetwork(seed=7, capture=True)
    yield n
    n.close()


def pair(net):
    got: list[tuple[bytes, tuple]] = []
    ta, tb = net.transport(A), net.transport(B)
    ta.start(lambda d, s: None)
    tb.start(lambda d, s: got.append((d, s)))
    return ta, tb, got


def test_delivery_and_source(net):
    ta, _tb, got = pair(net)
    ta.send(b"hello", B)
    assert wait_for(lambda: got == [(b"hello", A)])
    assert ta.sent == 1


def test_endpoint_in_use(net):
    net.transport(A)
    with pytest.raises(ValueError):
        net.transport(A)


def _run_lossy(seed):
    n = MemoryNetwork(seed=seed)
    try:
        n.set_impairment(Impairment(drop=0.3))
        ta, _tb, got = pair(n)
        for i in range(300):
            ta.send(i.to_bytes(2, "big"), B)
        n.quiesce()
        wait_for(lambda: False, 0.05)
        return [d for d, _ in got]
    finally:
        n.close()


def test_loss_is_seeded_and_roughly_right():
    first, second = _run_lossy(3), _run_lossy(3)
    assert first == second
    assert 150 < len(first) < 260


def test_duplicate_and_corrupt(net):
    net.set_impairment(Impairment(duplicate=1.0), src=A)
    ta, _tb, got = pair(net)
    ta.send(b"x", B)
    assert wait_for(lambda: len(got) == 2)
    net.set_impairment(Impairment(corrupt=1.0), src=A)
    ta.send(b"\x00" * 8, B)
    assert wait_for(lambda: len(got) == 3)
    assert got[2][0] != b"\x00" * 8 and sum(bin(b).count("1") for b in got[2][0]) == 1


def test_reorder(net):
    net.set_impairment(Impairment(reorder=0.5, reorder_delay=0.1))
    ta, _tb, got = pair(net)
    for i in range(50):
        ta.send(bytes([i]), B)
    assert wait_for(lambda: len(got) == 50)
    order = [d[0] for d, _ in got]
    assert sorted(order) == list(range(50)) and order != list(range(50))


def test_nat_and_rebinding(net):
    pub1, pub2 = ("198.18.9.1", 40000), ("198.18.9.1", 40001)
    net.set_nat(A, pub1)
    ta, tb, got = pair(net)
    back: list[bytes] = []
    ta.start(lambda d, s: back.append(d))
    ta.send(b"out", B)
    assert wait_for(lambda: got and got[-1] == (b"out", pub1))
    tb.send(b"in", pub1)
    assert wait_for(lambda: back == [b"in"])
    net.set_nat(A, pub2)  # rebinding: the old mapping is gone
    tb.send(b"lost", pub1)
    ta.send(b"again", B)
    assert wait_for(lambda: got[-1] == (b"again", pub2))
    assert back == [b"in"]


def test_capture_and_replay_from_other_source(net):
    _ta, _tb, got = pair(net)
    net.transport(("198.18.0.3", 1)).send(b"secret", B)
    assert wait_for(lambda: len(got) == 1)
    mallory = ("198.18.0.66", 9)
    assert net.replay(lambda c: c.data == b"secret", src=mallory, times=3) == 3
    assert wait_for(lambda: len(got) == 4)
    assert got[1:] == [(b"secret", mallory)] * 3


def test_block(net):
    net.block(A[0], B[0])
    ta, _tb, got = pair(net)
    ta.send(b"x", B)
    net.quiesce()
    time.sleep(0.02)
    assert got == [] and net.dropped == 1


def test_close_joins_thread():
    before = set(threading.enumerate())
    n = MemoryNetwork()
    n.close()
    assert set(threading.enumerate()) <= before
