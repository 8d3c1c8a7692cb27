"""A session: one DMA space, the groups it opened, and its devices.

The container backend shares one container between every group; a group
opens once and is shared (refcounted) by its devices.  The iommufd backend
opens devices through their cdevs into one IOAS.

Opening and closing devices is slow (each one resets the device) and is
meant to run from many threads at once, so the session's lock guards only
its bookkeeping, never a syscall that can reset: devices of different groups
open and close in parallel; devices of one group serialise only on that
group's first open.
"""

from __future__ import annotations

import errno
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from vfiopy._log import get_logger
from vfiopy._uapi import Closable
from vfiopy.container import Container
from vfiopy.device import Device
from vfiopy.dma import (
    DmaBuffer,
    DmaMapping,
    DmaSpace,
    HugePage,
    IoasSpace,
    IovaAllocator,
    IovaRange,
    smallest_page,
)
from vfiopy.errors import DmaMapError, OpenDeviceError, ReleaseError, VfioError
from vfiopy.events import RequestWatcher
from vfiopy.group import Group
from vfiopy.iommufd import Iommufd
from vfiopy.kernel import Kernel, default_kernel
from vfiopy.kmodel import KernelModel
from vfiopy.sysfs import VFIO_DRIVER, PciAddress, Sysfs

log = get_logger(__name__)

Backend = Literal["container", "iommufd"]


@dataclass
class _GroupSlot:
    """A group shared by the session's devices; ``lock`` serialises its first open."""

    number: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    group: Group | None = None
    refs: int = 0


