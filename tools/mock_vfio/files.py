"""Simulated open files: container, group, device (group or cdev), iommufd, pidfd.

Ioctl arguments are the caller's cffi structs; handlers read ``argsz`` (or
``size``) first and check it against ``offsetofend`` of the last field the
kernel needs, as include/uapi/linux/vfio.h requires, then decode the same
bytes the kernel would and write back only what the kernel copies out.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mock_vfio.machine import PAGE, Device, DmaSpace, Group, Machine
from mock_vfio.trace import oserror
from mock_vfio.version import DEVICE_FEATURE, FDINFO_SYSPATH, IOEVENTFD, LOW_POWER
from vfiopy._uapi import (
    FEATURE_MASK,
    IRQ_SET_ACTION_TYPE_MASK,
    IRQ_SET_DATA_TYPE_MASK,
    VFIO_PCI_DEVID_NOT_OWNED,
    VFIO_PCI_DEVID_OWNED,
    VFIO_PCI_NUM_REGIONS,
    DeviceFlag,
    DmaMapFlag,
    DmaUnmapFlag,
    Extension,
    Feature,
    FeatureFlag,
    GroupFlag,
    HotResetFlag,
    IoasMapFlag,
    Ioctl,
    IommuInfoCap,
    IommuInfoFlag,
    IommuType,
    IrqInfoFlag,
    IrqSetFlag,
    RegionCap,
    RegionFlag,
    ffi,
    lib,
)

if TYPE_CHECKING:
    from mock_vfio.process import SimProcess

OFFSET_SHIFT = 40
OFFSET_MASK = (1 << OFFSET_SHIFT) - 1
CONFIG_INDEX = 7
ROM_INDEX = 6
VGA_INDEX = 8
NUM_IRQS = 5
IOEVENTFD_MAX = 1000  # VFIO_PCI_IOEVENTFD_MAX: ioeventfds a device can have
INTX, MSI, MSIX, ERR, REQ = range(5)
IOVA_PGSIZES = 0x40201000  # 4K | 2M | 1G, as intel-iommu reports
DMA_ENTRY_LIMIT = 65535  # vfio_iommu_type1 dma_entry_limit default
U64_MAX = (1 << 64) - 1
IOVA_RANGES = ((0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1))  # x86: MSI window reserved
# Answered by type1 only once a container has its IOMMU (vfio_iommu_type1_check_extension
# with no iommu data, as a container without a model asks every driver, says 0 to these).
_TYPE1_NEEDS_IOMMU = frozenset({lib.VFIO_DMA_CC_IOMMU, lib.VFIO_UPDATE_VADDR})


def iova_ranges(machine: Machine) -> tuple[tuple[int, int], ...]:
    """The usable IOVA ranges: below the IOMMU's address width, minus the x86 MSI window."""
    top = (1 << machine.topology.iommu_address_width) - 1
    return tuple((s, min(e, top)) for s, e in IOVA_RANGES if s <= top)


# --- argument access -----------------------------------------------------------------


def addr_of(arg: Any) -> int:
    if isinstance(arg, int):
        if arg == 0:
            raise oserror(errno.EFAULT, "NULL ioctl argument")
        return arg
    a = int(ffi.cast("uintptr_t", arg))
    if a == 0:
        raise oserror(errno.EFAULT, "NULL ioctl argument")
    return a


def as_struct(addr: int, ctype: str) -> Any:
    return ffi.cast(ctype + " *", addr)


def u32_at(addr: int) -> int:
    return int(ffi.cast("uint32_t *", addr)[0])


def read_mem(addr: int, n: int) -> bytes:
    return bytes(ffi.buffer(ffi.cast("char *", addr), n))


def write_mem(addr: int, data: bytes) -> None:
    ffi.memmove(ffi.cast("char *", addr), data, len(data))


def offsetofend(ctype: str, fld: str) -> int:
    return int(ffi.offsetof(ctype, fld)) + int(
        ffi.sizeof(ffi.typeof(ctype).fields[_fidx(ctype, fld)][1].type)
    )


def _fidx(ctype: str, fld: str) -> int:
    for i, (name, _) in enumerate(ffi.typeof(ctype).fields):
        if name == fld:
            return i
    raise KeyError(fld)


def sizeof(ctype: str) -> int:
    return int(ffi.sizeof(ctype))


def check_argsz(addr: int, ctype: str, last: str) -> tuple[int, int]:
    """(argsz, minsz); EINVAL when argsz < minsz, as every vfio ioctl does."""
    argsz = u32_at(addr)
    minsz = offsetofend(ctype, last)
    if argsz < minsz:
        raise oserror(errno.EINVAL, f"{ctype}: argsz {argsz} < {minsz}")
    return argsz, minsz


