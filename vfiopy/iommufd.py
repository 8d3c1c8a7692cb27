"""iommufd (/dev/iommu, Linux 6.2+): IO address spaces (IOAS) and their mappings.

Devices join an IOAS through their VFIO cdev (VFIO_DEVICE_BIND_IOMMUFD then
ATTACH_IOMMUFD_PT, see :meth:`vfiopy.device.Device.from_cdev`).  Closing the
iommufd destroys every object in it.
"""

from __future__ import annotations

import enum
import errno
from typing import Any

from vfiopy._fdguard import FdGuard
from vfiopy._uapi import Closable, IoasMapFlag, Struct, ffi, ioctl, lib, open_node
from vfiopy.dma import IovaRange
from vfiopy.errors import DmaMapError, OpenIommufdError, ReleaseError, VfioError, raise_as
from vfiopy.kernel import O_RDWR, Kernel, default_kernel

IOMMUFD_PATH = "/dev/iommu"
_MAX_GROW = 8
_MAP_ADVICE = {
    errno.EEXIST: "the IOVA range overlaps an existing mapping; unmap it first or pick another",
    errno.ENOMEM: "the locked-memory limit is too low (raise ulimit -l / RLIMIT_MEMLOCK)",
    errno.ENOENT: "no IOAS with that id; allocate one with alloc_ioas()",
}
_OPTION_ADVICE = {
    errno.ENOTTY: "this kernel has no IOMMU_OPTION (Linux 6.2+)",
    errno.EOPNOTSUPP: "this kernel does not know the option",
    errno.ENOENT: "no IOAS with that id; allocate one with alloc_ioas()",
    errno.EINVAL: "huge pages can be turned off only before anything is mapped while a "
    "device is attached: set it first, or unmap everything",
}


class IommuOption(enum.IntEnum):
    """``enum iommufd_option`` (include/uapi/linux/iommufd.h, Linux 6.2)."""

    RLIMIT_MODE = lib.IOMMU_OPTION_RLIMIT_MODE
    HUGE_PAGES = lib.IOMMU_OPTION_HUGE_PAGES


