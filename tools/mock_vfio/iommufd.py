"""``/dev/iommu``: the iommufd context and its IOAS objects (drivers/iommu/iommufd/)."""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Any

from mock_vfio.file import File
from mock_vfio.iova import DmaSpace, iova_ranges, min_pgsize
from mock_vfio.trace import oserror
from mock_vfio.uapi import (
    _IOCTLS,
    PAGE,
    U64_MAX,
    addr_of,
    as_struct,
    offsetofend,
    read_mem,
    sizeof,
    u32_at,
)
from vfiopy._uapi import (
    IoasMapFlag,
    Ioctl,
    ffi,
    lib,
)

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Device
    from mock_vfio.process import SimProcess


_IOMMUFD_IOCTLS = {
    v: "IOMMU_" + k.removeprefix("IOMMUFD_") for k, v in _IOCTLS.items() if k.startswith("IOMMUFD_")
}


class IommufdCtx:
    """``struct iommufd_ctx``: object ids for IOAS and bound devices."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_id = 1
        self.ioas: dict[int, Ioas] = {}
        self.devices: dict[int, Device] = {}

    def alloc_id(self) -> int:
        with self.lock:
            i = self.next_id
            self.next_id += 1
            return i


class Ioas:
    def __init__(self, oid: int) -> None:
        self.id = oid
        self.dma = DmaSpace()
        self.users = 0
        self.next_iova = 1 << 32
        self.huge_pages = True  # IOMMU_OPTION_HUGE_PAGES: iopt->disable_large_pages clear

    def alignment(self, machine: Machine) -> int:
        """iopt->iova_alignment (iopt_calculate_iova_alignment): 1 for a bare IOAS, PAGE_SIZE
        with huge pages off, and at least the attached domains' smallest page."""
        align = PAGE if not self.huge_pages else 1
        return max(align, min_pgsize(machine)) if self.users else align


