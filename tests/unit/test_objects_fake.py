"""The object model against a fake kernel: argsz growth, errors, fd hygiene, close order."""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

import anyio
import pytest
from fakekernel import FakeKernel, oserror

from vfiopy._uapi import (
    DeviceFlag,
    Extension,
    GroupFlag,
    IommuType,
    IrqSetFlag,
    RegionCap,
    RegionFlag,
    ffi,
    lib,
)
from vfiopy.container import Container
from vfiopy.device import Device
from vfiopy.errors import (
    BindIommufdError,
    DeviceInfoError,
    DmaMapError,
    GroupNotViableError,
    HotResetError,
    OpenContainerError,
    OpenDeviceError,
    OpenGroupError,
    RegionError,
)
from vfiopy.group import Group
from vfiopy.iommufd import Iommufd
from vfiopy.session import Session

DEV = "0000:01:00.0"


def _sizeof(t: str) -> int:
    return int(ffi.sizeof(t))


def _put_caps(arg: Any, ctype: str, caps: list[bytes]) -> int | None:
    """Write a capability chain after ``ctype`` the way the kernel does.

    Returns the offset of the first cap, or None after raising argsz when the
    caller's buffer is too small.
    """
    p = ffi.cast(ctype + " *", arg)
    base = _sizeof(ctype)
    need = base + sum(len(c) for c in caps)
    if p.argsz < need:
        p.argsz = need
        return None
    buf = ffi.cast("char *", arg)
    off = base
    for i, cap in enumerate(caps):
        nxt = off + len(cap) if i + 1 < len(caps) else 0
        data = bytearray(cap)
        struct.pack_into("<I", data, 4, nxt)
        ffi.memmove(buf + off, bytes(data), len(data))
        off += len(cap)
    return base


def _cap(cap_id: int, body: bytes, version: int = 1) -> bytes:
    return struct.pack("<HHI", cap_id, version, 0) + body


