"""VFIO groups, ``/dev/vfio/<group>`` (drivers/vfio/group.c)."""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Any

from mock_vfio.file import File
from mock_vfio.trace import oserror
from mock_vfio.uapi import (
    PAGE,
    addr_of,
    as_struct,
    check_argsz,
)
from mock_vfio.vfio_container import ContainerFile
from mock_vfio.vfio_pci_devset import device_open
from vfiopy._uapi import (
    GroupFlag,
    Ioctl,
    ffi,
)

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Device
    from mock_vfio.process import SimProcess

_GROUP_IOCTLS = {
    Ioctl.GROUP_GET_STATUS: "VFIO_GROUP_GET_STATUS",
    Ioctl.GROUP_SET_CONTAINER: "VFIO_GROUP_SET_CONTAINER",
    Ioctl.GROUP_UNSET_CONTAINER: "VFIO_GROUP_UNSET_CONTAINER",
    Ioctl.GROUP_GET_DEVICE_FD: "VFIO_GROUP_GET_DEVICE_FD",
}


class Group:
    """``struct vfio_group``."""

    def __init__(self, gid: int) -> None:
        self.id = gid
        self.devices: list[Device] = []
        self.opened_file: File | None = None
        self.container: Any = None  # Container
        self.cdev_binds = 0
        self.lock = threading.Lock()

    def viable(self) -> bool:
        # iommu_group_dma_owner_claimed(): a device bound to a kernel driver that
        # uses the DMA API claims the group; vfio-pci and pci-stub do not.
        return all(
            d.driver in (None, "pci-stub") or d.vfio_pci for d in self.devices if not d.removed
        )


class GroupFile(File):
    kind = "group"

    def __init__(self, machine: Machine, group: Group) -> None:
        super().__init__(machine)
        self.group = group
        self.container_file: ContainerFile | None = None
        self.device_files = 0

    def link(self) -> str:
        return f"/dev/vfio/{self.group.id}"

    def device(self) -> Device | None:
        return self.group.devices[0] if self.group.devices else None

    def ioctl_names(self, request: int) -> tuple[str, ...]:
        n = _GROUP_IOCTLS.get(request)
        return (n,) if n else ()

    def ioctl(self, proc: SimProcess, request: int, arg: Any) -> int:
        g = self.group
        if not g.devices:
            raise oserror(errno.ENODEV, f"group {g.id} is gone")
        if request == Ioctl.GROUP_GET_STATUS:
            a = addr_of(arg)
            check_argsz(a, "struct vfio_group_status", "flags")
            flags = 0
            if g.container is not None:
                flags = GroupFlag.VIABLE | GroupFlag.CONTAINER_SET
            elif g.viable():
                flags = GroupFlag.VIABLE
            as_struct(a, "struct vfio_group_status").flags = flags
            return 0
        if request == Ioctl.GROUP_SET_CONTAINER:
            cfd = int(ffi.cast("int32_t *", addr_of(arg))[0])
            f = proc.file_of(cfd)
            if not isinstance(f, ContainerFile):
                raise oserror(errno.EINVAL, f"fd {cfd} is not a container")
            with g.lock:
                if g.container is not None:
                    raise oserror(errno.EINVAL, "group already has a container")
                if not g.viable():
                    # iommu_group_claim_dma_owner(): a kernel driver owns DMA in the group
                    raise oserror(errno.EPERM, f"group {g.id} is not viable")
                c = f.container
                with c.lock:
                    c.groups.append(g)
                g.container = c
            return 0
        if request == Ioctl.GROUP_UNSET_CONTAINER:
            with g.lock:
                if g.container is None:
                    raise oserror(errno.EINVAL, "group has no container")
                if self.device_files:
                    raise oserror(errno.EBUSY, "device files are open")
                c = g.container
                g.container = None
            c.detach(g)
            return 0
        if request == Ioctl.GROUP_GET_DEVICE_FD:
            name = ffi.string(ffi.cast("char *", addr_of(arg)), PAGE).decode(errors="replace")
            dev = self._find(name)
            self.machine.host.match_device_name(dev, name)  # vf_token= (vfio_pci_core_match)
            if g.container is None or g.container.iommu is None:
                raise oserror(errno.EINVAL, "group has no container with an IOMMU set")
            from mock_vfio.vfio_pci_core import DeviceFile

            df = DeviceFile(self.machine, dev, self, None)
            device_open(self.machine, dev, proc.pid)
            with self.machine.files_lock:
                self.refs += 1  # device files hold a reference to the group file
                self.device_files += 1
                dev.dma = g.container.dma
            return proc.install(df)
        raise oserror(errno.ENOTTY, f"group ioctl {request:#x}")

    def _find(self, name: str) -> Device:
        base = name.split()[0] if name.split() else ""
        for d in self.group.devices:
            if d.addr == base and not d.removed and d.vfio_pci:
                return d
        raise oserror(errno.ENODEV, f"no device {name!r} in group {self.group.id}")

    def release(self, pid: int) -> None:
        g = self.group
        with g.lock:
            c = g.container
            g.container = None
            if g.opened_file is self:
                g.opened_file = None
        if c is not None:
            c.detach(g)
