"""A full socket buffer delays a send by a bounded time, then drops it: the control loop never stalls."""

from __future__ import annotations

import time

import pytest

from husarnet_ros.core import udp


@pytest.fixture
def sock():
    s = udp.UdpSocket(0, gso=False, gro=False)
    yield s
    s.close()


def test_send_into_a_full_buffer_gives_up_after_the_control_wait(sock, monkeypatch) -> None:
    waits: list[float] = []

    def fake_select(r, w, x, timeout):
        waits.append(timeout)
        return [], [], []

    monkeypatch.setattr(udp.select, "select", fake_select)
    calls = 0

    def always_full() -> None:
        nonlocal calls
        calls += 1
        raise BlockingIOError

    assert sock._retry_full(always_full, udp.CONTROL_SEND_WAIT) is False
    assert calls >= 1 and waits
    assert max(waits) <= udp.CONTROL_SEND_WAIT  # never one long wait


def test_send_succeeds_once_the_buffer_drains(sock, monkeypatch) -> None:
    monkeypatch.setattr(udp.select, "select", lambda r, w, x, t: ([], w, []))
    results = [BlockingIOError, BlockingIOError, None]

    def drains() -> None:
        outcome = results.pop(0)
        if outcome is not None:
            raise outcome

    assert sock._retry_full(drains, udp.DATA_SEND_WAIT) is True
    assert results == []


class _FullSocket:
    """Stands in for a socket whose send buffer is full: every send would block."""

    def __init__(self, real) -> None:
        self.real = real

    def sendto(self, *args) -> None:
        raise BlockingIOError

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_public_send_uses_the_short_control_wait(sock, monkeypatch) -> None:
    seen: list[float] = []
    monkeypatch.setattr(sock, "_retry_full", lambda op, wait: seen.append(wait) or True)
    real = sock.sock
    sock.sock = _FullSocket(real)  # the first, unguarded attempt finds the buffer full
    try:
        sock.send(b"x", ("127.0.0.1", 9))
        sock.send_many([b"a", b"b"], ("127.0.0.1", 9))
    finally:
        sock.sock = real
    assert seen[0] == udp.CONTROL_SEND_WAIT
    assert seen[1:] == [udp.DATA_SEND_WAIT, udp.DATA_SEND_WAIT]
    assert udp.CONTROL_SEND_WAIT < udp.DATA_SEND_WAIT


def test_a_send_with_room_takes_no_retry_path(sock, monkeypatch) -> None:
    seen: list[float] = []
    monkeypatch.setattr(sock, "_retry_full", lambda op, wait: seen.append(wait) or True)
    peer = udp.UdpSocket(0, gso=False, gro=False)
    try:
        sock.send(b"hello", ("127.0.0.1", peer.sock.getsockname()[1]))
        got = peer.recv_batch(2.0)
    finally:
        peer.close()
    assert [d for d, _ in got] == [b"hello"]
    assert seen == []


