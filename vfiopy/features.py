"""Typed VFIO device features: low power, bus mastering, DMA-BUF export, migration, ioeventfds.

Each but the ioeventfd is a ``VFIO_DEVICE_FEATURE`` (the ioctl exists from Linux 5.7).  A
kernel that does not know a feature answers ENOTTY (``vfio_pci_core_ioctl_feature``'s
default), one that knows it but not the operation EINVAL (``vfio_check_feature``); these
become :class:`FeatureNotSupportedError`, which says which kernel or driver offers the
feature.  Where EINVAL also means a bad request (low power entered twice, an ioeventfd
outside a BAR) only ENOTTY is taken for "not supported".

- low power (``VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY`` / ``_EXIT``, cc2742fe3660, and
  ``_ENTRY_WITH_WAKEUP``, 453e6c98fd2b; Linux 6.1): the device may go to D3hot or D3cold
  through runtime PM.  With a wakeup eventfd, the kernel signals it when anything resumes the
  device (a PME, a host access, an ioctl on the device fd: vfio resumes the device for every
  ioctl, LOW_POWER_EXIT included) and the low-power entry is then over.
- ioeventfds (``VFIO_DEVICE_IOEVENTFD``, 30656177c408, Linux 4.17): a write the kernel makes
  to a BAR register when an eventfd is signalled, with no ioctl; KVM's ioeventfd can signal
  it straight from a guest's MMIO write.  The value is part of the registration, so one
  register can have an eventfd per value (KVM's datamatch pairs with that).  At most 1000 per
  device; none on the MSI-X table; widths 1, 2, 4 and 8.
- bus mastering (``VFIO_DEVICE_FEATURE_BUS_MASTER``, feature 10): set or clear the bus
  master enable through the kernel; only vfio-cdx (AMD's CDX bus) implements it, vfio-pci
  answers ENOTTY on every release.  On PCI the config write does it
  (``ConfigSpace.enable_bus_master``).
- DMA-BUF export of BAR slices (``VFIO_DEVICE_FEATURE_DMA_BUF``, feature 11, Linux 6.19):
  probed only.
- write-combining BAR mappings: none.  vfio-pci maps every BAR uncached and no mainline
  kernel has a write-combining feature or DMA-BUF attribute yet; the DMA-BUF probe only
  sharpens the error (:func:`require_vfio_write_combining`).
- migration (``VFIO_DEVICE_FEATURE_MIGRATION``, Linux 6.0): GET gives the migration flags;
  only devices whose driver implements migration (a variant driver such as
  ``mlx5_vfio_pci``) have it, plain vfio-pci answers ENOTTY.
"""

from __future__ import annotations

import enum
import errno
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from vfiopy._uapi import Closable, Feature, PciRegion
from vfiopy.errors import FeatureError, VfioError, raise_as
from vfiopy.kernel import EFD_NONBLOCK
from vfiopy.kmodel import IOEVENTFD, LOW_POWER, format_version

if TYPE_CHECKING:
    from vfiopy.device import Device
    from vfiopy.region import Region

DMA_BUF = 11  # VFIO_DEVICE_FEATURE_DMA_BUF (Linux 6.19, 5d74781ebc86), kept for older headers
_CLEAR_MASTER, _SET_MASTER = 0, 1  # struct vfio_device_feature_bus_master.op
_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)
_UNKNOWN_TO_KERNEL = (errno.ENOTTY,)
_IOEVENTFD_WIDTHS = (1, 2, 4, 8)


class MigrationFlag(enum.IntFlag):
    """struct vfio_device_feature_migration.flags."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class FeatureNotSupportedError(FeatureError):
    """The running kernel, or the device's driver, does not offer the feature."""


@dataclass(frozen=True)
class FeatureSupport:
    """What :func:`probe_features` found: each True only where the kernel said so."""

    bus_master: bool
    dma_buf: bool
    migration: bool
    low_power: bool


_OFFERED_BY = {
    "bus master control": "a driver with VFIO_DEVICE_FEATURE_BUS_MASTER (vfio-cdx; vfio-pci "
    "has none); set PCI_COMMAND_MASTER in config space instead (ConfigSpace.enable_bus_master)",
    "low power": f"Linux {format_version(LOW_POWER)}+ (VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, "
    "_EXIT and _ENTRY_WITH_WAKEUP)",
    "VFIO_DEVICE_IOEVENTFD": f"Linux {format_version(IOEVENTFD)}+",
    "DMA-BUF export": "Linux 6.19+ (VFIO_DEVICE_FEATURE_DMA_BUF), with DMA-BUF support built in",
    "migration": "Linux 6.0+ and a driver that implements migration (a variant driver such as "
    "mlx5_vfio_pci; plain vfio-pci has none)",
}


