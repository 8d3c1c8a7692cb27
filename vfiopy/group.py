"""IOMMU groups (/dev/vfio/<n>): the unit the legacy container interface owns.

The kernel lets one process open a group at a time (EBUSY otherwise), claims
DMA ownership of the whole group when it joins a container (EPERM when a
device of the group is bound to a kernel driver), and hands out device fds
only once the container has an IOMMU set (EINVAL before).
"""

from __future__ import annotations

import errno
import uuid
from typing import TYPE_CHECKING, Any

from vfiopy._fdguard import FdGuard
from vfiopy._log import get_logger
from vfiopy._uapi import Closable, GroupFlag, Struct, ffi, ioctl, open_node
from vfiopy.errors import (
    GroupNotViableError,
    OpenDeviceError,
    OpenGroupError,
    ReleaseError,
    SetContainerError,
    SysfsError,
    VfioError,
    raise_as,
)
from vfiopy.kernel import O_RDWR, Kernel, default_kernel
from vfiopy.sysfs import PciAddress, Sysfs

if TYPE_CHECKING:
    from vfiopy.container import Container

log = get_logger(__name__)

_OPEN_ADVICE = {
    errno.EBUSY: "another process has the group open (see fuser /dev/vfio/*); a group "
    "can be open once",
    errno.ENOENT: "no such VFIO group: bind the group's devices to vfio-pci first",
    errno.ENODEV: "the group has no VFIO device any more: bind its devices to vfio-pci",
}
_DEVICE_ADVICE = {
    errno.EINVAL: "the group needs a container with an IOMMU first "
    "(Group.set_container, then Container.set_iommu)",
    errno.ENODEV: "the device is not in this group or not bound to vfio-pci",
    errno.EACCES: "a VF of a PF bound to vfio-pci (and a PF whose VFs are open) needs the VF "
    "token the PF's user set with VFIO_DEVICE_FEATURE_PCI_VF_TOKEN: open it with vf_token=, "
    "the same UUID",
}
_VF_TOKEN_ADVICE = {
    **_DEVICE_ADVICE,
    errno.EINVAL: "a VF token goes only to a VF whose PF is bound to vfio-pci, or to such a "
    "PF; otherwise the group needs a container with an IOMMU first",
}


def group_path(kernel: Kernel, number: int) -> str:
    """/dev/vfio/<n>, or /dev/vfio/noiommu-<n> for a no-IOMMU group."""
    path = f"/dev/vfio/{number}"
    noiommu = f"/dev/vfio/noiommu-{number}"
    return noiommu if not kernel.exists(path) and kernel.exists(noiommu) else path


