"""Where each peer was last reached directly, kept across restarts (``<state_dir>/endpoints.json``).

After a restart a node knows who its peers are (the whitelist) but not where: that comes from the base
server or from LAN beacons.  A robot that restarts while the base is unreachable (an internet outage, a
base being redeployed) and whose peers are not on its LAN would stay cut off although the peers sit at
the same addresses as a minute ago.  So the engine remembers the direct paths it validated and offers
them again as hints at start.

A hint is only that: nothing but a handshake is sent to it, and only an authenticated answer makes it a
path (DESIGN.md 4.4), so a stale or planted entry costs at most a few handshake attempts.  The file is
still private (0600, refused otherwise, like every state file): it says where the peers are.  It is a
cache, so a damaged file is reported and ignored, never fatal, and the next save replaces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .fsutil import StateFileError, atomic_write_json, read_private_file
from .identity import format_address, parse_address
from .transport import Endpoint, format_endpoint, parse_endpoint

FILE_NAME = "endpoints.json"
VERSION = 1
#: Bounds on what is kept and read back: a file is at most a few hundred kB, whatever it says.
MAX_PEERS = 1024
MAX_ENDPOINTS = 4
MAX_FILE_BYTES = 256 * 1024


class EndpointCacheError(Exception):
    """The cache file cannot be used; the message says why (the caller logs it and starts without)."""


def load(path: str | os.PathLike[str]) -> dict[bytes, list[Endpoint]]:
    """The cached endpoints per peer address; {} when there is no file.

    Raises :class:`EndpointCacheError` for a file that is unsafe (not 0600, not a regular file), too
    large, or not a cache this version wrote.  Strict: one bad entry rejects the file, as a file that is
    partly wrong cannot be trusted to be partly right.
    """
    try:
        data = read_private_file(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        return {}
    except (StateFileError, OSError) as exc:
        raise EndpointCacheError(f"endpoint cache {path}: {exc}") from None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EndpointCacheError(f"endpoint cache {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("peers"), dict):
        raise EndpointCacheError(f'endpoint cache {path}: expected {{"version": {VERSION}, "peers": {{...}}}}')
    peers = doc["peers"]
    if len(peers) > MAX_PEERS:
        raise EndpointCacheError(f"endpoint cache {path}: {len(peers)} peers, more than {MAX_PEERS}")
    out: dict[bytes, list[Endpoint]] = {}
    for addr_text, eps in peers.items():
        try:
            address = parse_address(addr_text)
        except ValueError as exc:
            raise EndpointCacheError(f"endpoint cache {path}: {exc}") from None
        if not isinstance(eps, list) or not 0 < len(eps) <= MAX_ENDPOINTS or not all(isinstance(e, str) for e in eps):
            raise EndpointCacheError(
                f"endpoint cache {path}: {addr_text}: expected a list of 1 to {MAX_ENDPOINTS} endpoint strings"
            )
        try:
            out[address] = [parse_endpoint(e) for e in eps]
        except ValueError as exc:
            raise EndpointCacheError(f"endpoint cache {path}: {addr_text}: {exc}") from None
    return out


def save(path: str | os.PathLike[str], entries: dict[bytes, list[Endpoint]]) -> None:
    """Replace the cache atomically (0600) with ``entries``, cut to the bounds :func:`load` accepts."""
    peers = {
        format_address(address): [format_endpoint(ep) for ep in eps[:MAX_ENDPOINTS]]
        for address, eps in list(entries.items())[:MAX_PEERS]
        if eps
    }
    atomic_write_json(Path(path), {"version": VERSION, "peers": peers})
