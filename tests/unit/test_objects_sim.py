"""Every object of the model on the simulator, error paths included."""

from __future__ import annotations

import errno
import threading
from typing import Any

import anyio
import pytest
from mock_vfio.pci_driver import bind, remove_device, unbind

from vfiopy._uapi import DeviceFlag, Feature, IommuType, PciIrq, PciRegion, Struct, lib
from vfiopy.container import Container
from vfiopy.device import Device
from vfiopy.errors import (
    DeviceInfoError,
    DmaMapError,
    GroupNotViableError,
    IrqError,
    OpenContainerError,
    OpenDeviceError,
    RegionError,
    VfioError,
)
from vfiopy.group import Group
from vfiopy.iommufd import Iommufd
from vfiopy.pci import CapId, Command
from vfiopy.session import Session
from vfiopy.sysfs import PciAddress, Sysfs

try:
    from mock_vfio import Machine, load_topology
except ImportError:  # the simulator package exports these once it is complete
    pytest.skip("mock_vfio has no Machine yet", allow_module_level=True)

GPU0 = "0000:03:00.0"
AUDIO0 = "0000:03:00.1"
GPU1 = "0000:04:00.0"


def _sim_fds(k: Any) -> list[int]:
    return sorted(k.fd_table())


# --- sysfs -------------------------------------------------------------------------------


def test_sysfs_view_of_the_gpu_server(k: Any) -> None:
    s = Sysfs(k)
    gpu = PciAddress.parse(GPU0)
    assert gpu in s.devices()
    assert s.driver(gpu) == "vfio-pci"
    assert s.vendor(gpu) == 0x10DE
    group = s.iommu_group(gpu)
    assert [str(a) for a in s.group_devices(group)] == [GPU0, AUDIO0]
    assert s.parent_bridge(gpu) == PciAddress.parse("0000:02:00.0")
    assert [str(a) for a in s.reset_domain(gpu)] == [GPU0, AUDIO0]
    assert s.cdev(gpu) is not None


# --- the whole chain through a session -------------------------------------------------------


def test_session_device_regions_config_irqs(k: Any) -> None:
    with Session(k) as s:
        dev = s.open_device(GPU0)
        assert dev.info.flags & DeviceFlag.PCI
        assert dev.info.num_regions >= PciRegion.CONFIG + 1
        assert s.container is not None and s.container.iommu_type is IommuType.TYPE1v2

        cfg = dev.config
        assert cfg.vendor_id == 0x10DE and cfg.device_id == 0x2330
        ids = {c.id for c in cfg.capabilities()}
        assert {CapId.MSI, CapId.MSIX, CapId.EXP} <= ids

        bar0 = dev.region(PciRegion.BAR0)
        assert bar0.size == 16 << 20 and bar0.areas
        m = bar0.mmap(0)
        m.write32(m.offset + 0x100, 0x12345678)
        assert m.read32(m.offset + 0x100) == 0x12345678
        with pytest.raises(RegionError, match="aligned"):
            m.read32(m.offset + 2)

        msix = dev.irq(PciIrq.MSIX)
        assert msix.count == 6
        fds = msix.enable(2)
        assert len(fds) == 2

        async def fire() -> int:
            msix.trigger(1)
            return await msix.wait(1)

        assert anyio.run(fire) == 1

        deps = dev.hot_reset_info()
        assert {str(d.address) for d in deps} == {GPU0, AUDIO0}
        s.close_device(dev)
        assert m.closed and not msix.enabled
    assert _sim_fds(k) == []


def test_group_shared_by_functions_and_dropped_with_the_last(k: Any) -> None:
    with Session(k) as s:
        gpu = s.open_device(GPU0)
        audio = s.open_device(AUDIO0)
        assert gpu.group is audio.group and gpu.group is not None
        # The whole group is open: the group form of hot reset is allowed.
        s.hot_reset([gpu, audio])
        s.close_device(gpu)
        assert audio.group is not None and not audio.group.closed
        s.close_device(audio)
        assert audio.group.closed
    assert _sim_fds(k) == []


