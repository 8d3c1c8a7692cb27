"""VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: which devices a slot or bus reset of a device hits.

Apart from :mod:`vfiopy.device` so that a tool that only asks (``release --pid``,
identifying a VMM's device files by their reset set) does not load the whole
device object model.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from vfiopy._uapi import HotResetFlag, Struct, ffi, ioctl, lib
from vfiopy.errors import HotResetError
from vfiopy.kernel import Kernel
from vfiopy.sysfs import PciAddress

HOT_RESET_ADVICE = {
    errno.EPERM: "every device of the reset domain must be open in this process "
    "(pass all their groups) - see hot_reset_info()",
    errno.EINVAL: "a group of the reset domain is missing from the call - see hot_reset_info()",
    errno.ENODEV: "the device supports neither slot nor bus reset",
    errno.EBUSY: "another user holds a device of the reset domain",
}


@dataclass(frozen=True)
class DependentDevice:
    """A device a hot reset would touch (VFIO_DEVICE_GET_PCI_HOT_RESET_INFO).

    Group-opened devices report ``group_id``; cdev-opened ones report
    ``devid`` (the iommufd device id, None when not bound here) and ``owned``.
    """

    address: PciAddress
    group_id: int | None = None
    devid: int | None = None
    owned: bool | None = None


def hot_reset_info(kernel: Kernel, fd: int, name: str) -> list[DependentDevice]:
    """VFIO_DEVICE_GET_PCI_HOT_RESET_INFO on the device fd ``fd`` (``name`` for errors).

    Read-only: it asks which devices a slot or bus reset would hit, without
    resetting, so it also names the reset set of a device fd of unknown origin.
    """
    item = ffi.sizeof("struct vfio_pci_dependent_device")
    base = ffi.sizeof("struct vfio_pci_hot_reset_info")
    room = 8
    for _ in range(8):  # the set only grows if devices appear in between
        s = Struct("struct vfio_pci_hot_reset_info", base + room * item)
        try:
            ioctl(
                kernel,
                fd,
                "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
                s.p,
                error=HotResetError,
                device=name,
                advice=HOT_RESET_ADVICE,
            )
        except HotResetError as exc:
            # ENOSPC: the array is too small and count says how many exist.
            if exc.errno == errno.ENOSPC and s.p.count > room:
                room = int(s.p.count)
                continue
            raise
        by_devid = bool(s.p.flags & HotResetFlag.DEV_ID)
        out = []
        for i in range(min(int(s.p.count), room)):
            d = s.p.devices[i]
            addr = PciAddress.from_devfn(int(d.segment), int(d.bus), int(d.devfn))
            if not by_devid:
                out.append(DependentDevice(addr, group_id=int(d.group_id)))
                continue
            devid = int(ffi.cast("int32_t", d.group_id))  # the union's signed devid
            if devid == lib.VFIO_PCI_DEVID_NOT_OWNED:
                out.append(DependentDevice(addr, owned=False))
            elif devid == lib.VFIO_PCI_DEVID_OWNED:
                out.append(DependentDevice(addr, owned=True))
            else:
                out.append(DependentDevice(addr, devid=int(d.group_id), owned=True))
        return out
    raise HotResetError(
        errno.ENOSPC,
        name,
        "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
        detail="the device count kept growing",
    )


__all__ = ["HOT_RESET_ADVICE", "DependentDevice", "hot_reset_info"]
