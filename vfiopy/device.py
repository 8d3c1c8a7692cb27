"""A VFIO device fd: info, regions, interrupts, resets and features.

Opening a device (GROUP_GET_DEVICE_FD, or BIND_IOMMUFD on its cdev) makes
vfio-pci enable it and try a function reset; releasing the last fd disables
it, tries a function reset and, once every device of its reset set is
released, a bus reset.  :meth:`Device.close` therefore unmaps the regions and
disables interrupts first: a live mmap would defer that release.
"""

from __future__ import annotations

import contextlib
import errno
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vfiopy._fdguard import FdGuard
from vfiopy._log import get_logger
from vfiopy._uapi import (
    Cap,
    Closable,
    DeviceFlag,
    Feature,
    FeatureFlag,
    PciRegion,
    Struct,
    cap_chain,
    ffi,
    ioctl,
    ioctl_info,
    lib,
    open_node,
)
from vfiopy.errors import (
    BindIommufdError,
    DeviceInfoError,
    FeatureError,
    HotResetError,
    OpenDeviceError,
    RegionError,
    ReleaseError,
    ResetError,
    VfioError,
    raise_as,
)
from vfiopy.hotreset import HOT_RESET_ADVICE as _HOT_RESET_ADVICE
from vfiopy.hotreset import DependentDevice as DependentDevice
from vfiopy.hotreset import hot_reset_info
from vfiopy.irq import Irq
from vfiopy.kernel import O_RDWR, Kernel
from vfiopy.pci import COMMAND, Command, ConfigSpace
from vfiopy.region import Caching, Region, retire_write_combined, write_combined_devices
from vfiopy.sysfs import PciAddress, Sysfs

if TYPE_CHECKING:
    from vfiopy.group import Group
    from vfiopy.iommufd import Iommufd

log = get_logger(__name__)

# vfio_pci_ioeventfd's refusals (ENOTTY, a kernel before 4.17, is vfiopy.features' to explain)
_IOEVENTFD_ADVICE = {
    errno.EINVAL: "the register must lie inside a BAR (not config space or the ROM) and "
    "outside the MSI-X table, with a width of 1, 2, 4 or 8 bytes",
    errno.EEXIST: "this (register, value, width) already has an ioeventfd; unregister it first",
    errno.ENODEV: "no ioeventfd is registered for this (register, value, width)",
    errno.ENOSPC: "the kernel allows 1000 ioeventfds per device (VFIO_PCI_IOEVENTFD_MAX)",
}


@dataclass(frozen=True)
class DeviceInfo:
    """VFIO_DEVICE_GET_INFO."""

    flags: DeviceFlag
    num_regions: int
    num_irqs: int
    caps: tuple[Cap, ...] = ()


