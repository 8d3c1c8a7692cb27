"""The legacy container, ``/dev/vfio/vfio``, with the type1 IOMMU backend
(drivers/vfio/container.c, drivers/vfio/vfio_iommu_type1.c)."""

from __future__ import annotations

import errno
import struct
import threading
from typing import TYPE_CHECKING, Any

from mock_vfio.file import File
from mock_vfio.iova import DmaSpace, iova_ranges, min_pgsize
from mock_vfio.trace import oserror
from mock_vfio.uapi import (
    U64_MAX,
    CapChain,
    addr_of,
    as_struct,
    check_argsz,
    offsetofend,
    put_caps,
    sizeof,
)
from mock_vfio.version import UNMAP_ALL_VADDR
from vfiopy._uapi import (
    DmaMapFlag,
    DmaUnmapFlag,
    Extension,
    Ioctl,
    IommuInfoCap,
    IommuInfoFlag,
    IommuType,
    lib,
)

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.process import SimProcess
    from mock_vfio.vfio_group import Group

DMA_ENTRY_LIMIT = 65535  # vfio_iommu_type1 dma_entry_limit default
# Answered by type1 only once a container has its IOMMU (vfio_iommu_type1_check_extension
# with no iommu data, as a container without a model asks every driver, says 0 to these).
_TYPE1_NEEDS_IOMMU = frozenset({lib.VFIO_DMA_CC_IOMMU, lib.VFIO_UPDATE_VADDR})


_CONTAINER_IOCTLS = {
    Ioctl.GET_API_VERSION: "VFIO_GET_API_VERSION",
    Ioctl.CHECK_EXTENSION: "VFIO_CHECK_EXTENSION",
    Ioctl.SET_IOMMU: "VFIO_SET_IOMMU",
    Ioctl.IOMMU_GET_INFO: "VFIO_IOMMU_GET_INFO",
    Ioctl.IOMMU_MAP_DMA: "VFIO_IOMMU_MAP_DMA",
    Ioctl.IOMMU_UNMAP_DMA: "VFIO_IOMMU_UNMAP_DMA",
    Ioctl.IOMMU_ENABLE: "VFIO_IOMMU_ENABLE",
    Ioctl.IOMMU_DISABLE: "VFIO_IOMMU_DISABLE",
}


class Container:
    """``struct vfio_container`` with a type1 IOMMU backend."""

    def __init__(self) -> None:
        self.groups: list[Group] = []
        self.iommu: int | None = None
        self.dma = DmaSpace()
        self.lock = threading.Lock()

    def detach(self, group: Group) -> None:
        with self.lock:
            if group in self.groups:
                self.groups.remove(group)
            if not self.groups:
                # the last group leaving releases the IOMMU driver and its mappings
                self.iommu = None
                self.dma.clear()


