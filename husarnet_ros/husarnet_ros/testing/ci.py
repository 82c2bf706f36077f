"""Skips that become failures in CI: a missing prerequisite that CI always provides is a broken CI.

On a developer's machine a test whose prerequisite is missing (rclpy not built, a test-only package
not installed) skips with the reason. CI sets ``CI=true`` and installs and builds everything
(``make test``), so there the same condition means the build or the environment broke: a whole tier
turning into skips would still leave CI green. :func:`skip_or_fail` fails instead in that case.

Skips that are impossible to satisfy on any machine (``launch_ros`` is not on PyPI) and skips about
privileges CI always has (root for the netns tier) keep using ``pytest.skip`` directly.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

#: Values of ``CI`` that mean "running in CI" (CI services set ``CI=true``; ``1`` and ``yes`` by hand).
_TRUE = {"1", "true", "yes", "on"}


def in_ci() -> bool:
    """Whether the ``CI`` environment variable is set to a true value."""
    return os.environ.get("CI", "").strip().lower() in _TRUE


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with ``reason``; fail with it when :func:`in_ci`, where every prerequisite must be present.

    Works at module level too (``allow_module_level``): there a failure is a collection error.
    """
    __tracebackhide__ = True  # report the caller's line, as pytest.skip and pytest.importorskip do
    if in_ci():
        pytest.fail(f"{reason} [CI is set, so this prerequisite must be present: not skipping]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, reason: str) -> ModuleType:
    """Import ``module`` and return it, or :func:`skip_or_fail` with ``reason`` and the import error."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        skip_or_fail(f"{reason} ({exc})")
