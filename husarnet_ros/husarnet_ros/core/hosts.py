r"""Hostnames for overlay peers: a marked block in the hosts file (DESIGN.md 4.9).

``ping robot1`` should work without DNS, so peer hostnames go into the hosts
file.  The file belongs to the operating system and to the user, so we own
exactly one marked block::

    # BEGIN husarnet_ros
    fc94:...\trobot1
    # END husarnet_ros

and keep every other byte as it was.  Names come from remote parties
(websetup, configuration, services), so they are validated strictly (RFC 1123
labels, ASCII only): a newline or a space in a "hostname" would otherwise
inject arbitrary lines into a file every resolver on the machine trusts.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .constants import ADDRESS_LEN, MAX_HOSTNAME_LEN
from .fsutil import atomic_write

if TYPE_CHECKING:
    from .whitelist import Whitelist

log = logging.getLogger(__name__)

BEGIN_MARKER = b"# BEGIN husarnet_ros"
END_MARKER = b"# END husarnet_ros"
LOCAL_HOSTNAME = "husarnet-local"
RESERVED_HOSTNAMES: tuple[str, ...] = (LOCAL_HOSTNAME,)
MAX_NAME_LEN = 253
MAX_HOSTS_FILE = 16 << 20  # a hosts file larger than this is not one we should rewrite

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


class HostsError(Exception):
    """The hosts file cannot be edited safely; the message names the file and the reason."""


def validate_hostname(name: str, *, allow_reserved: bool = False) -> str:
    """Return ``name`` unchanged if it is an RFC 1123 host name, else raise ``ValueError`` with the reason.

    Case is preserved (resolvers compare names case-insensitively anyway).
    Only letters, digits and inner hyphens in dot-separated labels of 1-63
    characters, at most 253 in total: this excludes whitespace, newlines,
    control characters, ``#`` and anything non-ASCII, which is what makes a
    name safe to write into the hosts file.
    """
    if not isinstance(name, str):
        raise ValueError("hostname must be a string")
    if not name:
        raise ValueError("hostname is empty")
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"hostname is {len(name)} characters long; at most {MAX_NAME_LEN} are allowed")
    for label in name.split("."):
        if not label:
            raise ValueError("hostname has an empty label (leading, trailing or double dot)")
        if len(label) > MAX_HOSTNAME_LEN:
            raise ValueError(f"hostname label is {len(label)} characters long; at most {MAX_HOSTNAME_LEN} are allowed")
        bad = next((c for c in label if c not in _LABEL_CHARS), None)
        if bad is not None:
            raise ValueError(f"hostname contains {bad!r}; only letters, digits, '-' and '.' are allowed")
        if label[0] == "-" or label[-1] == "-":
            raise ValueError("a hostname label may not start or end with '-'")
    if name.rsplit(".", 1)[-1].isdigit():
        # "123" or "1.2.3.4" would be read as an IPv4 address by inet_aton-style resolvers (RFC 1123 2.1).
        raise ValueError("the last label of a hostname may not be all digits (it would look like an IPv4 address)")
    if not allow_reserved and name.lower() in RESERVED_HOSTNAMES:
        raise ValueError(f"hostname {name!r} is reserved for this node's own address")
    return name


def _check_address(addr: bytes) -> bytes:
    if not isinstance(addr, (bytes, bytearray)) or len(addr) != ADDRESS_LEN:
        raise ValueError("address must be 16 bytes")
    return bytes(addr)


#: Why a rename over the hosts file can fail although the file itself may be writable: it is a mount point
#: (Docker bind-mounts /etc/hosts: EBUSY), on another file system (EXDEV), or its directory is closed to us
#: (a normal user given write access to /etc/hosts only: EACCES or EPERM creating the temporary file).
_NO_RENAME = frozenset({errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM})


def _replace(target: Path, data: bytes, mode: int) -> bool:
    """Give ``target`` the content ``data``: atomically by rename (True) or, where that is impossible, in place.

    The hosts file is the one file we write that we do not own: in a Docker
    container /etc/hosts is a bind mount, which no rename can replace, and a
    normal user may have been given write access to the file but not to /etc.
    There the file is rewritten in place (truncate, write, fsync; False): a
    resolver racing the write may see our block cut short for an instant, and
    a power cut in the middle leaves the file short, which names tolerate.
    Identity and whitelist never come here: they always use :func:`atomic_write`.
    """
    try:
        atomic_write(target, data, mode)
        return True
    except OSError as exc:
        if exc.errno not in _NO_RENAME or not target.exists():
            raise
        log.debug("hosts file %s cannot be replaced (%s); rewriting it in place", target, exc.strerror)
    with open(target, "r+b") as f:  # an error here is the one to report: the file itself is closed to us
        f.truncate(0)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return False


class HostsFile:
    """Rewrites only our marked block of a hosts file, keeping the rest byte for byte (atomically where possible)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    # --- reading --------------------------------------------------------------
    def _target(self) -> Path:
        """The file we really write: the symlink's final target, so a symlinked hosts file stays a symlink."""
        try:
            target = Path(os.path.realpath(self.path, strict=False))
            mode = target.stat().st_mode if target.exists() else None
        except OSError as exc:  # symlink loop, permission denied on a directory, ...
            raise HostsError(f"cannot resolve {self.path}: {exc}") from exc
        if mode is not None and not stat.S_ISREG(mode):
            raise HostsError(f"{self.path} (resolved to {target}) is not a regular file; refusing to write it")
        return target

    def _read(self, target: Path) -> bytes:
        try:
            with open(target, "rb") as f:
                data = f.read(MAX_HOSTS_FILE + 1)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise HostsError(f"cannot read {target}: {exc}") from exc
        if len(data) > MAX_HOSTS_FILE:
            raise HostsError(f"{target} is larger than {MAX_HOSTS_FILE} bytes; refusing to rewrite it")
        return data

    @staticmethod
    def _split(data: bytes, where: Path) -> tuple[bytes, bytes | None, bytes]:
        """Split into (before, block including markers or None, after); malformed blocks raise."""
        lines = data.splitlines(keepends=True)
        begin = end = None
        for i, line in enumerate(lines):
            stripped = line.rstrip(b"\r\n").rstrip()
            if stripped == BEGIN_MARKER:
                if begin is not None:
                    raise HostsError(f"{where} has two '{BEGIN_MARKER.decode()}' lines; fix it by hand")
                begin = i
            elif stripped == END_MARKER:
                if begin is None or end is not None:
                    raise HostsError(f"{where} has a stray '{END_MARKER.decode()}' line; fix it by hand")
                end = i
        if begin is None:
            return data, None, b""
        if end is None:
            raise HostsError(f"{where} has '{BEGIN_MARKER.decode()}' without '{END_MARKER.decode()}'; fix it by hand")
        return b"".join(lines[:begin]), b"".join(lines[begin : end + 1]), b"".join(lines[end + 1 :])

    def read_block(self) -> dict[str, bytes]:
        """The names currently in our block (lines we cannot parse are skipped)."""
        target = self._target()
        _, block, _ = self._split(self._read(target), target)
        result: dict[str, bytes] = {}
        if block is None:
            return result
        for line in block.splitlines()[1:-1]:
            parts = line.split()
            if len(parts) != 2:
                continue
            try:
                addr = ipaddress.IPv6Address(parts[0].decode("ascii")).packed
                result[parts[1].decode("ascii")] = addr
            except (ValueError, UnicodeDecodeError):
                continue
        return result

    # --- writing --------------------------------------------------------------
    @staticmethod
    def render_block(mapping: dict[str, bytes]) -> bytes:
        """The block text for ``mapping`` (validated, sorted by name so rewrites are stable)."""
        out = [BEGIN_MARKER + b"\n"]
        for name in sorted(mapping, key=lambda n: (n.lower(), n)):
            validate_hostname(name, allow_reserved=True)
            addr = _check_address(mapping[name])
            out.append(f"{ipaddress.IPv6Address(addr)}\t{name}\n".encode("ascii"))
        out.append(END_MARKER + b"\n")
        return b"".join(out)

    def _write(self, new_block: bytes | None) -> bool:
        with self._lock:
            target = self._target()
            data = self._read(target)
            before, block, after = self._split(data, target)
            if new_block is None:
                if block is None:
                    return False
                new = before + after
            elif block is None:
                sep = b"" if not before or before.endswith(b"\n") else b"\n"
                new = before + sep + new_block
            else:
                new = before + new_block + after
            if new == data:
                return False
            try:
                st = target.stat()
                mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            except FileNotFoundError:
                mode, uid, gid = 0o644, -1, -1
            try:
                if not _replace(target, new, mode):
                    return True  # rewritten in place: mode and owner are the file's own
                if uid >= 0 and (uid, gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.chown(target, uid, gid)
                    except PermissionError:
                        log.warning("hosts file %s: could not restore its owner %d:%d", target, uid, gid)
            except OSError as exc:
                raise HostsError(f"cannot write {target}: {exc.strerror or exc}") from exc
            return True

    def update(self, mapping: dict[str, bytes]) -> bool:
        """Make our block hold exactly ``mapping`` (name -> 16-byte address); True if the file changed.

        Every name and address is validated before the file is touched, so a
        bad entry leaves the file byte-identical.
        """
        return self._write(self.render_block(mapping))

    def clear(self) -> bool:
        """Remove our block (and only it); True if the file changed."""
        return self._write(None)


class HostsSync:
    """Keeps the hosts block equal to our own names, the whitelist's hostnames and extra sources.

    Precedence when two sources name different addresses: own names, then the
    whitelist, then extra sources in the order they were first set.  Names are
    compared case-insensitively, as resolvers do.
    """

    def __init__(
        self,
        hosts_file: HostsFile,
        own_address: bytes,
        own_hostname: str = "",
        whitelist: Whitelist | None = None,
    ) -> None:
        self.hosts_file = hosts_file
        self.own_address = _check_address(own_address)
        self.own_hostname = validate_hostname(own_hostname) if own_hostname else ""
        self.whitelist = whitelist
        self._sources: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()
        if whitelist is not None:
            whitelist.add_listener(self._on_whitelist)

    def _on_whitelist(self, kind: str, addr: bytes | None) -> None:
        try:
            self.sync()
        except (HostsError, ValueError) as exc:
            log.error("hosts file not updated after a whitelist change: %s", exc)

    def mapping(self) -> dict[str, bytes]:
        """The block's content: name -> address."""
        result: dict[str, bytes] = {}
        seen: set[str] = set()

        def put(name: str, addr: bytes) -> None:
            key = name.lower()
            if key not in seen:
                seen.add(key)
                result[name] = addr

        put(LOCAL_HOSTNAME, self.own_address)
        if self.own_hostname:
            put(self.own_hostname, self.own_address)
        if self.whitelist is not None:
            for name, addr in self.whitelist.hostnames().items():
                put(name, addr)
        for source in list(self._sources.values()):
            for name, addr in source.items():
                put(name, addr)
        return result

    def set_source(self, name: str, mapping: dict[str, bytes]) -> None:
        """Replace one extra source (e.g. ``"websetup"``) and rewrite the block."""
        checked = {validate_hostname(n): _check_address(a) for n, a in mapping.items()}
        with self._lock:
            self._sources[name] = checked
        self.sync()

    def source_hook(self, name: str) -> Callable[[dict[str, bytes]], None]:
        """A callable for :class:`WebsetupServer`'s ``hosts_hook``."""
        return lambda mapping: self.set_source(name, mapping)

    def sync(self) -> bool:
        """Rewrite the block from the current sources; True if the file changed."""
        with self._lock:
            return self.hosts_file.update(self.mapping())

    def close(self) -> None:
        """Remove our block (node shutdown): names must not point at a dead overlay."""
        with self._lock:
            self.hosts_file.clear()
