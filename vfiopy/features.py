"""Typed VFIO device features: bus mastering, DMA-BUF export and migration, probed.

Each is a ``VFIO_DEVICE_FEATURE`` (the ioctl exists from Linux 5.7).  A kernel that does not
know a feature answers ENOTTY (``vfio_pci_core_ioctl_feature``'s default), one that knows it
but not the operation EINVAL (``vfio_check_feature``); both become
:class:`FeatureNotSupportedError`, which says which kernel or driver offers the feature.

- bus mastering (``VFIO_DEVICE_FEATURE_BUS_MASTER``, feature 10): set or clear
  PCI_COMMAND_MASTER through the kernel; recent kernels only (release not checked here).
  Everywhere else the config write does the same (``ConfigSpace.enable_bus_master``).
- DMA-BUF export of BAR slices (``VFIO_DEVICE_FEATURE_DMA_BUF``, feature 11, Linux 6.19):
  probed only.
- migration (``VFIO_DEVICE_FEATURE_MIGRATION``, Linux 6.0): GET gives the migration flags;
  only devices whose driver implements migration (a variant driver such as
  ``mlx5_vfio_pci``) have it, plain vfio-pci answers ENOTTY.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vfiopy._uapi import Feature
from vfiopy.errors import FeatureError

if TYPE_CHECKING:
    from vfiopy.device import Device

DMA_BUF = 11  # VFIO_DEVICE_FEATURE_DMA_BUF (Linux 6.19), kept here for older headers
_CLEAR_MASTER, _SET_MASTER = 0, 1  # struct vfio_device_feature_bus_master.op
_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)


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


_OFFERED_BY = {
    "bus master control": "the kernel's VFIO_DEVICE_FEATURE_BUS_MASTER (a recent kernel); "
    "set PCI_COMMAND_MASTER in config space instead (ConfigSpace.enable_bus_master)",
    "DMA-BUF export": "Linux 6.19+ (VFIO_DEVICE_FEATURE_DMA_BUF), with DMA-BUF support built in",
    "migration": "Linux 6.0+ and a driver that implements migration (a variant driver such as "
    "mlx5_vfio_pci; plain vfio-pci has none)",
}


def _not_supported(exc: FeatureError, what: str) -> FeatureError:
    if exc.errno not in _UNSUPPORTED:
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


def probe_features(device: Device) -> FeatureSupport:
    """Ask the kernel (PROBE, nothing changes) which of the three it offers this device."""
    return FeatureSupport(
        bus_master=device.feature_probe(Feature.BUS_MASTER, put=True),
        dma_buf=device.feature_probe(DMA_BUF, get=True),
        migration=device.feature_probe(Feature.MIGRATION, get=True),
    )


__all__ = [
    "DMA_BUF",
    "FeatureNotSupportedError",
    "FeatureSupport",
    "MigrationFlag",
    "migration_flags",
    "probe_features",
    "require_dma_buf",
    "set_bus_master",
]
