"""vfio-pci device sets: open and release under the set's lock, and their resets.

Resets follow vfio-pci (drivers/vfio/pci/vfio_pci_core.c):

* first open of a device (``vfio_pci_core_enable``): ``pci_enable_device``
  then ``pci_try_reset_function``; the reset's success is ``reset_works``;
* last release (``vfio_pci_core_disable``): ``needs_reset = true``, a function
  reset when ``reset_works`` clears it, then ``vfio_pci_dev_set_try_reset``:
  when no other device of the device set is open and some device still needs
  a reset, one bus (or slot) reset for the whole set;
* a function reset picks its method as :mod:`mock_vfio.pci_reset` says.

Open and release run under the device set's mutex (``devset`` model, Linux
5.15+, per-set locks since 5.0) or one global ``driver_lock`` (``legacy``,
before 5.0).
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mock_vfio.config import PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from mock_vfio.pci_reset import bridges_on, bus_devices, can_bus_reset, do_reset, function_reset
from mock_vfio.trace import Event, now, oserror, thread_name

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Bridge, Device


@dataclass(slots=True)
class DevSet:
    """``struct vfio_device_set``: devices reset together, one mutex."""

    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    devices: list[Device] = field(default_factory=list)
    bridge: Bridge | None = None  # the bridge whose secondary bus is reset


def _devset_for(machine: Machine, dev: Device) -> DevSet:
    # vfio_pci_core_register_device: root bus (and VFs) -> own set; a slot with
    # reset support -> the slot; else the whole bus, for bus-wide resets.
    br = dev.bridge
    if br is None or (dev.is_vf and machine.vf_own_devset):
        name, bridge = dev.addr, None
    elif dev.is_vf:
        name, bridge = f"bus:{dev.addr[:7]}", None
    elif br.spec.hotplug_slot:
        name, bridge = f"slot:{br.addr}", br
    else:
        name, bridge = f"bus:{dev.addr[:7]}", br
    ds = machine.devsets.get(name)
    if ds is None:
        ds = machine.devsets[name] = DevSet(name, bridge=bridge)
    return ds


def vfio_register(machine: Machine, dev: Device) -> None:
    ds = _devset_for(machine, dev)
    dev.devset = ds
    ds.devices.append(dev)
    if dev.minor < 0:
        dev.minor = machine._minor
        machine._minor += 1


def vfio_unregister(machine: Machine, dev: Device) -> None:
    if dev.devset is not None:
        dev.devset.devices.remove(dev)
        if not dev.devset.devices:
            machine.devsets.pop(dev.devset.name, None)
        dev.devset = None


@contextlib.contextmanager
def locked(machine: Machine, dev: Device, what: str) -> Iterator[None]:
    """The lock vfio-pci holds around open/release/hot reset of ``dev``."""
    if machine.kernel_model == "legacy" or dev.devset is None:
        lock, name = machine.driver_lock, "driver_lock"
    else:
        lock, name = dev.devset.lock, dev.devset.name
    if not lock.acquire(blocking=False):
        t0 = now()
        lock.acquire()
        machine.record(Event("lock_wait", t0, now(), thread_name(), dev.addr, name, cause=what))
        machine.counters.add("lock_waits")
    try:
        yield
    finally:
        lock.release()


def devset_resettable(machine: Machine, ds: DevSet) -> Device | None:
    """``vfio_pci_dev_set_resettable``: every device the reset hits is in the set."""
    if not ds.devices:
        return None
    first = ds.devices[0]
    if not can_bus_reset(machine, first):
        return None
    # vfio_pci_for_each_slot_or_bus walks every function below the bridge,
    # bridges included; a bridge is never in a vfio device set.
    if first.bridge is not None and bridges_on(machine, first.bridge):
        return None
    members = set(ds.devices)
    for d in bus_devices(machine, first):
        if d not in members:
            return None
    return first


def bus_reset(machine: Machine, ds: DevSet, cause: str) -> bool:
    first = devset_resettable(machine, ds)
    if first is None:
        return False
    devs = [d for d in bus_devices(machine, first) if not d.removed]
    if not devs:
        return False
    method = "slot" if first.bridge is not None and first.bridge.spec.hotplug_slot else "bus"
    do_reset(machine, devs, method, cause, ds.name)
    return True


# --- open and release ---------------------------------------------------------------


def device_open(machine: Machine, dev: Device, pid: int) -> None:
    """``vfio_df_open``: open_count and, on the first open, ``vfio_pci_core_enable``."""
    with locked(machine, dev, "open"):
        if dev.removed or not dev.vfio_pci or dev.unbinding:
            raise oserror(errno.ENODEV, dev.addr)
        dev.open_count += 1
        if dev.open_count > 1:
            return
        t0 = now()
        dev.low_power = False
        dev.config.set_power_state(0)
        # pci_enable_device sets memory/IO decoding for the BARs present
        cmd = dev.config.command()
        if any(not b.is_io for b in dev.spec.bars):
            cmd |= PCI_COMMAND_MEMORY
        if any(b.is_io for b in dev.spec.bars):
            cmd |= PCI_COMMAND_IO
        dev.set_command(cmd, "enable")
        try:
            dev.reset_works = function_reset(machine, dev, "open")
        except OSError:
            dev.open_count -= 1
            raise
        if dev.model is not None:
            dev.model.start()
        machine.record(
            Event(
                "open",
                t0,
                now(),
                thread_name(),
                dev.addr,
                dev.devset.name if dev.devset else None,
                pid=pid,
            )
        )
        machine.counters.add("opens")


def device_close(machine: Machine, dev: Device, pid: int) -> None:
    """Last file reference gone: ``vfio_pci_core_disable`` and the set's bus reset."""
    with locked(machine, dev, "release"):
        if dev.open_count > 1:
            dev.open_count -= 1
            return
        t0 = now()
        if dev.model is not None:
            dev.model.stop()
        dev.disable_irqs()
        dev.set_command(dev.config.command() & ~PCI_COMMAND_MASTER, "disable")
        dev.needs_reset = True
        if dev.reset_works and not dev.removed:
            try:
                if function_reset(machine, dev, "release"):
                    dev.needs_reset = False
            except OSError:
                pass
        ds = dev.devset
        if ds is not None and not dev.removed:
            others_open = any(d.open_count for d in ds.devices if d is not dev)
            needed = not others_open and any(d.needs_reset for d in ds.devices)
            if needed and bus_reset(machine, ds, "devset"):
                for d in ds.devices:
                    d.needs_reset = False
        dev.open_count -= 1
        dev.dma = None
        dev.claimed_bars.clear()  # vfio_pci_core_disable releases the BAR regions
        machine.record(
            Event("release", t0, now(), thread_name(), dev.addr, ds.name if ds else None, pid=pid)
        )
        machine.counters.add("releases")
        if dev.removed:
            from mock_vfio.pci_driver import finish_remove

            finish_remove(machine, dev)
