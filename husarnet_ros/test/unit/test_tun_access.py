"""Which users the clone device's mode lets in: what setup-tun warns about and open() explains."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from husarnet_ros.core.tun import tun_node_access


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A regular file stands in for the node (its mode bits read the same); never owned by root, whom
    tun_node_access always lets in: as root the tests give it to uid/gid 1000, else it is the runner's."""
    p = tmp_path / "tun"
    p.write_bytes(b"")
    if os.geteuid() == 0:
        os.chown(p, 1000, 1000)
    return p


@pytest.mark.parametrize(
    ("mode", "who", "groups", "allowed"),
    [
        (0o666, "other", "other", True),  # what distributions ship
        (0o600, "other", "other", False),  # hardened images, some containers
        (0o600, "owner", "other", True),
        (0o660, "other", "group", True),  # a 'tun' group the user belongs to
        (0o660, "other", "other", False),
        (0o606, "other", "group", False),  # the group class decides for members, as the kernel does
        (0o066, "owner", "group", False),  # and the owner class for the owner
        (0o644, "other", "other", False),  # read alone is not enough: the node opens O_RDWR
        (0o000, "root", "other", True),
    ],
)
def test_the_mode_decides_by_the_class_the_user_falls_in(
    node: Path, mode: int, who: str, groups: str, allowed: bool
) -> None:
    st = node.stat()
    uid = {"owner": st.st_uid, "other": st.st_uid + 4242, "root": 0}[who]
    gids = {st.st_gid} if groups == "group" else {st.st_gid + 4242}
    node.chmod(mode)
    problem = tun_node_access(uid, gids, str(node))
    assert (problem is None) == allowed, problem
    if not allowed:
        assert problem == f"{node} is mode {mode:04o}, owner uid {st.st_uid}, group gid {st.st_gid}"


def test_a_missing_node_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert tun_node_access(4242, set(), str(missing)) == f"{missing}: No such file or directory"