class Session(Closable):
    """Owns a DMA space (container, or iommufd + IOAS), groups and devices."""

    def __init__(
        self,
        kernel: Kernel | None = None,
        backend: Backend = "container",
        sysfs: Sysfs | None = None,
        *,
        allow_noiommu: bool = False,
        release_on_request: bool = False,
    ) -> None:
        """Open the DMA space: a container, or an iommufd with one IOAS.

        ``allow_noiommu`` accepts no-IOMMU groups, and the no-IOMMU model when
        the kernel offers no type1: device DMA then goes unchecked, so each use
        logs a warning.  Off by default.

        ``release_on_request``: wire each device's request interrupt and close the device
        (mappings, interrupts, fd) on a thread of the session as soon as the kernel signals
        it (an unbind from vfio-pci, a removal), so the unbind completes instead of waiting
        for this process.  A task awaiting the device then gets EBADF.  Off by default.
        """
        if backend not in ("container", "iommufd"):
            raise ValueError(f"backend must be 'container' or 'iommufd', not {backend!r}")
        self.kernel = kernel if kernel is not None else default_kernel()
        self.sysfs = sysfs if sysfs is not None else Sysfs(self.kernel)
        self.backend: Backend = backend
        self.allow_noiommu = allow_noiommu
        self._lock = threading.Lock()
        # Notified whenever an open in flight ends: close waits for them all.
        self._opens_done = threading.Condition(self._lock)
        self._groups: dict[int, _GroupSlot] = {}
        self._devices: dict[PciAddress, Device] = {}
        self._device_slot: dict[PciAddress, _GroupSlot] = {}
        self._opening: set[PciAddress] = set()
        # DMA buffers and mappings of the caller's memory: all unmapped by close.
        self._buffers: list[DmaBuffer | DmaMapping] = []
        self._allocator: IovaAllocator | None = None
        self._watcher = (
            RequestWatcher(self.kernel, self._release_on_request) if release_on_request else None
        )
        self.container: Container | None = None
        self.iommufd: Iommufd | None = None
        self.ioas_id: int | None = None
        self._space: DmaSpace
        self._ioas_space: IoasSpace | None = None
        if backend == "container":
            self.container = Container(self.kernel)
            self._space = self.container
        else:
            self.iommufd = Iommufd(self.kernel)
            try:
                self.ioas_id = self.iommufd.alloc_ioas()
            except BaseException:
                self.iommufd.close()
                raise
            self._space = self._ioas_space = IoasSpace(self.iommufd, self.ioas_id)
        self.closed = False

    # --- devices ------------------------------------------------------------------
    @property
    def devices(self) -> list[Device]:
        with self._lock:
            return list(self._devices.values())

    def device(self, addr: PciAddress | str) -> Device | None:
        a = PciAddress.of(addr)
        with self._lock:
            return self._devices.get(a)

    def _check_bindable(self, addr: PciAddress) -> None:
        name = str(addr)
        if not self.sysfs.exists(addr):
            raise OpenDeviceError(
                errno.ENODEV,
                name,
                detail=f"{self.sysfs.path(addr)} does not exist",
                advice="the device is gone or the address is wrong; check lspci -D",
            )
        driver = self.sysfs.driver(addr)
        if driver != VFIO_DRIVER and not KernelModel(self.sysfs).is_vfio_driver(driver):
            raise OpenDeviceError(
                errno.ENODEV,
                name,
                detail=f"bound to {driver or 'no driver'}, not {VFIO_DRIVER}",
                advice="bind it first: Sysfs.bind_vfio(addr) or "
                f"driverctl set-override {name} {VFIO_DRIVER}",
            )

    def open_device(self, addr: PciAddress | str, vf_token: uuid.UUID | None = None) -> Device:
        """Open ``addr``: check sysfs, open its group (once) or cdev, and the device fd.

        ``vf_token``: for a VF whose PF is bound to vfio-pci, the token the PF's user set
        (:meth:`Device.set_vf_token`): ``ADDR vf_token=UUID`` on the group path, the bind's
        token (VFIO_DEVICE_BIND_FLAG_TOKEN, Linux 6.17+) on the cdev path.
        """
        a = PciAddress.of(addr)
        with self._lock:
            if self.closed:
                raise OpenDeviceError(errno.EBADF, str(a), detail="the session is closed")
            if a in self._devices or a in self._opening:
                raise OpenDeviceError(
                    errno.EBUSY,
                    str(a),
                    detail="already open in this session",
                    advice="use Session.device(addr) to get it",
                )
            self._opening.add(a)
        t0 = time.monotonic()
        try:
            dev = self._open_new(a, vf_token)
        finally:
            # Only now, with the device registered or undone, may close go on.
            with self._lock:
                self._opening.discard(a)
                self._opens_done.notify_all()
        log.debug("device opened", bdf=str(a), elapsed_s=round(time.monotonic() - t0, 6))
        return dev

    def _open_new(self, a: PciAddress, vf_token: uuid.UUID | None = None) -> Device:
        """Open ``a`` and register it; undone when the session closed meanwhile."""
        slot: _GroupSlot | None = None
        try:
            self._check_bindable(a)
            if self.iommufd is not None and self.ioas_id is not None:
                dev = Device.from_cdev(
                    a, self.iommufd, self.ioas_id, self.kernel, self.sysfs, vf_token
                )
            else:
                slot, group = self._acquire_group(self.sysfs.iommu_group(a))
                dev = Device.from_group(group, a, vf_token)
        except BaseException:
            if slot is not None:
                self._release_group(slot)
            raise
        with self._lock:
            closed = self.closed
            if not closed:
                self._devices[a] = dev
                if slot is not None:
                    self._device_slot[a] = slot
        if closed:
            try:
                dev.close()
            finally:
                if slot is not None:
                    self._release_group(slot)
            raise OpenDeviceError(errno.EBADF, str(a), detail="the session closed meanwhile")
        if self._watcher is not None:
            try:
                self._watcher.add(dev)
            except BaseException:
                self.close_device(dev)
                raise
        return dev

    def _release_on_request(self, dev: Device) -> None:
        """The kernel asked for ``dev`` back: close it, unless it is closed already."""
        with self._lock:
            if self._devices.get(dev.address) is not dev:
                return
        self.close_device(dev)
        log.info("device released on request", bdf=dev.name)

    def _acquire_group(self, number: int) -> tuple[_GroupSlot, Group]:
        """Group ``number``, open and attached, and its slot with one ref taken."""
        with self._lock:
            slot = self._groups.get(number)
            if slot is None:
                slot = self._groups[number] = _GroupSlot(number)
            slot.refs += 1
        try:
            with slot.lock:
                group = slot.group
                if group is None:
                    group = Group(number, self.kernel, self.sysfs, allow_noiommu=self.allow_noiommu)
                    try:
                        group.set_container(self._container())
                        # The container takes an IOMMU model only once a group
                        # is attached; set_iommu is a no-op after the first.
                        self._container().set_iommu(allow_noiommu=self.allow_noiommu)
                    except BaseException:
                        group.close()
                        raise
                    slot.group = group
        except BaseException:
            self._release_group(slot)
            raise
        return slot, group

    def _container(self) -> Container:
        if self.container is None:
            raise OpenDeviceError(errno.EINVAL, detail="the iommufd backend has no container")
        return self.container

    def _release_group(self, slot: _GroupSlot) -> None:
        """Drop one ref; the last one closes the group (outside the session lock).

        The container's IOMMU, and every DMA mapping in it, lives only while
        some group is attached: the last group stays open (parked, no refs)
        while DMA buffers exist, and closes when the last buffer is freed.
        """
        with self._lock:
            slot.refs -= 1
            if slot.refs > 0 or self._parks(slot):
                return
            if self._groups.get(slot.number) is slot:
                del self._groups[slot.number]
        with slot.lock:
            group, slot.group = slot.group, None
        if group is not None:
            group.close()

    def _parks(self, slot: _GroupSlot) -> bool:
        """Whether ``slot`` is the last open group and DMA buffers need it (lock held)."""
        if not self._buffers or slot.group is None:
            return False
        return not any(o.group is not None for o in self._groups.values() if o is not slot)

    def close_device(self, dev: Device) -> None:
        """Close ``dev`` (mappings, IRQs, fd) and drop its group when it was the last."""
        with self._lock:
            if self._devices.get(dev.address) is not dev:
                raise ReleaseError(
                    errno.EINVAL, dev.name, "close device", detail="not open in this session"
                )
            del self._devices[dev.address]
            slot = self._device_slot.pop(dev.address, None)
        t0 = time.monotonic()
        try:
            if self._watcher is not None:
                self._watcher.remove(dev)  # its thread no longer polls the device's eventfd
            dev.close()
        finally:
            if slot is not None:
                self._release_group(slot)
        log.debug("device closed", bdf=dev.name, elapsed_s=round(time.monotonic() - t0, 6))

    def hot_reset(self, devices: list[Device]) -> None:
        """One slot/bus reset covering ``devices`` (all of one reset domain).

        The group form names every group of ``devices``; the cdev form is
        zero-length (the kernel checks the iommufd owns the whole domain).
        """
        if not devices:
            return
        if self.backend == "iommufd":
            devices[0].hot_reset()
            return
        groups: dict[int, Group] = {}
        for d in devices:
            if d.group is not None:
                groups[d.group.number] = d.group
        devices[0].hot_reset(groups=list(groups.values()))

    # --- DMA --------------------------------------------------------------------------
    @property
    def dma(self) -> DmaSpace:
        return self._space

    @property
    def huge_pages(self) -> bool:
        """iommufd only: IOMMU_OPTION_HUGE_PAGES of the session's IOAS (Linux 6.2+).

        On (the kernel's default), runs of contiguous pages are mapped with the
        IOMMU's large pages; off, everything is mapped with PAGE_SIZE pages.
        Turn it off before mapping anything.  type1 has no such switch: it
        always uses the largest pages it can.
        """
        return self._ioas().huge_pages

    @huge_pages.setter
    def huge_pages(self, enabled: bool) -> None:
        self._ioas().huge_pages = enabled

    def _ioas(self) -> IoasSpace:
        if self._ioas_space is None:
            raise DmaMapError(
                errno.EOPNOTSUPP,
                step="IOMMU_OPTION_HUGE_PAGES",
                detail="the container backend has no huge-pages option",
                advice="use Session(backend='iommufd'); type1 maps with large pages anyway",
            )
        return self._ioas_space

    def _iova_layout(self) -> tuple[list[IovaRange], int]:
        """The usable IOVA ranges and the IOMMU's smallest page, as the kernel reports them.

        type1: VFIO_IOMMU_GET_INFO's iova_pgsizes and IOVA_RANGE capability (the whole
        64-bit space when there is none); iommufd: IOMMU_IOAS_IOVA_RANGES and its
        out_iova_alignment.  Never below the CPU's page: memory is mapped in those.
        """
        try:
            if self.container is not None:
                info = self.container.info()
                ranges = info.iova_ranges or [IovaRange(0, (1 << 64) - 1)]
                return ranges, smallest_page(info.pgsizes)
            ranges, alignment = self._ioas().iommufd.iova_space(self._ioas().ioas_id)
            return ranges, smallest_page(alignment)
        except VfioError as exc:
            # With a container they exist only once a device's group has set the IOMMU model.
            if self.container is not None and self.container.iommu_type is None:
                exc.advice = "open a device first: the IOMMU is set with the first group"
            raise

    def _iova_allocator(self) -> tuple[IovaAllocator, list[IovaRange]]:
        """The session's allocator, and the ranges usable now: asked afresh each time, as
        they shrink when a device with reserved regions attaches after the allocator was
        made (an MSI window, say), and an IOVA must lie inside them at its map."""
        ranges, page = self._iova_layout()
        with self._lock:
            if self._allocator is None:
                self._allocator = IovaAllocator(ranges, page)
            return self._allocator, ranges

    def _register(self, item: DmaBuffer | DmaMapping, step: str) -> None:
        """Track ``item`` for close; undo it when the session closed meanwhile."""
        with self._lock:
            closed = self.closed
            if not closed:
                self._buffers.append(item)
        if closed:
            item.close()
            raise DmaMapError(errno.EBADF, step=step, detail="the session closed")

    def alloc_dma_buffer(
        self, size: int, limit: int | None = None, *, hugepage: HugePage | None = None
    ) -> DmaBuffer:
        """Anonymous memory of ``size`` bytes, mapped at a free IOVA of the session.

        ``limit``: the IOVA block ends at or below it (the device's DMA mask + 1).
        ``hugepage``: "2M" or "1G" backs it with hugetlb pages (size rounded up to
        whole ones, IOVA aligned to one); the host needs that many free in its pool
        (/sys/kernel/mm/hugepages), else the error says how to reserve them.
        """
        allocator, ranges = self._iova_allocator()
        buf = DmaBuffer(
            self._space,
            size,
            allocator=allocator,
            kernel=self.kernel,
            limit=limit,
            hugepage=hugepage,
            page=allocator.page_size,
            within=ranges,
        )
        self._register(buf, "allocate DMA buffer")
        return buf

    def map_dma(
        self,
        obj: Any,
        *,
        read: bool = True,
        write: bool = True,
        limit: int | None = None,
        align: int | None = None,
    ) -> DmaMapping:
        """Map the caller's memory (a bytearray, an mmap, a numpy array...) at a free IOVA.

        The memory must be C-contiguous, writable unless ``write=False`` (the device
        only reads it), and page-aligned in address and length (``mmap.mmap(-1, n)``
        is).  It stays referenced and pinned (a bytearray cannot be resized) until
        :meth:`unmap_dma` or :meth:`close`.  ``align``: a larger IOVA alignment, such
        as 2 MiB for hugepage-backed memory.
        """
        allocator, ranges = self._iova_allocator()
        mapping = DmaMapping(
            self._space,
            obj,
            allocator=allocator,
            read=read,
            write=write,
            limit=limit,
            page=allocator.page_size,
            align=align,
            within=ranges,
        )
        self._register(mapping, "map caller memory")
        return mapping

    def free_dma_buffer(self, buf: DmaBuffer | DmaMapping) -> None:
        """Unmap and release ``buf`` (a buffer, or a mapping of the caller's memory);
        the last one lets a parked group close."""
        with self._lock:
            if buf in self._buffers:
                self._buffers.remove(buf)
            parked = (
                []
                if self._buffers
                else [o for o in self._groups.values() if o.refs == 0 and o.group is not None]
            )
            if not self._buffers:
                self._allocator = None
        try:
            buf.close()
        finally:
            for slot in parked:
                slot.refs += 1  # _release_group drops it again, and closes
                self._release_group(slot)

    unmap_dma = free_dma_buffer

    @property
    def dma_mappings(self) -> list[DmaBuffer | DmaMapping]:
        """The session's DMA buffers and mappings of caller memory still mapped."""
        with self._lock:
            return list(self._buffers)

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Close everything, in the kernel's order. Idempotent.

        Opens in flight on other threads finish first (and undo themselves).
        Then the devices (mappings and IRQs, then fds: the release resets
        them), so none is still doing DMA when the buffers go; then the DMA
        buffers, while the container's IOMMU still exists (the last group
        stays parked for them); then groups; then the container or iommufd.
        Every step runs even if one fails; the first error is raised at the end.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._opens_done.wait_for(lambda: not self._opening)
            devices = list(self._devices.values())
        errors: list[BaseException] = []
        for dev in devices:
            try:
                self.close_device(dev)
            except OSError as exc:
                errors.append(exc)
        if self._watcher is not None:
            self._watcher.stop()
        with self._lock:
            buffers = list(self._buffers)
        failed = False
        for buf in buffers:
            try:
                self.free_dma_buffer(buf)
            except OSError as exc:
                errors.append(exc)
                failed = True
        if failed:
            try:
                self._unmap_leftovers()
            except OSError as exc:
                errors.append(exc)
        with self._lock:
            slots = list(self._groups.values())
            self._groups.clear()
        for slot in slots:
            # None is left unless closing a device or a buffer failed.
            if slot.group is not None:
                try:
                    slot.group.close()
                except OSError as exc:
                    errors.append(exc)
        for owner in (self.container, self.iommufd):
            if owner is not None:
                try:
                    owner.close()
                except OSError as exc:
                    errors.append(exc)
        for err in errors:
            log.warning("session close step failed", error=str(err))
        if errors:
            raise errors[0]

    def _unmap_leftovers(self) -> None:
        """After a buffer failed to unmap: unmap all the space still maps, so no IOVA
        outlives the session, even while the container or iommufd stays open elsewhere."""
        if self.container is not None:
            # Without an IOMMU model (no group left) the container holds no mapping.
            if self.container.iommu_type is not None:
                self.container.unmap_all()
        elif self.iommufd is not None and self.ioas_id is not None:
            # iova 0, length U64_MAX: every area of the IOAS (iommufd_ioas_unmap).
            self.iommufd.unmap(self.ioas_id, 0, (1 << 64) - 1)

    def __repr__(self) -> str:
        return f"Session(backend={self.backend}, devices={len(self._devices)})"


__all__ = ["Backend", "Session"]
