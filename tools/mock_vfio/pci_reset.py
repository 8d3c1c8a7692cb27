"""PCI resets (drivers/pci/pci.c): which method a function reset uses, what a bus or slot
reset hits (the bus and, through the bridges on it, everything below), and what each costs.

A function reset picks the first available method of ``reset_method``: ``flr``, ``pm``
(D3hot->D0 without No_Soft_Reset) or ``bus``/``slot``, which only works for a device alone on
a non-root bus (``pci_parent_bus_reset``).  Reset delays are real sleeps scaled by
``time_scale``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from mock_vfio.config import PCI_COMMAND_MEMORY
from mock_vfio.sched import uninterruptible
from mock_vfio.topology import split_addr
from mock_vfio.trace import Event, now, oserror, thread_name

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Bridge, Device

# Reset costs in model seconds (scaled by time_scale).
FLR_COST = 0.100  # pcie_flr: msleep(100) before the readiness poll
PM_COST = 0.020  # pci_pm_reset: D3hot and back, 10 ms each
SBR_PRE_63 = 1.0  # pci_reset_secondary_bus + ssleep(1) before Linux 6.3
SBR_FAST_LINK = 0.100  # 6.3+: PCIe <= 5 GT/s waits 100 ms after the reset
SBR_SLOW_LINK = 0.200  # 6.3+: > 5 GT/s waits for Data Link Layer Link Active, then 100 ms
SBR_CONVENTIONAL = 1.100  # 6.3+: conventional PCI waits 1 s + the device delay


def default_reset_methods(dev: Device) -> tuple[str, ...]:
    if dev.spec.reset_methods is not None:
        return dev.spec.reset_methods
    methods: list[str] = []
    if dev.spec.flr:
        methods.append("flr")
    if dev.spec.pm and not dev.spec.pm_no_soft_reset:
        methods.append("pm")
    if not dev.is_vf:
        methods.append("bus")
    return tuple(methods)


def alone_on_bus(dev: Device) -> bool:
    # pci_parent_bus_reset: no other function on the bus, bridges included.
    if dev.bridge is None or dev.is_vf:
        return False
    if bridges_on(dev.machine, dev.bridge):
        return False
    return all(d is dev or d.removed for d in dev.bridge.children)


def method_works(dev: Device, method: str) -> bool:
    """What the kernel's reset method probe would answer now."""
    if method == "flr":
        return dev.spec.flr
    if method == "pm":
        return dev.spec.pm and not dev.spec.pm_no_soft_reset
    if method in ("bus", "slot"):
        if method == "slot" and (dev.bridge is None or not dev.bridge.spec.hotplug_slot):
            return False
        return alone_on_bus(dev)
    return False


def function_reset_method(dev: Device) -> str | None:
    for m in dev.reset_methods:
        if method_works(dev, m):
            return "slot" if m == "bus" and _slot_reset(dev) else m
    return None


def _slot_reset(dev: Device) -> bool:
    return dev.bridge is not None and dev.bridge.spec.hotplug_slot


def bus_reset_cost(machine: Machine, bridge: Bridge | None) -> float:
    if machine.reset_model == "pre-6.3":
        return SBR_PRE_63
    speed = bridge.spec.link_speed if bridge is not None else 0.0
    if speed <= 0:
        return SBR_CONVENTIONAL
    return SBR_FAST_LINK if speed <= 5.0 else SBR_SLOW_LINK


def do_reset(
    machine: Machine, devs: list[Device], method: str, cause: str, devset: str | None
) -> None:
    """Run one reset: memory decoding off, the delay, config restored."""
    cost = {"flr": FLR_COST, "pm": PM_COST}.get(method)
    if cost is None:
        cost = bus_reset_cost(machine, devs[0].bridge if devs else None)
    targets = tuple(d.addr for d in devs) + ((devset,) if devset else ())
    extra, hang = machine.faults.reset_delay(targets)
    saved = [(d, d.config.command()) for d in devs]
    t0 = now()
    for d in devs:
        if d.memory_enabled():
            d.set_command(d.config.command() & ~PCI_COMMAND_MEMORY, "reset")
    machine.sleep(cost + extra)
    if hang is not None:
        # the caller sleeps uninterruptibly until the device is back
        uninterruptible(lambda: machine.faults.hung(targets, hang))
    for d, cmd in saved:
        if d.model is not None:
            d.model.reset()
        d.set_command(cmd, "restore")
    t1 = now()
    for d in devs:
        machine.record(Event("reset", t0, t1, thread_name(), d.addr, devset, method, cause))
    machine.counters.add("resets")
    machine.counters.add(f"resets.{method}")
    machine.counters.add(f"resets.cause.{cause}")


def function_reset(
    machine: Machine, dev: Device, cause: str, method: str | None = None, *, wait: bool = False
) -> bool:
    """``pci_try_reset_function``: False when no method works (-ENOTTY), EAGAIN when the
    device is locked; with ``wait``, ``pci_reset_function``, which waits for the lock."""
    m = method or function_reset_method(dev)
    if m is None or dev.removed:
        return False
    if not dev.reset_lock.acquire(blocking=wait):
        raise oserror(errno.EAGAIN, f"{dev.addr}: reset in progress")
    try:
        do_reset(machine, [dev], m, cause, dev.devset.name if dev.devset else None)
    finally:
        dev.reset_lock.release()
    return True


def bridges_on(machine: Machine, bridge: Bridge) -> list[Bridge]:
    """The bridges on ``bridge``'s secondary bus."""
    return [b for b in machine.bridges.values() if split_addr(b.addr)[1] == bridge.spec.secondary]


def bus_devices(machine: Machine, dev: Device) -> list[Device]:
    """Devices a bus/slot reset of ``dev``'s parent bridge would hit.

    pci_bus_reset resets the secondary bus and, through the bridges on it,
    everything below them (their subordinate bus range).
    """
    if dev.bridge is None or dev.is_vf:
        return [dev]
    below = [
        range(b.spec.secondary, b.spec.subordinate + 1) for b in bridges_on(machine, dev.bridge)
    ]
    return [
        d
        for d in machine.devices.values()
        if not d.removed
        and (d.bridge is dev.bridge or (d.bridge is not None and any(d.bus in r for r in below)))
    ]


def can_bus_reset(machine: Machine, dev: Device) -> bool:
    # pci_probe_reset_bus(): needs a parent bridge (not a root bus), not a VF
    return dev.bridge is not None and not dev.is_vf
