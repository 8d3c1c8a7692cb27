"""DMA address spaces, an IOVA allocator, DMA buffers and mappings of the caller's memory.

A :class:`DmaSpace` is where devices' DMA addresses (IOVAs) are translated: a
type1 :class:`~vfiopy.container.Container` or an iommufd IOAS
(:class:`IoasSpace`).  A :class:`DmaBuffer` is anonymous shared memory (on
4 KiB pages or on 2 MiB / 1 GiB hugepages) mapped into a space at an IOVA from
an :class:`IovaAllocator`; a :class:`DmaMapping` maps memory the caller already
owns (anything with a writable, contiguous buffer) the same way.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

from vfiopy._uapi import (
    MAP_ANONYMOUS,
    MAP_HUGE_SHIFT,
    MAP_HUGETLB,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Closable,
    ffi,
)
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


HugePage = Literal["2M", "1G"]
HUGEPAGE_SIZES: dict[str, int] = {"2M": 2 << 20, "1G": 1 << 30}


def hugepage_size(hugepage: HugePage) -> int:
    """The bytes of one ``hugepage`` ("2M" or "1G"); ValueError for anything else."""
    size = HUGEPAGE_SIZES.get(hugepage)
    if size is None:
        raise ValueError(f"hugepage must be '2M', '1G' or None, not {hugepage!r}")
    return size


def smallest_page(pgsizes: int) -> int:
    """The IOMMU's smallest page in a page-size bitmap, never below the CPU's page.

    0 (no bitmap reported) means the CPU's page size.
    """
    return max(pgsizes & -pgsizes, PAGE_SIZE)


class IoasSpace:
    """One IOAS of an :class:`~vfiopy.iommufd.Iommufd`, as a :class:`DmaSpace`."""

    def __init__(self, iommufd: Iommufd, ioas_id: int) -> None:
        self.iommufd = iommufd
        self.ioas_id = ioas_id

    @property
    def huge_pages(self) -> bool:
        """IOMMU_OPTION_HUGE_PAGES of this IOAS: whether the kernel may map runs of
        contiguous pages with the IOMMU's large pages (on by default; Linux 6.2+)."""
        return self.iommufd.huge_pages(self.ioas_id)

    @huge_pages.setter
    def huge_pages(self, enabled: bool) -> None:
        self.iommufd.set_huge_pages(self.ioas_id, enabled)

    def iova_alignment(self) -> int:
        """The alignment the IOAS requires of IOVAs and lengths (out_iova_alignment)."""
        return self.iommufd.iova_alignment(self.ioas_id)

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

    def allocate(
        self,
        size: int,
        align: int | None = None,
        limit: int | None = None,
        within: list[IovaRange] | None = None,
    ) -> int:
        """An IOVA for ``size`` bytes (rounded up to pages), aligned to ``align``.

        ``limit`` is the device's DMA mask plus one: the block ends at or below it
        (a device with a 28-bit DMA engine needs ``limit=1 << 28``).  ``within``: the
        ranges usable now, when they may have shrunk since the allocator was made (an
        IOAS gains reserved ranges as devices attach): the block lies inside one.
        """
        align = align or self.page_size
        if size <= 0 or align & (align - 1) or align < self.page_size:
            raise ValueError(f"bad size {size} or alignment {align}")
        size = _align_up(size, self.page_size)
        windows = [(r.start, r.last + 1) for r in within] if within is not None else [(0, 1 << 64)]
        with self._lock:
            for i, (start, end) in enumerate(self._free):
                for lo, hi in windows:
                    iova = _align_up(max(start, lo), align)
                    top = min(end, hi, limit if limit is not None else end)
                    if iova + size <= top:
                        break
                else:
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


