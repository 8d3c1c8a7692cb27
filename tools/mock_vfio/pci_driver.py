"""Functions appearing, drivers binding and unbinding, surprise removal: what
drivers/pci/probe.c, pci-driver.c, remove.c and drivers/base/dd.c do, with vfio-pci's
registration of the device and its wait for the last release."""

from __future__ import annotations

import contextlib
import errno
import time
from typing import TYPE_CHECKING

from mock_vfio.config import PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from mock_vfio.pci import Device, is_vfio_pci_driver
from mock_vfio.topology import Bar, FunctionSpec, split_addr
from mock_vfio.trace import Event, now, oserror, thread_name
from mock_vfio.uapi import PAGE, page_align
from mock_vfio.vfio_group import Group
from mock_vfio.vfio_pci_devset import vfio_register, vfio_unregister

if TYPE_CHECKING:
    from mock_vfio.machine import Machine

# vfio_unregister_group_dev repeats the device request every 10 s while it waits.
REQUEST_INTERVAL = 10.0


def _mem_base(top: int, b: Bar) -> tuple[int, int]:
    """(base, new top) of memory BAR ``b`` allocated at ``top``: naturally aligned, and a
    sub-page BAR at ``page_offset`` into a page of its own (see :class:`Bar`)."""
    if b.size < PAGE:
        base = page_align(top) + b.page_offset
        return base, page_align(base + b.size)
    base = (top + b.size - 1) & ~(b.size - 1)
    return base, base + b.size


def _alloc_bars(machine: Machine, dev: Device) -> None:
    for b in dev.spec.bars:
        if b.is_io:
            size = max(b.size, 16)
            base = (machine._io_next + size - 1) & ~(size - 1)
            machine._io_next = base + size
        elif b.is_64 and b.prefetch:
            base, machine._mmio64_next = _mem_base(machine._mmio64_next, b)
        else:
            base, machine._mmio_next = _mem_base(machine._mmio_next, b)
        dev.host_bars[b.index] = base
    if dev.spec.rom_size:
        size = dev.spec.rom_size
        base = (machine._mmio_next + size - 1) & ~(size - 1)
        machine._mmio_next = base + size
        dev.host_bars[6] = base


def add_function(machine: Machine, spec: FunctionSpec) -> Device:
    bridge = machine._bus_bridge.get(split_addr(spec.addr)[1])
    dev = Device(machine, spec, bridge)
    _alloc_bars(machine, dev)
    if bridge is not None and not dev.is_vf:
        bridge.children.append(dev)
    machine.devices[dev.addr] = dev
    machine.groups.setdefault(dev.group_id, Group(dev.group_id)).devices.append(dev)
    if spec.model != "generic":
        from mock_vfio.devices import make_model

        dev.model = make_model(spec.model, dev)
    if dev.vfio_pci:
        vfio_register(machine, dev)
    return dev


def bind(machine: Machine, dev: Device, driver: str) -> None:
    if dev.driver is not None:
        raise oserror(errno.EBUSY, f"{dev.addr} is bound to {dev.driver}")
    vfio = is_vfio_pci_driver(driver, machine.kernel_version)
    if vfio and dev.numvfs:
        # vfio_pci_core_register_device refuses a PF with VFs enabled
        raise oserror(errno.EBUSY, f"{dev.addr} has SR-IOV enabled")
    machine.host.probing(dev, driver)  # the driver's probe, on the writer's thread
    dev.driver = driver
    if vfio:
        vfio_register(machine, dev)
        dev.set_command(0, "bind")
    else:
        dev.set_command(PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER, "bind")
    t = now()
    machine.record(Event("bind", t, t, thread_name(), dev.addr, value=driver))


def unbind(machine: Machine, dev: Device) -> None:
    if dev.driver is None:
        raise oserror(errno.ENODEV, f"{dev.addr} has no driver")
    if dev.vfio_pci and dev.open_count:
        _request_release(machine, dev)
    if dev.vfio_pci:
        vfio_unregister(machine, dev)
    old = dev.driver
    machine.host.removing(dev, old)  # the driver's remove, on the writer's thread
    dev.driver = None
    t = now()
    machine.record(Event("unbind", t, t, thread_name(), dev.addr, value=old))


def _request_release(machine: Machine, dev: Device) -> None:
    """``vfio_unregister_group_dev`` with the device open: the writer waits, for ever.

    No new open gets the device from here on; ``vfio_pci_core_request`` signals the
    request eventfd (when one is wired) at once and again every 10 s (model time) until
    the last file reference is gone (drivers/vfio/vfio_main.c, Linux 6.1;
    ``vfio_del_group_dev`` in vfio.c before 5.13).
    """
    dev.unbinding = True
    try:
        interval = max(REQUEST_INTERVAL * machine.time_scale, 0.01)
        count = 0
        while dev.open_count:
            t = now()
            dev.fire_req()
            machine.record(Event("request", t, t, thread_name(), dev.addr, value=str(count)))
            count += 1
            deadline = time.monotonic() + interval
            while dev.open_count and time.monotonic() < deadline:
                time.sleep(0.001)
    finally:
        dev.unbinding = False


def probe(machine: Machine, dev: Device) -> None:
    """``drivers_probe``: bind the override driver, else a matching one."""
    if dev.driver is not None or dev.removed or not machine.host.can_probe(dev):
        return
    want = dev.driver_override
    if want is None:
        if (dev.spec.vendor, dev.spec.device) in machine.vfio_pci_ids:
            want = "vfio-pci"
        else:
            want = dev.spec.native_driver
    if want is None or want not in known_drivers(machine):
        return
    with contextlib.suppress(OSError):
        bind(machine, dev, want)


def known_drivers(machine: Machine) -> list[str]:
    names = {"vfio-pci", "pcieport", "pci-stub"}
    for d in machine.devices.values():
        if d.spec.driver:  # a topology's own binding (a variant driver) is a loaded module
            names.add(d.spec.driver)
        if d.spec.native_driver:
            names.add(d.spec.native_driver)
        if d.spec.vf_native_driver:  # the VF driver's module is loaded with the PF's
            names.add(d.spec.vf_native_driver)
        if d.driver:
            names.add(d.driver)
    return sorted(names)


def remove_device(machine: Machine, addr: str) -> None:
    """Surprise removal: later calls get ENODEV; an open device's release still runs."""
    dev = machine.device(addr)
    for vf in list(dev.vfs):
        remove_device(machine, vf.addr)
    with dev.lock:
        dev.removed = True
    t = now()
    machine.record(Event("remove", t, t, thread_name(), dev.addr))
    dev.fire_req()
    if dev.open_count == 0:
        finish_remove(machine, dev)


def stop_and_remove(machine: Machine, dev: Device) -> None:
    dev.removed = True
    finish_remove(machine, dev)


def finish_remove(machine: Machine, dev: Device) -> None:
    if dev.model is not None:
        dev.model.stop()
    if machine.devices.get(dev.addr) is dev:
        del machine.devices[dev.addr]
    if dev.vfio_pci:
        vfio_unregister(machine, dev)
    grp = machine.groups.get(dev.group_id)
    if grp is not None and dev in grp.devices:
        grp.devices.remove(dev)
        if not grp.devices:
            del machine.groups[dev.group_id]
    if dev.bridge is not None and dev in dev.bridge.children:
        dev.bridge.children.remove(dev)
