"""Interrupts of a vfio-pci device: ``VFIO_DEVICE_GET_IRQ_INFO`` and ``VFIO_DEVICE_SET_IRQS``
(drivers/vfio/pci/vfio_pci_intrs.c and the IRQ parts of vfio_pci_core.c)."""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING, Any

from mock_vfio.trace import oserror
from mock_vfio.uapi import (
    ERR,
    INTX,
    MSI,
    MSIX,
    NUM_IRQS,
    REQ,
    addr_of,
    as_struct,
    check_argsz,
    read_mem,
)
from mock_vfio.vfio_device import VfioDeviceFile
from vfiopy._uapi import (
    IRQ_SET_ACTION_TYPE_MASK,
    IRQ_SET_DATA_TYPE_MASK,
    IrqInfoFlag,
    IrqSetFlag,
)

if TYPE_CHECKING:
    from mock_vfio.process import SimProcess


class VfioPciIntrs(VfioDeviceFile):
    def irq_count(self, index: int) -> int:
        dev = self.dev
        if index == INTX:
            return 1 if dev.config.data[0x3D] else 0
        if index == MSI:
            return dev.config.msi_count()
        if index == MSIX:
            return dev.config.msix_count()
        if index == ERR:
            return 1 if dev.spec.pcie else 0
        if index == REQ:
            return 1
        return 0

    def _irq_info(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_irq_info"
        check_argsz(a, ct, "count")
        p = as_struct(a, ct)
        index = int(p.index)
        if index >= NUM_IRQS or (index == ERR and not self.dev.spec.pcie):
            raise oserror(errno.EINVAL, f"irq index {index}")
        flags = IrqInfoFlag.EVENTFD
        if index == INTX:
            flags |= IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
        elif not (index == MSIX and self.irq_count(MSIX) and self.machine.msix_dynamic):
            # has_dyn_msix needs an MSI-X capability (pci_msix_can_alloc_dyn): edu keeps it
            flags |= IrqInfoFlag.NORESIZE
        p.flags = flags
        p.count = self.irq_count(index)
        return 0

    def _set_irqs(self, proc: SimProcess, arg: Any) -> int:
        a = addr_of(arg)
        ct = "struct vfio_irq_set"
        argsz, minsz = check_argsz(a, ct, "count")
        p = as_struct(a, ct)
        flags, index, start, count = int(p.flags), int(p.index), int(p.start), int(p.count)
        if (
            index >= NUM_IRQS
            or count >= 0xFFFFFFFF - start
            or flags & ~(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK)
        ):
            raise oserror(errno.EINVAL, "SET_IRQS header")
        max_count = self.irq_count(index)
        if start >= max_count or start + count > max_count:
            raise oserror(errno.EINVAL, f"SET_IRQS vectors {start}+{count} of {max_count}")
        dtype = flags & IRQ_SET_DATA_TYPE_MASK
        sizes = {
            int(IrqSetFlag.DATA_NONE): 0,
            int(IrqSetFlag.DATA_BOOL): 1,
            int(IrqSetFlag.DATA_EVENTFD): 4,
        }
        size = sizes.get(dtype)
        if size is None:
            raise oserror(errno.EINVAL, "SET_IRQS data type")
        if size and argsz - minsz < count * size:
            raise oserror(errno.EINVAL, "SET_IRQS data shorter than count")
        data = read_mem(a + minsz, count * size) if size else b""
        action = flags & IRQ_SET_ACTION_TYPE_MASK
        return self.machine_irqs(proc, index, start, count, dtype, action, data)

    def machine_irqs(
        self,
        proc: SimProcess,
        index: int,
        start: int,
        count: int,
        dtype: int,
        action: int,
        data: bytes,
    ) -> int:
        dev = self.dev
        if action not in (
            IrqSetFlag.ACTION_MASK,
            IrqSetFlag.ACTION_UNMASK,
            IrqSetFlag.ACTION_TRIGGER,
        ):
            raise oserror(errno.EINVAL, "SET_IRQS action")
        if index in (MSI, MSIX, ERR, REQ) and action != IrqSetFlag.ACTION_TRIGGER:
            raise oserror(errno.ENOTTY, "only TRIGGER for this index")
        if index == INTX and action != IrqSetFlag.ACTION_TRIGGER:
            return self._intx_mask_unmask(proc, start, count, dtype, action, data)
        if dtype == IrqSetFlag.DATA_NONE and count == 0:
            self._disable(index)
            return 0
        if dtype == IrqSetFlag.DATA_EVENTFD:
            fds = struct.unpack(f"<{count}i", data)
            dups = [self._eventfd(proc, fd) for fd in fds]
            with dev.lock:
                if index in (INTX, MSI, MSIX):
                    error = None
                    if dev.irq_type not in (None, index):
                        error = "another interrupt mode is enabled"
                    elif dev.irq_type is None:
                        dev.irq_nvec = start + count  # vfio_msi_enable allocates start+count
                    elif index != INTX and start + count > dev.irq_nvec:
                        # vfio_msi_set_vector_signal: a vector past those allocated exists
                        # only where MSI-X allocates dynamically (6.5+); else EINVAL.
                        if index == MSIX and self.machine.msix_dynamic:
                            dev.irq_nvec = start + count
                        else:
                            error = f"vectors {start}+{count} past the {dev.irq_nvec} enabled"
                    if error is not None:
                        for d in dups:
                            if d is not None:
                                os.close(d)
                        raise oserror(errno.EINVAL, error)
                    dev.irq_type = index
                for i, d in enumerate(dups):
                    old = dev.irq_fds.pop((index, start + i), None)
                    if old is not None:
                        os.close(old)
                    if d is not None:
                        dev.irq_fds[(index, start + i)] = d
                if index in (INTX, MSI, MSIX) and not any(k[0] == index for k in dev.irq_fds):
                    dev.irq_type = None
                    dev.irq_nvec = 0
            if index == INTX:
                dev.set_intx(dev.intx_level)  # a line already asserted fires once requested
            return 0
        # DATA_NONE / DATA_BOOL trigger: loopback, fire the vectors' eventfds
        for i in range(count):
            if dtype == IrqSetFlag.DATA_BOOL and not data[i]:
                continue
            with dev.lock:
                fd = dev.irq_fds.get((index, start + i))
                if fd is not None:
                    os.eventfd_write(fd, 1)
        return 0

    def _intx_mask_unmask(
        self, proc: SimProcess, start: int, count: int, dtype: int, action: int, data: bytes
    ) -> int:
        """vfio_pci_set_intx_mask / _unmask: INTx enabled, vector 0 only; an unmask
        eventfd is listened to (vfio_virqfd_enable), -1 removes it; a mask eventfd is ENOTTY."""
        dev = self.dev
        if dev.irq_type != INTX or start != 0 or count != 1:
            raise oserror(errno.EINVAL, "INTx is not enabled, or not vector 0 alone")
        unmask = action == IrqSetFlag.ACTION_UNMASK
        if dtype == IrqSetFlag.DATA_EVENTFD:
            if not unmask:
                raise oserror(errno.ENOTTY, "mask eventfd")
            (fd,) = struct.unpack("<i", data)
            dev.set_intx_unmask_fd(self._eventfd(proc, fd) if fd >= 0 else None)
            return 0
        if dtype == IrqSetFlag.DATA_BOOL and not data[0]:
            return 0
        if unmask:
            dev.intx_unmask()
        else:
            with dev.lock:
                dev.intx_masked = True
        return 0

    def _disable(self, index: int) -> None:
        dev = self.dev
        if index == INTX:
            dev.set_intx_unmask_fd(None)
        with dev.lock:
            for key in [k for k in dev.irq_fds if k[0] == index]:
                os.close(dev.irq_fds.pop(key))
            if dev.irq_type == index:
                dev.irq_type = None
                dev.intx_masked = False
                dev.irq_nvec = 0
                # vfio_intx_disable / vfio_msi_disable: every vector of the index torn down
                self.machine.counters.add(f"irq_disable_{index}")

    def _eventfd(self, proc: SimProcess, fd: int) -> int | None:
        if fd == -1:
            return None
        if fd < 0 or proc.is_sim_fd(fd):
            raise oserror(errno.EBADF if fd < 0 else errno.EINVAL, f"eventfd {fd}")
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            raise oserror(errno.EBADF, f"eventfd {fd}") from e
        if kind != "anon_inode:[eventfd]":
            raise oserror(errno.EINVAL, f"fd {fd} is not an eventfd")
        return os.dup(fd)
