"""The QEMU-like simulated VMM: the fds, mappings and BAR state it leaves behind."""

from __future__ import annotations

import errno
import struct
from collections import Counter

import pytest
from mock_vfio import Machine, SimProcess, load_topology, spawn_qemu

from vfiopy._uapi import PciRegion

from .conftest import NICS, PAIR, SCALE, group_of

DEVICE_LINK = "anon_inode:[vfio-device]"


def links(p: SimProcess) -> dict[int, str]:
    return {int(fd): p.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in p.listdir(f"/proc/{p.pid}/fd")}


def device_fds(p: SimProcess) -> list[int]:
    return sorted(fd for fd, link in links(p).items() if link == DEVICE_LINK)


def bar_addresses(p: SimProcess, fd: int) -> list[int]:
    """The address bits of the six BAR registers, read through the device fd."""
    cfg = PciRegion.CONFIG << 40
    dwords = struct.unpack("<6I", p.pread(fd, 24, cfg + 0x10))
    return [d & ~(0x3 if d & 1 else 0xF) for d in dwords]


def sysfs_bar_starts(p: SimProcess, addr: str) -> list[int]:
    lines = p.read_text(f"/sys/bus/pci/devices/{addr}/resource").splitlines()[:6]
    return [int(line.split()[0], 16) for line in lines]


def test_container_fds(qemu: Machine) -> None:
    vmm = spawn_qemu(qemu, [NICS[0], *PAIR])
    assert vmm.name == "qemu-system-x86_64" and vmm.alive
    seen = Counter(links(vmm).values())
    # the pair shares one group: one group file, two device files
    assert seen == Counter(
        {
            "/dev/vfio/vfio": 1,
            f"/dev/vfio/{group_of(vmm, NICS[0])}": 1,
            f"/dev/vfio/{group_of(vmm, PAIR[0])}": 1,
            DEVICE_LINK: 3,
        }
    )
    assert group_of(vmm, PAIR[0]) == group_of(vmm, PAIR[1])
    assert qemu.counters["dma_maps"] == 1
    assert qemu.counters["opens"] == 3


def test_bars_through_the_fd_are_cleared_but_sysfs_keeps_them(qemu: Machine) -> None:
    vmm = spawn_qemu(qemu, [NICS[0]])
    (fd,) = device_fds(vmm)
    starts = sysfs_bar_starts(vmm, NICS[0])
    assert any(starts)
    assert bar_addresses(vmm, fd) == [0] * 6


def test_mappable_bars_are_mapped(qemu: Machine) -> None:
    vmm = spawn_qemu(qemu, [NICS[0]])
    (fd,) = device_fds(vmm)
    mappable = [b for b in qemu.device(NICS[0]).spec.bars if not b.is_io and b.size >= 4096]
    # files() lists each fd's file and then each mapping's
    maps = vmm.files()[len(vmm.fd_table()) :]
    assert mappable and len(maps) == len(mappable)
    assert all(f is vmm.file_of(fd) for f in maps)


def test_sparse_msix_bar_is_mapped_around_the_table() -> None:
    m = Machine(load_topology("qemu-vmtest"), time_scale=SCALE, msix_sparse=True)
    try:
        # mapping the MSI-X BAR whole would fail: only the areas around the table are mapped
        vmm = spawn_qemu(m, [NICS[0]])
        assert len(device_fds(vmm)) == 1
        assert len(vmm.files()) > len(vmm.fd_table())
    finally:
        m.close()


def test_dup_is_the_same_file_under_kcmp(qemu: Machine) -> None:
    vmm = spawn_qemu(qemu, [NICS[0], NICS[1]], dup_device_fds=[NICS[1]])
    fds = device_fds(vmm)
    assert len(fds) == 3
    same = [
        (a, b) for a in fds for b in fds if a < b and vmm.kcmp_file(vmm.pid, vmm.pid, a, b) == 0
    ]
    assert len(same) == 1
    # and so it is for another process comparing its pidfd_getfd copy
    mgr = qemu.spawn("mgr")
    copy = mgr.pidfd_getfd(mgr.pidfd_open(vmm.pid), same[0][0])
    assert [fd for fd in fds if mgr.kcmp_file(vmm.pid, mgr.pid, fd, copy) == 0] == list(same[0])


def test_iommufd_backend(qemu: Machine) -> None:
    vmm = spawn_qemu(qemu, NICS[:2], backend="iommufd", dup_device_fds=[NICS[0]])
    cdev = {
        a: f"/dev/vfio/devices/{vmm.listdir(f'/sys/bus/pci/devices/{a}/vfio-dev')[0]}"
        for a in NICS[:2]
    }
    assert Counter(links(vmm).values()) == Counter(
        {"/dev/iommu": 1, cdev[NICS[0]]: 2, cdev[NICS[1]]: 1}
    )
    assert qemu.counters["dma_maps"] == 1
    for fd, link in links(vmm).items():
        if link != "/dev/iommu":
            assert bar_addresses(vmm, fd) == [0] * 6


def test_exit_releases_everything(qemu: Machine) -> None:
    vmm = spawn_qemu(qemu, [NICS[0], *PAIR], dup_device_fds=[PAIR[1]])
    vmm.exit()
    assert qemu.open_fds() == 0
    assert sorted(e.device for e in qemu.events("release")) == sorted([NICS[0], *PAIR])


def test_a_failed_step_ends_the_process(qemu: Machine) -> None:
    qemu.faults.fail("VFIO_GROUP_GET_DEVICE_FD", errno.EBUSY, device=None)
    before = {p.pid for p in qemu.all_processes()}
    with pytest.raises(OSError) as e:
        spawn_qemu(qemu, [NICS[0]])
    assert e.value.errno == errno.EBUSY
    (vmm,) = [p for p in qemu.all_processes() if p.pid not in before]
    assert not vmm.alive and qemu.open_fds() == 0
    with pytest.raises(ValueError, match="not opened"):
        spawn_qemu(qemu, [NICS[0]], dup_device_fds=[NICS[1]])


def test_no_devices_opens_nothing(qemu: Machine) -> None:
    vmm = spawn_qemu(qemu, [])
    assert links(vmm) == {}
