"""Bus and slot resets asked for by the user: ``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`` and
``VFIO_DEVICE_PCI_HOT_RESET`` (drivers/vfio/pci/vfio_pci_core.c,
``vfio_pci_ioctl_get_pci_hot_reset_info``, ``vfio_pci_dev_set_hot_reset``)."""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING, Any

from mock_vfio.pci_reset import bus_devices, can_bus_reset
from mock_vfio.trace import Event, now, oserror, thread_name
from mock_vfio.uapi import (
    addr_of,
    as_struct,
    check_argsz,
    read_mem,
    sizeof,
)
from mock_vfio.vfio_device import VfioDeviceFile
from mock_vfio.vfio_group import GroupFile
from mock_vfio.vfio_pci_devset import bus_reset, devset_resettable, locked
from mock_vfio.vfio_pci_mmap import zap_bars
from vfiopy._uapi import (
    VFIO_PCI_DEVID_NOT_OWNED,
    VFIO_PCI_DEVID_OWNED,
    HotResetFlag,
)

if TYPE_CHECKING:
    from mock_vfio.pci import Device
    from mock_vfio.process import SimProcess


class VfioPciHotReset(VfioDeviceFile):
    def _affected(self) -> list[Device]:
        dev = self.dev
        if not can_bus_reset(self.machine, dev):
            raise oserror(errno.ENODEV, f"{dev.addr} cannot be bus reset")
        return bus_devices(self.machine, dev)

    def _hot_reset_info(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_pci_hot_reset_info"
        argsz, _ = check_argsz(a, ct, "count")
        p = as_struct(a, ct)
        devs = self._affected()
        flags = 0
        ids: list[int] = []
        if self.cdev_minor is not None:
            flags |= HotResetFlag.DEV_ID
            all_owned = True
            for d in devs:
                i = self._devid_for(d)
                if i is None:
                    all_owned = False
                    ids.append(VFIO_PCI_DEVID_NOT_OWNED)
                else:
                    ids.append(i)
            if all_owned:
                flags |= HotResetFlag.DEV_ID_OWNED
        else:
            ids = [d.group_id for d in devs]
        p.flags = flags
        need = sizeof(ct) + len(devs) * sizeof("struct vfio_pci_dependent_device")
        if argsz < need:
            p.count = len(devs)
            raise oserror(errno.ENOSPC, f"hot reset info needs {need} bytes")
        p.count = len(devs)
        for i, d in enumerate(devs):
            _, bus, slot, fn = (
                int(x, 16) for x in (d.addr[:4], d.addr[5:7], d.addr[8:10], d.addr[11])
            )
            p.devices[i].group_id = ids[i] & 0xFFFFFFFF
            p.devices[i].segment = int(d.addr[:4], 16)
            p.devices[i].bus = bus
            p.devices[i].devfn = (slot << 3) | fn
        return 0

    def _devid_for(self, d: Device) -> int | None:
        """``vfio_iommufd_get_dev_id``: our devid, OWNED via the group, or not owned."""
        ictx = self.ictx
        if ictx is None:
            return None
        for devid, bound in ictx.devices.items():
            if bound is d:
                return devid
        if d.ictx is None:
            grp = self.machine.groups.get(d.group_id)
            if grp is not None and any(x.ictx is ictx for x in grp.devices):
                return VFIO_PCI_DEVID_OWNED
        return None

    def _hot_reset(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_pci_hot_reset"
        argsz, minsz = check_argsz(a, ct, "count")
        p = as_struct(a, ct)
        if p.flags:
            raise oserror(errno.EINVAL, "HOT_RESET flags")
        count = int(p.count)
        # a zero-length array is only for cdev-opened devices, and only there
        if bool(count) == (self.cdev_minor is not None):
            raise oserror(errno.EINVAL, "group fds for group opens, none for cdev opens")
        devs = self._affected()
        groups: set[int] = set()
        if count:
            if argsz - minsz < count * 4 or count > len(devs):
                raise oserror(errno.EINVAL, "HOT_RESET group fd array")
            for fd in struct.unpack(f"<{count}i", read_mem(a + minsz, count * 4)):
                if fd >= 0 and not proc.is_sim_fd(fd) and os.path.exists(f"/proc/self/fd/{fd}"):
                    # an open file of another kind (an eventfd): vfio_file_is_group() fails
                    raise oserror(errno.EINVAL, f"fd {fd} is not a VFIO group")
                f = proc.file_of(fd)
                if not isinstance(f, GroupFile):
                    raise oserror(errno.EINVAL, f"fd {fd} is not a VFIO group")
                groups.add(f.group.id)
        dev = self.dev
        ds = dev.devset
        assert ds is not None
        with locked(self.machine, dev, "hot_reset"):
            if devset_resettable(self.machine, ds) is None:
                raise oserror(errno.EINVAL, f"device set {ds.name} cannot be bus reset")
            for d in ds.devices:
                owned = (self._devid_for(d) is not None) if not count else d.group_id in groups
                if not owned:
                    raise oserror(errno.EINVAL, f"{d.addr} is not owned by the caller")
            # Each device's memory_lock with down_write_trylock, then its zap (before 6.10 a
            # vma_lock trylock came first; whatever holds it holds memory_lock here).
            locked_mem: list[Device] = []
            try:
                for d in ds.devices:
                    if not d.memory_lock.down_write_trylock():
                        raise oserror(errno.EBUSY, f"{d.addr}: its memory_lock is held")
                    locked_mem.append(d)
                    zap_bars(d, "reset")
                self._reset_bus(proc, ds)
            finally:
                for d in reversed(locked_mem):
                    d.memory_lock.up_write()
        return 0

    def _reset_bus(self, proc: SimProcess, ds: Any) -> None:
        """``pci_reset_bus``: EAGAIN when a device below the bridge is locked elsewhere."""
        devs = bus_devices(self.machine, self.dev)
        held = [d for d in devs if d.reset_lock.acquire(blocking=False)]
        try:
            if len(held) < len(devs):
                raise oserror(errno.EAGAIN, "pci_bus_trylock: a device is being reset")
            h0 = now()
            bus_reset(self.machine, ds, "hot_reset")
            self.machine.record(
                Event("hot_reset", h0, now(), thread_name(), self.dev.addr, ds.name, pid=proc.pid)
            )
            self.machine.counters.add("hot_resets")
        finally:
            for d in held:
                d.reset_lock.release()
