"""PCI addresses and the sysfs view of PCI devices, IOMMU groups, drivers and resets.

Sysfs is hostile input: a device can be removed between two reads, an IOMMU
group can hold non-PCI devices, an attribute can be missing on an older kernel.
Every read goes through the :class:`~vfiopy.kernel.Kernel`, is parsed strictly
and fails with a :class:`~vfiopy.errors.SysfsError` naming the device and the
attribute; listings skip entries they cannot parse instead of failing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

from vfiopy.errors import AddressError, SysfsError, raise_as
from vfiopy.kernel import Kernel, default_kernel

# Domain: Linux prints "%04x", so VMD domains (0x10000 and up) have 5+ digits.
_ADDRESS_RE = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<slot>[0-9a-fA-F]{2})\.(?P<function>[0-7])"
)
_RESET_METHOD_RE = re.compile(r"[a-z][a-z0-9_]*")
VFIO_DRIVER = "vfio-pci"


@dataclass(frozen=True, order=True, slots=True)
class PciAddress:
    """A PCI function address: domain, bus, slot (device) and function."""

    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        for name, value, top in (
            ("domain", self.domain, 0xFFFFFFFF),
            ("bus", self.bus, 0xFF),
            ("slot", self.slot, 0x1F),
            ("function", self.function, 0x7),
        ):
            if not 0 <= value <= top:
                raise AddressError(
                    errno.EINVAL,
                    detail=f"{name} {value:#x} is outside 0..{top:#x}",
                    advice="give an address like 0000:3b:00.0 or 3b:00.0",
                )

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``0000:3b:00.0`` or ``3b:00.0``; anything else raises :class:`AddressError`."""
        m = _ADDRESS_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise AddressError(
                errno.EINVAL,
                detail=f"{text!r} is not a PCI address",
                advice="give an address like 0000:3b:00.0 or 3b:00.0 (see lspci -D)",
            )
        return cls(
            int(m["domain"] or "0", 16),
            int(m["bus"], 16),
            int(m["slot"], 16),
            int(m["function"]),
        )

    @classmethod
    def of(cls, addr: PciAddress | str) -> PciAddress:
        """``addr`` itself, or parsed when it is text."""
        return addr if isinstance(addr, PciAddress) else cls.parse(addr)

    @classmethod
    def from_devfn(cls, domain: int, bus: int, devfn: int) -> PciAddress:
        return cls(domain, bus, devfn >> 3, devfn & 7)

    @property
    def devfn(self) -> int:
        return self.slot << 3 | self.function

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"


def _try_parse(name: str) -> PciAddress | None:
    try:
        return PciAddress.parse(name)
    except AddressError:
        return None


class PciIds(NamedTuple):
    vendor: int
    device: int


