"""Mapped-BAR ``read32``: what one MMIO load costs through :class:`vfiopy.region.Mapping`.

On the simulator the mapped BAR is ordinary memory, so this measures the
Python-to-C call path alone (no PCIe round trip); on a real device a
non-posted read adds the device's completion latency (typically 0.5-2 us).
"""

from __future__ import annotations

import statistics
import time

from vfiopy._uapi import PciRegion
from vfiopy.bench._results import MmioResult
from vfiopy.errors import VfioError
from vfiopy.kernel import Kernel
from vfiopy.region import Mapping, Region
from vfiopy.session import Session

_BARS = (
    PciRegion.BAR0,
    PciRegion.BAR1,
    PciRegion.BAR2,
    PciRegion.BAR3,
    PciRegion.BAR4,
    PciRegion.BAR5,
)


def _first_mapping(kernel: Kernel, fd: int, device: str) -> Mapping | None:
    for index in _BARS:
        try:
            region = Region(kernel, fd, device, int(index))
        except VfioError:
            continue  # an absent BAR reads as size 0 or EINVAL: try the next
        for i, area in enumerate(region.areas):
            if area.size >= 4:
                return region.mmap(i)
    return None


BATCHES = 5


def read32_ns(mapping: Mapping, calls: int) -> float:
    """Nanoseconds per ``read32``: the median of BATCHES timed batches of the area's first
    register, ``calls`` reads in all, so one batch hit by a context switch does not decide."""
    read32 = mapping.read32
    off = mapping.offset
    # Warm up: page faults on first touch are not the steady state.
    for _ in range(1000):
        read32(off)
    per_batch = max(1, calls // BATCHES)
    times = []
    for _ in range(BATCHES):
        t0 = time.perf_counter_ns()
        for _ in range(per_batch):
            read32(off)
        times.append((time.perf_counter_ns() - t0) / per_batch)
    return statistics.median(times)


def measure(kernel: Kernel, address: str, calls: int, backend: str) -> MmioResult:
    """Open ``address``, map its first mappable BAR, and time ``read32``."""
    session = Session(kernel)
    try:
        dev = session.open_device(address)
        mapping = _first_mapping(kernel, dev.fd, address)
        if mapping is None:
            raise RuntimeError(f"{address}: no BAR with a mappable area; pick another device")
        try:
            ns = read32_ns(mapping, calls)
            region = mapping.region.index
        finally:
            mapping.close()
    finally:
        session.close()
    return MmioResult(address, region, calls, ns, backend)