class ContainerFile(File):
    kind = "container"

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self.container = Container()

    def link(self) -> str:
        return "/dev/vfio/vfio"

    def ioctl_names(self, request: int) -> tuple[str, ...]:
        n = _CONTAINER_IOCTLS.get(request)
        return (n,) if n else ()

    def ioctl(self, proc: SimProcess, request: int, arg: Any) -> int:
        c = self.container
        if request == Ioctl.GET_API_VERSION:
            return int(lib.VFIO_API_VERSION)
        if request == Ioctl.CHECK_EXTENSION:
            ext = int(arg) if isinstance(arg, int) else addr_of(arg)
            if ext in _TYPE1_NEEDS_IOMMU and c.iommu is None:
                return 0
            if ext == lib.VFIO_DMA_CC_IOMMU and not self.machine.topology.iommu_coherent:
                return 0
            if ext in _UNMAP_ALL_VADDR and self.machine.kernel_version < UNMAP_ALL_VADDR:
                return 0
            return 1 if ext in _TYPE1_EXTENSIONS else 0
        if request == Ioctl.SET_IOMMU:
            kind = int(arg) if isinstance(arg, int) else addr_of(arg)
            with c.lock:
                # vfio_ioctl_set_iommu: a group must be attached, and only once
                if not c.groups or c.iommu is not None:
                    raise oserror(errno.EINVAL, "SET_IOMMU without a group or twice")
                if kind not in (IommuType.TYPE1, IommuType.TYPE1v2):
                    raise oserror(errno.ENODEV, f"no IOMMU driver for type {kind}")
                c.iommu = kind
            return 0
        if c.iommu is None:
            # no IOMMU driver yet: vfio_fops_unl_ioctl has nothing to pass it to
            raise oserror(errno.EINVAL, "container has no IOMMU set")
        if request == Ioctl.IOMMU_GET_INFO:
            return self._get_info(addr_of(arg))
        if request == Ioctl.IOMMU_MAP_DMA:
            return self._map(addr_of(arg))
        if request == Ioctl.IOMMU_UNMAP_DMA:
            return self._unmap(addr_of(arg))
        raise oserror(errno.ENOTTY, f"type1 ioctl {request:#x}")

    def _get_info(self, a: int) -> int:
        ct = "struct vfio_iommu_type1_info"
        argsz, _ = check_argsz(a, ct, "iova_pgsizes")
        caps = CapChain()
        pgsizes = self.machine.iova_pgsizes
        caps.add(IommuInfoCap.MIGRATION, 1, struct.pack("<IQQ", 0, pgsizes, 256 << 20)[:20])
        avail = DMA_ENTRY_LIMIT - self.container.dma.count()
        caps.add(IommuInfoCap.DMA_AVAIL, 1, struct.pack("<I", avail))
        ranges = iova_ranges(self.machine)
        body = struct.pack("<II", len(ranges), 0)
        body += b"".join(struct.pack("<QQ", s, e) for s, e in ranges)
        caps.add(IommuInfoCap.IOVA_RANGE, 1, body)
        info_size = sizeof(ct)
        new_argsz, cap_offset, _ = put_caps(a, argsz, info_size, caps)
        p = as_struct(a, ct)
        # copy_to_user(arg, &info, min(argsz, sizeof(info)))
        p.flags = IommuInfoFlag.PGSIZES | IommuInfoFlag.CAPS
        p.iova_pgsizes = pgsizes
        p.argsz = new_argsz
        if argsz >= offsetofend(ct, "cap_offset"):
            p.cap_offset = cap_offset
        return 0

    def _map(self, a: int) -> int:
        ct = "struct vfio_iommu_type1_dma_map"
        check_argsz(a, ct, "size")
        p = as_struct(a, ct)
        flags = int(p.flags)
        known = DmaMapFlag.READ | DmaMapFlag.WRITE
        if self.machine.kernel_version >= UNMAP_ALL_VADDR:
            known |= DmaMapFlag.VADDR
        if flags & ~known:
            raise oserror(errno.EINVAL, f"MAP_DMA flags {flags:#x}")
        prot = flags & (DmaMapFlag.READ | DmaMapFlag.WRITE)
        set_vaddr = bool(flags & DmaMapFlag.VADDR)
        if bool(prot) == set_vaddr:
            raise oserror(errno.EINVAL, "MAP_DMA needs READ/WRITE, or VADDR alone")
        iova, size, vaddr = int(p.iova), int(p.size), int(p.vaddr)
        # vfio_dma_do_map: size, iova and vaddr aligned to the IOMMU's smallest page
        pgsize = min_pgsize(self.machine)
        if not size or (size | iova | vaddr) & (pgsize - 1):
            raise oserror(errno.EINVAL, f"MAP_DMA: zero size or not {pgsize:#x}-aligned")
        if iova + size - 1 > U64_MAX or vaddr + size - 1 > U64_MAX:
            raise oserror(errno.EINVAL, "MAP_DMA wraps")
        dma = self.container.dma
        hits = dma.find_overlap(iova, size)
        if set_vaddr:
            if hits != [iova] or dma.maps[iova][0] != size:
                raise oserror(errno.EINVAL, "VADDR update must name one whole mapping")
            old = dma.maps[iova]
            dma.remove(iova)
            dma.add(iova, size, vaddr, old[2])
            return 0
        if hits:
            raise oserror(errno.EEXIST, f"iova {iova:#x}+{size:#x} overlaps a mapping")
        if dma.count() >= DMA_ENTRY_LIMIT:
            raise oserror(errno.ENOSPC, "dma_entry_limit reached")
        if not any(s <= iova and iova + size - 1 <= e for s, e in iova_ranges(self.machine)):
            raise oserror(errno.EINVAL, f"iova {iova:#x}+{size:#x} outside the valid ranges")
        dma.add(
            iova,
            size,
            vaddr,
            (1 if prot & DmaMapFlag.READ else 0) | (2 if prot & DmaMapFlag.WRITE else 0),
        )
        self.machine.counters.add("dma_maps")
        return 0

    def _unmap(self, a: int) -> int:
        ct = "struct vfio_iommu_type1_dma_unmap"
        check_argsz(a, ct, "size")
        p = as_struct(a, ct)
        flags = int(p.flags)
        allowed = DmaUnmapFlag.GET_DIRTY_BITMAP
        if self.machine.kernel_version >= UNMAP_ALL_VADDR:
            allowed |= DmaUnmapFlag.ALL | DmaUnmapFlag.VADDR
        if flags & ~allowed or flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            raise oserror(errno.EINVAL, f"UNMAP_DMA flags {flags:#x}")
        iova, size = int(p.iova), int(p.size)
        dma = self.container.dma
        if flags & DmaUnmapFlag.ALL:
            if iova or size:
                raise oserror(errno.EINVAL, "UNMAP_DMA ALL with iova/size")
            targets = list(dma.starts)
        else:
            pgsize = min_pgsize(self.machine)  # vfio_dma_do_unmap, as for a map
            if not size or (iova | size) & (pgsize - 1) or iova + size - 1 > U64_MAX:
                raise oserror(errno.EINVAL, "UNMAP_DMA: zero size, unaligned or wraps")
            targets = dma.find_overlap(iova, size)
            for s in targets:
                # type1v2 refuses to split a mapping
                if s < iova or s + dma.maps[s][0] > iova + size:
                    raise oserror(errno.EINVAL, "UNMAP_DMA would split a mapping")
        done = 0
        for s in targets:
            if flags & DmaUnmapFlag.VADDR:
                done += dma.maps[s][0]
                continue
            done += dma.remove(s)
            self.machine.counters.add("dma_unmaps")
        p.size = done
        return 0

    def release(self, pid: int) -> None:
        c = self.container
        with c.lock:
            if not c.groups:
                c.iommu = None
                c.dma.clear()


_UNMAP_ALL_VADDR = frozenset({Extension.UNMAP_ALL, Extension.UPDATE_VADDR})
_TYPE1_EXTENSIONS = {
    Extension.TYPE1_IOMMU,
    Extension.TYPE1v2_IOMMU,
    Extension.UNMAP_ALL,
    Extension.UPDATE_VADDR,
    Extension.DMA_CC_IOMMU,
}