class Vfio:
    """Handlers for one container, group 12 with DEV, and DEV's fd."""

    def __init__(self, k: FakeKernel) -> None:
        self.k = k
        self.calls: list[str] = []
        self.viable = True
        k.nodes.add("/dev/vfio/vfio")
        k.pci_device(DEV, 12)
        k.pci_device("0000:01:00.1", 12, driver="snd_hda_intel")
        self.extensions = {IommuType.TYPE1v2, IommuType.TYPE1, Extension.UNMAP_ALL}
        k.on("VFIO_GET_API_VERSION", lambda path, arg: int(lib.VFIO_API_VERSION))
        k.on("VFIO_CHECK_EXTENSION", lambda path, arg: int(arg in self.extensions))
        k.on("VFIO_SET_IOMMU", self.log("set_iommu"))
        k.on("VFIO_GROUP_GET_STATUS", self.status)
        k.on("VFIO_GROUP_SET_CONTAINER", self.log("set_container"))
        k.on("VFIO_GROUP_UNSET_CONTAINER", self.log("unset_container"))
        k.on("VFIO_GROUP_GET_DEVICE_FD", self.get_device_fd)
        k.on("VFIO_DEVICE_GET_INFO", self.device_info)
        k.on("VFIO_DEVICE_GET_REGION_INFO", self.region_info)
        k.on("VFIO_DEVICE_GET_IRQ_INFO", self.irq_info)
        k.on("VFIO_DEVICE_SET_IRQS", self.set_irqs)
        k.on("VFIO_IOMMU_GET_INFO", self.info_or_hot_reset_info)  # same number
        k.on("VFIO_IOMMU_MAP_DMA", self.map_dma_or_hot_reset)  # same number
        k.on("VFIO_IOMMU_UNMAP_DMA", self.unmap_dma)
        self.eventfds: list[int] = []
        self.hot_reset_devices = 3
        self.mapped: dict[int, int] = {}

    def log(self, name: str) -> Any:
        def fn(path: str, arg: Any) -> int:
            self.calls.append(name)
            return 0

        return fn

    def status(self, path: str, arg: Any) -> int:
        arg.flags = GroupFlag.VIABLE if self.viable else 0
        return 0

    def get_device_fd(self, path: str, arg: Any) -> int:
        name = ffi.string(arg).decode()
        if name != DEV:
            raise oserror(errno.ENODEV)
        self.calls.append("get_device_fd")
        self.k.nodes.add("device:" + name)
        return self.k.open("device:" + name, 0)

    def device_info(self, path: str, arg: Any) -> int:
        arg.flags = DeviceFlag.PCI | DeviceFlag.RESET
        arg.num_regions, arg.num_irqs = 9, 5
        return 0

    def region_info(self, path: str, arg: Any) -> int:
        self.calls.append(f"region_info {arg.index} argsz {arg.argsz}")
        index = int(arg.index)
        arg.offset = index << 40
        if index == 0:  # a BAR with the MSI-X table cut out of the middle
            arg.size = 0x10000
            arg.flags = RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP | RegionFlag.CAPS
            sparse = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 0, 0x2000, 0x3000, 0xD000)
            first = _put_caps(arg, "struct vfio_region_info", [_cap(RegionCap.SPARSE_MMAP, sparse)])
            arg.cap_offset = first or 0
        elif index == 7:
            arg.size, arg.flags = 0x1000, RegionFlag.READ | RegionFlag.WRITE
        else:
            arg.size, arg.flags = 0, 0
        return 0

    def irq_info(self, path: str, arg: Any) -> int:
        arg.flags, arg.count = 1, 4 if arg.index == 2 else 1
        return 0

    def set_irqs(self, path: str, arg: Any) -> int:
        flags, start, count = int(arg.flags), int(arg.start), int(arg.count)
        if flags & IrqSetFlag.DATA_EVENTFD:
            fds = ffi.cast("int32_t *", arg.data)
            self.eventfds = [int(fds[i]) for i in range(count)]
        elif flags & IrqSetFlag.ACTION_TRIGGER and count == 0:
            self.eventfds = []
        elif flags & IrqSetFlag.ACTION_TRIGGER:
            os.write(self.eventfds[start], (1).to_bytes(8, "little"))
        self.calls.append(f"set_irqs {flags:#x} {start} {count}")
        return 0

    def info_or_hot_reset_info(self, path: str, arg: Any) -> int:
        if path.startswith("device:"):
            p = ffi.cast("struct vfio_pci_hot_reset_info *", arg)
            n = self.hot_reset_devices
            room = (p.argsz - _sizeof("struct vfio_pci_hot_reset_info")) // 8
            p.count = n
            if room < n:
                raise oserror(errno.ENOSPC)
            for i in range(n):
                p.devices[i].group_id = 12 + i
                p.devices[i].bus = 1
                p.devices[i].devfn = i
            return 0
        p = ffi.cast("struct vfio_iommu_type1_info *", arg)
        self.calls.append(f"iommu_info argsz {p.argsz}")
        p.flags = 3
        p.iova_pgsizes = 0x40201000
        ranges = struct.pack("<II", 2, 0) + struct.pack(
            "<QQQQ", 0, 0xFEDFFFFF, 0xFEF00000, (1 << 48) - 1
        )
        first = _put_caps(
            arg,
            "struct vfio_iommu_type1_info",
            [_cap(1, ranges), _cap(3, struct.pack("<II", 65000, 0))],
        )
        p.cap_offset = first or 0
        return 0

    def map_dma_or_hot_reset(self, path: str, arg: Any) -> int:
        if path.startswith("device:"):
            h = ffi.cast("struct vfio_pci_hot_reset *", arg)
            self.calls.append(f"hot_reset {[int(h.group_fds[i]) for i in range(h.count)]}")
            if h.count < 2:
                raise oserror(errno.EPERM)
            return 0
        p = ffi.cast("struct vfio_iommu_type1_dma_map *", arg)
        if int(p.iova) in self.mapped:
            raise oserror(errno.EEXIST)
        self.mapped[int(p.iova)] = int(p.size)
        return 0

    def unmap_dma(self, path: str, arg: Any) -> int:
        p = ffi.cast("struct vfio_iommu_type1_dma_unmap *", arg)
        self.calls.append(f"unmap flags {int(p.flags)}")
        if p.flags & 2:
            p.size = sum(self.mapped.values())
            self.mapped.clear()
        else:
            p.size = self.mapped.pop(int(p.iova), 0)
        return 0


@pytest.fixture
def k() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def vfio(k: FakeKernel) -> Vfio:
    return Vfio(k)


def _open(k: FakeKernel) -> tuple[Container, Group, Device]:
    c = Container(k)
    g = Group(12, k)
    g.set_container(c)
    c.set_iommu()
    return c, g, Device.from_group(g, DEV)


# --- container -----------------------------------------------------------------------


def test_container_eacces_names_node_and_permission(k: FakeKernel, vfio: Vfio) -> None:
    k.open_errors["/dev/vfio/vfio"] = errno.EACCES
    with pytest.raises(OpenContainerError) as info:
        Container(k)
    text = str(info.value)
    assert "open /dev/vfio/vfio" in text and "EACCES" in text
    assert "read and write permission" in text
    assert info.value.errno == errno.EACCES