def test_dma_buffers_and_container_info(k: Any) -> None:
    with Session(k) as s:
        with pytest.raises(VfioError, match="open a device first"):
            s.alloc_dma_buffer(4096)
        s.open_device(GPU0)
        assert s.container is not None
        ranges = s.container.iova_ranges()
        assert ranges and all(r.start <= r.last for r in ranges)
        avail = s.container.dma_avail()
        assert avail is None or avail > 0
        buf = s.alloc_dma_buffer(3 * 4096)
        buf.write(0, b"abc")
        assert buf.read(0, 3) == b"abc"
        with pytest.raises(DmaMapError) as info:
            s.dma.map(buf.vaddr, buf.iova, buf.size)  # overlaps the buffer's own mapping
        assert info.value.errno == errno.EEXIST
        other = s.alloc_dma_buffer(4096)
        assert other.iova >= buf.iova + buf.size or other.iova + other.size <= buf.iova
    assert _sim_fds(k) == []


def test_concurrent_open_and_close_from_threads(k: Any) -> None:
    addrs = [GPU0, AUDIO0, GPU1, "0000:04:00.1"]
    with Session(k) as s:
        errors: list[BaseException] = []

        def run(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s.open_device, a)) for a in addrs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(str(d.address) for d in s.devices) == addrs
        threads = [threading.Thread(target=run, args=(s.close_device, d)) for d in s.devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and s.devices == []
    assert _sim_fds(k) == []


# --- iommufd and cdev ----------------------------------------------------------------------------


def test_iommufd_session_via_cdev(k: Any) -> None:
    with Session(k, backend="iommufd") as s:
        dev = s.open_device(GPU0)
        assert dev.iommufd is s.iommufd and dev.devid
        buf = s.alloc_dma_buffer(8192)
        assert buf.iova
        deps = dev.hot_reset_info()
        assert {str(d.address) for d in deps} == {GPU0, AUDIO0}
        assert s.iommufd is not None and s.ioas_id is not None
        assert s.iommufd.iova_ranges(s.ioas_id)
        audio = s.open_device(AUDIO0)
        s.hot_reset([dev, audio])  # zero-length form: the iommufd owns the whole set
    assert _sim_fds(k) == []


def test_cdev_open_by_hand(k: Any) -> None:
    with Iommufd(k) as fd:
        ioas = fd.alloc_ioas()
        with Device.from_cdev(GPU0, fd, ioas) as dev:
            assert dev.config.vendor_id == 0x10DE
    assert _sim_fds(k) == []


# --- error paths ----------------------------------------------------------------------------------


def test_non_viable_group_names_the_blocking_driver(machine: Any, k: Any) -> None:
    audio = machine.device(AUDIO0)
    driver = audio.spec.native_driver or "snd_hda_intel"
    unbind(machine, audio)
    bind(machine, audio, driver)
    with Session(k) as s, pytest.raises(GroupNotViableError) as info:
        s.open_device(GPU0)
    text = str(info.value)
    assert f"{AUDIO0} ({driver})" in text and "vfio-pci" in text
    assert _sim_fds(k) == []


def test_open_failure_leaks_no_fd(machine: Any, k: Any) -> None:
    machine.faults.fail("VFIO_GROUP_GET_DEVICE_FD", errno.EIO)
    with Session(k) as s:
        with pytest.raises(OpenDeviceError) as info:
            s.open_device(GPU0)
        assert info.value.errno == errno.EIO and GPU0 in str(info.value)
        assert "VFIO_GROUP_GET_DEVICE_FD" in str(info.value)
        assert s.container is not None
        assert _sim_fds(k) == [s.container.fd]  # the group was closed again
        s.open_device(GPU0)  # the fault fired once
    assert _sim_fds(k) == []


def test_eacces_on_container_names_the_node(machine: Any, k: Any) -> None:
    machine.faults.fail("open", errno.EACCES)
    with pytest.raises(OpenContainerError) as info:
        Container(k)
    assert "/dev/vfio/vfio" in str(info.value) and "permission" in str(info.value)


def test_short_argsz_is_rejected_by_the_kernel(k: Any) -> None:
    with Session(k) as s:
        dev = s.open_device(GPU0)
        info = Struct("struct vfio_device_info")
        info.p.argsz = 4  # shorter than the fixed part
        with pytest.raises(OSError) as exc:
            k.ioctl(dev.fd, lib.VFIO_DEVICE_GET_INFO, info.p)
        assert exc.value.errno == errno.EINVAL


def test_region_caps_need_a_second_larger_query() -> None:
    # Before Linux 4.16 the MSI-X table was cut out of the BAR (sparse mmap cap).
    m = Machine(load_topology("gpus:1"), time_scale=0.001, msix_sparse=True)
    try:
        k = m.spawn()
        with Session(k) as s:
            dev = s.open_device(GPU0)
            regions = [r for r in dev.regions() if r.sparse is not None]
            assert regions, "a BAR holding the MSI-X table reports sparse areas"
            r = regions[0]
            assert len(r.areas) >= 1 and sum(a.size for a in r.areas) < r.size
            maps = r.mmap_all()
            assert len(maps) == len(r.areas)
    finally:
        m.close()


def test_closed_device_and_closed_fd(k: Any) -> None:
    with Session(k) as s:
        dev = s.open_device(GPU0)
        irq = dev.irq(PciIrq.MSIX)
        s.close_device(dev)
        with pytest.raises(DeviceInfoError) as info:
            dev.region(0)
        assert info.value.errno == errno.EBADF
        with pytest.raises(IrqError) as info2:
            irq.enable(1)
        assert info2.value.errno == errno.EBADF
        assert "EBADF" in str(info2.value) and "already released" in str(info2.value)
        dev.close()  # idempotent


def test_removed_device_is_reported_gone(machine: Any, k: Any) -> None:
    with Session(k) as s:
        dev = s.open_device(GPU0)
        remove_device(machine, GPU0)
        with pytest.raises(VfioError) as info:
            dev.config.read32(0)
        assert info.value.errno == errno.ENODEV
        assert "gone" in str(info.value)
        s.close_device(dev)
        with pytest.raises(OpenDeviceError, match="gone"):
            s.open_device(GPU0)
    assert _sim_fds(k) == []


def test_group_and_container_by_hand(k: Any) -> None:
    group = Sysfs(k).iommu_group(GPU0)
    with Container(k) as c, Group(group, k) as g:
        assert g.viable
        g.set_container(c)
        c.set_iommu()
        with Device.from_group(g, GPU0) as dev:
            assert dev.config.vendor_id == 0x10DE
        with pytest.raises(OpenDeviceError) as info:
            g.get_device_fd(GPU1)  # not in this group
        assert GPU1 in str(info.value)
    assert _sim_fds(k) == []


def test_function_reset_features_and_intx() -> None:
    m = Machine(load_topology("nvme:1"), time_scale=0.001, bus_master_feature=True)
    try:
        k = m.spawn()
        nvme = "0000:01:00.0"
        s = Sysfs(k)
        assert s.reset_domain(nvme) == [PciAddress.parse(nvme)]  # FLR, alone on its bus
        with Session(k) as session:
            dev = session.open_device(nvme)
            assert dev.info.flags & DeviceFlag.RESET
            before = len(m.trace)
            dev.reset()
            assert any(e.kind == "reset" for e in m.trace[before:])
            assert dev.feature_probe(Feature.BUS_MASTER, put=True)
            assert not dev.feature_probe(Feature.MIGRATION)
            dev.feature_set(Feature.BUS_MASTER, (1).to_bytes(4, "little"))
            assert dev.config.command & Command.MASTER
            dev.feature_set(Feature.BUS_MASTER, (0).to_bytes(4, "little"))
            assert not dev.config.command & Command.MASTER
            intx = dev.irq(PciIrq.INTX)
            intx.enable()
            intx.mask()
            intx.unmask()
            intx.trigger()
            assert intx.read() == 1
        assert _sim_fds(k) == []
    finally:
        m.close()
