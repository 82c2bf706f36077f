"""Atomic state writes: a crash never leaves a torn or missing file."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from husarnet_ros.core.fsutil import (
    StateFileError,
    atomic_write,
    atomic_write_json,
    check_private_file,
    ensure_state_dir,
    read_private_file,
)


def test_atomic_write_replaces_content_with_mode(tmp_path) -> None:
    path = tmp_path / "x"
    atomic_write(path, b"one")
    atomic_write(path, b"two", mode=0o640)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary left behind


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    path = tmp_path / "x"
    atomic_write(path, b"good")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"bad")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_kill_during_many_writes_never_tears_the_file(tmp_path) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, {"n": -1})
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.dirname(__file__)))!r})
        from husarnet_ros.core.fsutil import atomic_write_json
        i = 0
        while True:
            atomic_write_json({str(path)!r}, {{"n": i, "pad": "x" * 4096}})
            i += 1
            if i == 20:
                print("running", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"running"
    proc.kill()
    proc.wait()
    import json

    data = json.loads(path.read_text())
    assert data["n"] >= 19


def test_private_file_checks(tmp_path) -> None:
    path = tmp_path / "secret"
    atomic_write(path, b"k" * 32)
    assert read_private_file(path) == b"k" * 32
    path.chmod(0o604)
    with pytest.raises(StateFileError, match="group or others"):
        check_private_file(path)
    path.chmod(0o600)
    atomic_write(path, b"k" * 100)
    with pytest.raises(StateFileError, match="larger than"):
        read_private_file(path, limit=10)


def test_private_file_is_checked_on_what_is_read(tmp_path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(StateFileError, match="not a regular file"):
        read_private_file(fifo)  # refused at once instead of blocking for a writer
    path = tmp_path / "secret"
    atomic_write(path, b"k" * 32, mode=0o640)
    with pytest.raises(StateFileError, match="chmod 600"):
        read_private_file(path)


def test_state_dir_lets_others_through_but_not_list(tmp_path) -> None:
    """0711 whatever the umask: others reach dds/ by name; an older 0700 directory we own is widened."""
    old_umask = os.umask(0o077)
    try:
        new = ensure_state_dir(tmp_path / "a" / "state")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o711
    older = tmp_path / "older"
    older.mkdir(mode=0o700)
    older.chmod(0o700)
    ensure_state_dir(older)
    assert stat.S_IMODE(older.stat().st_mode) == 0o711
    locked = tmp_path / "locked"  # only the search bits are added, nothing else
    locked.mkdir()
    locked.chmod(0o750)
    ensure_state_dir(locked)
    assert stat.S_IMODE(locked.stat().st_mode) == 0o751


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a directory as another user")
def test_state_dir_of_another_owner_keeps_its_mode(tmp_path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    theirs.chmod(0o700)
    os.chown(theirs, 65534, 65534)
    ensure_state_dir(theirs)
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o700


def test_atomic_write_never_rewrites_in_place(tmp_path, monkeypatch) -> None:
    """Identity and whitelist: a rename that fails (EBUSY) is an error, never a torn in-place write."""
    path = tmp_path / "id"
    atomic_write(path, b"good")

    def busy(*_a, **_k):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(OSError, match="busy"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["id"]