def test_container_api_mismatch_closes_fd(k: FakeKernel, vfio: Vfio) -> None:
    k.on("VFIO_GET_API_VERSION", lambda path, arg: 99)
    with pytest.raises(OpenContainerError, match="API 99"):
        Container(k)
    assert k.fds == {}


def test_set_iommu_picks_best_once(k: FakeKernel, vfio: Vfio) -> None:
    vfio.extensions = {IommuType.TYPE1}
    with Container(k) as c:
        assert c.set_iommu() is IommuType.TYPE1
        assert c.set_iommu() is IommuType.TYPE1
        assert vfio.calls.count("set_iommu") == 1
    assert k.fds == {}


def test_iommu_info_grows_argsz_and_walks_caps(k: FakeKernel, vfio: Vfio) -> None:
    with Container(k) as c:
        info = c.info()
        assert info.pgsizes == 0x40201000
        assert [(r.start, r.last) for r in info.iova_ranges] == [
            (0, 0xFEDFFFFF),
            (0xFEF00000, (1 << 48) - 1),
        ]
        assert info.dma_avail == 65000
        assert c.dma_avail() == 65000
    base = _sizeof("struct vfio_iommu_type1_info")
    assert vfio.calls[0] == f"iommu_info argsz {base}"
    assert vfio.calls[1] != vfio.calls[0]  # the retry with the size asked for


def test_map_dma_error_names_range_and_advice(k: FakeKernel, vfio: Vfio) -> None:
    with Container(k) as c:
        c.map_dma(0x7000_0000, 0x10000, 0x1000)
        with pytest.raises(DmaMapError) as info:
            c.map_dma(0x7000_0000, 0x10000, 0x1000)
    text = str(info.value)
    assert "VFIO_IOMMU_MAP_DMA" in text and "EEXIST" in text and "iova 0x10000" in text
    assert "overlaps" in text


def test_unmap_all_with_and_without_extension(k: FakeKernel, vfio: Vfio) -> None:
    with Container(k) as c:
        c.map_dma(0, 0x1000, 0x1000)
        c.map_dma(0, 0x3000, 0x2000)
        assert c.unmap_all() == 0x3000
        assert vfio.calls[-1] == "unmap flags 2"
        vfio.extensions.discard(Extension.UNMAP_ALL)
        c.map_dma(0, 0x1000, 0x1000)
        c.map_dma(0, 0x3000, 0x2000)
        assert c.unmap_all() == 0x3000
        assert vfio.calls[-2:] == ["unmap flags 0", "unmap flags 0"]


# --- group -------------------------------------------------------------------------------


def test_group_not_viable_lists_members_and_drivers(k: FakeKernel, vfio: Vfio) -> None:
    vfio.viable = False
    with Container(k) as c, Group(12, k) as g, pytest.raises(GroupNotViableError) as info:
        g.set_container(c)
    text = str(info.value)
    assert "group 12" in text
    assert "0000:01:00.1 (snd_hda_intel)" in text and "0000:01:00.0 (vfio-pci)" in text
    assert "bind every device of the group to vfio-pci" in text
    assert k.fds == {}


def test_group_busy_says_another_process(k: FakeKernel, vfio: Vfio) -> None:
    k.open_errors["/dev/vfio/12"] = errno.EBUSY
    with pytest.raises(OpenGroupError, match="another process has the group open"):
        Group(12, k)


def test_get_device_fd_unknown_device(k: FakeKernel, vfio: Vfio) -> None:
    c, g, d = _open(k)
    with pytest.raises(OpenDeviceError) as info:
        g.get_device_fd("0000:01:00.1")
    text = str(info.value)
    assert "0000:01:00.1" in text and "VFIO_GROUP_GET_DEVICE_FD" in text and "ENODEV" in text
    d.close()
    g.close()
    c.close()
    assert k.fds == {}
    assert vfio.calls[-1] == "unset_container"


# --- device ---------------------------------------------------------------------------------


def test_device_info_failure_closes_the_device_fd(k: FakeKernel, vfio: Vfio) -> None:
    def gone(path: str, arg: Any) -> int:
        raise oserror(errno.ENODEV)

    k.on("VFIO_DEVICE_GET_INFO", gone)
    c = Container(k)
    g = Group(12, k)
    g.set_container(c)
    c.set_iommu()
    with pytest.raises(DeviceInfoError) as info:
        Device.from_group(g, DEV)
    text = str(info.value)
    assert DEV in text and "VFIO_DEVICE_GET_INFO" in text and "ENODEV" in text
    assert "the device is gone" in text
    assert set(k.fds.values()) == {"/dev/vfio/vfio", "/dev/vfio/12"}


