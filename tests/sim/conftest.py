"""Helpers for driving the simulator directly through the Kernel protocol."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from mock_vfio import Machine, SimProcess, load_topology

from vfiopy._uapi import Ioctl, IommuType, ffi
from vfiopy.kernel import O_RDWR

SCALE = 0.02
NICS = [f"0000:{i:02x}:00.0" for i in range(1, 7)]
PAIR = ["0000:07:00.0", "0000:07:00.1"]
EDU = "0000:08:01.0"


@pytest.fixture
def qemu() -> Iterator[Machine]:
    m = Machine(load_topology("qemu-vmtest"), time_scale=SCALE)
    yield m
    m.close()


@pytest.fixture
def legacy() -> Iterator[Machine]:
    m = Machine(load_topology("qemu-vmtest"), kernel_model="legacy", time_scale=SCALE)
    yield m
    m.close()


def group_of(p: SimProcess, addr: str) -> int:
    return int(p.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group").rsplit("/", 1)[1])


def open_container_group(p: SimProcess, addr: str) -> tuple[int, int]:
    c = p.open("/dev/vfio/vfio", O_RDWR)
    g = p.open(f"/dev/vfio/{group_of(p, addr)}", O_RDWR)
    p.ioctl(g, Ioctl.GROUP_SET_CONTAINER, ffi.new("int *", c))
    p.ioctl(c, Ioctl.SET_IOMMU, IommuType.TYPE1v2)
    return c, g


def get_device(p: SimProcess, g: int, addr: str) -> int:
    return p.ioctl(g, Ioctl.GROUP_GET_DEVICE_FD, ffi.new("char[]", addr.encode()))


def open_device(p: SimProcess, addr: str) -> tuple[int, int, int]:
    """(container, group, device) fds for ``addr`` through the group path."""
    c, g = open_container_group(p, addr)
    return c, g, get_device(p, g, addr)


def overlapping(events: list[Any]) -> bool:
    """True when at least two of the intervals share an instant.

    Not "all of them at once": threads start one after another, and on a busy machine the
    first may finish before the last starts. Lengthen the intervals (``faults.slow_reset``)
    far beyond thread start-up before asking.
    """
    ev = sorted(events, key=lambda e: e.start)
    return any(b.start < a.end for a, b in itertools.pairwise(ev))


def serial(events: list[Any]) -> bool:
    """True when no two intervals overlap."""
    ev = sorted(events, key=lambda e: e.start)
    return all(b.start >= a.end for a, b in itertools.pairwise(ev))
