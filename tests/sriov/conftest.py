"""Fixtures for vfiopy.sriov's tests: the vm-host topology (sriov_helpers names its PF)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

mock_vfio = pytest.importorskip("mock_vfio")

from mock_vfio import Machine, SimProcess, load_topology  # noqa: E402


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def host() -> Iterator[Machine]:
    m = Machine(load_topology("vm-host"), time_scale=0.01)
    yield m
    m.close()


@pytest.fixture
def proc(host: Machine) -> SimProcess:
    return host.spawn(name="vfiopy")
