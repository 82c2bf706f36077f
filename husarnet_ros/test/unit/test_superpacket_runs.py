"""DataSuper fragments received as one GRO buffer (``DatagramRun``) are opened straight from the buffer.

The UDP socket hands a GRO buffer of DataSuper fragments over whole; the data path joins each complete
message in it (all headers checked at once) and cuts anything else into datagrams for the fragment-by-
fragment path.  Every verdict must be the one the datagrams would get one by one: forged runs cost one
AEAD open and deliver nothing, replays are refused, broken headers never join, and a run that holds a
complete message and the start of the next delivers both once the rest arrives.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from test_im_common import EP_A, Lab, wait_for
from test_superpacket_memnet import agreed, fragments_of, make_pair, small_loss_window, tcp_payloads

from husarnet_ros.core.datapath import _whole_message_at
from husarnet_ros.core.memnet import Impairment
from husarnet_ros.core.udp import DatagramRun, UdpSocket
from husarnet_ros.core.wire import (
    DATA_SUPER_HEADER,
    MSG_DATA,
    MSG_DATA_SUPER,
    SUPER_MAX_FRAGMENTS,
    build_super_fragments,
    super_fragment_run,
)

__all__ = ["small_loss_window"]  # the autouse fixture applies here too

# A payload whose sealed message is an exact multiple of the fragment size: every fragment is full-size,
# so GRO may append the next message's fragments to the same buffer.
FULL_FRAGMENTS_PAYLOAD = 20 * 1383 - 98


def run_of(frags: list[bytes]) -> DatagramRun:
    return DatagramRun(b"".join(frags), len(frags[0]))


def test_a_run_is_joined_once_and_checked_like_fragments(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b))
        lb.net.set_impairment(Impairment(drop=1.0), src=EP_A)  # we hand B the fragments ourselves
        p1 = b"g" * 50000
        frags = fragments_of(a, b, p1)
        dp = b.engine._datapath
        got0 = len(b.got)
        forged = list(frags)
        forged[3] = forged[3][:-1] + bytes([forged[3][-1] ^ 1])
        dp.receive_many([(run_of(forged), EP_A)])
        assert b.counter("bad_mac") == 1 and len(b.got) == got0
        dp.receive_many([(run_of(frags), EP_A)])
        assert wait_for(lambda: tcp_payloads(b) == p1), b.engine.counters.snapshot()
        replays = b.counter("replay")
        dp.receive_many([(run_of(frags), EP_A)])
        assert b.counter("replay") == replays + len(frags)
        assert b.counter("super_rx") == 1


def test_a_broken_header_never_joins(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b))
        lb.net.set_impairment(Impairment(drop=1.0), src=EP_A)
        frags = fragments_of(a, b, b"k" * 40000)
        bad = list(frags)
        bad[5] = bad[5][:16] + bytes([4]) + bad[5][17:]  # claims to be fragment 4 again
        assert _whole_message_at(run_of(bad).data, 0, len(frags[0])) == 0
        assert _whole_message_at(run_of(frags).data, 0, len(frags[0])) == len(frags)
        got0 = len(b.got)
        b.engine._datapath.receive_many([(run_of(bad), EP_A)])
        assert b.counter("fragment_duplicate") == 1
        assert len(b.got) == got0 and b.counter("super_rx") == 0


def test_a_run_with_a_message_and_the_start_of_the_next(tmp_path: Path) -> None:
    with Lab(tmp_path, log_sent=True) as lb:
        a, b = make_pair(lb)
        assert wait_for(lambda: agreed(a, b))
        lb.net.set_impairment(Impairment(drop=1.0), src=EP_A)
        p1, p2 = b"m" * FULL_FRAGMENTS_PAYLOAD, b"n" * 30000
        frags1 = fragments_of(a, b, p1)
        frags2 = fragments_of(a, b, p2, seq=len(p1))
        assert len({len(f) for f in frags1}) == 1 and len(frags2[0]) == len(frags1[0])
        dp = b.engine._datapath
        # GRO merged message 1 and the first 10 fragments of message 2; the rest comes in the next buffer.
        dp.receive_many([(run_of(frags1 + frags2[:10]), EP_A)])
        assert wait_for(lambda: tcp_payloads(b) == p1)
        dp.receive_many([(f, EP_A) for f in frags2[10:]])
        assert wait_for(lambda: tcp_payloads(b) == p1 + p2)
        assert b.counter("super_rx") == 2 and b.counter("bad_mac") == 0


def test_the_socket_keeps_data_runs_whole_and_cuts_up_a_buffer_with_a_control_message() -> None:
    tx, rx = UdpSocket(0), UdpSocket(0)
    try:
        if not (tx.gso and rx.gro):
            raise AssertionError("UDP GSO/GRO on loopback is expected on the kernels CI runs")
        ep = ("127.0.0.1", rx.sock.getsockname()[1])
        frags = [bytes([MSG_DATA_SUPER, i]) * 50 for i in range(3)]
        data = bytes([MSG_DATA]) + b"d" * 99  # a full-size Data datagram may share the buffer
        tx.send_many([*frags, data], ep)
        got = rx.recv_batch(2.0, runs=True)
        assert len(got) == 1
        run = got[0][0]
        assert isinstance(run, DatagramRun) and run.seg == 100 and run.data == b"".join([*frags, data])
        hello = bytes([5]) + b"h" * 49  # a control message GRO appended: the buffer is cut up as usual
        tx.send_many([*frags, hello], ep)
        assert [d for d, _ in rx.recv_batch(2.0, runs=True)] == [*frags, hello]
        tx.send_many(frags, ep)
        assert [d for d, _ in rx.recv_batch(2.0)] == frags  # without runs: datagram by datagram
    finally:
        tx.close()
        rx.close()


def test_fragments_leave_as_one_run_in_one_send_and_arrive_as_built() -> None:
    """send_segmented of a fragment run puts the same datagrams on the wire as the fragments."""
    sealed = bytes(range(256)) * 40  # 10240 bytes: 8 fragments of 1383, the last shorter
    frags = build_super_fragments(7, 99, sealed, 1383)
    parts = [super_fragment_run(7, 99, sealed, 1383)]
    assert b"".join(parts) == b"".join(frags) and len(frags) == 8
    for gso in (True, False):
        tx, rx = UdpSocket(0, gso=gso), UdpSocket(0)
        try:
            tx.send_segmented(parts, 1403, ("127.0.0.1", rx.sock.getsockname()[1]))
            got: list[bytes] = []
            while len(got) < len(frags):
                batch = rx.recv_batch(2.0)
                assert batch, f"only {len(got)} of {len(frags)} fragments arrived (gso={gso})"
                got += [bytes(d) for d, _ in batch]
            assert got == frags
        finally:
            tx.close()
            rx.close()


def reference_whole_message_at(data: bytes, off: int, seg: int) -> int:
    """The rule of ``_whole_message_at``, fragment by fragment and field by field: the obvious way."""
    first = data[off : off + seg]
    if not 20 < seg <= 20 + 2048 or len(first) != seg:
        return 0
    word, receiver, counter, index, count, reserved = DATA_SUPER_HEADER.unpack_from(first)
    if first[0] != MSG_DATA_SUPER or index != 0 or reserved or not 1 < count <= SUPER_MAX_FRAGMENTS:
        return 0
    for k in range(1, count):
        frag = data[off + k * seg : off + (k + 1) * seg]
        if len(frag) <= 20:
            return 0
        if DATA_SUPER_HEADER.unpack_from(frag) != (word, receiver, counter, k, count, reserved):
            return 0
    return count


@given(
    st.integers(2, 12),
    st.integers(16, 60),  # a sealed message holds at least a tag
    st.integers(0, 40),
    st.lists(st.tuples(st.integers(0, 11), st.integers(0, 19), st.integers(1, 255)), max_size=2),
    st.integers(-30, 0),
)
def test_a_run_is_whole_exactly_when_every_header_says_so(
    count: int, size: int, tail: int, flips: list[tuple[int, int, int]], cut: int
) -> None:
    """Any header byte changed, or a run cut short, is judged as the field-by-field reference judges it."""
    sealed = bytes(range(256)) * 2
    sealed = (sealed * 2)[: (count - 1) * size + 1 + tail % size]
    run = bytearray(super_fragment_run(0xA1B2C3D4, 2**40 + 7, sealed, size))
    seg = 20 + size
    for frag, byte, xor in flips:
        pos = (frag % count) * seg + byte
        run[pos] ^= xor
    data = bytes(run[: len(run) + cut] if cut else run)
    assert _whole_message_at(data, 0, seg) == reference_whole_message_at(data, 0, seg)