def _not_supported(
    exc: FeatureError, what: str, errnos: tuple[int, ...] = _UNSUPPORTED
) -> FeatureError:
    if exc.errno not in errnos:
        return exc
    return FeatureNotSupportedError(
        exc.errno,
        exc.device,
        exc.step,
        detail=f"{what} is not supported by this kernel or driver",
        advice=f"it needs {_OFFERED_BY[what]}",
    )


def set_bus_master(device: Device, enabled: bool) -> None:
    """Set (``enabled``) or clear PCI_COMMAND_MASTER with VFIO_DEVICE_FEATURE_BUS_MASTER."""
    op = _SET_MASTER if enabled else _CLEAR_MASTER
    try:
        device.feature_set(Feature.BUS_MASTER, op.to_bytes(4, "little"))
    except FeatureError as exc:
        raise _not_supported(exc, "bus master control") from exc


def migration_flags(device: Device) -> MigrationFlag:
    """The device's migration flags (VFIO_DEVICE_FEATURE_MIGRATION GET)."""
    try:
        data = device.feature_get(Feature.MIGRATION, bytes(8))
    except FeatureError as exc:
        raise _not_supported(exc, "migration") from exc
    return MigrationFlag(int.from_bytes(data, "little"))


def require_dma_buf(device: Device) -> None:
    """Raise :class:`FeatureNotSupportedError` unless the kernel exports BARs as DMA-BUFs."""
    if not device.feature_probe(DMA_BUF, get=True):
        raise FeatureNotSupportedError(
            errno.ENOTTY,
            device.name,
            "probe feature DMA_BUF",
            detail="DMA-BUF export is not supported by this kernel or driver",
            advice=f"it needs {_OFFERED_BY['DMA-BUF export']}",
        )


def require_vfio_write_combining(region: Region) -> None:
    """Raise :class:`FeatureNotSupportedError` unless the kernel maps ``region`` (a
    prefetchable BAR) write-combining through VFIO, which no mainline kernel does yet.

    The DMA-BUF probe (a region of a :class:`Device` only) says which of the two is missing:
    the export itself, or only its write-combining attribute."""
    bar = f"BAR{region.index}"
    if region.owner is not None and region.owner.feature_probe(DMA_BUF, get=True):
        have = (
            "it exports BAR slices as DMA-BUFs (VFIO_DEVICE_FEATURE_DMA_BUF) but with no "
            "write-combining attribute"
        )
    else:
        have = "it has neither a write-combining VFIO feature nor DMA-BUF export of BARs"
    raise FeatureNotSupportedError(
        errno.ENOTTY,
        region.device,
        f"mmap {bar} write-combining",
        detail=f"write-combining {bar} through VFIO is not supported by this kernel: "
        f"vfio-pci maps every BAR uncached and {have}",
        advice=f"map it through sysfs with caching='wc-sysfs' (resource{region.index}_wc, "
        "as root; vfiopy retires it around its own resets, the kernel does not), or "
        "uncached (the default)",
    )


def probe_features(device: Device) -> FeatureSupport:
    """Ask the kernel (PROBE, nothing changes) which of these it offers this device."""
    return FeatureSupport(
        bus_master=device.feature_probe(Feature.BUS_MASTER, put=True),
        dma_buf=device.feature_probe(DMA_BUF, get=True),
        migration=device.feature_probe(Feature.MIGRATION, get=True),
        low_power=device.feature_probe(Feature.LOW_POWER_ENTRY, put=True),
    )


# --- low power -------------------------------------------------------------------------


def _low_power(device: Device, feature: int, data: bytes) -> None:
    try:
        device.feature_set(feature, data)
    except FeatureError as exc:
        raise _not_supported(exc, "low power", _UNKNOWN_TO_KERNEL) from exc


def enter_low_power(device: Device) -> None:
    """Let the device go to low power (D3hot/D3cold, runtime PM) until :func:`exit_low_power`.

    Host accesses resume it for their duration and it goes back; EINVAL if already entered.
    """
    _low_power(device, Feature.LOW_POWER_ENTRY, b"")


def exit_low_power(device: Device) -> None:
    """Take the device out of low power (VFIO_DEVICE_FEATURE_LOW_POWER_EXIT)."""
    _low_power(device, Feature.LOW_POWER_EXIT, b"")


class LowPowerWakeup(Closable):
    """The eventfd of a low-power entry with wakeup: signalled when the device resumed.

    Once signalled, the entry is over (the device stays in D0).  Close it when done; the
    kernel holds its own reference until the device resumes or is closed.
    """

    def __init__(self, device: Device, fd: int) -> None:
        self.device = device.name
        self.kernel = device.kernel
        self.fd: int | None = fd

    def _fd(self) -> int:
        if self.fd is None:
            raise FeatureError(errno.EBADF, self.device, "wakeup eventfd", detail="closed")
        return self.fd

    def fired(self) -> bool:
        """Whether the device has resumed (non-blocking; consumes the signal)."""
        try:
            data = self.kernel.read(self._fd(), 8)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise FeatureError.from_oserror(exc, self.device, "read wakeup eventfd") from exc
        return int.from_bytes(data, sys.byteorder) > 0

    async def wait(self) -> None:
        """Wait until the device resumes."""
        while not self.fired():
            await anyio.wait_readable(self._fd())

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            self.kernel.close(fd)