def test_region_sparse_areas_and_mapping_accessors(k: FakeKernel, vfio: Vfio) -> None:
    _, _, d = _open(k)
    bar0 = d.region(0)
    assert d.region(0) is bar0
    assert bar0.size == 0x10000 and bar0.offset == 0
    assert [(a.offset, a.size) for a in bar0.areas] == [(0, 0x2000), (0x3000, 0xD000)]
    # The first query was too small for the chain: a second, larger one.
    sizes = [c for c in vfio.calls if c.startswith("region_info 0")]
    assert len(sizes) == 2
    with pytest.raises(RegionError, match="2 sparse areas"):
        bar0.mmap()
    m = bar0.mmap(1)
    m.write32(0x3000, 0xDEADBEEF)
    assert m.read32(0x3000) == 0xDEADBEEF
    assert m.read16(0x3002) == 0xDEAD and m.read8(0x3000) == 0xEF
    m.write64(0x3008, 0x0123456789ABCDEF)
    assert m.read64(0x3008) == 0x0123456789ABCDEF
    m.write_bytes(0x3011, b"abcdefghij")
    assert m.read_bytes(0x3011, 10) == b"abcdefghij"
    assert m.read_bytes(0x3010, 4) == b"\x00abc"
    for bad in (0x2FFC, 0x3001, 0x10000, -4):
        with pytest.raises(RegionError):
            m.read32(bad)
    with pytest.raises(RegionError, match="outside"):
        m.read_bytes(0xFFFE, 4)
    assert len(bar0.mmap_all()) == 2
    d.close()
    assert k.maps == {}
    with pytest.raises(RegionError, match="closed"):
        m.read32(0x3000)


def test_region_without_mmap_uses_pread(k: FakeKernel, vfio: Vfio) -> None:
    _, _, d = _open(k)
    k.pread_data[f"device:{DEV}"] = (7 << 40, bytes(range(16)))
    cfg = d.region(7)
    assert cfg.areas == []
    with pytest.raises(RegionError, match="no mappable area"):
        cfg.mmap()
    assert d.config.read32(4) == 0x07060504
    with pytest.raises(RegionError, match="EIO"):
        cfg.read(0x10, 8)  # short read
    with pytest.raises(RegionError, match="outside"):
        cfg.read(0xFFF, 2)


def test_close_unmaps_and_disables_before_closing_the_fd(k: FakeKernel, vfio: Vfio) -> None:
    order: list[str] = []
    munmap, close = k.munmap, k.close

    def rec_munmap(addr: int, length: int) -> None:
        order.append("munmap")
        munmap(addr, length)

    def rec_close(fd: int) -> None:
        order.append("close " + k.fds.get(fd, "?"))
        close(fd)

    k.munmap = rec_munmap  # type: ignore[method-assign]
    k.close = rec_close  # type: ignore[method-assign]
    c, g, d = _open(k)
    d.region(0).mmap(0)
    d.irq(2).enable(2)
    d.close()
    d.close()  # idempotent
    assert order[0] == "munmap"
    assert order[-1] == f"close device:{DEV}"
    assert vfio.calls[-1] == f"set_irqs {0x21:#x} 0 0"  # DATA_NONE|ACTION_TRIGGER, count 0
    assert vfio.eventfds == []
    g.close()
    c.close()
    assert k.fds == {}


def test_irq_enable_trigger_wait(k: FakeKernel, vfio: Vfio) -> None:
    _, _, d = _open(k)
    msix = d.irq(2)
    assert msix.count == 4
    fds = msix.enable()
    assert len(fds) == 4 and vfio.eventfds == fds
    assert msix.read(1) == 0

    async def main() -> int:
        msix.trigger(1)
        msix.trigger(1)
        return await msix.wait(1)

    assert anyio.run(main) == 2
    with pytest.raises(OSError, match="no vector 9"):
        msix.trigger(9)
    msix.disable()
    with pytest.raises(OSError, match="not enabled"):
        msix.read(0)
    d.close()


def test_hot_reset_info_grows_on_enospc(k: FakeKernel, vfio: Vfio) -> None:
    _, g, d = _open(k)
    vfio.hot_reset_devices = 11  # more than the first guess of 8
    deps = d.hot_reset_info()
    assert len(deps) == 11
    assert str(deps[9].address) == "0000:01:01.1" and deps[9].group_id == 21
    with pytest.raises(HotResetError) as info:
        d.hot_reset()
    text = str(info.value)
    assert "EPERM" in text and "the reset affects 0000:01:00.0 (group 12)" in text
    assert vfio.calls[-1] == f"hot_reset {[g.fd]}"
    d.hot_reset([g, g])
    assert vfio.calls[-1] == f"hot_reset {[g.fd, g.fd]}"


