"""Fixtures shared by the unit tests that run on the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def machine() -> Iterator[Any]:
    """A simulated machine with two GPUs (03:00 and 04:00, each with an audio function)."""
    mock_vfio = pytest.importorskip("mock_vfio")
    m = mock_vfio.Machine(mock_vfio.load_topology("gpus:2"), time_scale=0.001)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def k(machine: Any) -> Any:
    """A process of ``machine``: the Kernel the library runs against."""
    return machine.spawn("test")
