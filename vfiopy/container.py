"""The legacy VFIO container (/dev/vfio/vfio) and its type1 IOMMU.

Order matters to the kernel: a container accepts VFIO_SET_IOMMU only once a
group is attached (EINVAL before), and devices can be opened only after the
IOMMU is set.  Closing the container drops every DMA mapping it holds.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from vfiopy._fdguard import FdGuard
from vfiopy._log import get_logger
from vfiopy._uapi import (
    Closable,
    DmaMapFlag,
    DmaUnmapFlag,
    Extension,
    IommuInfoCap,
    IommuInfoFlag,
    IommuType,
    Struct,
    cap_chain,
    ffi,
    ioctl,
    ioctl_info,
    lib,
    open_node,
)
from vfiopy.dma import IovaRange
from vfiopy.errors import (
    DmaMapError,
    OpenContainerError,
    ReleaseError,
    SetIommuError,
    VfioError,
    raise_as,
)
from vfiopy.kernel import O_RDWR, Kernel, default_kernel

log = get_logger(__name__)

CONTAINER_PATH = "/dev/vfio/vfio"
_DMA_ADVICE = {
    errno.EEXIST: "the IOVA range overlaps an existing mapping; unmap it first or pick another",
    errno.ENOMEM: "the locked-memory limit is too low (raise ulimit -l / RLIMIT_MEMLOCK)",
    errno.ENOSPC: "the IOMMU's mapping limit is reached (see dma_avail()); map fewer, larger "
    "buffers or raise vfio_iommu_type1 dma_entry_limit",
}


@dataclass(frozen=True)
class IommuInfo:
    """VFIO_IOMMU_GET_INFO: page sizes, usable IOVA ranges and remaining mappings."""

    pgsizes: int
    iova_ranges: list[IovaRange] = field(default_factory=list)
    dma_avail: int | None = None


class Container(Closable):
    """An open VFIO container; use as a context manager or call :meth:`close`."""

    def __init__(self, kernel: Kernel | None = None, path: str = CONTAINER_PATH) -> None:
        self.kernel = kernel if kernel is not None else default_kernel()
        self.path = path
        self.iommu_type: IommuType | None = None
        self._lock = threading.Lock()
        # Our own mappings, for unmap_all on kernels without VFIO_UNMAP_ALL.
        self._mappings: dict[int, int] = {}
        self._groups: set[int] = set()
        self.fd = open_node(self.kernel, path, O_RDWR, error=OpenContainerError, device=None)
        # Close waits for the calls in flight (a DMA unmap on another thread,
        # say); later ones raise EBADF instead of using the number.
        self.guard = FdGuard(self.fd, self.path, "the container")
        try:
            version = self._ioctl("VFIO_GET_API_VERSION", error=OpenContainerError)
            if version != lib.VFIO_API_VERSION:
                raise OpenContainerError(
                    errno.EINVAL,
                    step="VFIO_GET_API_VERSION",
                    detail=f"the kernel speaks VFIO API {version}, vfiopy {lib.VFIO_API_VERSION}",
                    advice="use a kernel and vfiopy that agree on the VFIO API",
                )
        except BaseException:
            self.kernel.close(self.fd)
            raise
        self.closed = False

    def _ioctl(
        self,
        name: str,
        arg: object = 0,
        *,
        error: type[VfioError],
        detail: str | None = None,
        advice: str | Mapping[int, str] | None = None,
    ) -> int:
        with self.guard.hold(error, name) as fd:
            return ioctl(
                self.kernel,
                fd,
                name,
                arg,
                error=error,
                device=self.path,
                detail=detail,
                advice=advice,
            )

    @property
    def groups(self) -> frozenset[int]:
        """The numbers of the groups attached to this container."""
        with self._lock:
            return frozenset(self._groups)

    def note_attached(self, group: int) -> None:
        """Record that ``group`` joined (called by :class:`~vfiopy.group.Group`)."""
        with self._lock:
            self._groups.add(group)

    def note_detached(self, group: int) -> None:
        """Record that ``group`` left (called by :class:`~vfiopy.group.Group`)."""
        with self._lock:
            self._groups.discard(group)
            if not self._groups:
                # vfio_group_detach_container: detaching the last group
                # deprivileges the container; the IOMMU model and every
                # mapping go with it, and the next group must set it again.
                self.iommu_type = None
                self._mappings.clear()

    def check_extension(self, extension: Extension | int) -> bool:
        return self._ioctl("VFIO_CHECK_EXTENSION", int(extension), error=OpenContainerError) > 0

    def set_iommu(
        self, iommu_type: IommuType | None = None, *, allow_noiommu: bool = False
    ) -> IommuType:
        """Set the IOMMU model; by default the best type1 model the kernel offers.

        The no-IOMMU model leaves the device's DMA unchecked (it can write
        anywhere in memory), so it is used only when asked for: by
        ``iommu_type=IommuType.NOIOMMU``, or ``allow_noiommu=True`` as the
        fallback when there is no type1.  Either way it logs a warning.

        Needs a group attached first (the kernel answers EINVAL otherwise).
        Setting it again is a no-op; the kernel would refuse a second model.
        """
        with self._lock:
            if self.iommu_type is not None:
                return self.iommu_type
            if iommu_type is None:
                candidates = [IommuType.TYPE1v2, IommuType.TYPE1]
                if allow_noiommu:
                    candidates.append(IommuType.NOIOMMU)
                for candidate in candidates:
                    if self.check_extension(candidate):
                        iommu_type = candidate
                        break
                else:
                    noiommu = not allow_noiommu and self.check_extension(IommuType.NOIOMMU)
                    raise SetIommuError(
                        errno.ENODEV,
                        self.path,
                        detail="the kernel offers no type1 IOMMU model"
                        + ("; it offers no-IOMMU mode, which was not allowed" if noiommu else ""),
                        advice="pass allow_noiommu=True to accept DMA without an IOMMU "
                        "(unsafe: the device can write anywhere in memory)"
                        if noiommu
                        else "load vfio_iommu_type1 (modprobe vfio_iommu_type1), or enable "
                        "vfio's enable_unsafe_noiommu_mode and pass allow_noiommu=True",
                    )
            if iommu_type is IommuType.NOIOMMU:
                log.warning(
                    "container.noiommu",
                    container=self.path,
                    detail="no-IOMMU mode: the devices' DMA is not isolated or translated; "
                    "a device can read and write any physical memory",
                )
            self._ioctl(
                "VFIO_SET_IOMMU",
                int(iommu_type),
                error=SetIommuError,
                detail=f"type {iommu_type.name}",
                advice={errno.EINVAL: "attach a group (Group.set_container) first"},
            )
            self.iommu_type = iommu_type
            return iommu_type

    # --- DMA ----------------------------------------------------------------------
    def map_dma(
        self, vaddr: int, iova: int, size: int, read: bool = True, write: bool = True
    ) -> None:
        """Map ``size`` bytes of this process's memory at ``vaddr`` to ``iova``."""
        s = Struct("struct vfio_iommu_type1_dma_map")
        s.p.flags = (DmaMapFlag.READ if read else 0) | (DmaMapFlag.WRITE if write else 0)
        s.p.vaddr, s.p.iova, s.p.size = vaddr, iova, size
        self._dma_ioctl("VFIO_IOMMU_MAP_DMA", s, iova, size)
        with self._lock:
            self._mappings[iova] = size

    def unmap_dma(self, iova: int, size: int) -> int:
        """Unmap ``[iova, iova+size)``; returns the number of bytes the kernel unmapped."""
        s = Struct("struct vfio_iommu_type1_dma_unmap")
        s.p.iova, s.p.size = iova, size
        self._dma_ioctl("VFIO_IOMMU_UNMAP_DMA", s, iova, size)
        with self._lock:
            self._mappings.pop(iova, None)
        return int(s.p.size)

    map = map_dma
    unmap = unmap_dma

    def unmap_all(self) -> int:
        """Unmap every mapping; returns the bytes unmapped."""
        if self.check_extension(Extension.UNMAP_ALL):
            s = Struct("struct vfio_iommu_type1_dma_unmap")
            s.p.flags = DmaUnmapFlag.ALL  # iova and size must be 0 with this flag
            self._dma_ioctl("VFIO_IOMMU_UNMAP_DMA", s, 0, 0)
            with self._lock:
                self._mappings.clear()
            return int(s.p.size)
        with self._lock:
            mappings = sorted(self._mappings.items())
        return sum(self.unmap_dma(iova, size) for iova, size in mappings)

    def _dma_ioctl(self, name: str, s: Struct, iova: int, size: int) -> None:
        self._ioctl(
            name,
            s.p,
            error=DmaMapError,
            detail=f"iova {iova:#x} size {size:#x}",
            advice=_DMA_ADVICE,
        )

    def info(self) -> IommuInfo:
        """VFIO_IOMMU_GET_INFO with its capability chain."""
        with self.guard.hold(DmaMapError, "VFIO_IOMMU_GET_INFO") as fd:
            s = ioctl_info(
                self.kernel,
                fd,
                "VFIO_IOMMU_GET_INFO",
                "struct vfio_iommu_type1_info",
                error=DmaMapError,
                device=self.path,
                advice={errno.EINVAL: "set the IOMMU first (Container.set_iommu)"},
            )
        ranges: list[IovaRange] = []
        avail: int | None = None
        if s.p.flags & IommuInfoFlag.CAPS:
            for cap in cap_chain(s, int(s.p.cap_offset)):
                if cap.id == IommuInfoCap.IOVA_RANGE:
                    c = s.at("struct vfio_iommu_type1_info_cap_iova_range", cap.offset)
                    item = ffi.sizeof("struct vfio_iova_range")
                    room = (s.size - cap.offset - ffi.sizeof(c[0])) // item
                    ranges = [
                        IovaRange(int(r.start), int(r.end))
                        for r in (c.iova_ranges[i] for i in range(min(c.nr_iovas, room)))
                    ]
                elif cap.id == IommuInfoCap.DMA_AVAIL:
                    avail = int(s.at("struct vfio_iommu_type1_info_dma_avail", cap.offset).avail)
        pgsizes = int(s.p.iova_pgsizes) if s.p.flags & IommuInfoFlag.PGSIZES else 0
        return IommuInfo(pgsizes, ranges, avail)

    def iova_ranges(self) -> list[IovaRange]:
        """The usable IOVA ranges; the whole 64-bit space when the kernel reports none."""
        return self.info().iova_ranges or [IovaRange(0, (1 << 64) - 1)]

    def dma_avail(self) -> int | None:
        """How many more mappings the IOMMU accepts (None before Linux 5.10)."""
        return self.info().dma_avail

    # --- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Close the container; the kernel drops its mappings with it. Idempotent."""
        if not self.guard.shut():
            return
        self.closed = True
        with raise_as(ReleaseError, self.path, "close container"):
            self.kernel.close(self.fd)

    def __repr__(self) -> str:
        return f"Container(fd={self.fd}, iommu={self.iommu_type.name if self.iommu_type else None})"


__all__ = ["CONTAINER_PATH", "Container", "IommuInfo"]
