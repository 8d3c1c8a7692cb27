"""Fixtures for vfiopy.bind's tests: the vm-host topology on the simulator, a state file."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

mock_vfio = pytest.importorskip("mock_vfio")

from mock_vfio import Machine, SimProcess, load_topology  # noqa: E402

from vfiopy.bind import BindState  # noqa: E402

TIME_SCALE = 0.01  # a NIC's 0.3 s probe takes 3 ms


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def host() -> Iterator[Machine]:
    m = Machine(load_topology("vm-host"), time_scale=TIME_SCALE)
    yield m
    m.close()


@pytest.fixture
def proc(host: Machine) -> SimProcess:
    return host.spawn(name="vfiopy")


@pytest.fixture
def state(tmp_path: object) -> BindState:
    return BindState(f"{tmp_path}/run/vfiopy/bind.json")