class _IovaBlock:
    """What a :class:`DmaBuffer` and a :class:`DmaMapping` share: an IOVA block mapped into
    a space, handed back to its allocator once the IOMMU no longer maps it."""

    space: DmaSpace
    iova: int
    size: int
    closed: bool
    _allocator: IovaAllocator | None

    def _map_block(
        self,
        space: DmaSpace,
        vaddr: int,
        size: int,
        *,
        allocator: IovaAllocator | None,
        iova: int | None,
        align: int | None,
        limit: int | None,
        read: bool,
        write: bool,
        within: list[IovaRange] | None = None,
    ) -> None:
        """Take an IOVA (``iova``, or one from ``allocator`` inside ``within``) and map
        ``size`` bytes at ``vaddr``."""
        if (allocator is None) == (iova is None):
            raise ValueError("give exactly one of allocator= or iova=")
        self.space, self.size, self._allocator = space, size, allocator
        if allocator is not None:
            self.iova = allocator.allocate(size, align=align, limit=limit, within=within)
        elif iova is not None:
            self.iova = iova
        try:
            space.map(vaddr, self.iova, size, read=read, write=write)
        except BaseException:
            if allocator is not None:
                allocator.free(self.iova)
            raise

    def close(self) -> None:
        """Unmap from the IOMMU (the device loses access), then release the memory or the
        caller's buffer, even when the unmap failed. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.space.unmap(self.iova, self.size)
            # Only an IOVA the IOMMU no longer maps may be handed out again.
            if self._allocator is not None:
                self._allocator.free(self.iova)
        finally:
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def _closed_error(self, step: str) -> DmaMapError:
        return DmaMapError(
            errno.EBADF,
            None,
            step,
            detail=f"the DMA {type(self).__name__} at IOVA {self.iova:#x} is closed",
            advice="it was unmapped; map or allocate a new one",
        )


def _hugepage_advice(kernel: Kernel, hugepage: HugePage, size: int) -> str:
    """How to get ``size`` bytes of ``hugepage`` pages: the pool to grow, and by how much."""
    page = hugepage_size(hugepage)
    need = size // page
    pool = f"/sys/kernel/mm/hugepages/hugepages-{page >> 10}kB"
    try:
        total = int(kernel.read_text(f"{pool}/nr_hugepages"))
        free = int(kernel.read_text(f"{pool}/free_hugepages"))
        grow = f"echo {total + max(need - free, 1)} > {pool}/nr_hugepages"
    except (OSError, ValueError):
        grow = f"raise {pool}/nr_hugepages by {need}"
    return (
        f"{need} free {hugepage} hugepages are needed (HugePages_Free in /proc/meminfo, "
        f"{pool}/free_hugepages): reserve them as root, {grow}"
        + (
            " (1G pages are best reserved at boot: hugepagesz=1G hugepages=N)"
            if page == 1 << 30
            else ""
        )
        + ", or pass hugepage=None"
    )


class DmaBuffer(_IovaBlock, Closable):
    """Anonymous shared memory, mapped for device DMA at :attr:`iova`.

    ``hugepage`` ("2M" or "1G") backs it with hugetlb pages (MAP_HUGETLB): its
    size rounds up to whole hugepages and its IOVA is aligned to one, so the
    IOMMU can map it with large pages too.  ``page`` is the IOMMU's smallest
    page: the memory's address, size and IOVA are aligned to it (the kernel
    refuses them otherwise).

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
        hugepage: HugePage | None = None,
        page: int = PAGE_SIZE,
        within: list[IovaRange] | None = None,
    ) -> None:
        if (allocator is None) == (iova is None):
            raise ValueError("give exactly one of allocator= or iova=")
        if size <= 0:
            raise ValueError(f"a DMA buffer needs a positive size, not {size}")
        self.kernel = kernel if kernel is not None else default_kernel()
        self.hugepage = hugepage
        granule = max(page, allocator.page_size if allocator is not None else PAGE_SIZE)
        self.page_size = hugepage_size(hugepage) if hugepage is not None else PAGE_SIZE
        align = max(self.page_size, granule)
        size = _align_up(size, align)
        flags = MAP_SHARED | MAP_ANONYMOUS
        if hugepage is not None:
            flags |= MAP_HUGETLB | (self.page_size.bit_length() - 1) << MAP_HUGE_SHIFT
        # An IOMMU page above the CPU's (and above the hugepage) needs an aligned address:
        # map that much more and use the aligned part (munmap takes the whole range).
        extra = align - self.page_size
        step = "mmap " + (f"{hugepage} hugepages" if hugepage else "anonymous")
        with raise_as(
            DmaMapError,
            None,
            step,
            f"{size:#x} bytes",
            _hugepage_advice(self.kernel, hugepage, size) if hugepage is not None else None,
        ):
            base = self.kernel.mmap(-1, size + extra, 0, PROT_READ | PROT_WRITE, flags)
        self.vaddr = _align_up(base, align)
        try:
            self._map_block(
                space,
                self.vaddr,
                size,
                allocator=allocator,
                iova=iova,
                align=align,
                limit=limit,
                read=read,
                write=write,
                within=within,
            )
        except BaseException:
            self.kernel.munmap(base, size + extra)
            raise
        self._base, self._length = base, size + extra
        self._memory = _Memory(self.kernel, base, size + extra)
        owner = ffi.gc(ffi.cast("char *", self.vaddr), self._memory.unmap)
        self._mem: Any = ffi.buffer(owner, self.size)
        self.closed = False

    def _check(self, off: int, n: int, step: str) -> None:
        if self.closed:
            raise self._closed_error(step)
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

    def _release(self) -> None:
        # type1 and iommufd pin the pages while mapped, so releasing the
        # memory after a failed unmap cannot expose it to the device.
        self._memory.freed = True
        if isinstance(self.kernel, RemapKernel):
            with raise_as(DmaMapError, None, "release memory", f"{self._length:#x} bytes"):
                self.kernel.remap_anonymous(self._base, self._length)

    def __repr__(self) -> str:
        huge = f", hugepage={self.hugepage}" if self.hugepage else ""
        return f"DmaBuffer(iova={self.iova:#x}, size={self.size:#x}{huge})"


