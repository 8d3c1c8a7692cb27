"""What every tier shares: structlog as a library leaves it, around each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    # A command line run in a test configures structlog on that test's captured stderr;
    # a later test (or its worker threads) would log to the stream pytest has closed.
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