def enter_low_power_with_wakeup(device: Device) -> LowPowerWakeup:
    """Enter low power with a wakeup eventfd (VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP).

    Returns its :class:`LowPowerWakeup`; on an error no eventfd is left open.
    """
    with raise_as(FeatureError, device.name, "eventfd"):
        fd = device.kernel.eventfd(0, EFD_NONBLOCK)
    try:
        # struct vfio_device_low_power_entry_with_wakeup: s32 wakeup_eventfd, u32 reserved
        _low_power(
            device,
            Feature.LOW_POWER_ENTRY_WITH_WAKEUP,
            fd.to_bytes(4, "little", signed=True) + bytes(4),
        )
    except BaseException:
        device.kernel.close(fd)
        raise
    return LowPowerWakeup(device, fd)


# --- ioeventfds --------------------------------------------------------------------------


class IoEventFd(Closable):
    """A BAR write the kernel makes when :attr:`fd` is signalled (VFIO_DEVICE_IOEVENTFD).

    Hand :attr:`fd` to whatever signals it (KVM's ioeventfd, another process) or call
    :meth:`trigger`.  :meth:`close` unregisters it (fd -1) and closes the eventfd.
    """

    def __init__(
        self, device: Device, region: int, offset: int, width: int, value: int, fd: int
    ) -> None:
        self._device = device
        self.region, self.offset, self.width, self.value = region, offset, width, value
        self.fd: int | None = fd

    def trigger(self) -> None:
        """Signal the eventfd: the kernel then writes :attr:`value` to the register."""
        if self.fd is None:
            raise FeatureError(errno.EBADF, self._device.name, "ioeventfd", detail="closed")
        with raise_as(FeatureError, self._device.name, "write ioeventfd"):
            self._device.kernel.write(self.fd, (1).to_bytes(8, sys.byteorder))

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        dev = self._device
        try:
            dev.set_ioeventfd(
                dev.region(self.region).offset + self.offset, self.value, self.width, -1
            )
        except VfioError:
            if not dev.closed:  # a closed device dropped its ioeventfds already
                raise
        finally:
            dev.kernel.close(fd)

    def __repr__(self) -> str:
        return (
            f"IoEventFd(region={self.region}, offset={self.offset:#x}, width={self.width}, "
            f"value={self.value:#x}, fd={self.fd})"
        )


def register_ioeventfd(
    device: Device, region: int, offset: int, width: int, value: int
) -> IoEventFd:
    """Have the kernel write ``value`` (``width`` bytes: 1, 2, 4 or 8) at ``offset`` of BAR
    ``region`` whenever the returned :class:`IoEventFd` is signalled."""
    step = "VFIO_DEVICE_IOEVENTFD"
    if width not in _IOEVENTFD_WIDTHS or not 0 <= value < 1 << (8 * width):
        raise FeatureError(
            errno.EINVAL,
            device.name,
            step,
            detail=f"width {width}, value {value:#x}",
            advice="the width is 1, 2, 4 or 8 bytes and the value must fit in it",
        )
    if not PciRegion.BAR0 <= region <= PciRegion.BAR5:
        raise FeatureError(
            errno.EINVAL,
            device.name,
            step,
            detail=f"region {region}",
            advice="ioeventfds write BAR registers only (regions 0 to 5)",
        )
    base = device.region(region).offset
    with raise_as(FeatureError, device.name, "eventfd"):
        fd = device.kernel.eventfd(0, EFD_NONBLOCK)
    try:
        device.set_ioeventfd(base + offset, value, width, fd)
    except FeatureError as exc:
        device.kernel.close(fd)
        raise _not_supported(exc, "VFIO_DEVICE_IOEVENTFD", _UNKNOWN_TO_KERNEL) from exc
    except BaseException:
        device.kernel.close(fd)
        raise
    return IoEventFd(device, region, offset, width, value, fd)


__all__ = [
    "DMA_BUF",
    "FeatureNotSupportedError",
    "FeatureSupport",
    "IoEventFd",
    "LowPowerWakeup",
    "MigrationFlag",
    "enter_low_power",
    "enter_low_power_with_wakeup",
    "exit_low_power",
    "migration_flags",
    "probe_features",
    "register_ioeventfd",
    "require_dma_buf",
    "require_vfio_write_combining",
    "set_bus_master",
]
