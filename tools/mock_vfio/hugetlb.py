"""A hugetlb pool (mm/hugetlb.c) for ``MAP_HUGETLB`` mmaps, when the machine models one.

``Machine(hugepages={2 << 20: 4})`` gives a pool of four free 2 MiB pages: a MAP_HUGETLB
anonymous mmap takes whole pages from it, or fails with ENOMEM as the kernel's reservation
at mmap time does, and is backed by ordinary host memory aligned to the page, so hugepage
code runs on a host without any reserved.  munmap gives the pages back.
"""

from __future__ import annotations

import errno
import threading

from mock_vfio.trace import oserror
from vfiopy._uapi import MAP_HUGE_SHIFT, MAP_HUGETLB
from vfiopy.kernel import LinuxKernel

_HOST = LinuxKernel()
_DEFAULT_PAGE = 2 << 20  # MAP_HUGETLB without a size: the default hugepage size (x86)


class HugetlbPool:
    """Free pages by size (``free``, shared with the machine) and this process's mappings."""

    def __init__(self, free: dict[int, int]) -> None:
        self.free = free
        self._lock = threading.Lock()
        self._maps: dict[int, tuple[int, int, int, int]] = {}  # addr -> base, length, page, n

    def mmap(self, length: int, prot: int, flags: int) -> int:
        """hugetlb_get_unmapped_area and the reservation: whole pages, an aligned address."""
        shift = (flags >> MAP_HUGE_SHIFT) & 0x3F
        page = 1 << shift if shift else _DEFAULT_PAGE
        n = -(-length // page)
        with self._lock:
            have = self.free.get(page, 0)
            if have < n:
                raise oserror(errno.ENOMEM, f"{n} hugepages of {page:#x} asked, {have} free")
            self.free[page] = have - n
        plain = flags & ~(MAP_HUGETLB | 0x3F << MAP_HUGE_SHIFT)
        try:
            base = _HOST.mmap(-1, n * page + page, 0, prot, plain)
        except BaseException:
            with self._lock:
                self.free[page] += n
            raise
        addr = -(-base // page) * page
        with self._lock:
            self._maps[addr] = (base, n * page + page, page, n)
        return addr

    def munmap(self, addr: int, length: int) -> bool:
        """Unmap a whole mapping of the pool and return its pages; False if not one."""
        with self._lock:
            hit = self._maps.get(addr)
            if hit is None or length != hit[2] * hit[3]:
                return False
            del self._maps[addr]
            self.free[hit[2]] += hit[3]
        _HOST.munmap(hit[0], hit[1])
        return True
