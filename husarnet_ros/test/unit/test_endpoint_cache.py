"""The endpoint cache file: round trip, bounds, and every way a file can be unusable (reported, never fatal)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from husarnet_ros.core import endpoint_cache as ec
from husarnet_ros.core.identity import Identity, format_address

A, B = Identity.generate().address, Identity.generate().address


def write(path: Path, doc: object, mode: int = 0o600) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.chmod(path, mode)
    return path


def test_round_trip_keeps_order_scopes_and_ipv6_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / ec.FILE_NAME
    entries = {
        A: [("198.18.0.2", 5582), ("fd00::2", 40000)],
        B: [("fe80::1%veth0", 5582)],
    }
    ec.save(path, entries)
    assert path.stat().st_mode & 0o777 == 0o600
    assert ec.load(path) == entries
    doc = json.loads(path.read_text())
    assert doc["version"] == ec.VERSION
    assert doc["peers"][format_address(A)] == ["198.18.0.2:5582", "[fd00::2]:40000"]


def test_no_file_is_an_empty_cache(tmp_path: Path) -> None:
    assert ec.load(tmp_path / ec.FILE_NAME) == {}


def test_save_cuts_to_the_bounds_load_accepts(tmp_path: Path) -> None:
    path = tmp_path / ec.FILE_NAME
    many = [("198.18.0.2", 1000 + i) for i in range(ec.MAX_ENDPOINTS + 3)]
    ec.save(path, {A: many, B: []})
    assert ec.load(path) == {A: many[: ec.MAX_ENDPOINTS]}  # a peer with nothing is left out


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ("{not json", "not JSON"),
        ([1, 2], "expected"),
        ({"version": 99, "peers": {}}, "expected"),
        ({"version": 1, "peers": []}, "expected"),
        ({"version": 1, "peers": {"not-an-address": ["198.18.0.2:5582"]}}, "endpoint cache"),
        ({"version": 1, "peers": {format_address(A): []}}, "1 to"),
        ({"version": 1, "peers": {format_address(A): ["198.18.0.2:5582"] * (ec.MAX_ENDPOINTS + 1)}}, "1 to"),
        ({"version": 1, "peers": {format_address(A): [5582]}}, "endpoint strings"),
        ({"version": 1, "peers": {format_address(A): ["198.18.0.2"]}}, "host:port"),
        ({"version": 1, "peers": {format_address(A): ["198.18.0.2:99999"]}}, format_address(A)),
    ],
)
def test_a_malformed_file_is_refused_with_a_reason(tmp_path: Path, doc: object, says: str) -> None:
    path = write(tmp_path / ec.FILE_NAME, doc)
    with pytest.raises(ec.EndpointCacheError, match=says):
        ec.load(path)


def test_too_many_peers_or_bytes_are_refused(tmp_path: Path) -> None:
    peers = {f"fc94::{i:x}": ["198.18.0.2:5582"] for i in range(1, ec.MAX_PEERS + 2)}
    with pytest.raises(ec.EndpointCacheError, match="more than"):
        ec.load(write(tmp_path / "many.json", {"version": 1, "peers": peers}))
    with pytest.raises(ec.EndpointCacheError, match="larger than"):
        ec.load(write(tmp_path / "big.json", " " * (ec.MAX_FILE_BYTES + 1)))


def test_a_file_others_can_read_is_refused(tmp_path: Path) -> None:
    """It says where the peers are: private like every state file."""
    path = write(tmp_path / ec.FILE_NAME, {"version": 1, "peers": {}}, mode=0o644)
    with pytest.raises(ec.EndpointCacheError, match="endpoint cache"):
        ec.load(path)