class Sysfs:
    """PCI devices as sysfs shows them, read through a :class:`Kernel`.

    ``root`` is the sysfs mount point, so tests and the simulator can point it
    elsewhere.
    """

    def __init__(self, kernel: Kernel | None = None, root: str = "/sys") -> None:
        self.kernel = kernel if kernel is not None else default_kernel()
        self.root = root.rstrip("/")
        self.devices_dir = f"{self.root}/bus/pci/devices"

    # --- paths and raw access ----------------------------------------------
    def path(self, addr: PciAddress | str, attr: str = "") -> str:
        base = f"{self.devices_dir}/{PciAddress.of(addr)}"
        return f"{base}/{attr}" if attr else base

    def _gone_or(self, addr: PciAddress, exc: OSError, step: str, path: str) -> SysfsError:
        # An attribute missing under a vanished device directory means the
        # device was removed mid-walk: say so instead of "no such file".
        if exc.errno == errno.ENOENT and not self.kernel.exists(self.path(addr)):
            return SysfsError(
                errno.ENODEV,
                str(addr),
                step,
                detail=f"{self.path(addr)} does not exist",
                advice="the device is gone (removed or never present); check the address "
                "with lspci -D or rescan the bus",
            )
        return SysfsError(exc.errno or errno.EIO, str(addr), step, detail=path)

    def read(self, addr: PciAddress | str, attr: str) -> str:
        """The stripped text of one attribute of the device."""
        a = PciAddress.of(addr)
        path = self.path(a, attr)
        try:
            return self.kernel.read_text(path).strip()
        except OSError as exc:
            raise self._gone_or(a, exc, f"read {attr}", path) from exc

    def write(self, addr: PciAddress | str, attr: str, value: str) -> None:
        a = PciAddress.of(addr)
        path = self.path(a, attr)
        try:
            self.kernel.write_text(path, value)
        except OSError as exc:
            raise self._gone_or(a, exc, f"write {attr}", path) from exc

    def _readlink(self, addr: PciAddress, attr: str) -> str | None:
        """The target of a link attribute, or None when the link is absent."""
        path = self.path(addr, attr)
        try:
            return self.kernel.readlink(path)
        except OSError as exc:
            err = self._gone_or(addr, exc, f"readlink {attr}", path)
            if err.errno == errno.ENOENT:
                return None
            raise err from exc

    def _hex(self, addr: PciAddress | str, attr: str) -> int:
        text = self.read(addr, attr)
        try:
            return int(text, 16)
        except ValueError:
            raise SysfsError(
                errno.EINVAL, str(addr), f"read {attr}", detail=f"unexpected value {text!r}"
            ) from None

    # --- identity ------------------------------------------------------------
    def exists(self, addr: PciAddress | str) -> bool:
        return self.kernel.exists(self.path(addr))

    def devices(self) -> list[PciAddress]:
        """Every PCI function, sorted; entries that are not addresses are skipped."""
        with raise_as(SysfsError, None, "list PCI devices", self.devices_dir):
            names = self.kernel.listdir(self.devices_dir)
        return sorted(a for a in map(_try_parse, names) if a is not None)

    def vendor(self, addr: PciAddress | str) -> int:
        return self._hex(addr, "vendor")

    def device(self, addr: PciAddress | str) -> int:
        return self._hex(addr, "device")

    def class_code(self, addr: PciAddress | str) -> int:
        return self._hex(addr, "class")

    def ids(self, addr: PciAddress | str) -> PciIds:
        return PciIds(self.vendor(addr), self.device(addr))

    def find_device(
        self,
        vendor: int,
        device: int,
        address: str | None = None,
        *,
        name: str,
        hint: str = "give its address",
    ) -> PciAddress:
        """The device a driver for ``vendor:device`` (called ``name``) should take.

        ``address``, checked to name such a device (else :class:`AddressError`); without
        it, the first such device bound to vfio-pci.  None bound: a :class:`SysfsError`
        (ENODEV) listing those found and how to bind one; none at all: one ending in ``hint``.
        """
        want = f"{vendor:04x}:{device:04x} ({name})"
        step = "find device"
        if address is not None:
            addr = PciAddress.parse(address)
            if not self.exists(addr):
                raise AddressError(
                    errno.ENODEV, str(addr), step, "no PCI device at this address", "see lspci -D"
                )
            ids = self.ids(addr)
            if ids != (vendor, device):
                raise AddressError(
                    errno.ENODEV,
                    str(addr),
                    step,
                    f"it is {ids.vendor:04x}:{ids.device:04x}, not {want}",
                    "give the address of one",
                )
            return addr
        found = [a for a in self.devices() if self.ids(a) == (vendor, device)]
        for a in found:
            if self.driver(a) == VFIO_DRIVER:
                return a
        if found:
            bound = ", ".join(f"{a} ({self.driver(a) or 'no driver'})" for a in found)
            raise SysfsError(
                errno.ENODEV,
                None,
                step,
                f"no {want} is bound to {VFIO_DRIVER}; found {bound}",
                f"bind one with `driverctl set-override {found[0]} {VFIO_DRIVER}`",
            )
        raise SysfsError(errno.ENODEV, None, step, f"no {want} found", hint)

    # --- IOMMU groups and drivers -------------------------------------------
    def iommu_group(self, addr: PciAddress | str) -> int:
        """The IOMMU group number (the name of the iommu_group link's target)."""
        a = PciAddress.of(addr)
        target = self._readlink(a, "iommu_group")
        if target is None:
            raise SysfsError(
                errno.ENOENT,
                str(a),
                "readlink iommu_group",
                detail="the device has no IOMMU group",
                advice="enable the IOMMU (intel_iommu=on or amd_iommu=on, and iommu=pt) or "
                "load vfio with enable_unsafe_noiommu_mode=1",
            )
        name = target.rstrip("/").rsplit("/", 1)[-1]
        if not name.isdigit() or not name.isascii():
            raise SysfsError(
                errno.EINVAL, str(a), "readlink iommu_group", detail=f"odd target {target!r}"
            )
        return int(name)

    def group_devices(self, group: int) -> list[PciAddress]:
        """The PCI functions in IOMMU group ``group``, sorted."""
        path = f"{self.root}/kernel/iommu_groups/{int(group)}/devices"
        with raise_as(SysfsError, f"group {group}", "list group devices", path):
            names = self.kernel.listdir(path)
        # A group can hold non-PCI devices (platform devices behind the same
        # SMMU); they have no PCI address and are skipped.
        return sorted(a for a in map(_try_parse, names) if a is not None)

    def driver(self, addr: PciAddress | str) -> str | None:
        """The bound driver's name, or None when no driver is bound."""
        target = self._readlink(PciAddress.of(addr), "driver")
        return None if target is None else target.rstrip("/").rsplit("/", 1)[-1]

    def cdev(self, addr: PciAddress | str) -> str | None:
        """The device's VFIO cdev (/dev/vfio/devices/vfioN), or None.

        The vfio-dev directory exists only while vfio-pci is bound and the
        kernel has CONFIG_VFIO_DEVICE_CDEV (6.6+).
        """
        a = PciAddress.of(addr)
        path = self.path(a, "vfio-dev")
        try:
            names = self.kernel.listdir(path)
        except OSError as exc:
            err = self._gone_or(a, exc, "list vfio-dev", path)
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise err from exc
        nodes = sorted(n for n in names if re.fullmatch(r"vfio[0-9]+", n))
        return f"/dev/vfio/devices/{nodes[0]}" if nodes else None

    def bind_vfio(self, addr: PciAddress | str) -> None:
        """Bind the device to vfio-pci: driver_override, unbind, drivers_probe.

        driver_override makes the probe pick vfio-pci for this device only,
        unlike new_id which would grab every device with the same ids.
        """
        a = PciAddress.of(addr)
        self.write(a, "driver_override", VFIO_DRIVER)
        current = self.driver(a)
        if current == VFIO_DRIVER:
            return
        if current is not None:
            self.write(a, "driver/unbind", str(a))
        probe = f"{self.root}/bus/pci/drivers_probe"
        with raise_as(SysfsError, str(a), "write drivers_probe", probe):
            self.kernel.write_text(probe, str(a))
        bound = self.driver(a)
        if bound != VFIO_DRIVER:
            raise SysfsError(
                errno.ENODEV,
                str(a),
                "bind vfio-pci",
                detail=f"after drivers_probe the driver is {bound or 'none'}",
                advice="load the module (modprobe vfio-pci) and check dmesg",
            )

    def unbind(self, addr: PciAddress | str) -> None:
        """Unbind the device from its driver (nothing to do when none is bound)."""
        a = PciAddress.of(addr)
        if self.driver(a) is not None:
            self.write(a, "driver/unbind", str(a))

    # --- topology and resets --------------------------------------------------
    def parent_bridge(self, addr: PciAddress | str) -> PciAddress | None:
        """The bridge above the device, or None on a root bus.

        /sys/bus/pci/devices/<addr> links to the device's place in the tree
        (../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0); the
        component before the last is the parent.
        """
        a = PciAddress.of(addr)
        path = self.path(a)
        try:
            target = self.kernel.readlink(path)
        except OSError as exc:
            raise self._gone_or(a, exc, "readlink device", path) from exc
        parts = [p for p in target.split("/") if p]
        if len(parts) < 2 or parts[-1] != str(a):
            raise SysfsError(
                errno.EINVAL, str(a), "readlink device", detail=f"odd target {target!r}"
            )
        return _try_parse(parts[-2])

    def bus_devices(self, addr: PciAddress | str) -> list[PciAddress]:
        """Every function on the device's bus (itself included)."""
        a = PciAddress.of(addr)
        return [d for d in self.devices() if (d.domain, d.bus) == (a.domain, a.bus)]

    def slot_devices(self, addr: PciAddress | str) -> list[PciAddress]:
        """Every function in the device's slot (itself included)."""
        a = PciAddress.of(addr)
        return [d for d in self.bus_devices(a) if d.slot == a.slot]

    def reset_methods(self, addr: PciAddress | str) -> list[str]:
        """The enabled reset methods, in the kernel's order of preference.

        The attribute is hidden when the device has no reset method, and is
        absent before Linux 5.15; both read as an empty list.
        """
        a = PciAddress.of(addr)
        try:
            text = self.read(a, "reset_method")
        except SysfsError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise
        return [m for m in text.split() if _RESET_METHOD_RE.fullmatch(m)]

    def config(self, addr: PciAddress | str, size: int = 0x100) -> bytes:
        """Up to ``size`` bytes of the device's config space from its sysfs ``config`` file.

        The kernel shows all of it to root and the first 64 bytes to anyone else.
        """
        a = PciAddress.of(addr)
        path = self.path(a, "config")
        try:
            fd = self.kernel.open(path, os.O_RDONLY)
        except OSError as exc:
            raise self._gone_or(a, exc, "read config", path) from exc
        try:
            return self.kernel.pread(fd, size, 0)
        except OSError as exc:
            raise self._gone_or(a, exc, "read config", path) from exc
        finally:
            with contextlib.suppress(OSError):
                self.kernel.close(fd)

    def set_reset_methods(self, addr: PciAddress | str, methods: list[str]) -> None:
        """Enable exactly ``methods`` (in that order); an empty list disables resets."""
        bad = [m for m in methods if not _RESET_METHOD_RE.fullmatch(m)]
        if bad:
            raise SysfsError(
                errno.EINVAL, str(addr), "write reset_method", detail=f"bad names {bad!r}"
            )
        # reset_method_store() treats an empty (newline-only) write as "none".
        self.write(addr, "reset_method", " ".join(methods) or "\n")

    def is_virtfn(self, addr: PciAddress | str) -> bool:
        """Whether the device is an SR-IOV VF (it has a physfn link)."""
        return self.kernel.exists(self.path(addr, "physfn"))

    def is_bridge(self, addr: PciAddress | str) -> bool:
        return self.class_code(addr) >> 8 == 0x0604

    def reset_domain(
        self, addr: PciAddress | str, version: tuple[int, int] | None = None
    ) -> list[PciAddress]:
        """The functions ``addr``'s device set can touch, sorted: its vfio-pci members
        and what its bus or slot reset would hit, as :mod:`vfiopy.kmodel` predicts
        for ``version`` (default: the running kernel)."""
        from vfiopy.kmodel import KernelModel

        return KernelModel(self, version).device_set(addr).touched

    # --- SR-IOV ------------------------------------------------------------------
    def sriov_totalvfs(self, addr: PciAddress | str) -> int:
        return int(self.read(addr, "sriov_totalvfs"))

    def sriov_numvfs(self, addr: PciAddress | str) -> int:
        text = self.read(addr, "sriov_numvfs")
        if not text.isdigit():
            raise SysfsError(
                errno.EINVAL, str(addr), "read sriov_numvfs", detail=f"unexpected {text!r}"
            )
        return int(text)

    def set_sriov_numvfs(self, addr: PciAddress | str, count: int) -> None:
        """Create ``count`` VFs (0 removes them)."""
        if count < 0:
            raise SysfsError(errno.EINVAL, str(addr), "write sriov_numvfs", detail=f"{count}")
        current = self.sriov_numvfs(addr)
        if current == count:
            return
        # sriov_numvfs_store() refuses to change a non-zero count to another
        # non-zero count (EBUSY): go through 0.
        if current and count:
            self.write(addr, "sriov_numvfs", "0")
        self.write(addr, "sriov_numvfs", str(count))

    def virtfns(self, addr: PciAddress | str) -> list[PciAddress]:
        """The VFs of a PF (from its virtfnN links), in VF order."""
        a = PciAddress.of(addr)
        path = self.path(a)
        with raise_as(SysfsError, str(a), "list virtfn links", path):
            names = self.kernel.listdir(path)
        vfs: list[tuple[int, PciAddress]] = []
        for n in names:
            if not re.fullmatch(r"virtfn[0-9]+", n):
                continue
            target = self._readlink(a, n)
            vf = _try_parse(target.rsplit("/", 1)[-1]) if target else None
            if vf is not None:
                vfs.append((int(n[6:]), vf))
        return [vf for _, vf in sorted(vfs)]


__all__ = ["VFIO_DRIVER", "PciAddress", "PciIds", "Sysfs"]
