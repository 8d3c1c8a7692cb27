"""The modelled kernel version and the behaviours it decides.

A machine models one ``(major, minor)`` Linux version.  The version gives the
defaults of the coarser models (device-set locking, reset path) and gates the
behaviours that appeared in a known release.
"""

from __future__ import annotations

import re

KernelVersion = tuple[int, int]

# Debian 12's kernel.
DEFAULT_KERNEL_VERSION: KernelVersion = (6, 1)

# vfio_pci_probe_mmaps: a memory BAR smaller than a page is mappable when it starts on a page
# boundary; vfio-pci reserves the rest of the page ("vfio sub-page reserved") so that no other
# BAR lands there (05f0c03fbac1).  Before it only BARs of a page or more are.
SUBPAGE_MMAP = (4, 7)
# VFIO_DEVICE_IOEVENTFD (30656177c408): before it the ioctl is ENOTTY.
IOEVENTFD = (4, 17)
# The VFIO_DEVICE_FEATURE ioctl itself: before it, ENOTTY.
DEVICE_FEATURE = (5, 7)
# vfio-pci's memory_lock: BAR mappings zapped and BAR access refused (SIGBUS, EIO) while the
# user's PCI_COMMAND_MEMORY is clear (abafbc551fdd).
MMIO_BLOCKING = (5, 8)
# vfio_pci_core.ko: vfio-pci's core as a library, on which the variant drivers (mlx5_vfio_pci,
# hisi_acc_vfio_pci, ...) register their devices as vfio-pci does (7fa005caa35e).
VFIO_PCI_CORE = (5, 15)
# type1's VFIO_UNMAP_ALL (c19650995374) and VFIO_UPDATE_VADDR (c3cbab24db38): before them
# CHECK_EXTENSION says 0 and the flags are EINVAL.
UNMAP_ALL_VADDR = (5, 12)
# intel-iommu reports its real page sizes (a886d5a7e67b); before, every power of two from 4K.
IOMMU_REAL_PGSIZES = (5, 15)
# sysfs reset_method (d88f521da3ef): before it the attribute is absent and a function reset
# tries the methods in a fixed order.
RESET_METHOD_ATTR = (5, 15)
# vfio-pci's per-device-set locking replaced the global driver_lock.
DEVSET_LOCKING = (5, 0)
# The reset path stopped taking every device set's lock at once.
CURRENT_RESET = (6, 3)
# vfio_pci_core_register_device: an SR-IOV VF is a device set of its own.
VF_OWN_DEVSET = (6, 17)
# VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY/EXIT (cc2742fe3660) and _WITH_WAKEUP (453e6c98fd2b):
# before them vfio_pci_core_ioctl_feature answers ENOTTY.
LOW_POWER = (6, 1)
# Dynamic MSI-X (e4163438e015) and NORESIZE clear for MSI-X (6c8017c6a58d).
MSIX_DYNAMIC = (6, 5)
# vfio_device_show_fdinfo: ``vfio-device-syspath:`` in a device file's fdinfo.
FDINFO_SYSPATH = (6, 18)

_VERSION = re.compile(r"(\d+)\.(\d+)")


def is_version(text: str) -> bool:
    """Whether ``text`` is MAJOR.MINOR (``kernel=6.1`` names a version, not a model)."""
    return _VERSION.fullmatch(text.strip()) is not None


def parse_version(text: str) -> KernelVersion:
    """``"6.1"`` -> ``(6, 1)``; ValueError for anything but MAJOR.MINOR."""
    m = _VERSION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"kernel version {text!r} is not MAJOR.MINOR (such as 6.1)")
    return int(m[1]), int(m[2])


def check_version(version: KernelVersion) -> KernelVersion:
    """``version`` itself when it is two non-negative ints, else ValueError."""
    if (
        not isinstance(version, tuple)
        or len(version) != 2
        or not all(isinstance(v, int) and v >= 0 for v in version)
    ):
        raise ValueError(f"kernel_version must be (major, minor), not {version!r}")
    return version


def default_kernel_model(version: KernelVersion) -> str:
    return "devset" if version >= DEVSET_LOCKING else "legacy"


def default_reset_model(version: KernelVersion) -> str:
    return "current" if version >= CURRENT_RESET else "pre-6.3"


def format_version(version: KernelVersion) -> str:
    return f"{version[0]}.{version[1]}"
