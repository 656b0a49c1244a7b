"""Skips that CI must not take: on a developer's machine a missing piece (an optional
package, a tmpfs mount) skips its test with the reason; under CI (CI=true, set by .ci/run)
it fails, as a missing PostgreSQL or Chromium does (tests/conftest.py), so that a green CI
means the test really ran."""

from __future__ import annotations

import importlib
import os

import pytest


def skip_unless_ci(reason: str, fix: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI=true: {fix})")
    pytest.skip(reason)


def require(module: str):
    """pytest.importorskip, except that under CI a missing module fails."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        skip_unless_ci(f"{module} is not installed ({exc})",
                       "scripts/setup.sh test installs it with the test extra")
