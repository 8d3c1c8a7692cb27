"""The vfio-pci device file (drivers/vfio/pci/vfio_pci_core.c): the ioctl table, device
and region info, the function reset ioctl, device features, ioeventfds and the BAR mmap.

Interrupts, region reads and writes and hot resets are in :mod:`vfio_pci_intrs`,
:mod:`vfio_pci_rdwr` and :mod:`vfio_pci_hot_reset`; opening, releasing and the device set's
resets in :mod:`vfio_pci_devset`.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mock_vfio.pci_reset import function_reset
from mock_vfio.trace import oserror
from mock_vfio.uapi import (
    CONFIG_INDEX,
    NUM_IRQS,
    OFFSET_MASK,
    OFFSET_SHIFT,
    PAGE,
    ROM_INDEX,
    VGA_INDEX,
    CapChain,
    addr_of,
    as_struct,
    check_argsz,
    page_align,
    put_caps,
    sizeof,
    u32_at,
)
from mock_vfio.version import DEVICE_FEATURE, IOEVENTFD, LOW_POWER, SUBPAGE_MMAP
from mock_vfio.vfio_pci_hot_reset import VfioPciHotReset
from mock_vfio.vfio_pci_intrs import VfioPciIntrs
from mock_vfio.vfio_pci_mmap import user_memory_enabled, zap_bars
from mock_vfio.vfio_pci_rdwr import VfioPciRdwr, setup_barmap
from vfiopy._uapi import (
    FEATURE_MASK,
    VFIO_PCI_NUM_REGIONS,
    DeviceFlag,
    Feature,
    FeatureFlag,
    Ioctl,
    RegionCap,
    RegionFlag,
    ffi,
    lib,
)

if TYPE_CHECKING:
    from mock_vfio.process import SimProcess


IOEVENTFD_MAX = 1000  # VFIO_PCI_IOEVENTFD_MAX: ioeventfds a device can have


class DeviceFile(VfioPciHotReset, VfioPciRdwr, VfioPciIntrs):
    """A vfio-pci device file: the vfio core file with vfio-pci's ioctls, reads, writes
    and mmap."""

    def ioctl(self, proc: SimProcess, request: int, arg: Any) -> int:
        dev = self.dev
        if request == Ioctl.DEVICE_BIND_IOMMUFD:
            return self._bind(proc, arg)
        if not self.bound:
            # vfio_device_fops_unl_ioctl: nothing but BIND before access is granted
            raise oserror(errno.EINVAL, "device file not bound to an iommufd")
        if dev.removed:
            raise oserror(errno.ENODEV, f"{dev.addr} was removed")
        handler = self._handlers().get(request)
        if handler is None:
            raise oserror(errno.ENOTTY, f"device ioctl {request:#x}")
        if dev.low_power and (request != Ioctl.DEVICE_FEATURE or dev.pm_wake_fd is not None):
            # Every ioctl resumes the device (vfio_device_pm_runtime_get); one that entered
            # with a wakeup eventfd leaves low power then and signals it.  Only the features
            # of a plain entry are modelled as leaving it suspended.
            dev.runtime_resume()
        return handler(proc, arg)

    def _handlers(self) -> dict[int, Callable[[SimProcess, Any], int]]:
        handlers = self._all_handlers()
        version = self.machine.kernel_version
        if version < IOEVENTFD:
            del handlers[Ioctl.DEVICE_IOEVENTFD]
        if version < DEVICE_FEATURE:
            del handlers[Ioctl.DEVICE_FEATURE]
        return handlers

    def _all_handlers(self) -> dict[int, Callable[[SimProcess, Any], int]]:
        return {
            Ioctl.DEVICE_GET_INFO: self._get_info,
            Ioctl.DEVICE_GET_REGION_INFO: self._region_info,
            Ioctl.DEVICE_GET_IRQ_INFO: self._irq_info,
            Ioctl.DEVICE_SET_IRQS: self._set_irqs,
            Ioctl.DEVICE_RESET: self._reset,
            Ioctl.DEVICE_GET_PCI_HOT_RESET_INFO: self._hot_reset_info,
            Ioctl.DEVICE_PCI_HOT_RESET: self._hot_reset,
            Ioctl.DEVICE_FEATURE: self._feature,
            Ioctl.DEVICE_IOEVENTFD: self._ioeventfd,
            Ioctl.DEVICE_ATTACH_IOMMUFD_PT: self._attach,
            Ioctl.DEVICE_DETACH_IOMMUFD_PT: self._detach,
        }

    def _get_info(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_info"
        check_argsz(a, ct, "num_irqs")
        p = as_struct(a, ct)
        flags = DeviceFlag.PCI
        if self.dev.reset_works:
            flags |= DeviceFlag.RESET
        p.flags = flags
        p.num_regions = VFIO_PCI_NUM_REGIONS
        p.num_irqs = NUM_IRQS
        return 0

    def region(self, index: int) -> tuple[int, int, CapChain]:
        """(flags, size, caps) of a region, or EINVAL for one the device lacks."""
        dev = self.dev
        caps = CapChain()
        if index == CONFIG_INDEX:
            return RegionFlag.READ | RegionFlag.WRITE, dev.spec.cfg_size, caps
        if index == ROM_INDEX:
            size = dev.spec.rom_size
            return (RegionFlag.READ if size else 0), size, caps
        if index == VGA_INDEX:
            if not dev.spec.vga:
                raise oserror(errno.EINVAL, "no VGA region")
            return RegionFlag.READ | RegionFlag.WRITE, 0xC0000 - 0xA0000, caps
        if not 0 <= index < ROM_INDEX:
            raise oserror(errno.EINVAL, f"region index {index}")
        bar = dev.bar(index)
        if bar is None:
            return 0, 0, caps
        flags = RegionFlag.READ | RegionFlag.WRITE
        if self._bar_mmap_supported(index):
            flags |= RegionFlag.MMAP
            m = dev.spec.msix
            if m is not None and m.table_bar == index:
                if self.machine.msix_sparse:
                    areas = self._sparse_areas(bar.size)
                    body = struct.pack("<II", len(areas), 0)
                    body += b"".join(struct.pack("<QQ", o, s) for o, s in areas)
                    caps.add(RegionCap.SPARSE_MMAP, 1, body)
                else:
                    caps.add(RegionCap.MSIX_MAPPABLE, 1, b"")
            if caps.buf:
                flags |= RegionFlag.CAPS
        return flags, bar.size, caps

    def _bar_mmap_supported(self, index: int) -> bool:
        """``vfio_pci_probe_mmaps``: a memory BAR of a page or more; from 4.7 (05f0c03fbac1)
        also a smaller one that starts a page, whose rest vfio-pci reserves so that the page
        is the BAR's alone.  A BAR inside a page is not: where it lies in the page is
        unknown to the user and the page may hold another device's registers."""
        bar = self.dev.bar(index)
        if bar is None or bar.is_io or not bar.size:
            return False
        if bar.size >= PAGE:
            return True
        aligned = not self.dev.host_bars[index] & (PAGE - 1)
        return aligned and self.machine.kernel_version >= SUBPAGE_MMAP

    def _sparse_areas(self, size: int) -> list[tuple[int, int]]:
        m = self.dev.spec.msix
        assert m is not None
        start = m.table_offset & ~(PAGE - 1)
        end = (m.table_offset + m.count * 16 + PAGE - 1) & ~(PAGE - 1)
        areas = []
        if start > 0:
            areas.append((0, start))
        if end < size:
            areas.append((end, size - end))
        return areas

    def _region_info(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_region_info"
        argsz, _ = check_argsz(a, ct, "offset")
        p = as_struct(a, ct)
        index = int(p.index)
        flags, size, caps = self.region(index)
        new_argsz, cap_offset, _ = put_caps(a, argsz, sizeof(ct), caps)
        p.flags = flags
        p.size = size
        p.offset = index << OFFSET_SHIFT
        p.cap_offset = cap_offset
        p.argsz = new_argsz
        return 0

    def _reset(self, proc: SimProcess, arg: Any) -> int:
        dev = self.dev
        if not dev.reset_works:
            raise oserror(errno.EINVAL, f"{dev.addr} has no function reset")
        with dev.memory_lock.write():  # vfio_pci_zap_and_down_write_memory_lock
            zap_bars(dev, "reset")
            if not function_reset(self.machine, dev, "ioctl"):
                raise oserror(errno.ENOTTY, "reset")
        return 0

    def _feature(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_feature"
        argsz, minsz = check_argsz(a, ct, "flags")
        p = as_struct(a, ct)
        flags = int(p.flags)
        known = FEATURE_MASK | FeatureFlag.GET | FeatureFlag.SET | FeatureFlag.PROBE
        if flags & ~known:
            raise oserror(errno.EINVAL, f"FEATURE flags {flags:#x}")
        if not flags & FeatureFlag.PROBE and flags & FeatureFlag.SET and flags & FeatureFlag.GET:
            raise oserror(errno.EINVAL, "FEATURE GET and SET together")
        feature = flags & FEATURE_MASK
        payload = argsz - minsz
        dev = self.dev
        low_power = (
            Feature.LOW_POWER_ENTRY,
            Feature.LOW_POWER_ENTRY_WITH_WAKEUP,
            Feature.LOW_POWER_EXIT,
        )
        if feature in low_power and self.machine.kernel_version >= LOW_POWER:
            return self._low_power(proc, feature, flags, payload, a + minsz)
        if feature == Feature.BUS_MASTER and self.machine.bus_master_feature:
            if not self._check_feature(flags, payload, FeatureFlag.SET, 4):
                return 0
            op = u32_at(a + minsz)
            if op not in (0, 1):
                raise oserror(errno.EINVAL, "BUS_MASTER op")
            cmd = dev.config.command()
            dev.set_command(cmd | 4 if op else cmd & ~4, "user")
            return 0
        if feature == Feature.PCI_VF_TOKEN and dev.spec.sriov_total and not dev.is_vf:
            # vfio_pci_core_feature_token: a PF's vf_token, SET only, a 16-byte UUID
            if not self._check_feature(flags, payload, FeatureFlag.SET, 16):
                return 0
            raw = bytes(ffi.buffer(ffi.cast("char *", a + minsz), 16))
            self.machine.host.set_vf_token(dev, raw)
            return 0
        # vfio_pci_core_ioctl_feature: anything else is not implemented here
        raise oserror(errno.ENOTTY, f"feature {feature}")

    def _low_power(
        self, proc: SimProcess, feature: int, flags: int, payload: int, data: int
    ) -> int:
        """vfio_pci_core_pm_entry, _entry_with_wakeup (a struct with the eventfd) and _exit."""
        wakeup = feature == Feature.LOW_POWER_ENTRY_WITH_WAKEUP
        if not self._check_feature(flags, payload, FeatureFlag.SET, 8 if wakeup else 0):
            return 0
        dev = self.dev
        if feature == Feature.LOW_POWER_EXIT:
            dev.runtime_resume()  # the ioctl resumed it already when entered with a wakeup
            return 0
        wake = None
        if wakeup:
            (fd,) = struct.unpack("<i", bytes(ffi.buffer(ffi.cast("char *", data), 4)))
            if fd < 0:
                raise oserror(errno.EINVAL, "wakeup eventfd")
            wake = self._eventfd(proc, fd)
        with dev.lock:
            if dev.low_power:  # vfio_pci_runtime_pm_entry: already engaged
                if wake is not None:
                    os.close(wake)
                raise oserror(errno.EINVAL, "low power entry twice")
            dev.pm_wake_fd = wake
        with dev.memory_lock.write():  # vfio_pci_runtime_pm_entry zaps: no access in D3
            zap_bars(dev, "low_power")
            dev.low_power = True
            dev.config.set_power_state(3)
        return 0

    @staticmethod
    def _check_feature(flags: int, payload: int, supported: int, minsz: int) -> bool:
        """``vfio_check_feature``: False for a successful PROBE, True to go on."""
        if flags & (FeatureFlag.GET | FeatureFlag.SET) & ~supported:
            raise oserror(errno.EINVAL, "unsupported feature operation")
        if flags & FeatureFlag.PROBE:
            return False
        if not flags & (FeatureFlag.GET | FeatureFlag.SET):
            raise oserror(errno.EINVAL, "feature without GET or SET")
        if payload < minsz:
            raise oserror(errno.EINVAL, "feature payload too short")
        return True

    def _ioeventfd(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_device_ioeventfd"
        check_argsz(a, ct, "fd")
        p = as_struct(a, ct)
        size, fd = int(p.flags), int(p.fd)
        if size & ~0xF or bin(size).count("1") != 1 or fd < -1:
            raise oserror(errno.EINVAL, "IOEVENTFD size flags or fd")
        offset = int(p.offset)
        bar, pos, data = offset >> OFFSET_SHIFT, offset & OFFSET_MASK, int(p.data)
        return self._ioeventfd_set(proc, bar, pos, data, size, fd)

    def _ioeventfd_set(
        self, proc: SimProcess, bar: int, pos: int, data: int, size: int, fd: int
    ) -> int:
        """vfio_pci_ioeventfd: BARs only, inside the BAR and outside the MSI-X table;
        (bar, offset, data, size) names the registration, fd -1 removes it."""
        dev = self.dev
        spec = dev.bar(bar) if 0 <= bar < ROM_INDEX else None
        if spec is None or pos + size > spec.size:
            raise oserror(errno.EINVAL, f"ioeventfd outside BAR {bar}")
        m = dev.spec.msix
        if m is not None and m.table_bar == bar:
            end = m.table_offset + m.count * 16
            if not (pos + size <= m.table_offset or pos >= end):
                raise oserror(errno.EINVAL, "ioeventfd on the MSI-X table")
        key = (bar, pos, data, size)
        with dev.lock:
            old = dev.ioeventfds.get(key)
            if old is not None and fd >= 0:
                raise oserror(errno.EEXIST, "ioeventfd already registered")
            if old is None and fd < 0:
                raise oserror(errno.ENODEV, "no such ioeventfd")
            if old is None and len(dev.ioeventfds) >= IOEVENTFD_MAX:
                raise oserror(errno.ENOSPC, f"{IOEVENTFD_MAX} ioeventfds")
            if old is not None:
                del dev.ioeventfds[key]
        if old is not None:
            self.machine.virqfds.remove(old)
            return 0
        ours = self._eventfd(proc, fd)
        assert ours is not None
        with dev.lock:
            dev.ioeventfds[key] = ours
        value = data.to_bytes(size, "little")
        self.machine.virqfds.add(ours, lambda: self._ioeventfd_write(bar, pos, value))
        return 0

    def _ioeventfd_write(self, bar: int, pos: int, value: bytes) -> None:
        """vfio_pci_ioeventfd_handler and _thread: a memory BAR's write under memory_lock
        (waiting out a reset), dropped while the user's MEMORY is clear."""
        dev = self.dev
        spec = dev.bar(bar)
        if dev.removed or spec is None:
            return
        with dev.memory_lock.read():
            if not spec.is_io and not user_memory_enabled(dev):
                return
            self.machine.counters.add("ioeventfd_writes")
            if dev.model is not None and dev.model.mmio_write(bar, pos, value):
                return
            dev.bar_memory(bar)[pos : pos + len(value)] = value

    def mmap(self, proc: SimProcess, length: int, offset: int, prot: int, flags: int) -> int:
        dev = self._check_access()
        if not flags & lib.MAP_SHARED:
            raise oserror(errno.EINVAL, "vfio mmap must be MAP_SHARED")
        if length <= 0 or offset & (PAGE - 1):
            raise oserror(errno.EINVAL, "mmap length/offset")
        length = page_align(length)  # the VMA's, whatever the caller asked
        index, pos = offset >> OFFSET_SHIFT, offset & OFFSET_MASK
        if index >= ROM_INDEX:
            raise oserror(errno.EINVAL, f"region {index} is not mappable")
        fl, size, _ = self.region(index)
        if not fl & RegionFlag.MMAP:
            raise oserror(errno.EINVAL, f"region {index} is not mappable")
        # A sub-page BAR maps its whole page: past the BAR lies the reserved rest of it.
        if pos + length > page_align(size):
            raise oserror(errno.EINVAL, "mmap past the BAR")
        msix = dev.spec.msix
        sparse = self.machine.msix_sparse and msix is not None and msix.table_bar == index
        if sparse and not any(
            o <= pos and pos + length <= o + s for o, s in self._sparse_areas(size)
        ):
            raise oserror(errno.EINVAL, "mmap over the MSI-X table")
        setup_barmap(self.machine, dev, index)
        return dev.maps.map(index, dev.bar_address(index), pos, length)

    def unmap(self, addr: int, length: int) -> None:
        self.dev.maps.unmap(addr, length)
