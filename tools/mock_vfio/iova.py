"""IOVA bookkeeping shared by vfio_iommu_type1 (its ``vfio_dma`` tree) and an iommufd
IOAS (``io_pagetable``), and the IOVA ranges the IOMMU leaves usable."""

from __future__ import annotations

import bisect
import errno
import threading
from typing import TYPE_CHECKING

from mock_vfio.trace import oserror

if TYPE_CHECKING:
    from mock_vfio.machine import Machine

IOVA_RANGES = ((0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1))  # x86: MSI window reserved
IOVA_PGSIZES = 0x40201000  # 4K | 2M | 1G, as intel-iommu reports
IOVA_PGSIZES_OLD = ~0xFFF & (1 << 64) - 1  # intel-iommu before 5.15: any power of two from 4K


def min_pgsize(machine: Machine) -> int:
    """The IOMMU's smallest page: vfio_dma_do_map's ``1 << __ffs(pgsize_bitmap)``."""
    return machine.iova_pgsizes & -machine.iova_pgsizes


def iova_ranges(machine: Machine) -> tuple[tuple[int, int], ...]:
    """The usable IOVA ranges: below the IOMMU's address width, minus the x86 MSI window."""
    top = (1 << machine.topology.iommu_address_width) - 1
    return tuple((s, min(e, top)) for s, e in IOVA_RANGES if s <= top)


class DmaSpace:
    """IOVA -> process virtual address bookkeeping shared by type1 and IOAS."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: list[int] = []
        self.maps: dict[int, tuple[int, int, int]] = {}  # iova -> (size, vaddr, prot)

    def find_overlap(self, iova: int, size: int) -> list[int]:
        with self.lock:
            i = bisect.bisect_left(self.starts, iova)
            out: list[int] = []
            if i > 0:
                s = self.starts[i - 1]
                if s + self.maps[s][0] > iova:
                    out.append(s)
            while i < len(self.starts) and self.starts[i] < iova + size:
                out.append(self.starts[i])
                i += 1
            return out

    def add(self, iova: int, size: int, vaddr: int, prot: int) -> None:
        with self.lock:
            bisect.insort(self.starts, iova)
            self.maps[iova] = (size, vaddr, prot)

    def remove(self, iova: int) -> int:
        with self.lock:
            size = self.maps.pop(iova)[0]
            del self.starts[bisect.bisect_left(self.starts, iova)]  # not a linear search
            return size

    def clear(self) -> None:
        with self.lock:
            self.starts.clear()
            self.maps.clear()

    def count(self) -> int:
        with self.lock:
            return len(self.starts)

    def translate(self, iova: int, length: int, write: bool) -> int:
        """The process address for a device access, or EFAULT (an IOMMU fault)."""
        with self.lock:
            i = bisect.bisect_right(self.starts, iova) - 1
            if i >= 0:
                s = self.starts[i]
                size, vaddr, prot = self.maps[s]
                if iova + length <= s + size and prot & (2 if write else 1):
                    return vaddr + (iova - s)
        raise oserror(errno.EFAULT, f"IOMMU fault at iova {iova:#x}")