class Iommufd(Closable):
    """An open /dev/iommu; use as a context manager or call :meth:`close`."""

    def __init__(self, kernel: Kernel | None = None, path: str = IOMMUFD_PATH) -> None:
        self.kernel = kernel if kernel is not None else default_kernel()
        self.path = path
        self.fd = open_node(
            self.kernel,
            path,
            O_RDWR,
            error=OpenIommufdError,
            device=None,
            advice={
                errno.ENOENT: "this kernel has no iommufd (Linux 6.2+, device cdevs 6.6+; "
                "try modprobe iommufd) - use the container backend instead"
            },
        )
        # Close waits for the calls in flight (a DMA unmap on another thread,
        # say); later ones raise EBADF instead of using the number.
        self.guard = FdGuard(self.fd, self.path, "the iommufd")
        self.closed = False

    def _ioctl(
        self,
        name: str,
        s: Struct,
        error: type[VfioError],
        detail: str | None = None,
        advice: dict[int, str] = _MAP_ADVICE,
    ) -> int:
        with self.guard.hold(error, name) as fd:
            return ioctl(
                self.kernel,
                fd,
                name,
                s.p,
                error=error,
                device=self.path,
                detail=detail,
                advice=advice,
            )

    def alloc_ioas(self) -> int:
        """A new, empty IO address space; returns its object id."""
        s = Struct("struct iommu_ioas_alloc")
        self._ioctl("IOMMU_IOAS_ALLOC", s, OpenIommufdError)
        return int(s.p.out_ioas_id)

    def map(
        self,
        ioas: int,
        vaddr: int,
        length: int,
        iova: int | None = None,
        readable: bool = True,
        writeable: bool = True,
    ) -> int:
        """Map ``length`` bytes at ``vaddr``; at ``iova``, or where the kernel picks.

        Returns the IOVA used.
        """
        s = Struct("struct iommu_ioas_map")
        flags = IoasMapFlag.READABLE if readable else IoasMapFlag(0)
        if writeable:
            flags |= IoasMapFlag.WRITEABLE
        if iova is not None:
            flags |= IoasMapFlag.FIXED_IOVA
            s.p.iova = iova
        s.p.flags, s.p.ioas_id, s.p.user_va, s.p.length = flags, ioas, vaddr, length
        where = f"{iova:#x}" if iova is not None else "any"
        self._ioctl(
            "IOMMU_IOAS_MAP", s, DmaMapError, f"ioas {ioas} iova {where} length {length:#x}"
        )
        return int(s.p.iova)

    def unmap(self, ioas: int, iova: int, length: int) -> int:
        """Unmap ``[iova, iova+length)``; returns the bytes unmapped."""
        s = Struct("struct iommu_ioas_unmap")
        s.p.ioas_id, s.p.iova, s.p.length = ioas, iova, length
        self._ioctl(
            "IOMMU_IOAS_UNMAP", s, DmaMapError, f"ioas {ioas} iova {iova:#x} length {length:#x}"
        )
        return int(s.p.length)

    def iova_ranges(self, ioas: int) -> list[IovaRange]:
        """The IOVAs usable in ``ioas`` given the devices attached to it now."""
        return self.iova_space(ioas)[0]

    def iova_alignment(self, ioas: int) -> int:
        """The alignment ``ioas`` requires of a mapping's IOVA and length (at least 1)."""
        return self.iova_space(ioas)[1]

    def iova_space(self, ioas: int) -> tuple[list[IovaRange], int]:
        """IOMMU_IOAS_IOVA_RANGES: the usable ranges and out_iova_alignment, which is the
        largest smallest-page of the attached devices' IOMMUs (PAGE_SIZE with huge pages off,
        1 when nothing is attached)."""
        count = 0
        item = ffi.sizeof("struct iommu_iova_range")
        for _ in range(_MAX_GROW):
            s = Struct("struct iommu_ioas_iova_ranges")
            s.p.ioas_id, s.p.num_iovas = ioas, count
            array: Any = ffi.new("char[]", max(count, 1) * item)
            s.p.allowed_iovas = int(ffi.cast("uintptr_t", array))
            try:
                self._ioctl("IOMMU_IOAS_IOVA_RANGES", s, DmaMapError, f"ioas {ioas}")
            except VfioError as exc:
                # EMSGSIZE: the array was too small; num_iovas says how many exist.
                if exc.errno == errno.EMSGSIZE and s.p.num_iovas > count:
                    count = int(s.p.num_iovas)
                    continue
                raise
            ranges = ffi.cast("struct iommu_iova_range *", array)
            found = [
                IovaRange(int(ranges[i].start), int(ranges[i].last))
                for i in range(min(int(s.p.num_iovas), count))
            ]
            return found, max(int(s.p.out_iova_alignment), 1)
        raise DmaMapError(errno.EMSGSIZE, self.path, "IOMMU_IOAS_IOVA_RANGES", "kept growing")

    def option(self, option: IommuOption, object_id: int = 0, value: int | None = None) -> int:
        """IOMMU_OPTION: get ``option`` of ``object_id`` (an IOAS id, or 0 for the global
        RLIMIT_MODE), or set it to ``value``; returns the value the kernel holds."""
        s = Struct("struct iommu_option")
        s.p.option_id, s.p.object_id = int(option), object_id
        if value is None:
            s.p.op = lib.IOMMU_OPTION_OP_GET
        else:
            s.p.op, s.p.val64 = lib.IOMMU_OPTION_OP_SET, value
        what = f"{option.name} of object {object_id}" + ("" if value is None else f" = {value}")
        self._ioctl("IOMMU_OPTION", s, DmaMapError, what, _OPTION_ADVICE)
        return int(s.p.val64)

    def huge_pages(self, ioas: int) -> bool:
        """Whether ``ioas`` lets the IOMMU map contiguous runs with large pages (default on)."""
        return bool(self.option(IommuOption.HUGE_PAGES, ioas))

    def set_huge_pages(self, ioas: int, enabled: bool) -> None:
        """IOMMU_OPTION_HUGE_PAGES of ``ioas``: off maps everything with PAGE_SIZE pages,
        which costs IOTLB reach (useful to measure that); the kernel refuses to turn it off
        (EINVAL) once pages are mapped while a device is attached."""
        self.option(IommuOption.HUGE_PAGES, ioas, int(enabled))

    def destroy(self, object_id: int) -> None:
        """Destroy an iommufd object (an IOAS once nothing is attached to it)."""
        s = Struct("struct iommu_destroy")
        s.p.id = object_id
        self._ioctl("IOMMU_DESTROY", s, ReleaseError, f"object {object_id}")

    def close(self) -> None:
        """Close the iommufd, destroying every object in it. Idempotent."""
        if not self.guard.shut():
            return
        self.closed = True
        with raise_as(ReleaseError, self.path, "close iommufd"):
            self.kernel.close(self.fd)


__all__ = ["IOMMUFD_PATH", "IommuOption", "Iommufd"]
