"""Crash-safe state files.

Robots lose power.  A half-written identity or whitelist must never replace a
good one, so every state write goes to a temporary file in the same directory,
is fsynced, renamed over the target and the directory is fsynced too.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


class StateFileError(Exception):
    """A state file is missing, unsafe or unreadable; the message says which."""


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o600) -> None:
    """Serialise ``obj`` as stable, human-diffable JSON and write it atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, data, mode)


def _check_private_stat(path: str | os.PathLike[str], st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise StateFileError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise StateFileError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing to use it. Check whether the secret leaked, then run: chmod 600 {path}"
        )


def check_private_file(path: str | os.PathLike[str]) -> None:
    """Refuse a secret file that group or others can read or write.

    Raising (rather than silently chmod-ing) tells the operator their key may
    already have leaked, which a quiet fix would hide.
    """
    _check_private_stat(path, os.stat(path))


def read_private_file(path: str | os.PathLike[str], limit: int = 1 << 16) -> bytes:
    """Read a secret file after checking its permissions; bounded so a wrong path cannot eat memory.

    The checks run on the opened descriptor, so the file cannot be swapped
    between the check and the read, and O_NONBLOCK keeps a FIFO planted at the
    path from hanging the caller (it is refused as not a regular file).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        _check_private_stat(path, os.fstat(fd))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StateFileError(f"{path} is larger than {limit} bytes; not a state file")
    return data


#: Others may enter the state directory but not list it: every secret in it is a 0600 file, and the DDS
#: profiles in its ``dds/`` subdirectory must be readable by every local user's ROS processes.
STATE_DIR_MODE = 0o711
_TRAVERSE = STATE_DIR_MODE & 0o077  # the bits an older 0700 directory lacks


def ensure_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create the state directory (0711), or let others traverse one that an older version made 0700.

    Others must reach the DDS files in ``dds/`` (0755, files 0644) to source ``dds.env``.  Only the
    group and other search bits are added, and only on a directory we own; every other bit stays as it
    was.  Nothing else becomes readable by that: the identity, whitelist, websetup and cache files are
    0600 (the identity is refused otherwise), temporary files are created 0600, and listing stays denied.
    """
    return ensure_dir_open_to(path, _TRAVERSE)


def ensure_dir_open_to(path: str | os.PathLike[str], bits: int) -> Path:
    """Create ``path`` (0700 under any umask, plus ``bits``), or add ``bits`` to one we own that lacks them.

    Only ``bits`` are added, never taken away, and only on a directory we own.  A directory we cannot
    change (read-only) stays as it is: it still serves what is in it, only closed to others.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)  # the umask may only take bits away; widened below
    st = p.stat()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.geteuid() and mode & bits != bits:
        with contextlib.suppress(OSError):
            os.chmod(p, mode | bits)
    return p
