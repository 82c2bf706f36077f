"""Whitelist: explicit states, persistence before acknowledgement, static merge, corrupt files refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from husarnet_ros.core.identity import format_address, parse_address
from husarnet_ros.core.whitelist import Whitelist, WhitelistError, parse_entry

A = parse_address("fc94::a")
B = parse_address("fc94::b")
C = parse_address("fc94:1234::c")
# Same first 15 bytes as A, different last byte: the whitelist must compare all 16.
A_NEAR = A[:15] + bytes([A[15] ^ 1])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "whitelist.json"


def test_default_enabled_and_empty_denies_everyone(path: Path) -> None:
    wl = Whitelist(path)
    assert wl.enabled
    assert wl.entries() == {}
    assert not wl.is_allowed(A)
    assert not wl.is_allowed(B)


def test_enabled_allows_exactly_listed_full_addresses(path: Path) -> None:
    wl = Whitelist(path)
    assert wl.add(A, "robot1")
    assert wl.is_allowed(A)
    assert not wl.is_allowed(A_NEAR)
    assert not wl.is_allowed(A[:15])
    assert wl.is_allowed(memoryview(A))


def test_disabled_allows_every_valid_identity_only(path: Path) -> None:
    wl = Whitelist(path)
    wl.add(A)
    assert wl.set_enabled(False)
    assert not wl.enabled
    assert wl.is_allowed(B)
    assert wl.is_allowed(A)
    assert not wl.is_allowed(bytes(16))  # not fc94
    assert not wl.is_allowed(B[:15])
    assert wl.set_enabled(True)
    assert wl.is_allowed(A) and not wl.is_allowed(B)  # list kept while disabled


def test_enabled_most_recent_decision_wins(path: Path) -> None:
    wl = Whitelist(path, enabled_default=False)
    assert not wl.enabled
    assert not path.exists()  # nothing decided yet, nothing written
    wl.set_enabled(True)
    # The runtime choice survives a restart with the same configuration...
    assert Whitelist(path, enabled_default=False).enabled
    assert Whitelist(path, enabled_default=False).enabled
    # ...until the configured value changes: then the configuration is the newer decision.
    changed_config = Whitelist(path, enabled_default=True)
    assert changed_config.enabled
    changed_config.set_enabled(False)
    assert not Whitelist(path, enabled_default=True).enabled
    assert not Whitelist(path, enabled_default=False).enabled  # config changed again: config wins
    assert Whitelist(path, enabled_default=False).set_enabled(True)


def test_set_enabled_reports_change(path: Path) -> None:
    wl = Whitelist(path)
    seen: list[tuple[str, bytes | None]] = []
    wl.add_listener(lambda k, a: seen.append((k, a)))
    assert wl.set_enabled(True) is False  # already enabled (persisted now, no notification)
    assert wl.set_enabled(False) is True
    assert wl.set_enabled(False) is False
    assert seen == [("enabled", None)]


def test_add_remove_return_values_and_listeners(path: Path) -> None:
    wl = Whitelist(path)
    seen: list[tuple[str, bytes | None]] = []
    wl.add_listener(lambda k, a: seen.append((k, a)))
    assert wl.add(A) is True
    assert wl.add(A) is False
    assert wl.add(A, "robot1") is True  # hostname change is a change
    assert wl.add(A, "") is False  # keeps the hostname
    assert wl.entries() == {A: "robot1"}
    assert wl.hostnames() == {"robot1": A}
    assert wl.remove(B) is False
    assert wl.remove(A) is True
    assert not wl.is_allowed(A)
    assert seen == [("add", A), ("add", A), ("remove", A)]


def test_listener_sees_persisted_state_and_errors_do_not_undo(path: Path) -> None:
    wl = Whitelist(path)
    on_disk: list[dict] = []

    def listener(kind: str, addr: bytes | None) -> None:
        on_disk.append(json.loads(path.read_text()))
        raise RuntimeError("listener bug")

    wl.add_listener(listener)
    assert wl.add(A, "robot1")
    assert on_disk[0]["entries"] == {format_address(A): "robot1"}
    assert wl.is_allowed(A)


def test_bad_input_rejected_without_change(path: Path) -> None:
    wl = Whitelist(path)
    with pytest.raises(ValueError):
        wl.add(b"\x00" * 16)
    with pytest.raises(ValueError):
        wl.add(A[:15])
    with pytest.raises(ValueError):
        wl.add(A, "bad name\n1.2.3.4 evil")
    with pytest.raises(ValueError):
        wl.add(A, "husarnet-local")
    assert wl.entries() == {}
    assert not path.exists()


def test_hostname_belongs_to_one_address(path: Path) -> None:
    wl = Whitelist(path)
    wl.add(A, "Robot1")
    with pytest.raises(ValueError, match="already belongs"):
        wl.add(B, "robot1")
    assert wl.entries() == {A: "Robot1"}  # case preserved


def test_persisted_across_instances(path: Path) -> None:
    wl = Whitelist(path)
    wl.add(A, "robot1")
    wl.add(B)
    wl.remove(B)
    wl.set_enabled(False)
    again = Whitelist(path)
    assert again.entries() == {A: "robot1"}
    assert not again.enabled
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_static_entries_merge_and_formats(path: Path) -> None:
    static = [format_address(A), f"{format_address(B)}=robot-b", f"  {format_address(C)}  robot-c "]
    wl = Whitelist(path, static)
    assert wl.entries() == {A: "", B: "robot-b", C: "robot-c"}
    assert not path.exists()  # static entries are not written
    # Runtime hostname wins over the configured one.
    wl.add(B, "renamed")
    again = Whitelist(path, static)
    assert again.entries()[B] == "renamed"
    # Dropping an entry from the configuration removes it at next start.
    assert A not in Whitelist(path, static[1:]).entries()


def test_removed_static_entry_stays_removed_until_added(path: Path) -> None:
    static = [f"{format_address(A)} robot-a"]
    wl = Whitelist(path, static)
    assert wl.remove(A)
    assert not Whitelist(path, static).is_allowed(A)
    wl2 = Whitelist(path, static)
    assert wl2.add(A)
    assert Whitelist(path, static).entries() == {A: "robot-a"}


def test_bad_static_entry_names_it(path: Path) -> None:
    with pytest.raises(WhitelistError, match=re.escape("10.0.0.1")):
        Whitelist(path, ["10.0.0.1"])
    with pytest.raises(WhitelistError, match="configuration"):
        Whitelist(path, [f"{format_address(A)} bad_name"])


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"format": 2, "entries": {}}',
        b'{"format": 1, "entries": {"10.0.0.1": ""}}',
        b'{"format": 1, "entries": {"fc94::a": "x y"}}',
        b'{"format": 1, "entries": {"fc94::a": "r", "fc94::b": "R"}}',
        b'{"format": 1, "entries": {}, "enabled": "yes"}',
        b'{"format": 1, "entries": {}, "surprise": 1}',
        b"\xff\xfe",
    ],
)
def test_corrupt_file_refused_and_never_overwritten(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    with pytest.raises(WhitelistError, match=re.escape(str(path))):
        Whitelist(path, [format_address(A)])
    assert path.read_bytes() == content


def test_parse_entry() -> None:
    assert parse_entry("fc94::a") == (A, "")
    assert parse_entry("fc94::a=robot1") == (A, "robot1")
    assert parse_entry("fc94::a robot1") == (A, "robot1")
    for bad in ["", "fd00::1", "fc94::a a b", "fc94::a=bad name", "x" * 500]:
        with pytest.raises(ValueError):
            parse_entry(bad)


def test_write_failure_leaves_state_unchanged(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wl = Whitelist(path)
    wl.add(A)

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("husarnet_ros.core.whitelist.atomic_write_json", boom)
    with pytest.raises(OSError):
        wl.add(B)
    with pytest.raises(OSError):
        wl.remove(A)
    assert wl.entries() == {A: ""}
    assert wl.is_allowed(A) and not wl.is_allowed(B)


def test_concurrent_adds_all_persisted(path: Path) -> None:
    wl = Whitelist(path)
    addrs = [parse_address(f"fc94::1:{i:x}") for i in range(40)]
    threads = [threading.Thread(target=wl.add, args=(a,)) for a in addrs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(Whitelist(path).entries()) == set(addrs)


def test_acknowledged_add_survives_sigkill(path: Path) -> None:
    repo_pkg = Path(__file__).resolve().parents[2]  # .../husarnet_ros (the ament package dir)
    code = (
        "import sys, time\n"
        "from husarnet_ros.core.whitelist import Whitelist\n"
        "from husarnet_ros.core.identity import parse_address\n"
        "wl = Whitelist(sys.argv[1])\n"
        "wl.add(parse_address('fc94::a'), 'robot1')\n"
        "print('acked', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(repo_pkg))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"acked"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert Whitelist(path).entries() == {A: "robot1"}
