"""PCI_COMMAND_MEMORY hygiene: vfiopy's bring-up adds no flip of its own, bus master keeps
MEMORY, and clearing MEMORY under live BAR mappings is refused (counted in the simulator's
trace; time scale 0, so the 1.8 s flips of gpu-hyperv cost nothing here)."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

mock_vfio = pytest.importorskip("mock_vfio")

from mock_vfio import Machine, SimProcess, load_topology  # noqa: E402
from mock_vfio.topology import TopologyError  # noqa: E402
from mock_vfio.topology_dump import dump_toml  # noqa: E402
from mock_vfio.topology_load import parse_toml  # noqa: E402

from vfiopy._uapi import PciIrq, PciRegion  # noqa: E402
from vfiopy.bench._bringup import _size_bars_by_writing, kernel_flips, memory_flips  # noqa: E402
from vfiopy.errors import RegionError  # noqa: E402
from vfiopy.pci import Command  # noqa: E402
from vfiopy.session import Session  # noqa: E402

GPU = "0000:01:00.0"
BARS = [0, 1, 3]


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine(load_topology("gpu-hyperv"), time_scale=0)
    yield m
    m.close()


@pytest.fixture
def proc(machine: Machine) -> SimProcess:
    return machine.spawn(name="vmm")


def bring_up(proc: SimProcess, session: Session, naive: bool = False) -> None:
    dev = session.open_device(GPU)
    if naive:
        _size_bars_by_writing(dev.config, BARS)
    dev.config.enable_bus_master()
    for i in BARS:
        dev.region(i).mmap_all()
    dev.irq(PciIrq.MSIX).enable(1)


def test_bringup_adds_no_flip_of_its_own(machine: Machine, proc: SimProcess) -> None:
    with Session(kernel=proc) as session:
        bring_up(proc, session)
        flips = memory_flips(machine)[GPU]
        # the kernel's open: pci_enable_device, then the FLR's save-and-disable and restore
        assert flips == {"enable": 1, "reset": 1, "restore": 1}
        assert sum(flips.values()) == kernel_flips(machine, GPU)
        cmd = machine.devices[GPU].config.command()
        assert cmd & Command.MEMORY and cmd & Command.MASTER


def test_naive_sizing_flips_twice_per_bar(machine: Machine, proc: SimProcess) -> None:
    with Session(kernel=proc) as session:
        bring_up(proc, session, naive=True)
        assert memory_flips(machine)[GPU]["user"] == 2 * len(BARS)


def test_bus_master_is_one_read_modify_write(machine: Machine, proc: SimProcess) -> None:
    with Session(kernel=proc) as session:
        dev = session.open_device(GPU)
        before = len(machine.events("command_memory"))
        assert dev.config.enable_bus_master() is True
        assert dev.config.enable_bus_master() is False  # set already: no write
        assert len(machine.events("command_memory")) == before
        assert dev.config.command & Command.MEMORY


def test_clearing_memory_under_live_mappings_is_refused(machine: Machine, proc: SimProcess) -> None:
    with Session(kernel=proc) as session:
        dev = session.open_device(GPU)
        bar0 = dev.region(PciRegion.BAR0).mmap()
        before = len(machine.events("command_memory"))
        cmd = dev.config.command
        with pytest.raises(RegionError) as info:
            dev.config.command = cmd & ~Command.MEMORY
        assert info.value.errno == errno.EBUSY and "BAR0" in str(info.value)
        assert "SIGBUS" in str(info.value)
        with pytest.raises(RegionError):  # a raw 32-bit write over COMMAND and STATUS too
            dev.region(PciRegion.CONFIG).write(
                4, (int(cmd) & ~Command.MEMORY).to_bytes(4, "little")
            )
        assert len(machine.events("command_memory")) == before
        assert dev.config.command & Command.MEMORY
        dev.config.command = cmd  # a write that keeps MEMORY goes
        bar0.close()
        dev.config.command = cmd & ~Command.MEMORY  # nothing mapped: the caller's choice
        assert memory_flips(machine)[GPU].get("user") == 1


def test_toggle_cost_in_topology_files() -> None:
    topo = load_topology("gpu-hyperv")
    assert {f.memory_toggle_cost for f in topo.functions} == {1.8}
    again = parse_toml(dump_toml(topo), "again")
    assert [f.memory_toggle_cost for f in again.functions] == [1.8] * 4
    with pytest.raises(TopologyError, match="memory_toggle_cost"):
        parse_toml('[[device]]\naddr = "01:00.0"\nmemory_toggle_cost = -1\n')
