"""DMA address spaces, an IOVA allocator and DMA buffers.

A :class:`DmaSpace` is where devices' DMA addresses (IOVAs) are translated: a
type1 :class:`~vfiopy.container.Container` or an iommufd IOAS
(:class:`IoasSpace`).  A :class:`DmaBuffer` is anonymous shared memory mapped
into a space at an IOVA from an :class:`IovaAllocator`.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from vfiopy._uapi import MAP_ANONYMOUS, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE, Closable, ffi
from vfiopy.errors import DmaMapError, raise_as
from vfiopy.kernel import Kernel, RemapKernel, default_kernel

if TYPE_CHECKING:
    from vfiopy.iommufd import Iommufd


class IovaRange(NamedTuple):
    """An inclusive range of usable IOVAs, as both type1 and iommufd report them."""

    start: int
    last: int


@runtime_checkable
class DmaSpace(Protocol):
    """An IOMMU address space that process memory can be mapped into."""

    def map(
        self, vaddr: int, iova: int, size: int, *, read: bool = True, write: bool = True
    ) -> None: ...
    def unmap(self, iova: int, size: int) -> int: ...
    def iova_ranges(self) -> list[IovaRange]: ...


class IoasSpace:
    """One IOAS of an :class:`~vfiopy.iommufd.Iommufd`, as a :class:`DmaSpace`."""

    def __init__(self, iommufd: Iommufd, ioas_id: int) -> None:
        self.iommufd = iommufd
        self.ioas_id = ioas_id

    def map(
        self, vaddr: int, iova: int, size: int, *, read: bool = True, write: bool = True
    ) -> None:
        self.iommufd.map(self.ioas_id, vaddr, size, iova=iova, readable=read, writeable=write)

    def unmap(self, iova: int, size: int) -> int:
        return self.iommufd.unmap(self.ioas_id, iova, size)

    def iova_ranges(self) -> list[IovaRange]:
        return self.iommufd.iova_ranges(self.ioas_id)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class IovaAllocator:
    """First-fit allocator of page-aligned IOVA blocks inside the reported ranges.

    IOVA 0 is left out: many devices treat a zero DMA address as "not set".
    Thread-safe; freed blocks merge with their neighbours.
    """

    def __init__(self, ranges: list[IovaRange], page_size: int = PAGE_SIZE) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self._lock = threading.Lock()
        # Holes as half-open [start, end), sorted and disjoint.
        self._free: list[tuple[int, int]] = []
        for r in sorted(ranges):
            start = max(_align_up(r.start, page_size), page_size)
            end = (r.last + 1) & ~(page_size - 1)
            if start < end:
                self._insert(start, end)
        self._used: dict[int, int] = {}

    @property
    def free_ranges(self) -> list[IovaRange]:
        with self._lock:
            return [IovaRange(s, e - 1) for s, e in self._free]

    def allocate(self, size: int, align: int | None = None, limit: int | None = None) -> int:
        """An IOVA for ``size`` bytes (rounded up to pages), aligned to ``align``.

        ``limit`` is the device's DMA mask plus one: the block ends at or below it
        (a device with a 28-bit DMA engine needs ``limit=1 << 28``).
        """
        align = align or self.page_size
        if size <= 0 or align & (align - 1) or align < self.page_size:
            raise ValueError(f"bad size {size} or alignment {align}")
        size = _align_up(size, self.page_size)
        with self._lock:
            for i, (start, end) in enumerate(self._free):
                iova = _align_up(start, align)
                if iova + size > end or (limit is not None and iova + size > limit):
                    continue
                del self._free[i]
                # Keep the pieces before and after the block.
                for s, e in ((start, iova), (iova + size, end)):
                    if s < e:
                        self._insert(s, e)
                self._used[iova] = size
                return iova
        raise DmaMapError(
            errno.ENOSPC,
            step="allocate IOVA",
            detail=f"no free IOVA block of {size:#x} bytes"
            + (f" below {limit:#x}" if limit is not None else ""),
            advice="free DMA buffers or map fewer, larger ones",
        )

    def free(self, iova: int) -> None:
        """Return the block at ``iova`` (as given by :meth:`allocate`)."""
        with self._lock:
            size = self._used.pop(iova, None)
            if size is None:
                raise ValueError(f"IOVA {iova:#x} was not allocated here")
            self._insert(iova, iova + size)

    def _insert(self, start: int, end: int) -> None:
        """Add the hole [start, end), merging with touching neighbours (lock held)."""
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:
            mid = (lo + hi) // 2
            if free[mid][0] < start:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(free) and free[lo][0] == end:
            end = free.pop(lo)[1]
        if lo > 0 and free[lo - 1][1] == start:
            lo -= 1
            start = free.pop(lo)[0]
        free.insert(lo, (start, end))


class _Memory:
    """A buffer's address range, unmapped only when nothing can reach it any more.

    The buffer's cffi pointer owns it, and every ``view()`` keeps that
    pointer alive: the range goes with the last of them, never under a view.
    """

    __slots__ = ("freed", "kernel", "size", "vaddr")

    def __init__(self, kernel: Kernel, vaddr: int, size: int) -> None:
        self.kernel, self.vaddr, self.size = kernel, vaddr, size
        self.freed = False  # set by close; a buffer never closed stays mapped (and pinned)

    def unmap(self, _ptr: object) -> None:
        if self.freed:
            # Nothing can raise out of a finaliser; a failure leaves the range mapped.
            with contextlib.suppress(OSError):
                self.kernel.munmap(self.vaddr, self.size)


class DmaBuffer(Closable):
    """Anonymous shared memory, mapped for device DMA at :attr:`iova`.

    Closing unmaps it from the IOMMU first (so the device loses access) and
    only then releases the memory: its pages at once where the kernel can
    swap them for zero pages in place, the address range when the buffer
    and its views are gone, so a view used after close reads zeros instead
    of faulting.
    """

    def __init__(
        self,
        space: DmaSpace,
        size: int,
        *,
        allocator: IovaAllocator | None = None,
        iova: int | None = None,
        kernel: Kernel | None = None,
        read: bool = True,
        write: bool = True,
        limit: int | None = None,
    ) -> None:
        if (allocator is None) == (iova is None):
            raise ValueError("give exactly one of allocator= or iova=")
        self.kernel = kernel if kernel is not None else default_kernel()
        self.space = space
        self.size = _align_up(size, PAGE_SIZE)
        self._allocator = allocator
        with raise_as(DmaMapError, None, "mmap anonymous", f"{self.size:#x} bytes"):
            self.vaddr = self.kernel.mmap(
                -1, self.size, 0, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS
            )
        try:
            if allocator is not None:
                self.iova = allocator.allocate(self.size, limit=limit)
            elif iova is not None:
                self.iova = iova
            try:
                space.map(self.vaddr, self.iova, self.size, read=read, write=write)
            except BaseException:
                if allocator is not None:
                    allocator.free(self.iova)
                raise
        except BaseException:
            self.kernel.munmap(self.vaddr, self.size)
            raise
        self._memory = _Memory(self.kernel, self.vaddr, self.size)
        owner = ffi.gc(ffi.cast("char *", self.vaddr), self._memory.unmap)
        self._mem: Any = ffi.buffer(owner, self.size)
        self.closed = False

    def _check(self, off: int, n: int, step: str) -> None:
        if self.closed:
            raise DmaMapError(
                errno.EBADF,
                None,
                step,
                detail=f"the DMA buffer at IOVA {self.iova:#x} is closed",
                advice="the buffer was freed; allocate a new one",
            )
        if off < 0 or n < 0 or off + n > self.size:
            raise ValueError(f"[{off:#x}, +{n:#x}) lies outside a {self.size:#x}-byte buffer")

    def read(self, off: int, n: int) -> bytes:
        self._check(off, n, "read DMA buffer")
        return bytes(self._mem[off : off + n])

    def write(self, off: int, data: bytes) -> None:
        self._check(off, len(data), "write DMA buffer")
        self._mem[off : off + len(data)] = data

    def view(self) -> memoryview:
        """A writable view of the whole buffer; after :meth:`close` it reads zeros."""
        self._check(0, 0, "view DMA buffer")
        return memoryview(self._mem)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.space.unmap(self.iova, self.size)
            # Only an IOVA the IOMMU no longer maps may be handed out again.
            if self._allocator is not None:
                self._allocator.free(self.iova)
        finally:
            # type1 and iommufd pin the pages while mapped, so releasing the
            # memory after a failed unmap cannot expose it to the device.
            self._memory.freed = True
            if isinstance(self.kernel, RemapKernel):
                with raise_as(DmaMapError, None, "release memory", f"{self.size:#x} bytes"):
                    self.kernel.remap_anonymous(self.vaddr, self.size)

    def __repr__(self) -> str:
        return f"DmaBuffer(iova={self.iova:#x}, size={self.size:#x})"


__all__ = ["DmaBuffer", "DmaSpace", "IoasSpace", "IovaAllocator", "IovaRange"]