def test_feature_probe_maps_enotty_to_false(k: FakeKernel, vfio: Vfio) -> None:
    seen: list[int] = []

    def feature(path: str, arg: Any) -> int:
        seen.append(int(arg.flags))
        if arg.flags & 0xFFFF != 10:
            raise oserror(errno.ENOTTY)
        if arg.flags & (1 << 16):
            ffi.memmove(arg.data, b"\x01\x02", 2)
        return 0

    k.on("VFIO_DEVICE_FEATURE", feature)
    _, _, d = _open(k)
    assert d.feature_probe(10) and not d.feature_probe(3)
    assert d.feature_get(10, b"\x00\x00") == b"\x01\x02"
    d.feature_set(10, b"\x05")
    assert seen[0] == 10 | 1 << 18


# --- iommufd and cdev ------------------------------------------------------------------------


def test_iommufd_iova_ranges_grows_on_emsgsize(k: FakeKernel) -> None:
    k.nodes.add("/dev/iommu")
    asked: list[int] = []

    def ranges(path: str, arg: Any) -> int:
        asked.append(int(arg.num_iovas))
        have = int(arg.num_iovas)
        arg.num_iovas = 3
        if have < 3:
            raise oserror(errno.EMSGSIZE)
        out = ffi.cast("struct iommu_iova_range *", arg.allowed_iovas)
        for i in range(3):
            out[i].start, out[i].last = i << 32, (i << 32) + 0xFFFF
        return 0

    def alloc(path: str, arg: Any) -> int:
        arg.out_ioas_id = 7
        return 0

    k.on("IOMMU_IOAS_IOVA_RANGES", ranges)
    k.on("IOMMU_IOAS_ALLOC", alloc)
    with Iommufd(k) as fd:
        ioas = fd.alloc_ioas()
        assert ioas == 7
        assert fd.iova_ranges(ioas)[2] == (2 << 32, (2 << 32) + 0xFFFF)
    assert asked == [0, 3]
    assert k.fds == {}


def test_cdev_bind_failure_closes_the_cdev(k: FakeKernel, vfio: Vfio) -> None:
    k.nodes.update({"/dev/iommu", "/dev/vfio/devices/vfio0"})
    k.links[f"/sys/bus/pci/devices/{DEV}/vfio-dev/vfio0"] = "x"

    def busy(path: str, arg: Any) -> int:
        raise oserror(errno.EBUSY)

    k.on("VFIO_DEVICE_BIND_IOMMUFD", busy)
    with Iommufd(k) as fd:
        with pytest.raises(BindIommufdError) as info:
            Device.from_cdev(DEV, fd, 1)
        assert "already bound" in str(info.value)
        assert list(k.fds.values()) == ["/dev/iommu"]
    with Iommufd(k) as fd, pytest.raises(OpenDeviceError, match=r"6\.6"):
        Device.from_cdev("0000:01:00.1", fd, 1)


# --- session -------------------------------------------------------------------------------


def test_session_checks_driver_and_shares_groups(k: FakeKernel, vfio: Vfio) -> None:
    with Session(k) as s:
        with pytest.raises(OpenDeviceError) as info:
            s.open_device("01:00.1")
        assert "bound to snd_hda_intel" in str(info.value)
        assert "driverctl" in str(info.value)
        with pytest.raises(OpenDeviceError, match="does not exist"):
            s.open_device("02:00.0")
        d = s.open_device("01:00.0")
        assert s.devices == [d]
        with pytest.raises(OpenDeviceError, match="already open"):
            s.open_device(DEV)
        buf = s.alloc_dma_buffer(8192)
        assert buf.iova == 0x1000 and vfio.mapped == {0x1000: 8192}
        s.close_device(d)
        # The last group stays while a DMA buffer needs the container's IOMMU.
        assert vfio.calls.count("unset_container") == 0
        s.free_dma_buffer(buf)
        del buf  # its address range goes with the last reference
        assert vfio.calls.count("unset_container") == 1
        assert s.container is not None and s.container.iommu_type is None
        d = s.open_device("01:00.0")
        assert vfio.calls.count("set_iommu") == 2  # the container lost it with its last group
        s.alloc_dma_buffer(4096)
    assert k.fds == {} and k.maps == {}
