"""Mapped-BAR ``read32``: what one MMIO load costs through :class:`vfiopy.region.Mapping`;
and the write bandwidth of 4 KiB bursts, uncached against write-combining.

On the simulator the mapped BAR is ordinary memory, so this measures the
Python-to-C call path alone (no PCIe round trip); on a real device a
non-posted read adds the device's completion latency (typically 0.5-2 us).
Uncached stores leave the CPU one at a time; write-combined ones merge into
full-line bursts, so on real hardware the second number is the larger one. On
the simulator both mappings are the same plain memory.
"""

from __future__ import annotations

import errno
import statistics
import time
from dataclasses import dataclass

from vfiopy._uapi import PciRegion
from vfiopy.bench._results import MmioResult
from vfiopy.device import Device
from vfiopy.errors import VfioError
from vfiopy.kernel import Kernel
from vfiopy.region import Caching, Mapping, Region
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


BURST = 4096


def write_mbps(mapping: Mapping, bursts: int) -> float:
    """MB/s of 4 KiB bursts (``write_bytes``: one C loop of 32-bit stores) into the area's
    first 4 KiB: the median of BATCHES timed batches, ``bursts`` bursts in all."""
    data = bytes(range(256)) * (BURST // 256)
    write = mapping.write_bytes
    off = mapping.offset
    for _ in range(10):
        write(off, data)
    per_batch = max(1, bursts // BATCHES)
    rates = []
    for _ in range(BATCHES):
        t0 = time.perf_counter_ns()
        for _ in range(per_batch):
            write(off, data)
        rates.append(BURST * per_batch * 1e3 / max(1, time.perf_counter_ns() - t0))
    return statistics.median(rates)


@dataclass(frozen=True)
class WriteBandwidth:
    region: int
    uncached_mbps: float
    wc_mbps: float | None
    wc_unavailable: str | None


def _burst_area(region: Region) -> int | None:
    return next((i for i, a in enumerate(region.areas) if a.size >= BURST), None)


def write_bandwidth(dev: Device, bursts: int) -> WriteBandwidth | None:
    """4 KiB write bandwidth into the first prefetchable BAR (else the first memory BAR with
    4 KiB mappable), write-combining first: the uncached mapping makes vfio-pci claim the
    BAR, after which a CONFIG_IO_STRICT_DEVMEM kernel refuses resourceN_wc."""
    chosen: tuple[Region, int] | None = None
    for index in _BARS:
        try:
            region = dev.region(int(index))
        except VfioError:
            continue
        area = _burst_area(region)
        if area is None:
            continue
        if region.prefetchable:
            chosen = (region, area)
            break
        chosen = chosen or (region, area)
    if chosen is None:
        return None
    region, area = chosen
    wc: float | None = None
    unavailable: str | None = None
    try:
        if not region.prefetchable:
            raise LookupError(f"no prefetchable BAR; BAR{region.index} is not")
        m = region.mmap(area, caching=Caching.WC_SYSFS)
    except LookupError as exc:
        unavailable = str(exc)
    except VfioError as exc:
        unavailable = (
            f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.advice or exc.detail}"
        )
    else:
        try:
            wc = write_mbps(m, bursts)
        finally:
            m.close()
    m = region.mmap(area)
    try:
        uncached = write_mbps(m, bursts)
    finally:
        m.close()
    return WriteBandwidth(region.index, uncached, wc, unavailable)


def measure(kernel: Kernel, address: str, calls: int, backend: str) -> MmioResult:
    """Open ``address``; time 4 KiB writes (uncached and write-combining), then map its
    first mappable BAR and time ``read32``."""
    session = Session(kernel)
    try:
        dev = session.open_device(address)
        bw = write_bandwidth(dev, max(BATCHES, calls // 100))
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
    if bw is None:
        return MmioResult(address, region, calls, ns, backend)
    return MmioResult(
        address,
        region,
        calls,
        ns,
        backend,
        bw.region,
        bw.uncached_mbps,
        bw.wc_mbps,
        bw.wc_unavailable,
    )