class Device(Closable):
    """An open VFIO device. Build with :meth:`from_group` or :meth:`from_cdev`."""

    def __init__(
        self,
        address: PciAddress,
        fd: int,
        kernel: Kernel,
        *,
        group: Group | None = None,
        iommufd: Iommufd | None = None,
        devid: int | None = None,
    ) -> None:
        """Wrap an open device fd (the caller closes ``fd`` if this raises)."""
        self.address = address
        self.name = str(address)
        self.fd = fd
        self.kernel = kernel
        self.group = group
        self.iommufd = iommufd
        self.devid = devid
        self._regions: dict[int, Region] = {}
        self._irqs: dict[int, Irq] = {}
        self._config: ConfigSpace | None = None
        # Shared with the regions and interrupts: after close, none of them may
        # use the fd number, which the next open (another device) may get.
        self._guard = FdGuard(fd, self.name)
        self.closed = False
        s = ioctl_info(
            kernel,
            fd,
            "VFIO_DEVICE_GET_INFO",
            "struct vfio_device_info",
            error=DeviceInfoError,
            device=self.name,
        )
        flags = DeviceFlag(int(s.p.flags))
        caps = tuple(cap_chain(s, int(s.p.cap_offset))) if flags & DeviceFlag.CAPS else ()
        self.info = DeviceInfo(flags, int(s.p.num_regions), int(s.p.num_irqs), caps)

    # --- construction ---------------------------------------------------------------
    @classmethod
    def from_group(
        cls, group: Group, addr: PciAddress | str, vf_token: uuid.UUID | None = None
    ) -> Device:
        """Open ``addr`` through its group (which must have a container with an IOMMU);
        ``vf_token`` for a VF of a vfio-pci PF (see :meth:`Group.get_device_fd`)."""
        address = PciAddress.of(addr)
        fd = group.get_device_fd(address, vf_token)
        try:
            return cls(address, fd, group.kernel, group=group)
        except BaseException:
            group.kernel.close(fd)
            raise

    @classmethod
    def from_cdev(
        cls,
        addr: PciAddress | str,
        iommufd: Iommufd,
        ioas_id: int,
        kernel: Kernel | None = None,
        sysfs: Sysfs | None = None,
        vf_token: uuid.UUID | None = None,
    ) -> Device:
        """Open ``addr``'s VFIO cdev, bind it to ``iommufd`` and attach it to ``ioas_id``;
        ``vf_token`` for a VF of a vfio-pci PF (VFIO_DEVICE_BIND_FLAG_TOKEN, Linux 6.17+)."""
        address = PciAddress.of(addr)
        k = kernel if kernel is not None else iommufd.kernel
        path = (sysfs if sysfs is not None else Sysfs(k)).cdev(address)
        if path is None:
            raise OpenDeviceError(
                errno.ENODEV,
                str(address),
                "find vfio cdev",
                detail="no vfio-dev/vfioN under the device in sysfs",
                advice="bind the device to vfio-pci; the cdev needs Linux 6.6+ with "
                "CONFIG_VFIO_DEVICE_CDEV (else use the container backend)",
            )
        fd = open_node(k, path, O_RDWR, error=OpenDeviceError, device=str(address))
        try:
            if vf_token is None:
                bind = Struct("struct vfio_device_bind_iommufd")
            else:
                # The VF token rides along from Linux 6.17 (VFIO_DEVICE_BIND_FLAG_TOKEN);
                # an older kernel refuses the flag with EINVAL.
                bind = Struct("struct vfiopy_bind_iommufd_token")
                uuid_buf = ffi.new("uint8_t[16]", vf_token.bytes)
                bind.p.flags = lib.VFIO_DEVICE_BIND_FLAG_TOKEN
                bind.p.token_uuid_ptr = int(ffi.cast("uintptr_t", uuid_buf))
            # Binding is the open: vfio-pci enables and resets the device here.
            with iommufd.guard.hold(BindIommufdError, "VFIO_DEVICE_BIND_IOMMUFD") as ictx:
                bind.p.iommufd = ictx
                ioctl(
                    k,
                    fd,
                    "VFIO_DEVICE_BIND_IOMMUFD",
                    bind.p,
                    error=BindIommufdError,
                    device=str(address),
                    advice={
                        errno.EBUSY: "the device is already bound to an iommufd or open "
                        "through its group",
                        errno.EACCES: "a VF of a PF bound to vfio-pci needs the VF token its "
                        "PF's user set: give vf_token=, the same UUID",
                        errno.EINVAL: "a VF token on the cdev path needs Linux 6.17+; use the "
                        "container backend (the group path) before that",
                    }
                    if vf_token is not None
                    else {
                        errno.EBUSY: "the device is already bound to an iommufd or open "
                        "through its group",
                        errno.EACCES: "a VF of a PF bound to vfio-pci needs the VF token its "
                        "PF's user set: give vf_token=, the same UUID",
                    },
                )
            attach = Struct("struct vfio_device_attach_iommufd_pt")
            attach.p.pt_id = ioas_id
            ioctl(
                k,
                fd,
                "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                attach.p,
                error=BindIommufdError,
                device=str(address),
                detail=f"ioas {ioas_id}",
            )
            return cls(address, fd, k, iommufd=iommufd, devid=int(bind.p.out_devid))
        except BaseException:
            k.close(fd)
            raise

    # --- regions, interrupts, config -------------------------------------------
    def region(self, index: int) -> Region:
        """Region ``index`` (see :class:`vfiopy._uapi.PciRegion`), queried once."""
        # Held across the query and the caching, so close finds every region.
        with self._guard.hold(DeviceInfoError, f"region {index}"):
            r = self._regions.get(index)
            if r is None:
                r = Region(self.kernel, self.fd, self.name, index, self._guard)
                r.owner = self
                if index == PciRegion.CONFIG:
                    r.write_check = self._check_config_write
                self._regions[index] = r
        return r

    def _check_config_write(self, off: int, data: bytes) -> None:
        """Refuse a config write that clears PCI_COMMAND_MEMORY while BARs are mapped.

        vfio-pci zaps the BAR mappings when memory decoding goes off (Linux 5.8+, "vfio-pci:
        Invalidate mmaps and block MMIO access on disabled memory"): the next access through
        one raises SIGBUS.  A write that leaves MEMORY set, or one with nothing mapped, goes.
        """
        if not off <= COMMAND < off + len(data) or data[COMMAND - off] & Command.MEMORY:
            return
        bars = [(i, r) for i, r in sorted(self._regions.items()) if i <= PciRegion.BAR5]
        live = [
            f"BAR{i}"
            for i, r in bars
            if any(not m.closed and m.caching is not Caching.WC_SYSFS for m in r.mappings)
        ]
        wc = any(m.caching is Caching.WC_SYSFS for _, r in bars for m in r.mappings)
        if not live and not wc:
            return
        current = int.from_bytes(self.region(PciRegion.CONFIG).read(COMMAND, 2), "little")
        if not current & Command.MEMORY:
            return
        if live:
            raise RegionError(
                errno.EBUSY,
                self.name,
                "write PCI_COMMAND",
                detail=f"it would clear PCI_COMMAND_MEMORY while {', '.join(live)} "
                "are mapped: the kernel zaps the mappings and their next access gets SIGBUS",
                advice="close the mappings first (Mapping.close or Region.close), or keep "
                "MEMORY set (ConfigSpace.enable_bus_master keeps it)",
            )
        # The kernel does not zap resourceN_wc mappings when decoding goes off: retire them.
        self.retire_write_combined("a config write clearing PCI_COMMAND_MEMORY")

    def retire_write_combined(self, why: str) -> int:
        """Retire this device's ``resourceN_wc`` mappings (:class:`Caching` ``WC_SYSFS``)
        before ``why``: vfio-pci zaps only its own mappings.  How many it retired."""
        return sum(r.retire_write_combined(why) for r in list(self._regions.values()))

    def regions(self) -> list[Region]:
        """The device's regions (absent BARs have size 0; an absent VGA region is left out)."""
        out = []
        for i in range(self.info.num_regions):
            try:
                out.append(self.region(i))
            except DeviceInfoError as exc:
                # vfio-pci answers EINVAL for the VGA region of a non-VGA device.
                if exc.errno != errno.EINVAL:
                    raise
        return out

    def irq(self, index: int) -> Irq:
        """Interrupt index ``index`` (see :class:`vfiopy._uapi.PciIrq`), queried once."""
        with self._guard.hold(DeviceInfoError, f"irq {index}"):
            i = self._irqs.get(index)
            if i is None:
                i = Irq(self.kernel, self.fd, self.name, index, self._guard)
                self._irqs[index] = i
        return i

    @property
    def config(self) -> ConfigSpace:
        if self._config is None:
            self._config = ConfigSpace(self.region(PciRegion.CONFIG))
        return self._config

    # --- resets -----------------------------------------------------------------------
    def reset(self) -> None:
        """Function reset (VFIO_DEVICE_RESET): FLR, PM or another per-function method."""
        advice = None
        if not self.info.flags & DeviceFlag.RESET:
            advice = "the device has no function reset; use hot_reset() (slot or bus reset)"
        self.retire_write_combined("VFIO_DEVICE_RESET")
        with self._guard.hold(ResetError) as fd:
            ioctl(
                self.kernel,
                fd,
                "VFIO_DEVICE_RESET",
                0,
                error=ResetError,
                device=self.name,
                advice=advice,
            )

    def hot_reset_info(self) -> list[DependentDevice]:
        """The devices a slot or bus reset of this device would reset too."""
        with self._guard.hold(HotResetError, "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO") as fd:
            return hot_reset_info(self.kernel, fd, self.name)

    def hot_reset(self, groups: list[Group] | None = None) -> None:
        """Slot or bus reset of this device and every device that shares it.

        A group-opened device proves ownership with the fds of every affected
        group (``groups``, default: its own); a cdev device uses the
        zero-length form, where the kernel checks the iommufd's ownership.
        """
        if groups is None:
            groups = [self.group] if self.group is not None else []  # cdev: zero-length
        self._retire_for_hot_reset()
        try:
            with contextlib.ExitStack() as held:
                # The kernel gets the groups' numbers: none may be closed (and
                # its number handed on) until the reset is done.
                fd = held.enter_context(self._guard.hold(HotResetError))
                step = "VFIO_DEVICE_PCI_HOT_RESET"
                fds = [held.enter_context(g.guard.hold(HotResetError, step)) for g in groups]
                s = Struct(
                    "struct vfio_pci_hot_reset",
                    ffi.sizeof("struct vfio_pci_hot_reset") + 4 * len(fds),
                )
                s.p.count = len(fds)
                for i, group_fd in enumerate(fds):
                    s.p.group_fds[i] = group_fd
                ioctl(
                    self.kernel,
                    fd,
                    "VFIO_DEVICE_PCI_HOT_RESET",
                    s.p,
                    error=HotResetError,
                    device=self.name,
                    advice=_HOT_RESET_ADVICE,
                )
        except HotResetError as exc:
            if exc.errno in (errno.EPERM, errno.EINVAL, errno.EBUSY):
                exc.detail = self._dependents_text()
            raise

    def _retire_for_hot_reset(self) -> None:
        """Retire the ``resourceN_wc`` mappings of every device the reset will reach, mapped
        by whichever Device object (the affected list is asked for only when any exist)."""
        why = "VFIO_DEVICE_PCI_HOT_RESET"
        self.retire_write_combined(why)
        if not write_combined_devices():
            return
        try:
            affected = [str(d.address) for d in self.hot_reset_info()]
        except VfioError:
            return  # the reset itself will fail the same way and say why
        retire_write_combined(affected, why)

    def _dependents_text(self) -> str | None:
        try:
            deps = self.hot_reset_info()
        except VfioError:
            return None
        parts = [
            f"{d.address} (group {d.group_id})"
            if d.group_id is not None
            else f"{d.address} ({'owned' if d.owned else 'not owned'})"
            for d in deps
        ]
        return "the reset affects " + ", ".join(parts)

    # --- features -----------------------------------------------------------------------
    def _feature(self, flags: int, data: bytes, step: str) -> Struct:
        s = Struct(
            "struct vfio_device_feature", ffi.sizeof("struct vfio_device_feature") + len(data)
        )
        s.p.flags = flags
        if data:
            ffi.memmove(s.p.data, data, len(data))
        with self._guard.hold(FeatureError, step) as fd:
            ioctl(
                self.kernel,
                fd,
                "VFIO_DEVICE_FEATURE",
                s.p,
                error=FeatureError,
                device=self.name,
                detail=step,
            )
        return s

    def feature_probe(self, feature: int, *, get: bool = False, put: bool = False) -> bool:
        """Whether the device supports ``feature`` (and GET, or SET with ``put``, of it)."""
        flags = feature | FeatureFlag.PROBE
        flags |= (FeatureFlag.GET if get else 0) | (FeatureFlag.SET if put else 0)
        try:
            self._feature(flags, b"", f"probe feature {feature}")
        except FeatureError as exc:
            # Unknown features answer ENOTTY; unsupported GET/SET, EINVAL.
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise
        return True

    def feature_get(self, feature: int, data: bytes) -> bytes:
        """GET ``feature``: ``data`` is the input and sizes the reply."""
        s = self._feature(feature | FeatureFlag.GET, data, f"get feature {feature}")
        return bytes(ffi.buffer(s.p.data, len(data)))

    def feature_set(self, feature: int, data: bytes) -> None:
        if feature in (Feature.LOW_POWER_ENTRY, Feature.LOW_POWER_ENTRY_WITH_WAKEUP):
            # vfio-pci zaps its own BAR mappings on entry, not resourceN_wc ones.
            self.retire_write_combined("low-power entry")
        self._feature(feature | FeatureFlag.SET, data, f"set feature {feature}")

    def set_ioeventfd(self, offset: int, data: int, width: int, fd: int) -> None:
        """VFIO_DEVICE_IOEVENTFD: when ``fd`` is signalled the kernel writes ``data`` (``width``
        bytes) at device-file ``offset`` (a BAR's region offset plus the register); ``fd`` -1
        removes the registration of that (offset, data, width).  See vfiopy.features."""
        s = Struct("struct vfio_device_ioeventfd")
        s.p.flags, s.p.offset, s.p.data, s.p.fd = width, offset, data, fd
        step = "VFIO_DEVICE_IOEVENTFD"
        with self._guard.hold(FeatureError, step) as held:
            ioctl(
                self.kernel,
                held,
                step,
                s.p,
                error=FeatureError,
                device=self.name,
                detail=f"offset {offset:#x} width {width} data {data:#x} fd {fd}",
                advice=_IOEVENTFD_ADVICE,
            )

    def set_vf_token(self, token: uuid.UUID) -> None:
        """Share ``token`` with this PF's VFs (``VFIO_DEVICE_FEATURE_PCI_VF_TOKEN``, Linux 5.7+;
        the PF bound to vfio-pci): each VF then opens only with the same UUID, given as
        ``vf_token=`` (:meth:`Session.open_device`).  ENOTTY on a device that is not a PF."""
        self._feature(Feature.PCI_VF_TOKEN | FeatureFlag.SET, token.bytes, "set VF token")

    # --- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Unmap regions, disable interrupts, then close the fd. Idempotent.

        Unmapping or disabling can fail on a removed device; that is logged
        and the fd is closed regardless, since the kernel cleans up both at
        release.  Calls in flight on other threads finish first; later ones,
        on this object or anything derived from it, raise EBADF.
        """
        if not self._guard.shut():
            return
        self.closed = True
        parts: list[Region | Irq] = [*self._regions.values(), *self._irqs.values()]
        for obj in parts:
            try:
                if isinstance(obj, Irq):
                    obj.shutdown()
                else:
                    obj.close()
            except OSError as exc:
                log.warning(
                    "device.close_step_failed",
                    bdf=self.name,
                    step=repr(obj),
                    errno=exc.errno,
                    error=str(exc),
                )
        with raise_as(ReleaseError, self.name, "close device fd"):
            self.kernel.close(self.fd)

    def __repr__(self) -> str:
        return f"Device({self.name}, fd={self.fd})"


__all__ = ["DependentDevice", "Device", "DeviceInfo"]
