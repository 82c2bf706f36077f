"""The engine's TUN interface check (Engine._check_interface): a device set down is reported, a lost address restored.

The real device is exercised in test/netns/test_two_node.py; here a fake device drives every branch,
including the ones a real kernel will not produce on demand (an address that cannot be put back).
"""

from __future__ import annotations

import asyncio

import pytest

from husarnet_ros.core.engine import Engine, EngineConfig
from husarnet_ros.core.identity import Identity
from husarnet_ros.core.tun import TunError


class FakeTun:
    name = "hnet0"

    def __init__(self) -> None:
        self.up = True
        self.has_address = True
        self.restore_error: str | None = None
        self.restored = 0
        self.write_errors = 0
        self.closed = False

    def link_state(self) -> tuple[bool, bool]:
        return self.up, self.has_address

    def restore_address(self) -> None:
        if self.restore_error is not None:
            raise TunError(self.restore_error)
        self.restored += 1
        self.has_address = True


@pytest.fixture
def engine(tmp_path):
    ident = Identity.generate()
    eng = Engine(EngineConfig(state_dir=tmp_path, use_tun=False, lan_discovery=False), identity=ident)
    eng._tun = FakeTun()
    eng.notified = []
    eng.add_listener(eng.notified.append)
    return eng


def check(eng: Engine) -> None:
    asyncio.run(eng._check_interface())


def test_down_is_a_warning_with_the_fix_and_write_failures_are_counted(engine):
    tun = engine._tun
    check(engine)
    assert engine.status().warning == ""
    tun.up, tun.has_address = False, False  # what the kernel does to IPv6 on 'ip link set hnet0 down'
    tun.write_errors = 7
    check(engine)
    st = engine.status()
    assert "hnet0 is down" in st.warning and "ip link set hnet0 up" in st.warning
    assert engine.notified == ["status"]  # the ROS node publishes the change at once
    assert st.counters["tun_write_failed"] == 7
    assert tun.restored == 0  # a device set down is respected: nothing is put back while it is down
    tun.write_errors = 9
    check(engine)
    assert engine.status().counters["tun_write_failed"] == 9  # counted once each, not again every check
    tun.up = True  # 'ip link set hnet0 up': the link is back, the address is not
    check(engine)
    assert tun.restored == 1 and tun.has_address
    assert engine.status().warning == ""


def test_an_address_that_cannot_be_put_back_is_a_warning(engine):
    tun = engine._tun
    tun.has_address = False
    tun.restore_error = "not allowed to put the address of 'hnet0' back; run once: sudo husarnet-ros setup-tun"
    check(engine)
    warning = engine.status().warning
    assert warning.startswith("hnet0 cannot be checked or repaired: not allowed") and "setup-tun" in warning
    tun.restore_error = None
    check(engine)
    assert engine.status().warning == "" and tun.has_address


def test_no_check_once_the_device_failed_for_good(engine):
    tun = engine._tun
    engine.failure = "TUN device 'hnet0' is gone"
    tun.up = False
    check(engine)
    assert engine.status().warning == ""  # the failure says it all; no second, contradicting message
