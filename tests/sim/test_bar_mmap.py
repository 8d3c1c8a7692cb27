"""BAR mappings on the simulator: the zap and the fault of vfio-pci's memory_lock
(mock_vfio.vfio_pci_mmap), by kernel version, and what the views cost when they go.

tests/conformance covers the 6.1 behaviour that the guest shows as well; these are the
parts only the simulator can vary: older kernels, low power, and its own bookkeeping.
"""

from __future__ import annotations

import errno
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mock_vfio import Machine, load_topology
from mock_vfio.topology_load import parse_toml

from vfiopy import Session
from vfiopy._uapi import MAP_SHARED, PAGE_SIZE, PROT_READ, PciRegion, RegionFlag
from vfiopy.errors import RegionError
from vfiopy.features import enter_low_power, exit_low_power

from .conftest import EDU

IVSHMEM = "0000:09:00.0"  # BAR0: 256 bytes, page aligned

CONFORMANCE = Path(__file__).resolve().parents[1] / "conformance"
if str(CONFORMANCE) not in sys.path:
    sys.path.insert(0, str(CONFORMANCE))
scenarios = importlib.import_module("scenarios")
MEMORY = scenarios.PCI_COMMAND_MEMORY


@pytest.fixture(params=[(5, 4), (6, 1)], ids=["5.4", "6.1"])
def machine(request: pytest.FixtureRequest) -> Iterator[Machine]:
    m = Machine(load_topology("qemu-vmtest"), time_scale=0.0, kernel_version=request.param)
    yield m
    m.close()


def test_memory_off_by_version(machine: Machine) -> None:
    """5.8+: SIGBUS and EIO while MEMORY is clear; before, nothing is zapped and the BAR,
    no longer decoded, reads all ones."""
    zaps = machine.kernel_version >= (5, 8)
    with Session(machine.spawn()) as s:
        dev = s.open_device(EDU)
        region = dev.region(PciRegion.BAR0)
        bar = region.mmap()
        cmd = scenarios.config_command(s.kernel, dev)
        scenarios.write_command(s.kernel, dev, cmd & ~MEMORY)
        assert scenarios.touch(bar, 0) == ("SIGBUS" if zaps else "ok")
        if zaps:
            with pytest.raises(OSError) as info:
                region.read(0, 4)
            assert info.value.errno == errno.EIO
        else:
            assert region.read(0, 4) == b"\xff" * 4
        assert machine.counters["zaps.memory"] == int(zaps)
        scenarios.write_command(s.kernel, dev, cmd)
        assert scenarios.touch(bar, 0) == "ok" and bar.read32(0) == scenarios.EDU_ID


@pytest.fixture
def linux61() -> Iterator[Machine]:
    m = Machine(load_topology("qemu-vmtest"), time_scale=0.0, kernel_version=(6, 1))
    yield m
    m.close()


def test_low_power_zaps_and_resume_maps_back(linux61: Machine) -> None:
    with Session(linux61.spawn()) as s:
        dev = s.open_device(EDU)
        bar = dev.region(PciRegion.BAR0).mmap()
        enter_low_power(dev)
        assert scenarios.touch(bar, 0) == "SIGBUS"
        exit_low_power(dev)
        assert scenarios.touch(bar, 0) == "ok" and bar.read32(0) == scenarios.EDU_ID


def test_views_go_with_munmap_and_with_the_exit(linux61: Machine) -> None:
    """Each mmap is a view of its own of the BAR's pages; munmap and the exit remove it."""
    machine = linux61
    device = machine.device(EDU)
    with Session(machine.spawn()) as s:
        dev = s.open_device(EDU)
        region = dev.region(PciRegion.BAR0)
        first, second = region.mmap(), region.mmap()
        assert first.addr != second.addr and device.maps.count() == 2
        # Past edu's register block, which its device thread re-renders at any moment.
        first.write32(0x200, 0x1234)
        assert second.read32(0x200) == 0x1234  # the same pages, also the device model's
        assert int.from_bytes(device.bar_memory(0)[0x200:0x204], "little") == 0x1234
        first.close()
        assert device.maps.count() == 1
    vmm = machine.spawn(name="vmm")
    dev = Session(vmm).open_device(EDU)
    dev.region(PciRegion.BAR0).mmap()
    assert device.maps.count() == 1
    vmm.exit()
    assert device.maps.count() == 0 and device.open_count == 0


