"""Errors: one ``VfioError`` subclass per failing step, each an ``OSError``.

Every error keeps the errno, the device (or node) it concerns and the ioctl or
step that failed, and its message says what to do next.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

# What to do, by errno, when a step has no more specific advice.
_ADVICE: dict[int, str] = {
    _errno.EACCES: "check the node's owner and mode (the user needs read/write on it) or run as root",
    _errno.EPERM: "this needs CAP_SYS_ADMIN or ownership of every device involved",
    _errno.ENODEV: "the device is gone (hot-unplugged or unbound); rescan or re-bind it to vfio-pci",
    _errno.ENOENT: "the node or device does not exist; check the address and that vfio-pci is bound",
    _errno.EBUSY: "another process or driver holds it; release it there first (see `lsof` or fuser)",
    _errno.EINVAL: "the kernel rejected the arguments; this is a vfiopy or usage bug, please report it",
    _errno.ENOTTY: "the kernel does not implement this ioctl here (older kernel or wrong fd type)",
    _errno.ENOSPC: "the kernel needs a larger buffer; retry with the size it reported",
    _errno.EBADF: "the file descriptor is closed; the object was already released",
    _errno.ETIMEDOUT: "the step did not finish in time; the device may be hung, check dmesg",
    _errno.EIO: "the device did not respond; check dmesg for PCI errors",
    _errno.ENOMEM: "the kernel is out of memory or the locked-memory limit (ulimit -l) is too low",
}


class VfioError(OSError):
    """A VFIO step failed; carries ``errno``, ``device`` and ``step``."""

    step_name = "vfio"

    def __init__(
        self,
        err: int,
        device: str | None = None,
        step: str | None = None,
        detail: str | None = None,
        advice: str | None = None,
    ) -> None:
        self.device = device
        self.step = step or self.step_name
        self.detail = detail
        self.advice = advice if advice is not None else _ADVICE.get(err, "")
        super().__init__(err, os.strerror(err) if err else "error")

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        where = f"{self.device}: " if self.device else ""
        msg = f"{where}{self.step} failed: {name} ({self.strerror})"
        if self.detail:
            msg += f"; {self.detail}"
        if self.advice:
            msg += f" - {self.advice}"
        return msg

    @classmethod
    def from_oserror(
        cls,
        exc: OSError,
        device: str | None = None,
        step: str | None = None,
        detail: str | None = None,
        advice: str | None = None,
    ) -> VfioError:
        return cls(exc.errno or _errno.EIO, device, step, detail, advice)


class AddressError(VfioError, ValueError):
    """A PCI address is malformed or names no device."""

    step_name = "parse PCI address"


class SysfsError(VfioError):
    """Reading or writing a sysfs attribute failed."""

    step_name = "sysfs"


class OpenContainerError(VfioError):
    """Opening /dev/vfio/vfio or checking its API version failed."""

    step_name = "open container"


class SetIommuError(VfioError):
    """VFIO_SET_IOMMU failed."""

    step_name = "VFIO_SET_IOMMU"


class OpenIommufdError(VfioError):
    """Opening /dev/iommu or allocating an IOAS failed."""

    step_name = "open iommufd"


class OpenGroupError(VfioError):
    """Opening /dev/vfio/<group> failed."""

    step_name = "open group"


class GroupNotViableError(VfioError):
    """Not every device of the IOMMU group is bound to vfio-pci (or no driver)."""

    step_name = "group viability"


class SetContainerError(VfioError):
    """VFIO_GROUP_SET_CONTAINER failed."""

    step_name = "VFIO_GROUP_SET_CONTAINER"


class OpenDeviceError(VfioError):
    """VFIO_GROUP_GET_DEVICE_FD, or opening/binding the cdev, failed."""

    step_name = "open device"


class BindIommufdError(VfioError):
    """VFIO_DEVICE_BIND_IOMMUFD or ATTACH_IOMMUFD_PT failed."""

    step_name = "VFIO_DEVICE_BIND_IOMMUFD"


class DeviceInfoError(VfioError):
    """VFIO_DEVICE_GET_INFO/REGION_INFO/IRQ_INFO failed."""

    step_name = "device info"


class RegionError(VfioError):
    """A region read, write, or mmap failed."""

    step_name = "region access"


class IrqError(VfioError):
    """VFIO_DEVICE_SET_IRQS failed."""

    step_name = "VFIO_DEVICE_SET_IRQS"


class DmaMapError(VfioError):
    """Mapping or unmapping DMA failed."""

    step_name = "DMA map"


class ResetError(VfioError):
    """A function reset (VFIO_DEVICE_RESET) failed."""

    step_name = "VFIO_DEVICE_RESET"


class HotResetError(VfioError):
    """VFIO_DEVICE_GET_PCI_HOT_RESET_INFO or VFIO_DEVICE_PCI_HOT_RESET failed or was refused."""

    step_name = "VFIO_DEVICE_PCI_HOT_RESET"


class FeatureError(VfioError):
    """VFIO_DEVICE_FEATURE failed."""

    step_name = "VFIO_DEVICE_FEATURE"


class ReleaseError(VfioError):
    """Closing a device, group or container failed."""

    step_name = "release"


class ProcessError(VfioError):
    """pidfd_open, pidfd_getfd or signalling a process failed."""

    step_name = "process"


@contextmanager
def raise_as(
    error: type[VfioError],
    device: str | None,
    step: str,
    detail: str | None = None,
    advice: str | None = None,
) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into ``error`` (a ``VfioError`` passes through)."""
    try:
        yield
    except VfioError:
        raise
    except OSError as exc:
        raise error.from_oserror(exc, device, step, detail, advice) from exc


__all__ = [
    "AddressError",
    "BindIommufdError",
    "DeviceInfoError",
    "DmaMapError",
    "FeatureError",
    "GroupNotViableError",
    "HotResetError",
    "IrqError",
    "OpenContainerError",
    "OpenDeviceError",
    "OpenGroupError",
    "OpenIommufdError",
    "ProcessError",
    "RegionError",
    "ReleaseError",
    "ResetError",
    "SetContainerError",
    "SetIommuError",
    "SysfsError",
    "VfioError",
    "raise_as",
]
