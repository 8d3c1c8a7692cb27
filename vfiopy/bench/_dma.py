"""``--dma``: map and unmap 1 GiB for device DMA, in 4 KiB pages and in 2 MiB pages.

Each row maps 1 GiB as mappings of one page each (262144 of 4 KiB, 512 of 2 MiB) at
consecutive IOVAs of an iommufd IOAS with a device attached, then unmaps them one by one,
through vfiopy's own map and unmap calls.  It runs on iommufd because type1 caps a
container at 65535 mappings (vfio_iommu_type1's dma_entry_limit).

On the simulator the memory is never touched and a map is bookkeeping, so the rows measure
vfiopy's per-call cost plus the simulator's, not the kernel's pinning or the IOMMU's page
table updates; on a real device (``--real``) they include both, and the 2 MiB row uses
2 MiB hugepages when the host has 512 free (else ordinary memory, which the row says).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from vfiopy._uapi import (
    MAP_ANONYMOUS,
    MAP_HUGE_SHIFT,
    MAP_HUGETLB,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vfiopy.bench._results import SCHEMA, machine_info
from vfiopy.dma import IovaAllocator
from vfiopy.kernel import Kernel
from vfiopy.session import Session

GIB = 1 << 30
PAGES = (PAGE_SIZE, 2 << 20)


def _label(page: int) -> str:
    return f"{page >> 20} MiB" if page >= 1 << 20 else f"{page >> 10} KiB"


@dataclass(slots=True)
class DmaRow:
    """One page size: the seconds each round took to map, then to unmap, all ``total`` bytes."""

    page: int
    memory: str
    total: int = GIB
    map_s: list[float] = field(default_factory=list)
    unmap_s: list[float] = field(default_factory=list)
    # This process's CPU seconds for the same windows: less swayed by a busy machine.
    map_cpu_s: list[float] = field(default_factory=list)
    unmap_cpu_s: list[float] = field(default_factory=list)

    @property
    def maps(self) -> int:
        return self.total // self.page

    def to_json(self) -> dict[str, Any]:
        return {
            "page": self.page,
            "bytes": self.total,
            "maps": self.maps,
            "memory": self.memory,
            "map_median_s": statistics.median(self.map_s),
            "unmap_median_s": statistics.median(self.unmap_s),
            "map_cpu_median_s": statistics.median(self.map_cpu_s),
            "unmap_cpu_median_s": statistics.median(self.unmap_cpu_s),
            "map_s": self.map_s,
            "unmap_s": self.unmap_s,
            "map_cpu_s": self.map_cpu_s,
            "unmap_cpu_s": self.unmap_cpu_s,
        }


@dataclass(slots=True)
class DmaBench:
    backend: str
    rows: list[DmaRow]

    def to_json(self) -> dict[str, Any]:
        """The document ``--json`` writes (the sweep's schema number, a ``dma`` part)."""
        return {
            "schema": SCHEMA,
            "machine": machine_info(),
            "dma": {"backend": self.backend, "rows": [r.to_json() for r in self.rows]},
        }

    def lines(self) -> list[str]:
        rounds = len(self.rows[0].map_s) if self.rows else 0
        total = self.rows[0].total if self.rows else GIB
        size = f"{total >> 30} GiB" if total >= GIB else f"{total >> 20} MiB"
        out = [f"dma: map then unmap {size} on iommufd ({self.backend}), median of {rounds} rounds"]
        for r in self.rows:
            m, u = statistics.median(r.map_s), statistics.median(r.unmap_s)
            mc, uc = statistics.median(r.map_cpu_s), statistics.median(r.unmap_cpu_s)
            out.append(
                f"  {_label(r.page):>6} pages ({r.maps:>6} mappings, {r.memory}): "
                f"map {1000 * m:8.1f} ms wall, {1e6 * mc / r.maps:6.2f} us CPU each; "
                f"unmap {1000 * u:8.1f} ms wall, {1e6 * uc / r.maps:6.2f} us CPU each"
            )
        return out


def _memory(kernel: Kernel, page: int, total: int) -> tuple[int, str]:
    """``total`` bytes of private memory: on ``page``-sized hugepages when the host has them."""
    flags = MAP_PRIVATE | MAP_ANONYMOUS
    if page > PAGE_SIZE:
        try:
            huge = flags | MAP_HUGETLB | (page.bit_length() - 1) << MAP_HUGE_SHIFT
            return kernel.mmap(
                -1, GIB, 0, PROT_READ | PROT_WRITE, huge
            ), f"{_label(page)} hugepages"
        except OSError:
            pass  # no such pool, or not 512 free pages in it
    return kernel.mmap(-1, total, 0, PROT_READ | PROT_WRITE, flags), f"{_label(PAGE_SIZE)} pages"


def measure(kernel: Kernel, address: str, rounds: int, backend: str, total: int = GIB) -> DmaBench:
    """Open ``address`` on iommufd and time ``rounds`` rounds of every page size, mapping
    ``total`` bytes (a multiple of the largest page) each time."""
    if total <= 0 or total % max(PAGES):
        raise ValueError(f"the DMA size {total:#x} is not a positive multiple of {max(PAGES):#x}")
    bench = DmaBench(backend, [])
    session = Session(kernel, backend="iommufd")
    try:
        session.open_device(address)  # the IOAS takes the device's IOMMU ranges and alignment
        space = session.dma
        assert session.iommufd is not None and session.ioas_id is not None
        ranges = session.iommufd.iova_ranges(session.ioas_id)
        base_iova = IovaAllocator(ranges).allocate(total, align=max(PAGES))
        for page in PAGES:
            vaddr, memory = _memory(kernel, page, total)
            row = DmaRow(page, memory, total)
            try:
                offsets = range(0, total, page)
                for _ in range(rounds):
                    t0, c0 = time.perf_counter(), time.process_time()
                    for off in offsets:
                        space.map(vaddr + off, base_iova + off, page)
                    t1, c1 = time.perf_counter(), time.process_time()
                    for off in reversed(offsets):
                        space.unmap(base_iova + off, page)
                    row.map_s.append(t1 - t0)
                    row.unmap_s.append(time.perf_counter() - t1)
                    row.map_cpu_s.append(c1 - c0)
                    row.unmap_cpu_s.append(time.process_time() - c1)
            finally:
                kernel.munmap(vaddr, total)
            bench.rows.append(row)
    finally:
        session.close()
    return bench
