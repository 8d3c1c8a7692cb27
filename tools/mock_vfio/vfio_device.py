"""A VFIO device file, from ``VFIO_GROUP_GET_DEVICE_FD`` or a ``/dev/vfio/devices/vfioN``
open: what vfio core does for every device (drivers/vfio/vfio_main.c, device_cdev.c),
the cdev's binding to an iommufd, and the release of the last reference.

The vfio-pci parts of the same file (drivers/vfio/pci/) subclass it:
:mod:`vfio_pci_core`, :mod:`vfio_pci_intrs`, :mod:`vfio_pci_rdwr`, :mod:`vfio_pci_hot_reset`.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Any

from mock_vfio.file import File
from mock_vfio.iommufd import IommufdFile
from mock_vfio.iova import min_pgsize
from mock_vfio.trace import oserror
from mock_vfio.uapi import (
    _IOCTLS,
    PAGE,
    addr_of,
    as_struct,
    check_argsz,
)
from mock_vfio.version import FDINFO_SYSPATH
from mock_vfio.vfio_pci_devset import device_close, device_open, locked

if TYPE_CHECKING:
    from mock_vfio.iommufd import Ioas, IommufdCtx
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Device
    from mock_vfio.process import SimProcess
    from mock_vfio.vfio_group import GroupFile


_DEVICE_IOCTLS = {v: "VFIO_" + k for k, v in _IOCTLS.items() if k.startswith("DEVICE_")}


class VfioDeviceFile(File):
    """A VFIO device file, from GROUP_GET_DEVICE_FD or a /dev/vfio/devices/vfioN open."""

    kind = "device"

    def __init__(
        self, machine: Machine, dev: Device, group_file: GroupFile | None, cdev_minor: int | None
    ) -> None:
        super().__init__(machine)
        self.dev = dev
        self.group_file = group_file
        self.cdev_minor = cdev_minor
        self.bound = group_file is not None  # df->access_granted
        self.ictx: IommufdCtx | None = None
        self.ioas: Ioas | None = None
        self.devid = 0
        self.lock = threading.Lock()

    def link(self) -> str:
        if self.cdev_minor is not None:
            return f"/dev/vfio/devices/vfio{self.cdev_minor}"
        return "anon_inode:[vfio-device]"

    def fdinfo(self) -> str:
        from mock_vfio.sysfs import device_syspath

        if self.machine.kernel_version < FDINFO_SYSPATH:
            return ""
        return f"vfio-device-syspath: {device_syspath(self.machine, self.dev)}\n"

    def device(self) -> Device | None:
        return self.dev

    def ioctl_names(self, request: int) -> tuple[str, ...]:
        n = _DEVICE_IOCTLS.get(request)
        return (n,) if n else ()

    def _bind(self, proc: SimProcess, arg: Any) -> int:
        if self.group_file is not None:
            raise oserror(errno.EINVAL, "BIND_IOMMUFD on a group-opened device")
        a = addr_of(arg)
        ct = "struct vfio_device_bind_iommufd"
        check_argsz(a, ct, "out_devid")
        p = as_struct(a, ct)
        token = self.machine.host.bind_token(a, int(p.flags))  # EINVAL for unknown flags
        with self.lock:
            if self.bound:
                raise oserror(errno.EINVAL, "already bound")
            f = proc.file_of(int(p.iommufd))
            if not isinstance(f, IommufdFile):
                raise oserror(errno.EINVAL, "not an iommufd")
            dev = self.dev
            if dev.removed:
                raise oserror(errno.ENODEV, dev.addr)
            grp = self.machine.groups.get(dev.group_id)
            if grp is None:
                raise oserror(errno.ENODEV, dev.addr)
            with grp.lock:
                # vfio_device_block_group: the group path and the cdev path exclude each other
                if grp.opened_file is not None:
                    raise oserror(errno.EBUSY, f"group {grp.id} is open")
                grp.cdev_binds += 1
            try:
                self.machine.host.check_cdev_token(dev, token)
                with locked(self.machine, dev, "open"):
                    # vfio_df_open: only the group path may open a device twice
                    if dev.open_count:
                        raise oserror(errno.EINVAL, f"{dev.addr} is already open")
                device_open(self.machine, dev, proc.pid)
            except OSError:
                with grp.lock:
                    grp.cdev_binds -= 1
                raise
            devid = f.ctx.alloc_id()
            f.ctx.devices[devid] = dev
            dev.ictx = f.ctx
            dev.devid = devid
            self.ictx = f.ctx
            self.devid = devid
            self.bound = True
            dev.cdev_open = True
            p.out_devid = devid
        return 0

    def _attach(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_attach_iommufd_pt"
        check_argsz(a, ct, "pt_id")
        p = as_struct(a, ct)
        if p.flags or self.ictx is None:
            raise oserror(errno.EINVAL, "ATTACH_IOMMUFD_PT")
        ioas = self.ictx.ioas.get(int(p.pt_id))
        if ioas is None:
            raise oserror(errno.ENOENT, f"no IOAS {int(p.pt_id)}")
        if min_pgsize(self.machine) > PAGE:
            # iopt_table_add_domain: a domain must accept PAGE_SIZE mappings
            raise oserror(errno.EINVAL, "the IOMMU's smallest page exceeds PAGE_SIZE")
        with self.lock:
            if self.ioas is not None and self.ioas is not ioas:
                raise oserror(errno.EINVAL, "already attached to another IOAS")
            if self.ioas is None:
                ioas.users += 1
            self.ioas = ioas
            self.dev.dma = ioas.dma
        return 0

    def _detach(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_detach_iommufd_pt"
        check_argsz(a, ct, "flags")
        if as_struct(a, ct).flags or self.ictx is None:
            raise oserror(errno.EINVAL, "DETACH_IOMMUFD_PT")
        with self.lock:
            if self.ioas is not None:
                self.ioas.users -= 1
            self.ioas = None
            self.dev.dma = None
        return 0

    # --- region access -----------------------------------------------------------------

    def _check_access(self) -> Device:
        if not self.bound:
            raise oserror(errno.EINVAL, "device file not bound")
        if self.dev.removed:
            raise oserror(errno.ENODEV, f"{self.dev.addr} was removed")
        return self.dev

    def release(self, pid: int) -> None:
        dev = self.dev
        if self.group_file is not None or self.bound:
            device_close(self.machine, dev, pid)
        if self.ioas is not None:
            self.ioas.users -= 1
            self.ioas = None
        if self.ictx is not None:
            self.ictx.devices.pop(self.devid, None)
            dev.ictx = None
            dev.cdev_open = False
            grp = self.machine.groups.get(dev.group_id)
            if grp is not None:
                with grp.lock:
                    grp.cdev_binds -= 1
        gf = self.group_file
        if gf is not None:
            with self.machine.files_lock:
                gf.device_files -= 1
            self.machine.put_file(gf, pid)