@pytest.mark.parametrize("version", [(4, 6), (4, 7), (6, 1)], ids=["4.6", "4.7", "6.1"])
def test_subpage_bar_maps_as_its_page_from_4_7(version: tuple[int, int]) -> None:
    """05f0c03fbac1: ivshmem's 256-byte BAR0 is mappable from 4.7, the whole page mapped,
    vfiopy's accessors bounded by the BAR; before, no MMAP flag and no mappable area."""
    machine = Machine(load_topology("qemu-vmtest"), time_scale=0.0, kernel_version=version)
    try:
        with Session(machine.spawn()) as s:
            dev = s.open_device(IVSHMEM)
            region = dev.region(PciRegion.BAR0)
            assert region.size == 0x100
            if version < (4, 7):
                assert region.flags == RegionFlag.READ | RegionFlag.WRITE and not region.areas
                with pytest.raises(RegionError) as info:
                    region.mmap()
                assert info.value.errno == errno.EINVAL
                return
            assert region.flags == RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP
            bar = region.mmap()
            assert (bar.size, bar.length) == (0x100, PAGE_SIZE)
            bar.write32(0xFC, 0xA5A5_5A5A)
            assert region.read(0xFC, 4) == (0xA5A5_5A5A).to_bytes(4, "little")
            for off in (0x100, 0xFFC):
                with pytest.raises(RegionError) as info:
                    bar.read32(off)
                assert info.value.errno == errno.EINVAL
            assert machine.device(IVSHMEM).maps.count() == 1
            bar.close()
            assert machine.device(IVSHMEM).maps.count() == 0
    finally:
        machine.close()


def test_a_short_mmap_is_a_page_and_munmap_takes_it_back(linux61: Machine) -> None:
    """mmap(2) and munmap(2) round the length to a page: a caller asking for the BAR's 256
    bytes gets its page, and unmapping 256 bytes at that address removes it."""
    device = linux61.device(IVSHMEM)
    with Session(linux61.spawn()) as s:
        dev = s.open_device(IVSHMEM)
        offset = dev.region(PciRegion.BAR0).offset
        addr = s.kernel.mmap(dev.fd, 0x100, offset, PROT_READ, MAP_SHARED)
        assert device.maps.count() == 1
        with pytest.raises(OSError) as info:
            s.kernel.mmap(dev.fd, 0x100, offset + PAGE_SIZE, PROT_READ, MAP_SHARED)
        assert info.value.errno == errno.EINVAL
        s.kernel.munmap(addr, 0x100)
        assert device.maps.count() == 0


SUBPAGE_TOPOLOGY = """
[[device]]
addr = "0000:01:00.0"
iommu_group = 1
bars = [
  { index = 0, size = 0x100 },
  { index = 1, size = 0x100, page_offset = 0x800 },
  { index = 2, size = 0x100, type = "io" },
  { index = 3, size = 0x2000 },
]
"""


def test_only_a_page_aligned_memory_bar_below_a_page_is_mappable() -> None:
    """A sub-page BAR inside a page (its page may hold another BAR) and an I/O BAR are not
    mappable; the page-aligned one and the 8 KiB BAR are."""
    machine = Machine(parse_toml(SUBPAGE_TOPOLOGY), time_scale=0.0, kernel_version=(6, 1))
    try:
        bases = machine.device("0000:01:00.0").host_bars
        assert bases[0] % 4096 == 0 and bases[1] % 4096 == 0x800
        with Session(machine.spawn()) as s:
            dev = s.open_device("0000:01:00.0")
            mappable = {i: bool(dev.region(i).flags & RegionFlag.MMAP) for i in range(4)}
            assert mappable == {0: True, 1: False, 2: False, 3: True}
            with pytest.raises(RegionError) as info:
                dev.region(1).mmap()
            assert info.value.errno == errno.EINVAL
    finally:
        machine.close()
