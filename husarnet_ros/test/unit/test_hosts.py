"""Hosts file: only our marked block changes, atomically, with names that cannot inject lines."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

from husarnet_ros.core.hosts import HostsError, HostsFile, HostsSync, validate_hostname
from husarnet_ros.core.identity import parse_address
from husarnet_ros.core.whitelist import Whitelist

OWN = parse_address("fc94::1")
A = parse_address("fc94::a")
B = parse_address("fc94::b")

ORIGINAL = b"127.0.0.1\tlocalhost\n# a comment with trailing spaces   \n::1 ip6-localhost\r\n\n198.18.0.5 lab\n"


@pytest.mark.parametrize(
    "name",
    [
        "robot1",
        "Robot-1",
        "a",
        "a.b.c",
        "x" * 63,
        ".".join(["y" * 63] * 3) + "." + "z" * 61,
        "1robot",
        "123.robot",
        "xn--bcher-kva",
    ],
)
def test_valid_hostnames_preserved(name: str) -> None:
    assert validate_hostname(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("x" * 64, "label"),
        (".".join(["y" * 63] * 4), "253"),
        ("a b", "' '"),
        ("robot\n1.2.3.4 evil", "'\\\\n'"),
        ("robot\t", "'\\\\t'"),
        ("robot\x00", "'\\\\x00'"),
        ("-robot", "start or end"),
        ("robot-", "start or end"),
        ("a..b", "empty label"),
        ("robot.", "empty label"),
        ("rob_ot", "'_'"),
        ("röbot", "'ö'"),
        ("robot#1", "'#'"),
        ("123", "all digits"),
        ("198.18.0.66", "all digits"),
        ("husarnet-local", "reserved"),
        ("HUSARNET-LOCAL", "reserved"),
    ],
)
def test_invalid_hostnames_rejected_with_reason(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validate_hostname(name)


def test_non_string_rejected() -> None:
    with pytest.raises(ValueError):
        validate_hostname(b"robot")  # type: ignore[arg-type]
    assert validate_hostname("husarnet-local", allow_reserved=True) == "husarnet-local"


def test_update_appends_block_and_preserves_everything(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(ORIGINAL)
    os.chmod(path, 0o640)
    hf = HostsFile(path)
    assert hf.update({"husarnet-local": OWN, "robot1": A}) is True
    data = path.read_bytes()
    assert data.startswith(ORIGINAL)
    assert data[len(ORIGINAL) :] == (
        b"# BEGIN husarnet_ros\nfc94::1\thusarnet-local\nfc94::a\trobot1\n# END husarnet_ros\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert hf.read_block() == {"husarnet-local": OWN, "robot1": A}


def test_update_rewrites_only_the_block_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    tail = b"# after our block\n10.9.9.9 keep\n"  # never contacted: text only
    path.write_bytes(ORIGINAL + b"# BEGIN husarnet_ros\nfc94::a\told\n# END husarnet_ros\n" + tail)
    hf = HostsFile(path)
    hf.update({"robot2": B})
    assert path.read_bytes() == ORIGINAL + b"# BEGIN husarnet_ros\nfc94::b\trobot2\n# END husarnet_ros\n" + tail
    assert hf.update({"robot2": B}) is False  # no needless rewrite
    assert hf.clear() is True
    assert path.read_bytes() == ORIGINAL + tail
    assert hf.clear() is False


def test_file_without_trailing_newline_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(b"127.0.0.1 localhost")
    HostsFile(path).update({"robot1": A})
    assert path.read_bytes().startswith(b"127.0.0.1 localhost\n# BEGIN husarnet_ros\n")
    missing = tmp_path / "new_hosts"
    HostsFile(missing).update({"robot1": A})
    assert missing.read_bytes() == b"# BEGIN husarnet_ros\nfc94::a\trobot1\n# END husarnet_ros\n"
    assert stat.S_IMODE(missing.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "mapping",
    [
        {"robot\n1.2.3.4 evil": A},
        {"x" * 10_000: A},
        {"robot1": b"\x00" * 3},
        {"ok": A, "bad name": B},
    ],
)
def test_bad_entries_leave_file_byte_identical(tmp_path: Path, mapping: dict) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(ORIGINAL)
    before = os.stat(path)
    with pytest.raises(ValueError):
        HostsFile(path).update(mapping)
    assert path.read_bytes() == ORIGINAL
    assert os.stat(path).st_ino == before.st_ino


@pytest.mark.parametrize(
    "content",
    [
        b"# BEGIN husarnet_ros\nfc94::a x\n",
        b"# BEGIN husarnet_ros\n# BEGIN husarnet_ros\n# END husarnet_ros\n",
        b"# END husarnet_ros\n",
    ],
)
def test_malformed_block_refused_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(content)
    with pytest.raises(HostsError, match=re.escape(str(path))):
        HostsFile(path).update({"robot1": A})
    assert path.read_bytes() == content


def test_symlink_kept_and_target_written(tmp_path: Path) -> None:
    real = tmp_path / "real_hosts"
    real.write_bytes(ORIGINAL)
    link = tmp_path / "hosts"
    link.symlink_to(real)
    HostsFile(link).update({"robot1": A})
    assert link.is_symlink()
    assert real.read_bytes().startswith(ORIGINAL)
    assert b"robot1" in real.read_bytes()


def test_non_regular_target_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(HostsError, match="not a regular file"):
        HostsFile(d).update({"robot1": A})


def test_hosts_sync_follows_whitelist_and_sources(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_bytes(ORIGINAL)
    wl = Whitelist(tmp_path / "whitelist.json")
    sync = HostsSync(HostsFile(path), OWN, "me", wl)
    sync.sync()
    assert HostsFile(path).read_block() == {"husarnet-local": OWN, "me": OWN}
    wl.add(A, "robot1")
    assert HostsFile(path).read_block()["robot1"] == A
    hook = sync.source_hook("websetup")
    hook({"extra": B, "ROBOT1": B})  # whitelist wins over an extra source for the same name
    block = HostsFile(path).read_block()
    assert block["extra"] == B and block["robot1"] == A and "ROBOT1" not in block
    with pytest.raises(ValueError):
        hook({"bad\nname": B})
    wl.remove(A)
    assert "robot1" not in HostsFile(path).read_block()
    sync.close()
    assert path.read_bytes() == ORIGINAL


def test_symlink_loop_is_a_clear_error(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(HostsError):
        HostsFile(a).update({"robot1": A})


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EXDEV])
def test_unrenamable_hosts_file_is_rewritten_in_place(tmp_path: Path, monkeypatch, code: int) -> None:
    """Docker bind-mounts /etc/hosts: a rename over it fails (EBUSY, or EXDEV), so the file is rewritten in place."""
    path = tmp_path / "hosts"
    path.write_bytes(ORIGINAL)
    os.chmod(path, 0o640)
    inode = path.stat().st_ino
    real_replace = os.replace

    def no_rename(src, dst, **kw):
        if Path(dst) == path:
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", no_rename)
    hf = HostsFile(path)
    assert hf.update({"robot1": A}) is True
    assert path.read_bytes() == ORIGINAL + b"# BEGIN husarnet_ros\nfc94::a\trobot1\n# END husarnet_ros\n"
    assert path.stat().st_ino == inode and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert hf.clear() is True  # shorter than before: truncated, no stale tail
    assert path.read_bytes() == ORIGINAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]  # the failed rename's temporary is gone


def test_other_rename_errors_are_not_papered_over(tmp_path: Path, monkeypatch) -> None:
    """Only 'cannot be replaced' falls back; a full disk is an error and the file stays as it was."""
    path = tmp_path / "hosts"
    path.write_bytes(ORIGINAL)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(HostsError, match=f"cannot write {re.escape(str(path))}: No space left"):
        HostsFile(path).update({"robot1": A})
    assert path.read_bytes() == ORIGINAL
