"""Helpers shared by the release tests (trace arithmetic)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vfiopy.release._report import max_overlap
from vfiopy.sysfs import VFIO_DRIVER, Sysfs

MachineFactory = Callable[..., Any]


def vfio_devices(kernel: Any) -> list[str]:
    """Every device bound to vfio-pci, as the kernel's sysfs shows it."""
    s = Sysfs(kernel)
    return [str(a) for a in s.devices() if s.driver(a) == VFIO_DRIVER]


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def overlap(events: list[Any]) -> int:
    """The most intervals open at one instant."""
    return max_overlap((e.start, e.end) for e in events)


def devsets(m: Any) -> list[str]:
    return sorted({e.devset for e in m.unique_resets(cause="devset")})


def slow_resets(m: Any, addrs: list[str], seconds: float = 2.0) -> None:
    """Lengthen the resets of ``addrs`` (model seconds) so that thread start-up skew on a
    loaded machine is small beside them, and an overlap check measures concurrency."""
    for a in addrs:
        m.faults.slow_reset(a, seconds)
