"""Tests that need something beyond the test extra (another venv, a browser): skipped here, failed under CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def skip_or_fail_under_ci(reason: str, ci_note: str) -> NoReturn:
    """Skip for ``reason``; under CI (``$CI`` set), where ``.ci/run`` provides it, fail with ``ci_note`` added."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. {ci_note}")
    pytest.skip(reason)
