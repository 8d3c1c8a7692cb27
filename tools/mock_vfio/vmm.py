"""A simulated VMM that sets its devices up the way QEMU 7.x does at start-up.

It drives a :class:`SimProcess` with raw syscalls (open, ioctl, pread,
pwrite, mmap), not through vfiopy's object model, so what it leaves behind
is what a real QEMU leaves: a container, one file per group, one device file
per device (or, with iommufd, the iommufd and one cdev file per device),
guest RAM mapped for DMA, the mmappable BARs mapped, and BAR registers that
the guest side rewrote through the device file's config region.  That last
part matters to tools that look at a running VMM: the BARs a VMM's device
file reads back no longer match the host's ``resource`` file.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Sequence
from typing import Literal

from mock_vfio.file import File
from mock_vfio.machine import Machine
from mock_vfio.pci import Device
from mock_vfio.process import SimProcess
from mock_vfio.trace import oserror
from mock_vfio.uapi import page_align
from vfiopy._uapi import (
    MAP_ANONYMOUS,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    Extension,
    GroupFlag,
    Ioctl,
    IommuType,
    PciRegion,
    RegionCap,
    RegionFlag,
    Struct,
    cap_chain,
    ffi,
    lib,
)
from vfiopy.kernel import O_RDWR

# The guest RAM a VMM maps for DMA: enough to be seen, small enough to be cheap.
GUEST_RAM = 256 * 1024
# PCI_BASE_ADDRESS_0 .. PCI_BASE_ADDRESS_5
BAR_REGISTERS = range(0x10, 0x28, 4)

Backend = Literal["container", "iommufd"]


def spawn_qemu(
    machine: Machine,
    addresses: Sequence[str],
    *,
    backend: Backend = "container",
    dup_device_fds: Iterable[str] = (),
    name: str = "qemu-system-x86_64",
    process: SimProcess | None = None,
) -> SimProcess:
    """A new process that opened ``addresses`` as QEMU does and keeps every fd open.

    For each address in ``dup_device_fds`` the process also holds a second fd
    for the same device file, as when a management layer passed the fd in.
    With ``process`` (a VMM made here) the devices are hot-plugged into it:
    its container, groups or iommufd are reused.
    A failing step ends the process (releasing what it opened) and raises.
    """
    dups = set(dup_device_fds)
    unknown = dups - set(addresses)
    if unknown:
        raise ValueError(f"dup_device_fds names devices not opened: {sorted(unknown)}")
    if backend not in ("container", "iommufd"):
        raise ValueError(f"backend must be 'container' or 'iommufd', not {backend!r}")
    p = machine.spawn(name=name) if process is None else process
    try:
        if addresses:
            opened = (_container if backend == "container" else _iommufd)(p, list(addresses))
            for addr, fd in opened:
                _setup_device(p, fd)
                if addr in dups:
                    p.dup(fd)
    except BaseException:
        if process is None:
            p.exit()
        raise
    return p


# --- the two ways to a device fd -------------------------------------------------------------


def _container(p: SimProcess, addresses: list[str]) -> list[tuple[str, int]]:
    """vfio_connect_container + vfio_get_device: one container, a file per group."""
    held = _held(p)
    c = held.get("/dev/vfio/vfio")
    if c is None:
        c = p.open("/dev/vfio/vfio", O_RDWR)
        if p.ioctl(c, Ioctl.GET_API_VERSION) != lib.VFIO_API_VERSION:
            raise oserror(errno.EINVAL, "VFIO API version mismatch")
    v2 = p.ioctl(c, Ioctl.CHECK_EXTENSION, Extension.TYPE1v2_IOMMU)
    groups = {
        int(link.rsplit("/", 1)[1]): fd
        for link, fd in held.items()
        if link.startswith("/dev/vfio/") and link.rsplit("/", 1)[1].isdigit()
    }
    iommu_set = bool(groups)
    opened: list[tuple[str, int]] = []
    for addr in addresses:
        gid = int(p.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group").rsplit("/", 1)[1])
        if gid not in groups:
            g = p.open(f"/dev/vfio/{gid}", O_RDWR)
            status = Struct("struct vfio_group_status")
            p.ioctl(g, Ioctl.GROUP_GET_STATUS, status.p)
            if not status.p.flags & GroupFlag.VIABLE:
                raise oserror(errno.EPERM, f"group {gid} is not viable")
            p.ioctl(g, Ioctl.GROUP_SET_CONTAINER, ffi.new("int *", c))
            if not iommu_set:
                # the IOMMU is set, and guest RAM mapped, once the first group is in
                iommu_set = True
                p.ioctl(c, Ioctl.SET_IOMMU, IommuType.TYPE1v2 if v2 else IommuType.TYPE1)
                dma = Struct("struct vfio_iommu_type1_dma_map")
                dma.p.flags = lib.VFIO_DMA_MAP_FLAG_READ | lib.VFIO_DMA_MAP_FLAG_WRITE
                dma.p.vaddr, dma.p.iova, dma.p.size = _guest_ram(p), 0, GUEST_RAM
                p.ioctl(c, Ioctl.IOMMU_MAP_DMA, dma.p)
            groups[gid] = g
        fd = p.ioctl(groups[gid], Ioctl.GROUP_GET_DEVICE_FD, ffi.new("char[]", addr.encode()))
        opened.append((addr, fd))
    return opened


def _iommufd(p: SimProcess, addresses: list[str]) -> list[tuple[str, int]]:
    """The iommufd backend: /dev/iommu, one IOAS, a bound and attached cdev per device."""
    if "/dev/iommu" in _held(p):
        raise ValueError("hot-plug into an iommufd VMM is not modelled")
    ictx = p.open("/dev/iommu", O_RDWR)
    ioas = Struct("struct iommu_ioas_alloc")
    p.ioctl(ictx, Ioctl.IOMMUFD_IOAS_ALLOC, ioas.p)
    opened: list[tuple[str, int]] = []
    for addr in addresses:
        (cdev,) = p.listdir(f"/sys/bus/pci/devices/{addr}/vfio-dev")
        fd = p.open(f"/dev/vfio/devices/{cdev}", O_RDWR)
        bind = Struct("struct vfio_device_bind_iommufd")
        bind.p.iommufd = ictx
        p.ioctl(fd, Ioctl.DEVICE_BIND_IOMMUFD, bind.p)
        attach = Struct("struct vfio_device_attach_iommufd_pt")
        attach.p.pt_id = ioas.p.out_ioas_id
        p.ioctl(fd, Ioctl.DEVICE_ATTACH_IOMMUFD_PT, attach.p)
        if not opened:
            dma = Struct("struct iommu_ioas_map")
            dma.p.ioas_id = ioas.p.out_ioas_id
            dma.p.flags = (
                lib.IOMMU_IOAS_MAP_FIXED_IOVA
                | lib.IOMMU_IOAS_MAP_READABLE
                | lib.IOMMU_IOAS_MAP_WRITEABLE
            )
            dma.p.user_va, dma.p.iova, dma.p.length = _guest_ram(p), 0, GUEST_RAM
            p.ioctl(ictx, Ioctl.IOMMUFD_IOAS_MAP, dma.p)
        opened.append((addr, fd))
    return opened


def _held(p: SimProcess) -> dict[str, int]:
    """Link -> fd of the container, groups and iommufd ``p`` holds already."""
    return {f.link(): fd for fd, f in sorted(p.fd_table().items()) if f.kind != "device"}


def unplug_qemu(p: SimProcess, address: str) -> None:
    """What QEMU does on a completed ``device_del``: unmap the device's BARs, close its
    device fds, and close its group when no other device of the group is held."""
    table = p.fd_table()
    files = {id(f) for f in table.values() if _device_of(f, address)}
    if not files:
        raise ValueError(f"{address} is not held by pid {p.getpid()}")
    group = p.machine.device(address).group_id
    p.unmap_file(lambda f: id(f) in files)
    for fd, f in table.items():
        if id(f) in files:
            p.close(fd)
    others = [d for d in map(_device_of, p.fd_table().values()) if d and d.group_id == group]
    for fd, f in table.items():
        if not others and f.link() == f"/dev/vfio/{group}":
            p.close(fd)


def _device_of(f: File, address: str | None = None) -> Device | None:
    """The device of a device file (``address``'s only, when given), else None."""
    dev = f.device() if f.kind == "device" else None
    return dev if dev is not None and address in (None, dev.addr) else None


def _guest_ram(p: SimProcess) -> int:
    # Anonymous memory: the host's own, mapped for as long as the process lives.
    return p.mmap(-1, GUEST_RAM, 0, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS)


# --- per device -------------------------------------------------------------------------------


def _setup_device(p: SimProcess, fd: int) -> None:
    """vfio_populate_device + vfio_bars_register, then the guest side's BAR writes."""
    info = Struct("struct vfio_device_info")
    p.ioctl(fd, Ioctl.DEVICE_GET_INFO, info.p)
    cfg = _region_info(p, fd, PciRegion.CONFIG)
    p.pread(fd, min(int(cfg.p.size), 4096), int(cfg.p.offset))
    for index in range(PciRegion.BAR0, PciRegion.BAR5 + 1):
        _map_bar(p, fd, _region_info(p, fd, index))
    # QEMU presents the guest cleared BARs and passes its programming through the
    # config region: the device file's BARs stop matching the host's resources.
    zero = struct.pack("<I", 0)
    for reg in BAR_REGISTERS:
        p.pwrite(fd, zero, int(cfg.p.offset) + reg)


def _region_info(p: SimProcess, fd: int, index: int) -> Struct:
    """GET_REGION_INFO, asked again with the argsz the kernel wants for the caps."""
    ri = Struct("struct vfio_region_info")
    ri.p.index = index
    p.ioctl(fd, Ioctl.DEVICE_GET_REGION_INFO, ri.p)
    if ri.p.argsz > ri.size:
        ri = Struct("struct vfio_region_info", int(ri.p.argsz))
        ri.p.index = index
        p.ioctl(fd, Ioctl.DEVICE_GET_REGION_INFO, ri.p)
    return ri


def _map_bar(p: SimProcess, fd: int, ri: Struct) -> None:
    """Map the whole BAR, or only its sparse areas when the kernel lists some."""
    if not ri.p.flags & RegionFlag.MMAP or not ri.p.size:
        return
    areas = [(0, int(ri.p.size))]
    if ri.p.flags & RegionFlag.CAPS:
        for cap in cap_chain(ri, int(ri.p.cap_offset)):
            if cap.id == RegionCap.SPARSE_MMAP:
                sp = ri.at("struct vfio_region_info_cap_sparse_mmap", cap.offset)
                areas = [(int(a.offset), int(a.size)) for a in sp.areas[0 : sp.nr_areas]]
    for offset, size in areas:
        if size:
            p.mmap(
                fd, page_align(size), int(ri.p.offset) + offset, PROT_READ | PROT_WRITE, MAP_SHARED
            )
