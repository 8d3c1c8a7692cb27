"""Fixtures for the release manager's tests: simulated machines, both anyio backends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from release_helpers import MachineFactory

mock_vfio = pytest.importorskip("mock_vfio")

TIME_SCALE = 0.02


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def machine() -> Iterator[MachineFactory]:
    """Build simulated machines; each is closed (hung resets freed) at teardown."""
    made: list[Any] = []

    def make(
        topology: str = "gpus:8",
        kernel_model: str = "devset",
        reset_model: str = "pre-6.3",
        **kw: Any,
    ) -> Any:
        m = mock_vfio.Machine(
            mock_vfio.load_topology(topology),
            kernel_model=kernel_model,
            reset_model=reset_model,
            time_scale=TIME_SCALE,
            **kw,
        )
        made.append(m)
        return m

    yield make
    for m in made:
        m.faults.clear()
        m.close()
