"""VFIO semantics of the simulator: errnos, sysfs, interrupts, edu, iommufd, processes."""

from __future__ import annotations

import errno
import os
import signal
import struct
import threading
import time

import pytest
from mock_vfio import SIM_FD_BASE, Machine, load_topology
from mock_vfio.pci_driver import remove_device

from vfiopy._uapi import (
    PAGE_SIZE,
    DeviceFlag,
    GroupFlag,
    Ioctl,
    IommuInfoCap,
    IommuInfoFlag,
    IrqSetFlag,
    PciIrq,
    PciRegion,
    RegionCap,
    RegionFlag,
    Struct,
    cap_chain,
    ffi,
    lib,
)
from vfiopy.kernel import O_RDWR

from .conftest import EDU, NICS, PAIR, SCALE, group_of, open_container_group, open_device


def _errno(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.errno or 0


# --- errnos ---------------------------------------------------------------------------------


def test_argsz_and_flags_are_checked(qemu: Machine) -> None:
    p = qemu.spawn()
    _, g = open_container_group(p, NICS[0])
    st = Struct("struct vfio_group_status")
    st.p.argsz = 4
    assert _errno(p.ioctl, g, Ioctl.GROUP_GET_STATUS, st.p) == errno.EINVAL
    st.p.argsz = st.size
    p.ioctl(g, Ioctl.GROUP_GET_STATUS, st.p)
    assert st.p.flags == GroupFlag.VIABLE | GroupFlag.CONTAINER_SET
    d = p.ioctl(g, Ioctl.GROUP_GET_DEVICE_FD, ffi.new("char[]", NICS[0].encode()))
    irq = Struct("struct vfio_irq_set")
    irq.p.flags = 1 << 12  # unknown flag
    irq.p.index = PciIrq.MSI
    assert _errno(p.ioctl, d, Ioctl.DEVICE_SET_IRQS, irq.p) == errno.EINVAL
    info = Struct("struct vfio_device_info")
    info.p.argsz = 8
    assert _errno(p.ioctl, d, Ioctl.DEVICE_GET_INFO, info.p) == errno.EINVAL
    info.p.argsz = info.size
    p.ioctl(d, Ioctl.DEVICE_GET_INFO, info.p)
    assert info.p.flags & DeviceFlag.RESET and info.p.num_regions == 9
    feat = Struct("struct vfio_device_feature")
    feat.p.flags = (1 << 16) | 10  # GET of BUS_MASTER: a 6.1-like kernel lacks it
    assert _errno(p.ioctl, d, Ioctl.DEVICE_FEATURE, feat.p) == errno.ENOTTY


def test_closed_fd_is_ebadf_and_groups_are_exclusive(qemu: Machine) -> None:
    p, q = qemu.spawn(), qemu.spawn()
    _, g = open_container_group(p, NICS[0])
    assert g >= SIM_FD_BASE
    assert _errno(q.open, f"/dev/vfio/{group_of(q, NICS[0])}", O_RDWR) == errno.EBUSY
    assert _errno(p.open, f"/dev/vfio/{group_of(p, NICS[0])}", O_RDWR) == errno.EBUSY
    p.close(g)
    assert _errno(p.ioctl, g, Ioctl.GROUP_GET_STATUS, Struct("struct vfio_group_status").p) == (
        errno.EBADF
    )
    assert _errno(p.close, g) == errno.EBADF
    q.close(q.open(f"/dev/vfio/{group_of(q, NICS[0])}", O_RDWR))


def test_container_and_group_state_machine(qemu: Machine) -> None:
    p = qemu.spawn()
    c = p.open("/dev/vfio/vfio", O_RDWR)
    assert p.ioctl(c, Ioctl.GET_API_VERSION) == lib.VFIO_API_VERSION
    assert _errno(p.ioctl, c, Ioctl.SET_IOMMU, 3) == errno.EINVAL  # no group yet
    g = p.open(f"/dev/vfio/{group_of(p, NICS[0])}", O_RDWR)
    name = ffi.new("char[]", NICS[0].encode())
    assert _errno(p.ioctl, g, Ioctl.GROUP_GET_DEVICE_FD, name) == errno.EINVAL  # no container
    p.ioctl(g, Ioctl.GROUP_SET_CONTAINER, ffi.new("int *", c))
    assert _errno(p.ioctl, g, Ioctl.GROUP_GET_DEVICE_FD, name) == errno.EINVAL  # no IOMMU
    p.ioctl(c, Ioctl.SET_IOMMU, 3)
    assert _errno(p.ioctl, g, Ioctl.GROUP_GET_DEVICE_FD, ffi.new("char[]", b"0000:99:00.0")) == (
        errno.ENODEV
    )
    d = p.ioctl(g, Ioctl.GROUP_GET_DEVICE_FD, name)
    assert _errno(p.ioctl, g, Ioctl.GROUP_UNSET_CONTAINER) == errno.EBUSY
    p.close(d)
    p.ioctl(g, Ioctl.GROUP_UNSET_CONTAINER)
    # IOMMU info with a short buffer: argsz grows, no chain copied
    p.ioctl(g, Ioctl.GROUP_SET_CONTAINER, ffi.new("int *", c))
    p.ioctl(c, Ioctl.SET_IOMMU, 3)
    info = Struct("struct vfio_iommu_type1_info")
    p.ioctl(c, Ioctl.IOMMU_GET_INFO, info.p)
    assert info.p.flags & IommuInfoFlag.CAPS and info.p.cap_offset == 0
    big = Struct("struct vfio_iommu_type1_info", int(info.p.argsz))
    p.ioctl(c, Ioctl.IOMMU_GET_INFO, big.p)
    ids = [cap.id for cap in cap_chain(big, int(big.p.cap_offset))]
    assert IommuInfoCap.IOVA_RANGE in ids and IommuInfoCap.DMA_AVAIL in ids
    # DMA map bookkeeping
    buf = ffi.new("char[]", 2 * PAGE_SIZE)
    va = (int(ffi.cast("uintptr_t", buf)) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    m = Struct("struct vfio_iommu_type1_dma_map")
    m.p.flags, m.p.vaddr, m.p.iova, m.p.size = 3, va, 0x100000, PAGE_SIZE
    p.ioctl(c, Ioctl.IOMMU_MAP_DMA, m.p)
    assert _errno(p.ioctl, c, Ioctl.IOMMU_MAP_DMA, m.p) == errno.EEXIST
    m.p.iova = 0x100001
    assert _errno(p.ioctl, c, Ioctl.IOMMU_MAP_DMA, m.p) == errno.EINVAL
    u = Struct("struct vfio_iommu_type1_dma_unmap")
    u.p.flags = lib.VFIO_DMA_UNMAP_FLAG_ALL
    p.ioctl(c, Ioctl.IOMMU_UNMAP_DMA, u.p)
    assert u.p.size == PAGE_SIZE


def test_non_viable_group_cannot_join_a_container(qemu: Machine) -> None:
    p = qemu.spawn()
    p.write_text(f"/sys/bus/pci/devices/{PAIR[1]}/driver/unbind", PAIR[1])
    p.write_text(f"/sys/bus/pci/devices/{PAIR[1]}/driver_override", "e1000e")
    p.write_text("/sys/bus/pci/drivers_probe", PAIR[1])
    assert p.readlink(f"/sys/bus/pci/devices/{PAIR[1]}/driver").endswith("/e1000e")
    c = p.open("/dev/vfio/vfio", O_RDWR)
    g = p.open(f"/dev/vfio/{group_of(p, PAIR[0])}", O_RDWR)
    st = Struct("struct vfio_group_status")
    p.ioctl(g, Ioctl.GROUP_GET_STATUS, st.p)
    assert not st.p.flags & GroupFlag.VIABLE
    assert _errno(p.ioctl, g, Ioctl.GROUP_SET_CONTAINER, ffi.new("int *", c)) == errno.EPERM


def test_removed_device_gives_enodev_and_release_completes(qemu: Machine) -> None:
    p = qemu.spawn()
    _, _, d = open_device(p, NICS[1])
    remove_device(qemu, NICS[1])
    assert _errno(p.ioctl, d, Ioctl.DEVICE_GET_INFO, Struct("struct vfio_device_info").p) == (
        errno.ENODEV
    )
    assert _errno(p.pread, d, 4, PciRegion.CONFIG << 40) == errno.ENODEV
    # the kernel's removal waits for the vfio user, so the sysfs entry stays until release
    assert p.exists(f"/sys/bus/pci/devices/{NICS[1]}")
    p.exit()
    assert [e.device for e in qemu.events("release")] == [NICS[1]]
    assert not p.exists(f"/sys/bus/pci/devices/{NICS[1]}")
    assert qemu.open_fds() == 0


def test_fault_injection(qemu: Machine) -> None:
    p = qemu.spawn()
    _, _, d = open_device(p, NICS[0])
    qemu.faults.fail("VFIO_DEVICE_GET_INFO", errno.EIO, device=NICS[0])
    info = Struct("struct vfio_device_info")
    assert _errno(p.ioctl, d, Ioctl.DEVICE_GET_INFO, info.p) == errno.EIO
    p.ioctl(d, Ioctl.DEVICE_GET_INFO, info.p)  # count=1: once only
    qemu.faults.fail("close", errno.EINTR)
    assert _errno(p.close, d) == errno.EINTR
    assert len(qemu.events("release")) == 1  # close(2) releases even when it fails
    qemu.faults.slow_reset(NICS[2], 0.5)
    open_device(p, NICS[2])
    assert qemu.resets(device=NICS[2])[0].duration >= 0.5 * SCALE


# --- sysfs ----------------------------------------------------------------------------------


def test_sysfs_answers_what_a_library_asks(qemu: Machine) -> None:
    p = qemu.spawn()
    base = f"/sys/bus/pci/devices/{NICS[0]}"
    assert p.readlink(base) == f"../../../devices/pci0000:00/0000:00:02.0/{NICS[0]}"
    assert p.readlink(f"{base}/iommu_group") == "../../../../kernel/iommu_groups/13"
    assert p.readlink(f"{base}/driver").endswith("/bus/pci/drivers/vfio-pci")
    assert p.read_text(f"{base}/reset_method") == "bus\n"
    assert p.read_text(f"{base}/vendor") == "0x8086\n"
    assert p.read_text(f"{base}/driver_override") == "(null)\n"
    assert p.listdir("/sys/kernel/iommu_groups/19/devices") == PAIR
    assert p.listdir(f"{base}/vfio-dev") == ["vfio0"]
    assert p.exists("/dev/vfio/devices/vfio0") and p.exists("/dev/iommu")
    assert p.access(f"{base}/driver_override", os.W_OK)
    assert not p.access(f"{base}/vendor", os.W_OK)
    assert NICS[0] in p.listdir("/sys/bus/pci/drivers/vfio-pci")
    fd = p.open(f"{base}/config", os.O_RDONLY)
    assert struct.unpack("<HH", p.pread(fd, 4, 0)) == (0x8086, 0x10D3)
    p.close(fd)


def test_driver_override_and_drivers_probe_rebind(qemu: Machine) -> None:
    p = qemu.spawn()
    base = f"/sys/bus/pci/devices/{NICS[3]}"
    p.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", NICS[3])
    assert not p.exists(f"{base}/driver")
    assert str(group_of(p, NICS[3])) not in p.listdir("/dev/vfio")
    p.write_text("/sys/bus/pci/drivers_probe", NICS[3])
    assert p.readlink(f"{base}/driver").endswith("/e1000e")  # its native driver
    p.write_text(f"{base}/driver_override", "vfio-pci\n")
    p.write_text(f"{base}/driver/unbind", NICS[3])
    p.write_text("/sys/bus/pci/drivers_probe", NICS[3])
    assert p.readlink(f"{base}/driver").endswith("/vfio-pci")
    assert p.read_text(f"{base}/driver_override") == "vfio-pci\n"
    # unbinding a device in use waits for its release, asking the user meanwhile
    _, _, d = open_device(p, NICS[3])
    unbind = threading.Thread(
        target=p.write_text, args=("/sys/bus/pci/drivers/vfio-pci/unbind", NICS[3])
    )
    unbind.start()
    while not qemu.events("request"):
        unbind.join(0.01)
    p.close(d)
    unbind.join()
    assert not p.exists(f"{base}/driver")
    kinds = [e.kind for e in qemu.trace if e.device == NICS[3]]
    last = len(kinds) - 1 - kinds[::-1].index("release")
    assert "request" in kinds[:last] and kinds[last + 1 :].count("unbind") == 1


def test_reset_method_write(qemu: Machine) -> None:
    p = qemu.spawn()
    rm = f"/sys/bus/pci/devices/{NICS[0]}/reset_method"
    p.write_text(rm, "default")
    assert p.read_text(rm) == "pm bus\n"
    assert _errno(p.write_text, rm, "bogus") == errno.EINVAL
    p.write_text(rm, "pm")
    open_device(p, NICS[0])
    assert qemu.resets(device=NICS[0])[0].method == "pm"


def test_proc_fd_links(qemu: Machine) -> None:
    p = qemu.spawn()
    c, g, d = open_device(p, NICS[0])
    fds = p.listdir(f"/proc/{p.getpid()}/fd")
    assert fds == [str(c), str(g), str(d)]
    assert p.readlink(f"/proc/{p.pid}/fd/{g}") == "/dev/vfio/13"
    assert p.readlink(f"/proc/{p.pid}/fd/{c}") == "/dev/vfio/vfio"
    assert p.readlink(f"/proc/self/fd/{d}") == "anon_inode:[vfio-device]"


def test_sriov_vfs_scale() -> None:
    m = Machine(load_topology("vfs:2048"), time_scale=0, kernel_version=(6, 17))
    p = m.spawn()
    assert len(m.devsets) == 2048
    vf = "0000:09:00.0"
    assert p.readlink(f"/sys/bus/pci/devices/{vf}/physfn") == "../0000:01:00.0"
    assert p.read_text("/sys/bus/pci/devices/0000:01:00.0/sriov_numvfs") == "2048\n"
    open_device(p, vf)
    assert [e.method for e in m.resets()] == ["flr"]
    p.exit()
    assert [e.method for e in m.resets()] == ["flr", "flr"]
    m.close()


# --- regions, interrupts and edu --------------------------------------------------------------


def test_regions_config_virtualisation_and_mmap_limits(qemu: Machine) -> None:
    p = qemu.spawn()
    _, _, d = open_device(p, NICS[0])
    ri = Struct("struct vfio_region_info")
    ri.p.index = PciRegion.BAR3
    p.ioctl(d, Ioctl.DEVICE_GET_REGION_INFO, ri.p)
    assert ri.p.flags & RegionFlag.CAPS and ri.p.cap_offset == 0
    full = Struct("struct vfio_region_info", int(ri.p.argsz))
    full.p.index = PciRegion.BAR3
    p.ioctl(d, Ioctl.DEVICE_GET_REGION_INFO, full.p)
    assert [c.id for c in cap_chain(full, int(full.p.cap_offset))] == [RegionCap.MSIX_MAPPABLE]
    assert full.p.offset == 3 << 40 and full.p.size == 0x4000
    ri2 = Struct("struct vfio_region_info")
    ri2.p.index = PciRegion.BAR2
    p.ioctl(d, Ioctl.DEVICE_GET_REGION_INFO, ri2.p)
    assert not ri2.p.flags & RegionFlag.MMAP  # I/O port BAR
    prot, shared = lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED
    assert _errno(p.mmap, d, PAGE_SIZE, 2 << 40, prot, shared) == errno.EINVAL
    assert _errno(p.mmap, d, 0x40000, 0, prot, shared) == errno.EINVAL  # past the BAR
    cfg = PciRegion.CONFIG << 40
    p.pwrite(d, b"\xff\xff\xff\xff", cfg + 0x10)
    assert struct.unpack("<I", p.pread(d, 4, cfg + 0x10))[0] == 0xFFFE0000  # 128 KiB sizing
    p.pwrite(d, b"\x00\x00", cfg + 0x04)  # memory decoding off
    assert _errno(p.pread, d, 4, 0) == errno.EIO
    assert qemu.events("command_memory")[-1].cause == "user"


def test_irq_eventfd_really_fires(qemu: Machine) -> None:
    p = qemu.spawn()
    _, _, d = open_device(p, NICS[0])
    ii = Struct("struct vfio_irq_info")
    ii.p.index = PciIrq.MSIX
    p.ioctl(d, Ioctl.DEVICE_GET_IRQ_INFO, ii.p)
    assert ii.p.count == 5
    efd = p.eventfd(0, os.EFD_NONBLOCK)
    s = Struct("struct vfio_irq_set", 20 + 4)
    s.p.flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
    s.p.index, s.p.start, s.p.count = PciIrq.MSIX, 2, 1
    ffi.cast("int32_t *", s.p.data)[0] = efd
    p.ioctl(d, Ioctl.DEVICE_SET_IRQS, s.p)
    p.close(efd)  # the kernel holds its own reference to the eventfd context
    efd2 = os.dup(qemu.device(NICS[0]).irq_fds[(PciIrq.MSIX, 2)])
    loop = Struct("struct vfio_irq_set")
    loop.p.flags = IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER
    loop.p.index, loop.p.start, loop.p.count = PciIrq.MSIX, 2, 1
    p.ioctl(d, Ioctl.DEVICE_SET_IRQS, loop.p)
    assert p.poll([(efd2, lib.POLLIN if hasattr(lib, "POLLIN") else 1)], 1000)
    assert os.eventfd_read(efd2) == 1
    os.close(efd2)


def _edu_wait_dma_idle(p: object, d: int) -> None:
    deadline = time.monotonic() + 2.0
    while struct.unpack("<I", p.pread(d, 4, 0x98))[0] & 1:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the DMA never finished"
        time.sleep(0.001)


def test_edu_factorial_irq_and_dma(qemu: Machine) -> None:
    p = qemu.spawn()
    c, _, d = open_device(p, EDU)
    bar = p.mmap(d, 0x100000, 0, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED)
    assert lib.vfiopy_read32(bar) == 0x010000ED
    p.pwrite(d, struct.pack("<I", 0x1234), 0x04)
    assert struct.unpack("<I", p.pread(d, 4, 0x04))[0] == ~0x1234 & 0xFFFFFFFF
    cfg = PciRegion.CONFIG << 40
    command = struct.unpack("<H", p.pread(d, 2, cfg + 0x04))[0]
    p.pwrite(d, struct.pack("<H", command | 0x4), cfg + 0x04)  # bus master: MSI and DMA
    efd = p.eventfd(0, 0)
    s = Struct("struct vfio_irq_set", 24)
    s.p.flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
    s.p.index, s.p.start, s.p.count = PciIrq.MSI, 0, 1
    ffi.cast("int32_t *", s.p.data)[0] = efd
    p.ioctl(d, Ioctl.DEVICE_SET_IRQS, s.p)
    lib.vfiopy_write32(bar + 0x20, 0x80)  # raise an interrupt when the factorial is done
    lib.vfiopy_write32(bar + 0x08, 5)  # through the mapping: the device thread sees it
    assert p.poll([(efd, 1)], 2000)
    assert os.eventfd_read(efd) == 1
    assert lib.vfiopy_read32(bar + 0x08) == 120
    assert lib.vfiopy_read32(bar + 0x24) & 1
    # DMA as a driver checks it: RAM page 0 -> device buffer -> RAM page 1
    buf = ffi.new("char[]", 3 * PAGE_SIZE)
    va = (int(ffi.cast("uintptr_t", buf)) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    ffi.memmove(ffi.cast("char *", va), b"hello edu", 9)
    m = Struct("struct vfio_iommu_type1_dma_map")
    m.p.flags, m.p.vaddr, m.p.iova, m.p.size = 3, va, 0x200000, 2 * PAGE_SIZE
    p.ioctl(c, Ioctl.IOMMU_MAP_DMA, m.p)
    p.pwrite(d, struct.pack("<QQQQ", 0x200000, 0x40000, 9, 1), 0x80)
    _edu_wait_dma_idle(p, d)
    # The buffer is in the device's DMA space only: BAR0 does not decode 0x40000.
    assert p.pread(d, 9, 0x40000) == b"\xff" * 9
    p.pwrite(d, struct.pack("<QQQQ", 0x40000, 0x200000 + PAGE_SIZE, 9, 3), 0x80)
    _edu_wait_dma_idle(p, d)
    assert bytes(ffi.buffer(ffi.cast("char *", va + PAGE_SIZE), 9)) == b"hello edu"
    assert qemu.counters["dma_transfers"] == 2
    p.munmap(bar, 0x100000)
    p.close(efd)


# --- iommufd and cdev -----------------------------------------------------------------------------


def test_cdev_bind_attach_and_hot_reset_info(qemu: Machine) -> None:
    p = qemu.spawn()
    d = p.open("/dev/vfio/devices/vfio0", O_RDWR)
    info = Struct("struct vfio_device_info")
    assert _errno(p.ioctl, d, Ioctl.DEVICE_GET_INFO, info.p) == errno.EINVAL  # not bound yet
    ictx = p.open("/dev/iommu", O_RDWR)
    b = Struct("struct vfio_device_bind_iommufd")
    b.p.iommufd = ictx
    p.ioctl(d, Ioctl.DEVICE_BIND_IOMMUFD, b.p)
    assert b.p.out_devid > 0
    assert qemu.resets(cause="open")  # binding opens (and resets) the device
    # the group path is now blocked
    assert _errno(p.open, f"/dev/vfio/{group_of(p, NICS[0])}", O_RDWR) == errno.EBUSY
    a = Struct("struct iommu_ioas_alloc")
    p.ioctl(ictx, Ioctl.IOMMUFD_IOAS_ALLOC, a.p)
    at = Struct("struct vfio_device_attach_iommufd_pt")
    at.p.pt_id = a.p.out_ioas_id
    p.ioctl(d, Ioctl.DEVICE_ATTACH_IOMMUFD_PT, at.p)
    buf = ffi.new("char[]", 2 * PAGE_SIZE)
    mp = Struct("struct iommu_ioas_map")
    mp.p.ioas_id = a.p.out_ioas_id
    mp.p.flags = lib.IOMMU_IOAS_MAP_READABLE | lib.IOMMU_IOAS_MAP_WRITEABLE
    mp.p.user_va, mp.p.length = int(ffi.cast("uintptr_t", buf)) & ~(PAGE_SIZE - 1), PAGE_SIZE
    p.ioctl(ictx, Ioctl.IOMMUFD_IOAS_MAP, mp.p)
    assert mp.p.iova != 0
    p.ioctl(d, Ioctl.DEVICE_GET_INFO, info.p)
    hi = Struct("struct vfio_pci_hot_reset_info", 12 + 8)
    p.ioctl(d, Ioctl.DEVICE_GET_PCI_HOT_RESET_INFO, hi.p)
    assert (
        hi.p.flags == lib.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | lib.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
    )
    assert hi.p.devices[0].group_id == b.p.out_devid
    hr = Struct("struct vfio_pci_hot_reset")
    p.ioctl(d, Ioctl.DEVICE_PCI_HOT_RESET, hr.p)  # zero-length form: owned by our iommufd
    assert qemu.unique_resets(cause="hot_reset")
    p.exit()
    assert qemu.open_fds() == 0


# --- processes ------------------------------------------------------------------------------------


def test_pidfd_getfd_signal_and_exit(qemu: Machine) -> None:
    vmm = qemu.spawn(name="vmm")
    locked = qemu.spawn(name="locked", ptraceable=False)
    _, _, d = open_device(vmm, NICS[0])
    helper = qemu.spawn(name="helper")
    pidfd = helper.pidfd_open(vmm.pid)
    copy = helper.pidfd_getfd(pidfd, d)
    assert _errno(helper.pidfd_getfd, helper.pidfd_open(locked.pid), 0) == errno.EPERM
    assert _errno(helper.pidfd_open, 99999) == errno.ESRCH
    helper.pidfd_send_signal(pidfd, signal.SIGKILL)
    assert not vmm.alive and signal.SIGKILL in vmm.signals
    assert helper.poll([(pidfd, 1)], 0)
    assert qemu.events("release") == []  # the helper's copy keeps the device open
    helper.close(copy)
    assert [e.device for e in qemu.events("release")] == [NICS[0]]
    t = qemu.spawn()
    open_device(t, NICS[1])
    helper.pidfd_send_signal(helper.pidfd_open(t.pid), signal.SIGTERM)
    assert t.wait(5)
    deadline = time.monotonic() + 5
    while len(qemu.events("release")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(qemu.events("release")) == 2


def test_anonymous_memory_is_the_hosts_and_munmap_releases_it(qemu: Machine) -> None:
    from vfiopy._uapi import MAP_ANONYMOUS, MAP_SHARED, PROT_READ, PROT_WRITE

    p = qemu.spawn()
    addr = p.mmap(-1, 8192, 0, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS)

    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return any(int(line.split("-", 1)[0], 16) == addr for line in f)

    assert mapped()
    p.munmap(addr, 8192)
    assert not mapped()