def test_a_datagram_that_ended_a_wait_comes_alone_and_a_backlog_comes_as_one_batch() -> None:
    """After idle the first datagram is handed over at once (no drain attempt on its path); under load batches form."""
    import socket

    rx = udp.UdpSocket(0, "::ffff:127.0.0.1", gso=False, gro=False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dest = ("127.0.0.1", rx.local_port)
    try:
        for i in range(3):  # queued before anyone waits: one batch
            tx.sendto(b"q%d" % i, dest)
        time.sleep(0.05)
        assert [d for d, _ in rx.recv_batch(1.0)] == [b"q0", b"q1", b"q2"]

        def wait_while_three_arrive(timeout: float | None) -> bool:
            for i in range(3):
                tx.sendto(b"w%d" % i, dest)
            time.sleep(0.05)
            return True

        rx._waiter.wait = wait_while_three_arrive  # the socket is empty: recv_batch must wait
        assert [d for d, _ in rx.recv_batch(1.0)] == [b"w0"]  # the other two are queued, not drained
        assert [d for d, _ in rx.recv_batch(1.0)] == [b"w1", b"w2"]
    finally:
        tx.close()
        rx.close()


def test_without_a_timeout_the_wait_is_the_receive_itself_and_a_backlog_still_batches() -> None:
    """The receive thread's mode (timeout None): it sleeps inside the receive, with the same batching rule."""
    import socket

    rx = udp.UdpSocket(0, "::ffff:127.0.0.1", gso=False, gro=False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dest = ("127.0.0.1", rx.local_port)
    waits: list[int] = []

    class ArriveDuringWait:
        """The socket, but a receive that may wait first lets three datagrams arrive (and is counted)."""

        def __init__(self, real: socket.socket) -> None:
            self.real = real

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

        def recvfrom(self, bufsize: int, flags: int = 0) -> tuple:  # type: ignore[type-arg]
            if not flags & socket.MSG_DONTWAIT:
                waits.append(flags)
                for i in range(3):
                    tx.sendto(b"w%d" % i, dest)
                time.sleep(0.05)
            return self.real.recvfrom(bufsize, flags)

    try:
        for i in range(3):  # queued before the call: one batch, and no receive waited for them
            tx.sendto(b"q%d" % i, dest)
        time.sleep(0.05)
        rx.sock = ArriveDuringWait(rx.sock)  # type: ignore[assignment]
        assert [d for d, _ in rx.recv_batch(None)] == [b"q0", b"q1", b"q2"]
        assert waits == []
        # The socket is empty now: the call sleeps in the receive; what ended the wait comes alone.
        assert [d for d, _ in rx.recv_batch(None)] == [b"w0"]
        assert len(waits) == 1
        assert [d for d, _ in rx.recv_batch(None)] == [b"w1", b"w2"]  # queued: gathered without waiting
        assert len(waits) == 1
    finally:
        tx.close()
        rx.close()


def test_the_receive_thread_offers_lone_datagrams_to_on_lone_first() -> None:
    """UdpTransport: what ``on_lone`` accepts never reaches the batch handler; what it declines does."""
    import socket
    import threading

    from husarnet_ros.core.transport import UdpTransport

    t = UdpTransport(0, bind_host="127.0.0.1")
    offered: list[bytes] = []
    senders: list[object] = []
    batches: list[bytes] = []
    done = threading.Event()

    def on_lone(data: bytes, ep: object) -> bool:
        offered.append(data)
        senders.append(ep)
        if data == b"boom":
            raise RuntimeError("a bug in the handler")  # logged; the receiver goes on
        return data.startswith(b"L")

    def on_batch(batch: list) -> None:
        batches.extend(d for d, _ in batch)
        if b"end" in batches:
            done.set()

    waiting = threading.Event()

    class NoteWait:
        """The socket, but a receive that may wait (no MSG_DONTWAIT: the thread sleeps in it) is noted first."""

        def __init__(self, real: socket.socket) -> None:
            self.real = real

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

        def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> tuple:  # type: ignore[type-arg]
            if not flags & socket.MSG_DONTWAIT:
                waiting.set()
            return self.real.recvmsg(bufsize, ancbufsize, flags)

    t._sock.sock = NoteWait(t._sock.sock)  # type: ignore[assignment]
    t.start(lambda d, ep: None, on_batch, on_lone)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    try:
        for msg in (b"L1", b"other", b"boom", b"L2", b"end"):
            # Each is sent only once the thread waits for it, so each arrives alone: with a fixed pause
            # a loaded machine could start the thread late enough for two to queue, and two are a batch.
            assert waiting.wait(5), "the receive thread never waited for a datagram"
            waiting.clear()
            tx.sendto(msg, ("127.0.0.1", t.local_port))
        assert done.wait(5)
        assert b"L1" in offered and b"L2" in offered
        assert batches == [b"other", b"end"]
        # The sender in the socket's own form: what the data path's lanes keep and the bare sendto takes.
        assert set(senders) == {t.sockaddr(tx.getsockname())}
    finally:
        tx.close()
        t.close()


def test_a_receive_error_that_persists_backs_off_and_a_success_resets_it(monkeypatch) -> None:
    """A socket that keeps failing must not spin a core or flood the log; the receiver goes on after it."""
    import errno

    from husarnet_ros.core import transport as tmod

    t = tmod.UdpTransport(0, bind_host="127.0.0.1")
    script: list[object] = [OSError(errno.ENOMEM, "no memory")] * 12 + [[(b"x", ("127.0.0.1", 1))]]
    script += [OSError(errno.ENOMEM, "no memory")] * 2
    sleeps: list[float] = []
    got: list[bytes] = []

    def recv_batch(timeout, **_kw):  # type: ignore[no-untyped-def]
        if not script:
            t._closed = True  # the loop ends at its next check
            return []
        step = script.pop(0)
        if isinstance(step, OSError):
            raise step
        return step

    monkeypatch.setattr(t._sock, "recv_batch", recv_batch)
    monkeypatch.setattr(tmod.time, "sleep", sleeps.append)
    try:
        t._run(lambda data, ep: got.append(data), None, None)
    finally:
        t._closed = False
        t.close()
    assert got == [b"x"]
    first, limit = tmod.RECV_BACKOFF_FIRST, tmod.RECV_BACKOFF_MAX
    doubling = [first * 2**i for i in range(10)]  # 1 ms .. 512 ms, then the 1 s cap
    assert doubling[-1] < limit < 2 * doubling[-1]
    assert sleeps == [*doubling, limit, limit, first, 2 * first]  # a success starts over
