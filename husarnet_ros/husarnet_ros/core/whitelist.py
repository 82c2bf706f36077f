"""The persisted, default-deny peer whitelist (DESIGN.md 4.7).

A responder answers nothing for a peer that is not allowed here, so this is
the node's front door.  Three states are explicit because each is a decision
an operator makes on purpose:

* **enabled**: only listed addresses;
* **enabled and empty**: nobody (deny all) - not "allow all", which an empty
  list too often means elsewhere;
* **disabled**: every valid fc94 identity (the list is kept for later).

Every change, from any source (ROS service, websetup, CLI, configuration), goes
through :class:`Whitelist`; it is written to disk (atomic rename, fsynced)
*before* the method returns, so nothing is acknowledged that a power cut could
undo.  The datapath asks :meth:`Whitelist.is_allowed` per handshake: one
attribute read and a frozenset lookup, no lock, no I/O.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .constants import ADDRESS_LEN, OVERLAY_PREFIX
from .fsutil import atomic_write_json
from .hosts import validate_hostname
from .identity import format_address, parse_address

log = logging.getLogger(__name__)

FILE_FORMAT = 1
MAX_FILE_SIZE = 4 << 20
MAX_ENTRIES = 65536

Listener = Callable[[str, "bytes | None"], None]


class WhitelistError(Exception):
    """The whitelist file or a configured entry is unusable; the message names it and says why."""


def parse_entry(text: str) -> tuple[bytes, str]:
    """Parse ``"fc94:..."``, ``"fc94:...=hostname"`` or ``"fc94:... hostname"`` into (address, hostname)."""
    if not isinstance(text, str) or len(text) > 400:
        raise ValueError("whitelist entry must be a short string")
    text = text.strip()
    if "=" in text:
        addr_text, _, name = text.partition("=")
    else:
        parts = text.split()
        if len(parts) > 2:
            raise ValueError(f"whitelist entry {text!r} has more than an address and a hostname")
        addr_text, name = (parts[0], parts[1]) if len(parts) == 2 else (text, "")
    addr = parse_address(addr_text.strip())
    name = name.strip()
    if name:
        validate_hostname(name)
    return addr, name


def _check_addr(addr: bytes) -> bytes:
    if not isinstance(addr, (bytes, bytearray)) or len(addr) != ADDRESS_LEN:
        raise ValueError(f"address must be {ADDRESS_LEN} bytes")
    addr = bytes(addr)
    if addr[:2] != OVERLAY_PREFIX:
        raise ValueError("address is not inside fc94::/16")
    return addr


class Whitelist:
    """Persisted whitelist merged with the node's configured (static) entries.

    Static entries live in memory only, so deleting one from the configuration
    removes it at the next start.  A non-empty hostname set at runtime wins over
    the configured one (it is the later decision).  Removing a static entry
    writes a tombstone, so a removal survives restarts until :meth:`add`.
    Enabled or not: the most recent decision wins.  A runtime :meth:`set_enabled`
    is persisted together with the configured ``enabled_default`` it overrode;
    it holds across restarts until the configured value changes (then the
    configuration is the newer decision).
    """

    def __init__(self, path: str | os.PathLike[str], static: Iterable[str] = (), enabled_default: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._enabled_default = bool(enabled_default)
        self._static: dict[bytes, str] = {}
        for text in static:
            try:
                addr, name = parse_entry(text)
            except ValueError as exc:
                raise WhitelistError(f"whitelist entry {text!r} in the configuration: {exc}") from None
            if addr in self._static and name and self._static[addr] and self._static[addr] != name:
                raise WhitelistError(
                    f"whitelist entry {text!r} in the configuration: address already listed as {self._static[addr]!r}"
                )
            self._static[addr] = name or self._static.get(addr, "")
        self._entries, self._removed, self._enabled_explicit = self._load()
        self._effective: dict[bytes, str] = {}
        # (enabled, allowed set): swapped as one tuple so is_allowed never sees a half update.
        self._snapshot: tuple[bool, frozenset[bytes]] = (True, frozenset())
        self._effective = self._compute(self._entries, self._removed, warn=True)
        self._snapshot = (self._enabled_now(self._enabled_explicit), frozenset(self._effective))

    # --- persistence ------------------------------------------------------------
    def _fail(self, why: str) -> WhitelistError:
        return WhitelistError(
            f"whitelist file {self.path} is unusable: {why}. It was left untouched; fix or move it away "
            f"(the node then starts with an empty whitelist)"
        )

    def _load(self) -> tuple[dict[bytes, str], set[bytes], bool | None]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
        except FileNotFoundError:
            return {}, set(), None
        except OSError as exc:
            raise self._fail(f"cannot read it ({exc})") from exc
        if len(data) > MAX_FILE_SIZE:
            raise self._fail(f"larger than {MAX_FILE_SIZE} bytes")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._fail(f"not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise self._fail("not a JSON object")
        unknown = set(obj) - {"format", "entries", "removed", "enabled", "enabled_config"}
        if unknown:
            raise self._fail(f"unknown keys {sorted(unknown)}")
        if obj.get("format") != FILE_FORMAT:
            raise self._fail(f"format must be {FILE_FORMAT}, found {obj.get('format')!r}")
        raw_entries = obj.get("entries", {})
        raw_removed = obj.get("removed", [])
        enabled = obj.get("enabled")
        if not isinstance(raw_entries, dict) or not isinstance(raw_removed, list):
            raise self._fail("'entries' must be an object and 'removed' a list")
        enabled_config = obj.get("enabled_config")
        if enabled is not None and not isinstance(enabled, bool):
            raise self._fail("'enabled' must be true or false")
        if enabled_config is not None and not isinstance(enabled_config, bool):
            raise self._fail("'enabled_config' must be true or false")
        if enabled_config is not None and enabled_config != self._enabled_default:
            log.info("whitelist: the configured enabled=%s is newer than the runtime choice", self._enabled_default)
            enabled = None
        if len(raw_entries) > MAX_ENTRIES or len(raw_removed) > MAX_ENTRIES:
            raise self._fail(f"more than {MAX_ENTRIES} entries")
        entries: dict[bytes, str] = {}
        names: dict[str, bytes] = {}
        for key, name in raw_entries.items():
            try:
                addr = parse_address(key)
                if not isinstance(name, str):
                    raise ValueError("hostname must be a string")
                if name:
                    validate_hostname(name)
            except ValueError as exc:
                raise self._fail(f"entry {key!r}: {exc}") from None
            if addr in entries:
                raise self._fail(f"address {key!r} is listed twice")
            if name and names.setdefault(name.lower(), addr) != addr:
                raise self._fail(f"hostname {name!r} is given to two addresses")
            entries[addr] = name
        removed: set[bytes] = set()
        for key in raw_removed:
            try:
                removed.add(parse_address(key))
            except ValueError as exc:
                raise self._fail(f"removed entry {key!r}: {exc}") from None
        return entries, removed, enabled

    def _write(self, entries: dict[bytes, str], removed: set[bytes], enabled: bool | None) -> None:
        obj: dict[str, Any] = {
            "format": FILE_FORMAT,
            "entries": {format_address(a): n for a, n in sorted(entries.items())},
            # Tombstones only matter while the configuration still lists the address.
            "removed": sorted(format_address(a) for a in removed if a in self._static),
        }
        if enabled is not None:
            obj["enabled"] = enabled
            obj["enabled_config"] = self._enabled_default
        atomic_write_json(self.path, obj)

    def _compute(self, entries: dict[bytes, str], removed: set[bytes], warn: bool = False) -> dict[bytes, str]:
        effective = {a: n for a, n in self._static.items() if a not in removed}
        for addr, name in entries.items():
            effective[addr] = name or effective.get(addr, "")
        # One name, one address: a runtime name beats a configured one on another address.
        owner: dict[str, bytes] = {}
        for addr, name in entries.items():
            if name:
                owner[name.lower()] = addr
        for addr, name in list(effective.items()):
            if name and owner.setdefault(name.lower(), addr) != addr:
                if warn:
                    log.warning(
                        "configured hostname %r of %s is now used by %s; ignoring it",
                        name,
                        format_address(addr),
                        format_address(owner[name.lower()]),
                    )
                effective[addr] = ""
        return effective

    def _enabled_now(self, explicit: bool | None) -> bool:
        return self._enabled_default if explicit is None else explicit

    def _commit(self, entries: dict[bytes, str], removed: set[bytes], enabled: bool | None) -> None:
        """Persist first, then publish the new state (caller holds the lock)."""
        effective = self._compute(entries, removed)
        if len(effective) > MAX_ENTRIES:
            raise WhitelistError(f"whitelist is full ({MAX_ENTRIES} entries)")
        self._write(entries, removed, enabled)
        self._entries, self._removed, self._enabled_explicit = entries, removed, enabled
        self._effective = effective
        self._snapshot = (self._enabled_now(enabled), frozenset(effective))

    def _notify(self, kind: str, addr: bytes | None) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind, addr)
            except Exception:  # a listener's bug must not undo or hide a persisted change
                log.exception("whitelist listener failed on %s", kind)

    # --- queries ------------------------------------------------------------------
    def is_allowed(self, addr: bytes) -> bool:
        """May this full 16-byte address talk to us?  Lock-free; safe from any thread."""
        enabled, allowed = self._snapshot
        if enabled:
            try:
                return addr in allowed
            except TypeError:  # memoryview or other unhashable bytes-like
                return bytes(addr) in allowed
        return len(addr) == ADDRESS_LEN and bytes(addr[:2]) == OVERLAY_PREFIX

    @property
    def enabled(self) -> bool:
        return self._snapshot[0]

    # Readers take no lock (the mapping is replaced, never mutated), so they never wait for an fsync.
    def entries(self) -> dict[bytes, str]:
        """The listed addresses (static and persisted) with their hostnames ("" when none)."""
        return dict(self._effective)

    def hostnames(self) -> dict[str, bytes]:
        """hostname -> address for every listed entry that has a hostname."""
        return {n: a for a, n in self._effective.items() if n}

    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "count": len(self._snapshot[1]), "path": str(self.path)}

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(kind, addr)`` after every persisted change.

        kind is 'add' (also: hostname changed), 'remove' or 'enabled' (addr None).  Called outside the lock,
        from the thread that made the change.
        """
        self._listeners.append(fn)

    # --- changes --------------------------------------------------------------------
    def add(self, addr: bytes, hostname: str = "") -> bool:
        """Allow ``addr`` (optionally naming it); True if anything changed.  Persisted before returning."""
        addr = _check_addr(addr)
        if hostname:
            validate_hostname(hostname)
        with self._lock:
            current = self._effective.get(addr)
            if current is not None and (not hostname or current == hostname):
                return False
            if hostname:
                for other, name in self._effective.items():
                    if other != addr and name.lower() == hostname.lower():
                        raise ValueError(
                            f"hostname {hostname!r} already belongs to {format_address(other)}; remove that first"
                        )
            entries = dict(self._entries)
            entries[addr] = hostname or entries.get(addr, "") or (current or "")
            removed = self._removed - {addr}
            self._commit(entries, removed, self._enabled_explicit)
        self._notify("add", addr)
        return True

    def remove(self, addr: bytes) -> bool:
        """Stop allowing ``addr``; True if it was listed.  Persisted before returning (also for static entries)."""
        addr = _check_addr(addr)
        with self._lock:
            if addr not in self._effective:
                return False
            entries = dict(self._entries)
            entries.pop(addr, None)
            removed = set(self._removed)
            if addr in self._static:
                removed.add(addr)
            self._commit(entries, removed, self._enabled_explicit)
        self._notify("remove", addr)
        return True

    def set_enabled(self, enabled: bool) -> bool:
        """Enable (default deny) or disable (allow every valid identity); True if the state changed."""
        enabled = bool(enabled)
        with self._lock:
            changed = enabled != self.enabled
            if self._enabled_explicit == enabled:
                return False
            self._commit(dict(self._entries), set(self._removed), enabled)
        if changed:
            self._notify("enabled", None)
        return changed
