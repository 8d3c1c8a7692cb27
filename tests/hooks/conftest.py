"""Fixtures for the manager hooks in contrib/: a stand-in host per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hook_stubs import Host


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.cleanup()