class Group(Closable):
    """An open VFIO group; use as a context manager or call :meth:`close`.

    A no-IOMMU group (``/dev/vfio/noiommu-<n>``: its devices' DMA is not
    isolated) opens only with ``allow_noiommu=True``, and logs a warning.
    """

    def __init__(
        self,
        number: int,
        kernel: Kernel | None = None,
        sysfs: Sysfs | None = None,
        *,
        allow_noiommu: bool = False,
    ):
        self.kernel = kernel if kernel is not None else default_kernel()
        self.sysfs = sysfs if sysfs is not None else Sysfs(self.kernel)
        self.number = int(number)
        self.name = f"group {self.number}"
        self.path = group_path(self.kernel, self.number)
        self.noiommu = self.path.startswith("/dev/vfio/noiommu-")
        if self.noiommu and not allow_noiommu:
            raise OpenGroupError(
                errno.EPERM,
                self.name,
                f"open {self.path}",
                detail="it is a no-IOMMU group: its devices' DMA is neither isolated nor "
                "translated",
                advice="pass allow_noiommu=True (Session(allow_noiommu=True)) to use it anyway",
            )
        if self.noiommu:
            log.warning(
                "group.noiommu",
                group=self.number,
                path=self.path,
                detail="no-IOMMU group: a device can read and write any physical memory",
            )
        self.container: Container | None = None
        self.fd = open_node(
            self.kernel,
            self.path,
            O_RDWR,
            error=OpenGroupError,
            device=self.name,
            advice=_OPEN_ADVICE,
        )
        # Close waits for the calls in flight (a device being opened through
        # the group, say); later ones raise EBADF instead of using the number.
        self.guard = FdGuard(self.fd, self.name, "the group")
        self.closed = False

    def _ioctl(self, name: str, arg: Any, error: type[VfioError]) -> int:
        with self.guard.hold(error, name) as fd:
            return ioctl(self.kernel, fd, name, arg, error=error, device=self.name)

    def status(self) -> GroupFlag:
        s = Struct("struct vfio_group_status")
        self._ioctl("VFIO_GROUP_GET_STATUS", s.p, OpenGroupError)
        return GroupFlag(int(s.p.flags))

    @property
    def viable(self) -> bool:
        return bool(self.status() & GroupFlag.VIABLE)

    def members(self) -> list[tuple[PciAddress, str | None]]:
        """The group's PCI devices with their drivers (None: no driver), from sysfs."""
        out: list[tuple[PciAddress, str | None]] = []
        for addr in self.sysfs.group_devices(self.number):
            try:
                driver = self.sysfs.driver(addr)
            except SysfsError:
                continue  # removed while we listed: it no longer blocks the group
            out.append((addr, driver))
        return out

    def not_viable_error(self, err: int = errno.EPERM) -> GroupNotViableError:
        """The error for a group some device of which a kernel driver still holds."""
        try:
            members = self.members()
        except SysfsError:
            members = []
        from vfiopy.kmodel import KernelModel

        model = KernelModel(self.sysfs)
        blockers = [f"{a} ({d})" for a, d in members if not model.keeps_group_viable(a)]
        listing = ", ".join(f"{a} ({d or 'no driver'})" for a, d in members) or "unknown"
        detail = f"devices: {listing}"
        if blockers:
            detail = f"{', '.join(blockers)} bound to a kernel driver; {detail}"
        return GroupNotViableError(
            err,
            self.name,
            "VFIO_GROUP_SET_CONTAINER",
            detail=detail,
            advice="bind every device of the group to vfio-pci (or unbind it) first, "
            "e.g. Sysfs.bind_vfio or driverctl set-override <addr> vfio-pci",
        )

    def set_container(self, container: Container) -> None:
        """Attach the group to ``container``; raises GroupNotViableError when not viable."""
        if not self.viable:
            raise self.not_viable_error()
        try:
            with container.guard.hold(SetContainerError, "VFIO_GROUP_SET_CONTAINER") as cfd:
                arg = ffi.new("int32_t *", cfd)
                self._ioctl("VFIO_GROUP_SET_CONTAINER", arg, SetContainerError)
        except SetContainerError as exc:
            # The viability check above can race with a driver binding; the
            # kernel's DMA-ownership claim then fails with EPERM/EBUSY.
            if exc.errno in (errno.EPERM, errno.EBUSY) and not self.viable:
                raise self.not_viable_error(exc.errno) from exc
            raise
        self.container = container
        container.note_attached(self.number)

    def unset_container(self) -> None:
        """Detach from the container (EBUSY while device fds of the group are open)."""
        self._ioctl("VFIO_GROUP_UNSET_CONTAINER", 0, SetContainerError)
        self._detached()

    def _detached(self) -> None:
        if self.container is not None:
            self.container.note_detached(self.number)
            self.container = None

    def get_device_fd(self, addr: PciAddress | str, vf_token: uuid.UUID | None = None) -> int:
        """Open a device of the group; this is where the kernel resets it.

        ``vf_token``: the VF token shared with the PF's vfio-pci user, which a VF of a
        vfio-pci PF needs (and a PF whose VFs are in use), passed as the kernel's
        ``vfio_pci_core_match`` reads it: ``ADDR vf_token=UUID``.  A missing or wrong one
        is EACCES.
        """
        addr_text = str(PciAddress.of(addr))
        name = addr_text if vf_token is None else f"{addr_text} vf_token={vf_token}"
        arg = ffi.new("char[]", name.encode())
        with self.guard.hold(OpenDeviceError, "VFIO_GROUP_GET_DEVICE_FD") as fd:
            return ioctl(
                self.kernel,
                fd,
                "VFIO_GROUP_GET_DEVICE_FD",
                arg,
                error=OpenDeviceError,
                device=addr_text,
                detail=self.name,
                advice=_VF_TOKEN_ADVICE if vf_token is not None else _DEVICE_ADVICE,
            )

    def close(self) -> None:
        """Detach from the container and close the group fd. Idempotent.

        The kernel detaches on release anyway; unsetting first makes a
        still-open device fd show up as EBUSY here instead of silently
        keeping the group alive.  Calls in flight on other threads (a device
        being opened) finish first.
        """
        if not self.guard.shut():
            return
        self.closed = True
        try:
            if self.container is not None and not self.container.closed:
                ioctl(
                    self.kernel,
                    self.fd,
                    "VFIO_GROUP_UNSET_CONTAINER",
                    0,
                    error=SetContainerError,
                    device=self.name,
                )
        finally:
            # The release detaches the group (once its device fds are closed).
            self._detached()
            with raise_as(ReleaseError, self.name, "close group"):
                self.kernel.close(self.fd)

    def __repr__(self) -> str:
        return f"Group({self.number}, fd={self.fd})"


__all__ = ["Group", "group_path"]
