"""Shared pytest fixtures: privilege checks that skip with a reason instead of failing."""

from __future__ import annotations

import os
import shutil

import pytest


def _root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces and TUN (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip')"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip root-only tests with a clear reason when not root."""
    reason = _root_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(marker)
