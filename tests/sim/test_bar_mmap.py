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

from vfiopy import Session
from vfiopy._uapi import PciRegion
from vfiopy.features import enter_low_power, exit_low_power

from .conftest import EDU

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
        first.write32(0x10, 0x1234)
        assert second.read32(0x10) == 0x1234  # the same pages, also the device model's
        assert int.from_bytes(device.bar_memory(0)[0x10:0x14], "little") == 0x1234
        first.close()
        assert device.maps.count() == 1
    vmm = machine.spawn(name="vmm")
    dev = Session(vmm).open_device(EDU)
    dev.region(PciRegion.BAR0).mmap()
    assert device.maps.count() == 1
    vmm.exit()
    assert device.maps.count() == 0 and device.open_count == 0