class CapChain:
    """``struct vfio_info_cap``: capabilities appended after the info struct."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._last = -1

    def add(self, cap_id: int, version: int, body: bytes) -> None:
        off = len(self.buf)
        if self._last >= 0:
            struct.pack_into("<I", self.buf, self._last + 4, off)
        raw = struct.pack("<HHI", cap_id, version, 0) + body
        raw += b"\0" * (-len(raw) % 8)
        self.buf += raw
        self._last = off

    def shifted(self, base: int) -> bytes:
        """The chain with ``next`` offsets relative to the start of the user buffer."""
        out = bytearray(self.buf)
        off = 0
        while True:
            nxt = struct.unpack_from("<I", out, off + 4)[0]
            struct.pack_into("<I", out, off + 4, nxt + base if nxt else 0)
            if not nxt:
                break
            off = nxt
        return bytes(out)


def put_caps(addr: int, argsz: int, info_size: int, caps: CapChain) -> tuple[int, int, bool]:
    """Copy a chain if it fits: (argsz to report, cap_offset, fitted)."""
    if not caps.buf:
        return argsz, 0, True
    need = info_size + len(caps.buf)
    if argsz < need:
        return need, 0, False
    write_mem(addr + info_size, caps.shifted(info_size))
    return argsz, info_size, True


# --- files -------------------------------------------------------------------------


class File:
    """``struct file``: reference counted by fds, dups and mappings."""

    kind = "file"

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.refs = 0
        self.released = False

    def link(self) -> str:
        return "anon_inode:[file]"

    def fdinfo(self) -> str:
        return ""

    def device(self) -> Device | None:
        return None

    def ioctl(self, proc: SimProcess, request: int, arg: Any) -> int:
        raise oserror(errno.ENOTTY, f"ioctl {request:#x} on {self.link()}")

    def ioctl_names(self, request: int) -> tuple[str, ...]:
        return ()

    def pread(self, proc: SimProcess, size: int, offset: int) -> bytes:
        raise oserror(errno.EINVAL, "pread")

    def pwrite(self, proc: SimProcess, data: bytes, offset: int) -> int:
        raise oserror(errno.EINVAL, "pwrite")

    def mmap(self, proc: SimProcess, length: int, offset: int, prot: int, flags: int) -> int:
        raise oserror(errno.ENODEV, "mmap")

    def poll_events(self) -> int:
        return 0

    def release(self, pid: int) -> None:
        pass


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
_GROUP_IOCTLS = {
    Ioctl.GROUP_GET_STATUS: "VFIO_GROUP_GET_STATUS",
    Ioctl.GROUP_SET_CONTAINER: "VFIO_GROUP_SET_CONTAINER",
    Ioctl.GROUP_UNSET_CONTAINER: "VFIO_GROUP_UNSET_CONTAINER",
    Ioctl.GROUP_GET_DEVICE_FD: "VFIO_GROUP_GET_DEVICE_FD",
}
_IOCTLS: dict[str, int] = {k: v for k, v in vars(Ioctl).items() if k.isupper()}
_DEVICE_IOCTLS = {v: "VFIO_" + k for k, v in _IOCTLS.items() if k.startswith("DEVICE_")}
_IOMMUFD_IOCTLS = {
    v: "IOMMU_" + k.removeprefix("IOMMUFD_") for k, v in _IOCTLS.items() if k.startswith("IOMMUFD_")
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
        caps.add(IommuInfoCap.MIGRATION, 1, struct.pack("<IQQ", 0, IOVA_PGSIZES, 256 << 20)[:20])
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
        p.iova_pgsizes = IOVA_PGSIZES
        p.argsz = new_argsz
        if argsz >= offsetofend(ct, "cap_offset"):
            p.cap_offset = cap_offset
        return 0

    def _map(self, a: int) -> int:
        ct = "struct vfio_iommu_type1_dma_map"
        check_argsz(a, ct, "size")
        p = as_struct(a, ct)
        flags = int(p.flags)
        if flags & ~(DmaMapFlag.READ | DmaMapFlag.WRITE | DmaMapFlag.VADDR):
            raise oserror(errno.EINVAL, f"MAP_DMA flags {flags:#x}")
        prot = flags & (DmaMapFlag.READ | DmaMapFlag.WRITE)
        set_vaddr = bool(flags & DmaMapFlag.VADDR)
        if bool(prot) == set_vaddr:
            raise oserror(errno.EINVAL, "MAP_DMA needs READ/WRITE, or VADDR alone")
        iova, size, vaddr = int(p.iova), int(p.size), int(p.vaddr)
        if not size or (size | iova | vaddr) & (PAGE - 1):
            raise oserror(errno.EINVAL, "MAP_DMA: zero size or not page aligned")
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
        allowed = DmaUnmapFlag.GET_DIRTY_BITMAP | DmaUnmapFlag.ALL | DmaUnmapFlag.VADDR
        if flags & ~allowed or flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            raise oserror(errno.EINVAL, f"UNMAP_DMA flags {flags:#x}")
        iova, size = int(p.iova), int(p.size)
        dma = self.container.dma
        if flags & DmaUnmapFlag.ALL:
            if iova or size:
                raise oserror(errno.EINVAL, "UNMAP_DMA ALL with iova/size")
            targets = list(dma.starts)
        else:
            if not size or (iova | size) & (PAGE - 1) or iova + size - 1 > U64_MAX:
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
        p.size = done
        return 0

    def release(self, pid: int) -> None:
        c = self.container
        with c.lock:
            if not c.groups:
                c.iommu = None
                c.dma.clear()


_TYPE1_EXTENSIONS = {
    Extension.TYPE1_IOMMU,
    Extension.TYPE1v2_IOMMU,
    Extension.UNMAP_ALL,
    Extension.UPDATE_VADDR,
    Extension.DMA_CC_IOMMU,
}


class GroupFile(File):
    kind = "group"

    def __init__(self, machine: Machine, group: Group) -> None:
        super().__init__(machine)
        self.group = group
        self.container_file: ContainerFile | None = None
        self.device_files = 0

    def link(self) -> str:
        return f"/dev/vfio/{self.group.id}"

    def device(self) -> Device | None:
        return self.group.devices[0] if self.group.devices else None

    def ioctl_names(self, request: int) -> tuple[str, ...]:
        n = _GROUP_IOCTLS.get(request)
        return (n,) if n else ()

    def ioctl(self, proc: SimProcess, request: int, arg: Any) -> int:
        g = self.group
        if not g.devices:
            raise oserror(errno.ENODEV, f"group {g.id} is gone")
        if request == Ioctl.GROUP_GET_STATUS:
            a = addr_of(arg)
            check_argsz(a, "struct vfio_group_status", "flags")
            flags = 0
            if g.container is not None:
                flags = GroupFlag.VIABLE | GroupFlag.CONTAINER_SET
            elif g.viable():
                flags = GroupFlag.VIABLE
            as_struct(a, "struct vfio_group_status").flags = flags
            return 0
        if request == Ioctl.GROUP_SET_CONTAINER:
            cfd = int(ffi.cast("int32_t *", addr_of(arg))[0])
            f = proc.file_of(cfd)
            if not isinstance(f, ContainerFile):
                raise oserror(errno.EINVAL, f"fd {cfd} is not a container")
            with g.lock:
                if g.container is not None:
                    raise oserror(errno.EINVAL, "group already has a container")
                if not g.viable():
                    # iommu_group_claim_dma_owner(): a kernel driver owns DMA in the group
                    raise oserror(errno.EPERM, f"group {g.id} is not viable")
                c = f.container
                with c.lock:
                    c.groups.append(g)
                g.container = c
            return 0
        if request == Ioctl.GROUP_UNSET_CONTAINER:
            with g.lock:
                if g.container is None:
                    raise oserror(errno.EINVAL, "group has no container")
                if self.device_files:
                    raise oserror(errno.EBUSY, "device files are open")
                c = g.container
                g.container = None
            c.detach(g)
            return 0
        if request == Ioctl.GROUP_GET_DEVICE_FD:
            name = ffi.string(ffi.cast("char *", addr_of(arg)), PAGE).decode(errors="replace")
            dev = self._find(name)
            self.machine.host.match_device_name(dev, name)  # vf_token= (vfio_pci_core_match)
            if g.container is None or g.container.iommu is None:
                raise oserror(errno.EINVAL, "group has no container with an IOMMU set")
            df = DeviceFile(self.machine, dev, self, None)
            self.machine.device_open(dev, proc.pid)
            with self.machine.files_lock:
                self.refs += 1  # device files hold a reference to the group file
                self.device_files += 1
                dev.dma = g.container.dma
            return proc.install(df)
        raise oserror(errno.ENOTTY, f"group ioctl {request:#x}")

    def _find(self, name: str) -> Device:
        base = name.split()[0] if name.split() else ""
        for d in self.group.devices:
            if d.addr == base and not d.removed and d.driver == "vfio-pci":
                return d
        raise oserror(errno.ENODEV, f"no device {name!r} in group {self.group.id}")

    def release(self, pid: int) -> None:
        g = self.group
        with g.lock:
            c = g.container
            g.container = None
            if g.opened_file is self:
                g.opened_file = None
        if c is not None:
            c.detach(g)


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
            return 0
        if request == Ioctl.IOMMUFD_IOAS_IOVA_RANGES:
            _, p = self._cmd(arg, "struct iommu_ioas_iova_ranges", "out_iova_alignment")
            ioas = self._ioas(int(p.ioas_id))
            ranges = iova_ranges(self.machine) if ioas.users else ((0, U64_MAX),)
            n = int(p.num_iovas)
            p.out_iova_alignment = PAGE
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
            _, p = self._cmd(arg, "struct iommu_option", "val64")
            if p.option_id not in (lib.IOMMU_OPTION_RLIMIT_MODE, lib.IOMMU_OPTION_HUGE_PAGES):
                raise oserror(errno.EOPNOTSUPP, "IOMMU_OPTION id")
            if p.op == lib.IOMMU_OPTION_OP_GET:
                p.val64 = 1 if p.option_id == lib.IOMMU_OPTION_HUGE_PAGES else 0
            elif p.op != lib.IOMMU_OPTION_OP_SET:
                raise oserror(errno.EOPNOTSUPP, "IOMMU_OPTION op")
            return 0
        raise oserror(errno.ENOTTY, f"iommufd ioctl {request:#x}")

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
        if flags & IoasMapFlag.FIXED_IOVA:
            iova = int(p.iova)
            if iova & (PAGE - 1) or (va ^ iova) & (PAGE - 1):
                raise oserror(errno.EINVAL, "IOAS_MAP iova alignment")
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


class DeviceFile(File):
    """A VFIO device file, from GROUP_GET_DEVICE_FD or a /dev/vfio/devices/vfioN open."""

    kind = "device"

    def __init__(
        self, machine: Machine, dev: Device, group_file: GroupFile | None, cdev_minor: int | None
    ) -> None:
        super().__init__(machine)
        self.dev = dev
        self.group_file = group_file
        self.cdev_minor = cdev_minor
        self.bound = group_file is not None  # df->access_granted
        self.ictx: IommufdCtx | None = None
        self.ioas: Ioas | None = None
        self.devid = 0
        self.lock = threading.Lock()

    def link(self) -> str:
        if self.cdev_minor is not None:
            return f"/dev/vfio/devices/vfio{self.cdev_minor}"
        return "anon_inode:[vfio-device]"

    def fdinfo(self) -> str:
        from mock_vfio.sysfs import device_syspath

        if self.machine.kernel_version < FDINFO_SYSPATH:
            return ""
        return f"vfio-device-syspath: {device_syspath(self.machine, self.dev)}\n"

    def device(self) -> Device | None:
        return self.dev

    def ioctl_names(self, request: int) -> tuple[str, ...]:
        n = _DEVICE_IOCTLS.get(request)
        return (n,) if n else ()

    # --- ioctls --------------------------------------------------------------------------

    def ioctl(self, proc: SimProcess, request: int, arg: Any) -> int:
        dev = self.dev
        if request == Ioctl.DEVICE_BIND_IOMMUFD:
            return self._bind(proc, arg)
        if not self.bound:
            # vfio_device_fops_unl_ioctl: nothing but BIND before access is granted
            raise oserror(errno.EINVAL, "device file not bound to an iommufd")
        if dev.removed:
            raise oserror(errno.ENODEV, f"{dev.addr} was removed")
        handler = self._handlers().get(request)
        if handler is None:
            raise oserror(errno.ENOTTY, f"device ioctl {request:#x}")
        if dev.low_power and (request != Ioctl.DEVICE_FEATURE or dev.pm_wake_fd is not None):
            # Every ioctl resumes the device (vfio_device_pm_runtime_get); one that entered
            # with a wakeup eventfd leaves low power then and signals it.  Only the features
            # of a plain entry are modelled as leaving it suspended.
            dev.runtime_resume()
        return handler(proc, arg)

    def _handlers(self) -> dict[int, Callable[[SimProcess, Any], int]]:
        handlers = self._all_handlers()
        version = self.machine.kernel_version
        if version < IOEVENTFD:
            del handlers[Ioctl.DEVICE_IOEVENTFD]
        if version < DEVICE_FEATURE:
            del handlers[Ioctl.DEVICE_FEATURE]
        return handlers

    def _all_handlers(self) -> dict[int, Callable[[SimProcess, Any], int]]:
        return {
            Ioctl.DEVICE_GET_INFO: self._get_info,
            Ioctl.DEVICE_GET_REGION_INFO: self._region_info,
            Ioctl.DEVICE_GET_IRQ_INFO: self._irq_info,
            Ioctl.DEVICE_SET_IRQS: self._set_irqs,
            Ioctl.DEVICE_RESET: self._reset,
            Ioctl.DEVICE_GET_PCI_HOT_RESET_INFO: self._hot_reset_info,
            Ioctl.DEVICE_PCI_HOT_RESET: self._hot_reset,
            Ioctl.DEVICE_FEATURE: self._feature,
            Ioctl.DEVICE_IOEVENTFD: self._ioeventfd,
            Ioctl.DEVICE_ATTACH_IOMMUFD_PT: self._attach,
            Ioctl.DEVICE_DETACH_IOMMUFD_PT: self._detach,
        }

    def _get_info(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_info"
        check_argsz(a, ct, "num_irqs")
        p = as_struct(a, ct)
        flags = DeviceFlag.PCI
        if self.dev.reset_works:
            flags |= DeviceFlag.RESET
        p.flags = flags
        p.num_regions = VFIO_PCI_NUM_REGIONS
        p.num_irqs = NUM_IRQS
        return 0

    def region(self, index: int) -> tuple[int, int, CapChain]:
        """(flags, size, caps) of a region, or EINVAL for one the device lacks."""
        dev = self.dev
        caps = CapChain()
        if index == CONFIG_INDEX:
            return RegionFlag.READ | RegionFlag.WRITE, dev.spec.cfg_size, caps
        if index == ROM_INDEX:
            size = dev.spec.rom_size
            return (RegionFlag.READ if size else 0), size, caps
        if index == VGA_INDEX:
            if not dev.spec.vga:
                raise oserror(errno.EINVAL, "no VGA region")
            return RegionFlag.READ | RegionFlag.WRITE, 0xC0000 - 0xA0000, caps
        if not 0 <= index < ROM_INDEX:
            raise oserror(errno.EINVAL, f"region index {index}")
        bar = dev.bar(index)
        if bar is None:
            return 0, 0, caps
        flags = RegionFlag.READ | RegionFlag.WRITE
        if not bar.is_io and bar.size >= PAGE:
            flags |= RegionFlag.MMAP
            m = dev.spec.msix
            if m is not None and m.table_bar == index:
                if self.machine.msix_sparse:
                    areas = self._sparse_areas(bar.size)
                    body = struct.pack("<II", len(areas), 0)
                    body += b"".join(struct.pack("<QQ", o, s) for o, s in areas)
                    caps.add(RegionCap.SPARSE_MMAP, 1, body)
                else:
                    caps.add(RegionCap.MSIX_MAPPABLE, 1, b"")
            if caps.buf:
                flags |= RegionFlag.CAPS
        return flags, bar.size, caps

    def _sparse_areas(self, size: int) -> list[tuple[int, int]]:
        m = self.dev.spec.msix
        assert m is not None
        start = m.table_offset & ~(PAGE - 1)
        end = (m.table_offset + m.count * 16 + PAGE - 1) & ~(PAGE - 1)
        areas = []
        if start > 0:
            areas.append((0, start))
        if end < size:
            areas.append((end, size - end))
        return areas

    def _region_info(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_region_info"
        argsz, _ = check_argsz(a, ct, "offset")
        p = as_struct(a, ct)
        index = int(p.index)
        flags, size, caps = self.region(index)
        new_argsz, cap_offset, _ = put_caps(a, argsz, sizeof(ct), caps)
        p.flags = flags
        p.size = size
        p.offset = index << OFFSET_SHIFT
        p.cap_offset = cap_offset
        p.argsz = new_argsz
        return 0

    def irq_count(self, index: int) -> int:
        dev = self.dev
        if index == INTX:
            return 1 if dev.config.data[0x3D] else 0
        if index == MSI:
            return dev.config.msi_count()
        if index == MSIX:
            return dev.config.msix_count()
        if index == ERR:
            return 1 if dev.spec.pcie else 0
        if index == REQ:
            return 1
        return 0

    def _irq_info(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_irq_info"
        check_argsz(a, ct, "count")
        p = as_struct(a, ct)
        index = int(p.index)
        if index >= NUM_IRQS or (index == ERR and not self.dev.spec.pcie):
            raise oserror(errno.EINVAL, f"irq index {index}")
        flags = IrqInfoFlag.EVENTFD
        if index == INTX:
            flags |= IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
        elif index != MSIX or not self.machine.msix_dynamic:
            flags |= IrqInfoFlag.NORESIZE
        p.flags = flags
        p.count = self.irq_count(index)
        return 0

    def _set_irqs(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_irq_set"
        argsz, minsz = check_argsz(a, ct, "count")
        p = as_struct(a, ct)
        flags, index, start, count = int(p.flags), int(p.index), int(p.start), int(p.count)
        if (
            index >= NUM_IRQS
            or count >= 0xFFFFFFFF - start
            or flags & ~(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK)
        ):
            raise oserror(errno.EINVAL, "SET_IRQS header")
        max_count = self.irq_count(index)
        if start >= max_count or start + count > max_count:
            raise oserror(errno.EINVAL, f"SET_IRQS vectors {start}+{count} of {max_count}")
        dtype = flags & IRQ_SET_DATA_TYPE_MASK
        sizes = {
            int(IrqSetFlag.DATA_NONE): 0,
            int(IrqSetFlag.DATA_BOOL): 1,
            int(IrqSetFlag.DATA_EVENTFD): 4,
        }
        size = sizes.get(dtype)
        if size is None:
            raise oserror(errno.EINVAL, "SET_IRQS data type")
        if size and argsz - minsz < count * size:
            raise oserror(errno.EINVAL, "SET_IRQS data shorter than count")
        data = read_mem(a + minsz, count * size) if size else b""
        action = flags & IRQ_SET_ACTION_TYPE_MASK
        return self.machine_irqs(proc, index, start, count, dtype, action, data)

    def machine_irqs(
        self,
        proc: SimProcess,
        index: int,
        start: int,
        count: int,
        dtype: int,
        action: int,
        data: bytes,
    ) -> int:
        dev = self.dev
        if action not in (
            IrqSetFlag.ACTION_MASK,
            IrqSetFlag.ACTION_UNMASK,
            IrqSetFlag.ACTION_TRIGGER,
        ):
            raise oserror(errno.EINVAL, "SET_IRQS action")
        if index in (MSI, MSIX, ERR, REQ) and action != IrqSetFlag.ACTION_TRIGGER:
            raise oserror(errno.ENOTTY, "only TRIGGER for this index")
        if index == INTX and action != IrqSetFlag.ACTION_TRIGGER:
            return self._intx_mask_unmask(proc, start, count, dtype, action, data)
        if dtype == IrqSetFlag.DATA_NONE and count == 0:
            self._disable(index)
            return 0
        if dtype == IrqSetFlag.DATA_EVENTFD:
            fds = struct.unpack(f"<{count}i", data)
            dups = [self._eventfd(proc, fd) for fd in fds]
            with dev.lock:
                if index in (INTX, MSI, MSIX):
                    error = None
                    if dev.irq_type not in (None, index):
                        error = "another interrupt mode is enabled"
                    elif dev.irq_type is None:
                        dev.irq_nvec = start + count  # vfio_msi_enable allocates start+count
                    elif index != INTX and start + count > dev.irq_nvec:
                        # vfio_msi_set_vector_signal: a vector past those allocated exists
                        # only where MSI-X allocates dynamically (6.5+); else EINVAL.
                        if index == MSIX and self.machine.msix_dynamic:
                            dev.irq_nvec = start + count
                        else:
                            error = f"vectors {start}+{count} past the {dev.irq_nvec} enabled"
                    if error is not None:
                        for d in dups:
                            if d is not None:
                                os.close(d)
                        raise oserror(errno.EINVAL, error)
                    dev.irq_type = index
                for i, d in enumerate(dups):
                    old = dev.irq_fds.pop((index, start + i), None)
                    if old is not None:
                        os.close(old)
                    if d is not None:
                        dev.irq_fds[(index, start + i)] = d
                if index in (INTX, MSI, MSIX) and not any(k[0] == index for k in dev.irq_fds):
                    dev.irq_type = None
                    dev.irq_nvec = 0
            if index == INTX:
                dev.set_intx(dev.intx_level)  # a line already asserted fires once requested
            return 0
        # DATA_NONE / DATA_BOOL trigger: loopback, fire the vectors' eventfds
        for i in range(count):
            if dtype == IrqSetFlag.DATA_BOOL and not data[i]:
                continue
            with dev.lock:
                fd = dev.irq_fds.get((index, start + i))
                if fd is not None:
                    os.eventfd_write(fd, 1)
        return 0

    def _intx_mask_unmask(
        self, proc: SimProcess, start: int, count: int, dtype: int, action: int, data: bytes
    ) -> int:
        """vfio_pci_set_intx_mask / _unmask: INTx enabled, vector 0 only; an unmask
        eventfd is listened to (vfio_virqfd_enable), -1 removes it; a mask eventfd is ENOTTY."""
        dev = self.dev
        if dev.irq_type != INTX or start != 0 or count != 1:
            raise oserror(errno.EINVAL, "INTx is not enabled, or not vector 0 alone")
        unmask = action == IrqSetFlag.ACTION_UNMASK
        if dtype == IrqSetFlag.DATA_EVENTFD:
            if not unmask:
                raise oserror(errno.ENOTTY, "mask eventfd")
            (fd,) = struct.unpack("<i", data)
            dev.set_intx_unmask_fd(self._eventfd(proc, fd) if fd >= 0 else None)
            return 0
        if dtype == IrqSetFlag.DATA_BOOL and not data[0]:
            return 0
        if unmask:
            dev.intx_unmask()
        else:
            with dev.lock:
                dev.intx_masked = True
        return 0

    def _disable(self, index: int) -> None:
        dev = self.dev
        if index == INTX:
            dev.set_intx_unmask_fd(None)
        with dev.lock:
            for key in [k for k in dev.irq_fds if k[0] == index]:
                os.close(dev.irq_fds.pop(key))
            if dev.irq_type == index:
                dev.irq_type = None
                dev.intx_masked = False
                dev.irq_nvec = 0
                # vfio_intx_disable / vfio_msi_disable: every vector of the index torn down
                self.machine.counters.add(f"irq_disable_{index}")

    def _eventfd(self, proc: SimProcess, fd: int) -> int | None:
        if fd == -1:
            return None
        if fd < 0 or proc.is_sim_fd(fd):
            raise oserror(errno.EBADF if fd < 0 else errno.EINVAL, f"eventfd {fd}")
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            raise oserror(errno.EBADF, f"eventfd {fd}") from e
        if kind != "anon_inode:[eventfd]":
            raise oserror(errno.EINVAL, f"fd {fd} is not an eventfd")
        return os.dup(fd)

    def _reset(self, proc: SimProcess, arg: Any) -> int:
        dev = self.dev
        if not dev.reset_works:
            raise oserror(errno.EINVAL, f"{dev.addr} has no function reset")
        if not self.machine.function_reset(dev, "ioctl"):
            raise oserror(errno.ENOTTY, "reset")
        return 0

    def _affected(self) -> list[Device]:
        dev = self.dev
        if not self.machine.can_bus_reset(dev):
            raise oserror(errno.ENODEV, f"{dev.addr} cannot be bus reset")
        return self.machine.bus_devices(dev)

    def _hot_reset_info(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_pci_hot_reset_info"
        argsz, _ = check_argsz(a, ct, "count")
        p = as_struct(a, ct)
        devs = self._affected()
        flags = 0
        ids: list[int] = []
        if self.cdev_minor is not None:
            flags |= HotResetFlag.DEV_ID
            all_owned = True
            for d in devs:
                i = self._devid_for(d)
                if i is None:
                    all_owned = False
                    ids.append(VFIO_PCI_DEVID_NOT_OWNED)
                else:
                    ids.append(i)
            if all_owned:
                flags |= HotResetFlag.DEV_ID_OWNED
        else:
            ids = [d.group_id for d in devs]
        p.flags = flags
        need = sizeof(ct) + len(devs) * sizeof("struct vfio_pci_dependent_device")
        if argsz < need:
            p.count = len(devs)
            raise oserror(errno.ENOSPC, f"hot reset info needs {need} bytes")
        p.count = len(devs)
        for i, d in enumerate(devs):
            _, bus, slot, fn = (
                int(x, 16) for x in (d.addr[:4], d.addr[5:7], d.addr[8:10], d.addr[11])
            )
            p.devices[i].group_id = ids[i] & 0xFFFFFFFF
            p.devices[i].segment = int(d.addr[:4], 16)
            p.devices[i].bus = bus
            p.devices[i].devfn = (slot << 3) | fn
        return 0

    def _devid_for(self, d: Device) -> int | None:
        """``vfio_iommufd_get_dev_id``: our devid, OWNED via the group, or not owned."""
        ictx = self.ictx
        if ictx is None:
            return None
        for devid, bound in ictx.devices.items():
            if bound is d:
                return devid
        if d.ictx is None:
            grp = self.machine.groups.get(d.group_id)
            if grp is not None and any(x.ictx is ictx for x in grp.devices):
                return VFIO_PCI_DEVID_OWNED
        return None

    def _hot_reset(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_pci_hot_reset"
        argsz, minsz = check_argsz(a, ct, "count")
        p = as_struct(a, ct)
        if p.flags:
            raise oserror(errno.EINVAL, "HOT_RESET flags")
        count = int(p.count)
        # a zero-length array is only for cdev-opened devices, and only there
        if bool(count) == (self.cdev_minor is not None):
            raise oserror(errno.EINVAL, "group fds for group opens, none for cdev opens")
        devs = self._affected()
        groups: set[int] = set()
        if count:
            if argsz - minsz < count * 4 or count > len(devs):
                raise oserror(errno.EINVAL, "HOT_RESET group fd array")
            for fd in struct.unpack(f"<{count}i", read_mem(a + minsz, count * 4)):
                if fd >= 0 and not proc.is_sim_fd(fd) and os.path.exists(f"/proc/self/fd/{fd}"):
                    # an open file of another kind (an eventfd): vfio_file_is_group() fails
                    raise oserror(errno.EINVAL, f"fd {fd} is not a VFIO group")
                f = proc.file_of(fd)
                if not isinstance(f, GroupFile):
                    raise oserror(errno.EINVAL, f"fd {fd} is not a VFIO group")
                groups.add(f.group.id)
        dev = self.dev
        ds = dev.devset
        assert ds is not None
        with self.machine.locked(dev, "hot_reset"):
            if self.machine.devset_resettable(ds) is None:
                raise oserror(errno.EINVAL, f"device set {ds.name} cannot be bus reset")
            for d in ds.devices:
                owned = (self._devid_for(d) is not None) if not count else d.group_id in groups
                if not owned:
                    raise oserror(errno.EINVAL, f"{d.addr} is not owned by the caller")
            busy = [d for d in ds.devices if not d.reset_lock.acquire(blocking=False)]
            if busy:
                for d in ds.devices:
                    if d not in busy:
                        d.reset_lock.release()
                raise oserror(errno.EBUSY, "a device of the set is being reset")
            try:
                from mock_vfio.trace import Event, now, thread_name

                h0 = now()
                self.machine.bus_reset(ds, "hot_reset")
                self.machine.record(
                    Event("hot_reset", h0, now(), thread_name(), dev.addr, ds.name, pid=proc.pid)
                )
                self.machine.counters.add("hot_resets")
            finally:
                for d in ds.devices:
                    d.reset_lock.release()
        return 0

    def _feature(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_feature"
        argsz, minsz = check_argsz(a, ct, "flags")
        p = as_struct(a, ct)
        flags = int(p.flags)
        known = FEATURE_MASK | FeatureFlag.GET | FeatureFlag.SET | FeatureFlag.PROBE
        if flags & ~known:
            raise oserror(errno.EINVAL, f"FEATURE flags {flags:#x}")
        if not flags & FeatureFlag.PROBE and flags & FeatureFlag.SET and flags & FeatureFlag.GET:
            raise oserror(errno.EINVAL, "FEATURE GET and SET together")
        feature = flags & FEATURE_MASK
        payload = argsz - minsz
        dev = self.dev
        low_power = (
            Feature.LOW_POWER_ENTRY,
            Feature.LOW_POWER_ENTRY_WITH_WAKEUP,
            Feature.LOW_POWER_EXIT,
        )
        if feature in low_power and self.machine.kernel_version >= LOW_POWER:
            return self._low_power(proc, feature, flags, payload, a + minsz)
        if feature == Feature.BUS_MASTER and self.machine.bus_master_feature:
            if not self._check_feature(flags, payload, FeatureFlag.SET, 4):
                return 0
            op = u32_at(a + minsz)
            if op not in (0, 1):
                raise oserror(errno.EINVAL, "BUS_MASTER op")
            cmd = dev.config.command()
            dev.set_command(cmd | 4 if op else cmd & ~4, "user")
            return 0
        if feature == Feature.PCI_VF_TOKEN and dev.spec.sriov_total and not dev.is_vf:
            # vfio_pci_core_feature_token: a PF's vf_token, SET only, a 16-byte UUID
            if not self._check_feature(flags, payload, FeatureFlag.SET, 16):
                return 0
            raw = bytes(ffi.buffer(ffi.cast("char *", a + minsz), 16))
            self.machine.host.set_vf_token(dev, raw)
            return 0
        # vfio_pci_core_ioctl_feature: anything else is not implemented here
        raise oserror(errno.ENOTTY, f"feature {feature}")

    def _low_power(
        self, proc: SimProcess, feature: int, flags: int, payload: int, data: int
    ) -> int:
        """vfio_pci_core_pm_entry, _entry_with_wakeup (a struct with the eventfd) and _exit."""
        wakeup = feature == Feature.LOW_POWER_ENTRY_WITH_WAKEUP
        if not self._check_feature(flags, payload, FeatureFlag.SET, 8 if wakeup else 0):
            return 0
        dev = self.dev
        if feature == Feature.LOW_POWER_EXIT:
            dev.runtime_resume()  # the ioctl resumed it already when entered with a wakeup
            return 0
        wake = None
        if wakeup:
            (fd,) = struct.unpack("<i", bytes(ffi.buffer(ffi.cast("char *", data), 4)))
            if fd < 0:
                raise oserror(errno.EINVAL, "wakeup eventfd")
            wake = self._eventfd(proc, fd)
        with dev.lock:
            if dev.low_power:  # vfio_pci_runtime_pm_entry: already engaged
                if wake is not None:
                    os.close(wake)
                raise oserror(errno.EINVAL, "low power entry twice")
            dev.pm_wake_fd = wake
        dev.low_power = True
        dev.config.set_power_state(3)
        return 0

    @staticmethod
    def _check_feature(flags: int, payload: int, supported: int, minsz: int) -> bool:
        """``vfio_check_feature``: False for a successful PROBE, True to go on."""
        if flags & (FeatureFlag.GET | FeatureFlag.SET) & ~supported:
            raise oserror(errno.EINVAL, "unsupported feature operation")
        if flags & FeatureFlag.PROBE:
            return False
        if not flags & (FeatureFlag.GET | FeatureFlag.SET):
            raise oserror(errno.EINVAL, "feature without GET or SET")
        if payload < minsz:
            raise oserror(errno.EINVAL, "feature payload too short")
        return True

    def _ioeventfd(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_ioeventfd"
        check_argsz(a, ct, "fd")
        p = as_struct(a, ct)
        size, fd = int(p.flags), int(p.fd)
        if size & ~0xF or bin(size).count("1") != 1 or fd < -1:
            raise oserror(errno.EINVAL, "IOEVENTFD size flags or fd")
        offset = int(p.offset)
        bar, pos, data = offset >> OFFSET_SHIFT, offset & OFFSET_MASK, int(p.data)
        return self._ioeventfd_set(proc, bar, pos, data, size, fd)

    def _ioeventfd_set(
        self, proc: SimProcess, bar: int, pos: int, data: int, size: int, fd: int
    ) -> int:
        """vfio_pci_ioeventfd: BARs only, inside the BAR and outside the MSI-X table;
        (bar, offset, data, size) names the registration, fd -1 removes it."""
        dev = self.dev
        spec = dev.bar(bar) if 0 <= bar < ROM_INDEX else None
        if spec is None or pos + size > spec.size:
            raise oserror(errno.EINVAL, f"ioeventfd outside BAR {bar}")
        m = dev.spec.msix
        if m is not None and m.table_bar == bar:
            end = m.table_offset + m.count * 16
            if not (pos + size <= m.table_offset or pos >= end):
                raise oserror(errno.EINVAL, "ioeventfd on the MSI-X table")
        key = (bar, pos, data, size)
        with dev.lock:
            old = dev.ioeventfds.get(key)
            if old is not None and fd >= 0:
                raise oserror(errno.EEXIST, "ioeventfd already registered")
            if old is None and fd < 0:
                raise oserror(errno.ENODEV, "no such ioeventfd")
            if old is None and len(dev.ioeventfds) >= IOEVENTFD_MAX:
                raise oserror(errno.ENOSPC, f"{IOEVENTFD_MAX} ioeventfds")
            if old is not None:
                del dev.ioeventfds[key]
        if old is not None:
            self.machine.virqfds.remove(old)
            return 0
        ours = self._eventfd(proc, fd)
        assert ours is not None
        with dev.lock:
            dev.ioeventfds[key] = ours
        value = data.to_bytes(size, "little")
        self.machine.virqfds.add(ours, lambda: self._ioeventfd_write(bar, pos, value))
        return 0

    def _ioeventfd_write(self, bar: int, pos: int, value: bytes) -> None:
        """vfio_pci_ioeventfd_thread: the write, dropped while memory decoding is off."""
        dev = self.dev
        spec = dev.bar(bar)
        if dev.removed or spec is None or (not spec.is_io and not dev.memory_enabled()):
            return
        self.machine.counters.add("ioeventfd_writes")
        if dev.model is not None and dev.model.mmio_write(bar, pos, value):
            return
        dev.bar_memory(bar)[pos : pos + len(value)] = value

    def _bind(self, proc: SimProcess, arg: Any) -> int:
        if self.group_file is not None:
            raise oserror(errno.EINVAL, "BIND_IOMMUFD on a group-opened device")
        a = addr_of(arg)
        ct = "struct vfio_device_bind_iommufd"
        check_argsz(a, ct, "out_devid")
        p = as_struct(a, ct)
        token = self.machine.host.bind_token(a, int(p.flags))  # EINVAL for unknown flags
        with self.lock:
            if self.bound:
                raise oserror(errno.EINVAL, "already bound")
            f = proc.file_of(int(p.iommufd))
            if not isinstance(f, IommufdFile):
                raise oserror(errno.EINVAL, "not an iommufd")
            dev = self.dev
            if dev.removed:
                raise oserror(errno.ENODEV, dev.addr)
            grp = self.machine.groups.get(dev.group_id)
            if grp is None:
                raise oserror(errno.ENODEV, dev.addr)
            with grp.lock:
                # vfio_device_block_group: the group path and the cdev path exclude each other
                if grp.opened_file is not None:
                    raise oserror(errno.EBUSY, f"group {grp.id} is open")
                grp.cdev_binds += 1
            try:
                self.machine.host.check_cdev_token(dev, token)
                with self.machine.locked(dev, "open"):
                    # vfio_df_open: only the group path may open a device twice
                    if dev.open_count:
                        raise oserror(errno.EINVAL, f"{dev.addr} is already open")
                self.machine.device_open(dev, proc.pid)
            except OSError:
                with grp.lock:
                    grp.cdev_binds -= 1
                raise
            devid = f.ctx.alloc_id()
            f.ctx.devices[devid] = dev
            dev.ictx = f.ctx
            dev.devid = devid
            self.ictx = f.ctx
            self.devid = devid
            self.bound = True
            dev.cdev_open = True
            p.out_devid = devid
        return 0

    def _attach(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_attach_iommufd_pt"
        check_argsz(a, ct, "pt_id")
        p = as_struct(a, ct)
        if p.flags or self.ictx is None:
            raise oserror(errno.EINVAL, "ATTACH_IOMMUFD_PT")
        ioas = self.ictx.ioas.get(int(p.pt_id))
        if ioas is None:
            raise oserror(errno.ENOENT, f"no IOAS {int(p.pt_id)}")
        with self.lock:
            if self.ioas is not None and self.ioas is not ioas:
                raise oserror(errno.EINVAL, "already attached to another IOAS")
            if self.ioas is None:
                ioas.users += 1
            self.ioas = ioas
            self.dev.dma = ioas.dma
        return 0

    def _detach(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_detach_iommufd_pt"
        check_argsz(a, ct, "flags")
        if as_struct(a, ct).flags or self.ictx is None:
            raise oserror(errno.EINVAL, "DETACH_IOMMUFD_PT")
        with self.lock:
            if self.ioas is not None:
                self.ioas.users -= 1
            self.ioas = None
            self.dev.dma = None
        return 0

    # --- region access -----------------------------------------------------------------

    def _check_access(self) -> Device:
        if not self.bound:
            raise oserror(errno.EINVAL, "device file not bound")
        if self.dev.removed:
            raise oserror(errno.ENODEV, f"{self.dev.addr} was removed")
        return self.dev

    def pread(self, proc: SimProcess, size: int, offset: int) -> bytes:
        dev = self._check_access()
        index, pos = offset >> OFFSET_SHIFT, offset & OFFSET_MASK
        if index == CONFIG_INDEX:
            cfg = dev.config
            if pos >= dev.spec.cfg_size:
                raise oserror(errno.EINVAL, "config offset")
            return cfg.read(pos, min(size, dev.spec.cfg_size - pos))
        if index == ROM_INDEX:
            rs = dev.spec.rom_size
            if not rs or pos >= rs:
                raise oserror(errno.EINVAL, "ROM")
            rom = bytearray(min(size, rs - pos))
            sig = b"\x55\xaa"
            for i in range(len(rom)):
                if pos + i < 2:
                    rom[i] = sig[pos + i]
            return bytes(rom)
        mem, n = self._bar_range(index, pos, size)
        if dev.model is not None:
            hooked = dev.model.mmio_read(index, pos, n)
            if hooked is not None:
                return hooked
        data = bytearray(mem[pos : pos + n])
        self._mask_msix(index, pos, data, None)
        return bytes(data)

    def pwrite(self, proc: SimProcess, data: bytes, offset: int) -> int:
        dev = self._check_access()
        index, pos = offset >> OFFSET_SHIFT, offset & OFFSET_MASK
        if index == CONFIG_INDEX:
            if pos >= dev.spec.cfg_size:
                raise oserror(errno.EINVAL, "config offset")
            n = min(len(data), dev.spec.cfg_size - pos)
            dev.config.user_write(pos, data[:n])
            return n
        if index == ROM_INDEX:
            raise oserror(errno.EINVAL, "ROM is read-only")
        mem, n = self._bar_range(index, pos, len(data))
        chunk = bytearray(data[:n])
        if self._mask_msix(index, pos, chunk, mem):
            return n
        if dev.model is not None and dev.model.mmio_write(index, pos, bytes(chunk)):
            return n
        mem[pos : pos + n] = bytes(chunk)
        return n

    def _bar_range(self, index: int, pos: int, size: int) -> tuple[Any, int]:
        dev = self.dev
        if index == VGA_INDEX and dev.spec.vga:
            raise oserror(errno.EINVAL, "VGA access is not modelled")
        bar = dev.bar(index) if 0 <= index < ROM_INDEX else None
        if bar is None:
            raise oserror(errno.EINVAL, f"region {index}")
        if pos >= bar.size:
            raise oserror(errno.EINVAL, "offset past the BAR")
        if dev.low_power:
            raise oserror(errno.EIO, "device is in low power")
        if not bar.is_io and not dev.memory_enabled():
            # __vfio_pci_memory_enabled(): BAR access with decoding off faults
            raise oserror(errno.EIO, "PCI_COMMAND_MEMORY is clear")
        return dev.bar_memory(index), min(size, bar.size - pos)

    def _mask_msix(self, index: int, pos: int, data: bytearray, mem: Any) -> bool:
        """vfio_pci_bar_rw skips the MSI-X table: reads fill 0xff, writes drop."""
        m = self.dev.spec.msix
        if m is None or m.table_bar != index:
            return False
        lo, hi = m.table_offset, m.table_offset + m.count * 16
        touched = False
        for i in range(len(data)):
            if lo <= pos + i < hi:
                touched = True
                if mem is None:
                    data[i] = 0xFF
                else:
                    data[i] = mem[pos + i]
        if mem is not None and touched:
            mem[pos : pos + len(data)] = bytes(data)
            return True
        return False

    def mmap(self, proc: SimProcess, length: int, offset: int, prot: int, flags: int) -> int:
        dev = self._check_access()
        if not flags & lib.MAP_SHARED:
            raise oserror(errno.EINVAL, "vfio mmap must be MAP_SHARED")
        if length <= 0 or offset & (PAGE - 1):
            raise oserror(errno.EINVAL, "mmap length/offset")
        index, pos = offset >> OFFSET_SHIFT, offset & OFFSET_MASK
        if index >= ROM_INDEX:
            raise oserror(errno.EINVAL, f"region {index} is not mappable")
        fl, size, _ = self.region(index)
        if not fl & RegionFlag.MMAP:
            raise oserror(errno.EINVAL, f"region {index} is not mappable")
        phys = (size + PAGE - 1) & ~(PAGE - 1)
        if pos + length > phys:
            raise oserror(errno.EINVAL, "mmap past the BAR")
        msix = dev.spec.msix
        sparse = self.machine.msix_sparse and msix is not None and msix.table_bar == index
        if sparse and not any(
            o <= pos and pos + length <= o + s for o, s in self._sparse_areas(size)
        ):
            raise oserror(errno.EINVAL, "mmap over the MSI-X table")
        return dev.bar_address(index) + pos

    def release(self, pid: int) -> None:
        dev = self.dev
        if self.group_file is not None or self.bound:
            self.machine.device_close(dev, pid)
        if self.ioas is not None:
            self.ioas.users -= 1
            self.ioas = None
        if self.ictx is not None:
            self.ictx.devices.pop(self.devid, None)
            dev.ictx = None
            dev.cdev_open = False
            grp = self.machine.groups.get(dev.group_id)
            if grp is not None:
                with grp.lock:
                    grp.cdev_binds -= 1
        gf = self.group_file
        if gf is not None:
            with self.machine.files_lock:
                gf.device_files -= 1
            self.machine.put_file(gf, pid)


class PidFile(File):
    kind = "pidfd"

    def __init__(self, machine: Machine, target: SimProcess) -> None:
        super().__init__(machine)
        self.target = target

    def link(self) -> str:
        return "anon_inode:[pidfd]"

    def fdinfo(self) -> str:
        return f"Pid:\t{self.target.pid if self.target.alive else -1}\n"

    def poll_events(self) -> int:
        import select

        return select.POLLIN if not self.target.alive else 0


class SysfsConfigFile(File):
    """``/sys/bus/pci/devices/<addr>/config`` opened for pread."""

    kind = "sysfs"

    def __init__(self, machine: Machine, dev: Device, path: str) -> None:
        super().__init__(machine)
        self.dev = dev
        self.path = path

    def link(self) -> str:
        return self.path

    def device(self) -> Device | None:
        return self.dev

    def pread(self, proc: SimProcess, size: int, offset: int) -> bytes:
        if self.dev.removed:
            raise oserror(errno.ENODEV, self.dev.addr)
        cs = self.dev.spec.cfg_size
        if offset >= cs:
            return b""
        return self.dev.config.read(offset, min(size, cs - offset))
