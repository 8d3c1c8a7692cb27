"""Helpers of the property tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from hypothesis import settings


def budget(fraction: float) -> settings:
    """Settings for a test whose examples are expensive: a fraction of the profile's count
    (the profile is loaded by conftest.py before any test module is imported)."""
    return settings(max_examples=max(5, int(settings.default.max_examples * fraction)))


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``cond``; the timeout only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