class IommufdFile(File):
    kind = "iommufd"

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self.ctx = IommufdCtx()

    def link(self) -> str:
        return "/dev/iommu"

    def ioctl_names(self, request: int) -> tuple[str, ...]:
        n = _IOMMUFD_IOCTLS.get(request)
        return (n,) if n else ()

    def _cmd(self, arg: Any, ctype: str, last: str) -> tuple[int, Any]:
        """``iommufd_fops_ioctl``: size >= min_size, and bytes past ours all zero."""
        a = addr_of(arg)
        size = u32_at(a)
        if size < offsetofend(ctype, last):
            raise oserror(errno.EINVAL, f"{ctype}: size {size}")
        ours = sizeof(ctype)
        if size > ours and any(read_mem(a + ours, size - ours)):
            raise oserror(errno.E2BIG, f"{ctype}: unknown trailing fields set")
        return a, as_struct(a, ctype)

    def _ioas(self, oid: int) -> Ioas:
        ioas = self.ctx.ioas.get(oid)
        if ioas is None:
            raise oserror(errno.ENOENT, f"no IOAS {oid}")
        return ioas

    def ioctl(self, proc: SimProcess, request: int, arg: Any) -> int:
        if not self.machine.iommufd:
            raise oserror(errno.ENOTTY, "iommufd")
        if request == Ioctl.IOMMUFD_IOAS_ALLOC:
            _, p = self._cmd(arg, "struct iommu_ioas_alloc", "out_ioas_id")
            if p.flags:
                raise oserror(errno.EOPNOTSUPP, "IOAS_ALLOC flags")
            oid = self.ctx.alloc_id()
            self.ctx.ioas[oid] = Ioas(oid)
            p.out_ioas_id = oid
            return 0
        if request == Ioctl.IOMMUFD_DESTROY:
            _, p = self._cmd(arg, "struct iommu_destroy", "id")
            oid = int(p.id)
            ioas = self.ctx.ioas.get(oid)
            if ioas is None:
                raise oserror(errno.ENOENT, f"no object {oid}")
            if ioas.users:
                raise oserror(errno.EBUSY, f"IOAS {oid} has attached devices")
            del self.ctx.ioas[oid]
            return 0
        if request == Ioctl.IOMMUFD_IOAS_MAP:
            _, p = self._cmd(arg, "struct iommu_ioas_map", "iova")
            return self._map(p)
        if request == Ioctl.IOMMUFD_IOAS_UNMAP:
            _, p = self._cmd(arg, "struct iommu_ioas_unmap", "length")
            ioas = self._ioas(int(p.ioas_id))
            iova, length = int(p.iova), int(p.length)
            if iova == 0 and length == U64_MAX:
                targets = list(ioas.dma.starts)
            else:
                if not length or iova + length - 1 > U64_MAX:
                    raise oserror(errno.EINVAL, "IOAS_UNMAP range")
                targets = ioas.dma.find_overlap(iova, length)
                for s in targets:
                    if s < iova or s + ioas.dma.maps[s][0] > iova + length:
                        raise oserror(errno.ENOENT, "IOAS_UNMAP would split an area")
                if not targets:
                    raise oserror(errno.ENOENT, "IOAS_UNMAP: nothing mapped there")
            p.length = sum(ioas.dma.remove(s) for s in targets)
            self.machine.counters.add("dma_unmaps", len(targets))
            return 0
        if request == Ioctl.IOMMUFD_IOAS_IOVA_RANGES:
            _, p = self._cmd(arg, "struct iommu_ioas_iova_ranges", "out_iova_alignment")
            ioas = self._ioas(int(p.ioas_id))
            ranges = iova_ranges(self.machine) if ioas.users else ((0, U64_MAX),)
            n = int(p.num_iovas)
            p.out_iova_alignment = ioas.alignment(self.machine)
            p.num_iovas = len(ranges)
            if n < len(ranges):
                raise oserror(errno.EMSGSIZE, "num_iovas too small")
            out = ffi.cast("struct iommu_iova_range *", int(p.allowed_iovas))
            for i, (s, e) in enumerate(ranges):
                out[i].start = s
                out[i].last = e
            return 0
        if request == Ioctl.IOMMUFD_IOAS_ALLOW_IOVAS:
            _, p = self._cmd(arg, "struct iommu_ioas_allow_iovas", "allowed_iovas")
            self._ioas(int(p.ioas_id))
            return 0
        if request == Ioctl.IOMMUFD_OPTION:
            a, p = self._cmd(arg, "struct iommu_option", "val64")
            return self._option(a, p)
        raise oserror(errno.ENOTTY, f"iommufd ioctl {request:#x}")

    def _option(self, a: int, p: Any) -> int:
        """iommufd_option (Linux 6.2, drivers/iommu/iommufd/main.c and ioas.c)."""
        # __reserved, the u16 after op (the binding does not name it)
        if read_mem(a + offsetofend("struct iommu_option", "op"), 2) != b"\0\0":
            raise oserror(errno.EOPNOTSUPP, "IOMMU_OPTION __reserved")
        op, val = int(p.op), int(p.val64)
        if p.option_id == lib.IOMMU_OPTION_RLIMIT_MODE:
            if p.object_id:
                raise oserror(errno.EOPNOTSUPP, "RLIMIT_MODE is global: object_id must be 0")
            if op == lib.IOMMU_OPTION_OP_GET:
                p.val64 = 0
            elif op != lib.IOMMU_OPTION_OP_SET or val not in (0, 1):
                raise oserror(errno.EINVAL if op == lib.IOMMU_OPTION_OP_SET else errno.EOPNOTSUPP)
            return 0
        if p.option_id != lib.IOMMU_OPTION_HUGE_PAGES:
            raise oserror(errno.EOPNOTSUPP, "IOMMU_OPTION id")
        ioas = self._ioas(int(p.object_id))  # a per-IOAS option: ENOENT for another id
        if op == lib.IOMMU_OPTION_OP_GET:
            p.val64 = int(ioas.huge_pages)
        elif op != lib.IOMMU_OPTION_OP_SET:
            raise oserror(errno.EOPNOTSUPP, "IOMMU_OPTION op")
        elif val == 0:
            # iopt_disable_large_pages: not once a domain holds mapped pages
            if ioas.huge_pages and ioas.users and ioas.dma.count():
                raise oserror(errno.EINVAL, "HUGE_PAGES off with pages mapped in a domain")
            ioas.huge_pages = False
        elif val == 1:
            ioas.huge_pages = True
        else:
            raise oserror(errno.EINVAL, f"HUGE_PAGES value {val}")
        return 0

    def _map(self, p: Any) -> int:
        flags = int(p.flags)
        allowed = IoasMapFlag.FIXED_IOVA | IoasMapFlag.WRITEABLE | IoasMapFlag.READABLE
        if flags & ~allowed:
            raise oserror(errno.EOPNOTSUPP, f"IOAS_MAP flags {flags:#x}")
        ioas = self._ioas(int(p.ioas_id))
        length, va = int(p.length), int(p.user_va)
        if not length or length >= U64_MAX or va + length - 1 > U64_MAX:
            raise oserror(errno.EINVAL if not length else errno.EOVERFLOW, "IOAS_MAP length")
        prot = (1 if flags & IoasMapFlag.READABLE else 0) | (
            2 if flags & IoasMapFlag.WRITEABLE else 0
        )
        # iopt_alloc_area_pages / iopt_check_iova / iopt_insert_area: the length, the IOVA
        # and the address's offset in its page aligned to iova_alignment, else EINVAL
        align = ioas.alignment(self.machine)
        if length & (align - 1) or (va % PAGE) & (align - 1):
            raise oserror(errno.EINVAL, f"IOAS_MAP length or address not {align:#x}-aligned")
        if flags & IoasMapFlag.FIXED_IOVA:
            iova = int(p.iova)
            if iova & (align - 1):
                raise oserror(errno.EINVAL, f"IOAS_MAP iova not {align:#x}-aligned")
            ranges = iova_ranges(self.machine) if ioas.users else ((0, U64_MAX),)
            if not any(s <= iova and iova + length - 1 <= e for s, e in ranges):
                raise oserror(errno.EINVAL, f"iova {iova:#x}+{length:#x} hits a reserved range")
            if ioas.dma.find_overlap(iova, length):
                raise oserror(errno.EEXIST, f"iova {iova:#x} in use")
        else:
            iova = (ioas.next_iova + PAGE - 1) & ~(PAGE - 1)
            iova += va & (PAGE - 1)
            while ioas.dma.find_overlap(iova, length):
                iova += max(length, PAGE)
            ioas.next_iova = iova + length
            p.iova = iova
        ioas.dma.add(iova, length, va, prot)
        self.machine.counters.add("dma_maps")
        return 0
