"""Bring-up modes that count PCI_COMMAND_MEMORY flips, on the simulator only.

Under a hypervisor each flip of memory decoding remaps the device's BARs: Hyper-V takes
about 1.8 s for a 128 GB BAR (the ``gpu-hyperv`` topology's ``memory_toggle_cost``).  Both
modes bring the devices up one after another, as a VMM does:

``bringup``        (b)  vfiopy's way: open (the kernel enables the device and resets it),
                        ``ConfigSpace.enable_bus_master`` (one read-modify-write that keeps
                        MEMORY), map every BAR (sizes from VFIO_DEVICE_GET_REGION_INFO),
                        enable one MSI-X vector;
``bringup-naive``  (n)  the same, but each BAR is sized the way a probe path does it on bare
                        metal: memory decoding off, all-ones written to the BAR, read back,
                        the value restored, decoding on: two flips per BAR.

The bound is the model's: the flips the kernel makes at open (one to enable, two around each
reset: ``pci_dev_save_and_disable`` clears the command register) plus, for the naive mode,
two per BAR, times each device's toggle cost; the devices in turn, so the sum.
"""

from __future__ import annotations

from typing import Any

from vfiopy.bench._hostmodes import _machine
from vfiopy.bench._target import System

BRINGUP_HOST = "bringup"


def _devices(system: System) -> list[str]:
    return [d for g in system.groups for d in g.devices]


def _bars(machine: Any, addr: str) -> list[int]:
    return [b.index for b in machine.devices[addr].spec.bars if not b.is_io]


def kernel_flips(machine: Any, addr: str) -> int:
    """The MEMORY transitions the kernel makes when ``addr`` is opened: the enable, and two
    around the reset at open when the device has a function reset."""
    from mock_vfio.pci_reset import function_reset_method

    dev = machine.devices[addr]
    return 1 + (2 if function_reset_method(dev) is not None else 0)


def bound_vfiopy(system: System) -> float:
    m = _machine(system)
    return float(
        sum(kernel_flips(m, a) * m.devices[a].spec.memory_toggle_cost for a in _devices(system))
    )


def bound_naive(system: System) -> float:
    m = _machine(system)
    return float(
        sum(
            (kernel_flips(m, a) + 2 * len(_bars(m, a))) * m.devices[a].spec.memory_toggle_cost
            for a in _devices(system)
        )
    )


def _size_bars_by_writing(config: Any, bars: list[int]) -> None:
    """The bare-metal probe's BAR sizing: decoding off, all-ones, read, restore, on."""
    from vfiopy.pci import COMMAND, Command

    for i in bars:
        reg = 0x10 + 4 * i
        cmd = config.read16(COMMAND)
        config.write16(COMMAND, cmd & ~Command.MEMORY)
        saved = config.read32(reg)
        config.write32(reg, 0xFFFFFFFF)
        config.read32(reg)
        config.write32(reg, saved)
        config.write16(COMMAND, cmd)


def _bring_up(system: System, naive: bool) -> Any:
    from vfiopy._uapi import PciIrq
    from vfiopy.bench._modes import _Timer
    from vfiopy.session import Session

    machine = _machine(system)
    addrs = _devices(system)
    session = Session(kernel=system.kernel)
    with _Timer(system) as t:
        for a in addrs:
            dev = session.open_device(a)
            if naive:
                _size_bars_by_writing(dev.config, _bars(machine, a))
            dev.config.enable_bus_master()
            for i in _bars(machine, a):
                dev.region(i).mmap_all()
            if machine.devices[a].spec.msix is not None:
                dev.irq(PciIrq.MSIX).enable(1)
    system.leave_open(session.close)  # the release (and its resets) is not this run's
    return t.window()


def mode_bringup(system: System) -> Any:
    return _bring_up(system, naive=False)


def mode_bringup_naive(system: System) -> Any:
    return _bring_up(system, naive=True)


def memory_flips(machine: Any, since: float = 0.0) -> dict[str, dict[str, int]]:
    """Per device, the MEMORY transitions in the simulator's trace by cause (``enable``,
    ``reset``/``restore`` the kernel's, ``user`` the process's own config writes)."""
    out: dict[str, dict[str, int]] = {}
    for e in machine.events("command_memory"):
        if e.start >= since and e.device is not None:
            by = out.setdefault(e.device, {})
            by[e.cause or "?"] = by.get(e.cause or "?", 0) + 1
    return out


__all__ = [
    "BRINGUP_HOST",
    "bound_naive",
    "bound_vfiopy",
    "kernel_flips",
    "memory_flips",
    "mode_bringup",
    "mode_bringup_naive",
]