class DmaMapping(_IovaBlock, Closable):
    """The caller's own memory mapped for device DMA at :attr:`iova`.

    ``obj`` is anything exporting a contiguous buffer: a ``bytearray``, an
    ``mmap``, a numpy array.  Its address and length must be multiples of
    ``page`` (the IOMMU's smallest page; the kernel refuses anything else),
    which an ``mmap.mmap(-1, n)`` or a :class:`DmaBuffer` always is and a
    ``bytearray`` rarely is.  While mapped, the mapping holds a buffer export
    of ``obj``: the object stays alive and cannot be resized (a ``bytearray``
    raises BufferError), so its pages stay the ones the IOMMU points at.
    :meth:`close` unmaps it and releases the export.
    """

    def __init__(
        self,
        space: DmaSpace,
        obj: Any,
        *,
        allocator: IovaAllocator | None = None,
        iova: int | None = None,
        read: bool = True,
        write: bool = True,
        limit: int | None = None,
        page: int = PAGE_SIZE,
        align: int | None = None,
        within: list[IovaRange] | None = None,
    ) -> None:
        step = "map caller memory"
        try:
            view = memoryview(obj)
        except TypeError as exc:
            raise DmaMapError(
                errno.EINVAL,
                step=step,
                detail=f"a {type(obj).__name__} does not export a buffer",
                advice="pass a bytearray, an mmap, a numpy array or another buffer object",
            ) from exc
        cdata: Any = None
        try:
            if write and view.readonly:
                raise DmaMapError(
                    errno.EACCES,
                    step=step,
                    detail=f"the {type(obj).__name__} is read-only and the device may write it",
                    advice="pass a writable buffer, or map it with write=False",
                )
            if not view.c_contiguous:
                raise DmaMapError(
                    errno.EINVAL,
                    step=step,
                    detail=f"the {type(obj).__name__} is not C-contiguous in memory",
                    advice="map a contiguous copy (numpy.ascontiguousarray) or its base array",
                )
            granule = max(page, allocator.page_size if allocator is not None else PAGE_SIZE)
            cdata = ffi.from_buffer(view, require_writable=write)
            vaddr, size = int(ffi.cast("uintptr_t", cdata)), view.nbytes
            if size == 0 or (vaddr | size) & (granule - 1):
                raise DmaMapError(
                    errno.EINVAL,
                    step=step,
                    detail=f"address {vaddr:#x} and length {size:#x} must be non-zero multiples "
                    f"of the IOMMU page ({granule:#x})",
                    advice="use page-aligned memory whose length is whole pages: "
                    "mmap.mmap(-1, n) or Session.alloc_dma_buffer",
                )
            self._map_block(
                space,
                vaddr,
                size,
                allocator=allocator,
                iova=iova,
                align=max(granule, align or granule),
                limit=limit,
                read=read,
                write=write,
                within=within,
            )
        except BaseException:
            if cdata is not None:
                ffi.release(cdata)
            view.release()
            raise
        self.vaddr = vaddr
        self.obj = obj
        # The exports pin the object: alive, and (for a bytearray) not resizable.
        self._view: memoryview | None = view
        self._cdata: Any = cdata
        self.closed = False

    def _release(self) -> None:
        ffi.release(self._cdata)
        if self._view is not None:
            self._view.release()
        self._view = None

    def __repr__(self) -> str:
        return (
            f"DmaMapping(iova={self.iova:#x}, size={self.size:#x}, obj={type(self.obj).__name__})"
        )


__all__ = [
    "HUGEPAGE_SIZES",
    "DmaBuffer",
    "DmaMapping",
    "DmaSpace",
    "HugePage",
    "IoasSpace",
    "IovaAllocator",
    "IovaRange",
    "hugepage_size",
    "smallest_page",
]
