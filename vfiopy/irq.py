"""Device interrupts (INTx, MSI, MSI-X, error and request) delivered on eventfds.

VFIO_DEVICE_SET_IRQS with DATA_EVENTFD|ACTION_TRIGGER wires vectors to
eventfds; the kernel signals the eventfd on each interrupt, and the counter
read back says how many arrived since the last read.
"""

from __future__ import annotations

import errno
import sys

import anyio

from vfiopy._fdguard import FdGuard
from vfiopy._uapi import Closable, IrqInfoFlag, IrqSetFlag, Struct, ffi, ioctl
from vfiopy.errors import DeviceInfoError, IrqError, raise_as
from vfiopy.kernel import EFD_NONBLOCK, Kernel

_IRQ_ADVICE = {
    errno.EINVAL: "the index, vector range or action is not supported for this interrupt "
    "(see Irq.count and Irq.flags; MSI and MSI-X exclude each other and INTx)",
}


class Irq(Closable):
    """One interrupt index of a device, as VFIO_DEVICE_GET_IRQ_INFO describes it.

    ``guard`` is the device's: once the device is closed, every call raises
    EBADF instead of reaching whatever file reused the fd number.
    """

    def __init__(
        self, kernel: Kernel, fd: int, device: str, index: int, guard: FdGuard | None = None
    ) -> None:
        self.kernel = kernel
        self.fd = fd
        self.device = device
        self.index = index
        self._guard = guard if guard is not None else FdGuard(fd, device)
        s = Struct("struct vfio_irq_info")
        s.p.index = index
        step = "VFIO_DEVICE_GET_IRQ_INFO"
        with self._guard.hold(DeviceInfoError, step) as held:
            ioctl(
                kernel,
                held,
                step,
                s.p,
                error=DeviceInfoError,
                device=device,
                detail=f"irq index {index}",
            )
        self.flags = IrqInfoFlag(int(s.p.flags))
        self.count = int(s.p.count)
        self.eventfds: list[int] = []

    @property
    def enabled(self) -> bool:
        return bool(self.eventfds)

    def _set(self, flags: int, start: int, count: int, fds: list[int] | None = None) -> None:
        with self._guard.hold(IrqError) as fd:
            self._set_on(fd, flags, start, count, fds)

    def _set_on(
        self, device_fd: int, flags: int, start: int, count: int, fds: list[int] | None = None
    ) -> None:
        data = 4 * len(fds) if fds else 0
        s = Struct("struct vfio_irq_set", ffi.sizeof("struct vfio_irq_set") + data)
        s.p.flags, s.p.index, s.p.start, s.p.count = flags, self.index, start, count
        if fds:
            arr = ffi.cast("int32_t *", s.p.data)
            for i, fd in enumerate(fds):
                arr[i] = fd
        ioctl(
            self.kernel,
            device_fd,
            "VFIO_DEVICE_SET_IRQS",
            s.p,
            error=IrqError,
            device=self.device,
            detail=f"irq index {self.index} start {start} count {count}",
            advice=_IRQ_ADVICE,
        )

    def _vector(self, vector: int) -> None:
        if not 0 <= vector < max(self.count, len(self.eventfds)):
            raise IrqError(
                errno.EINVAL,
                self.device,
                detail=f"irq index {self.index} has no vector {vector} (count {self.count})",
            )

    def enable(self, count: int | None = None) -> list[int]:
        """Wire vectors 0..count-1 (default: all) to new eventfds; returns them."""
        if self.eventfds:
            self.disable()
        count = self.count if count is None else count
        if not 0 < count <= self.count:
            raise IrqError(
                errno.EINVAL,
                self.device,
                detail=f"irq index {self.index}: cannot enable {count} of {self.count} vectors",
            )
        fds: list[int] = []
        try:
            with raise_as(IrqError, self.device, "eventfd"):
                for _ in range(count):
                    fds.append(self.kernel.eventfd(0, EFD_NONBLOCK))
            self._set(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0, count, fds)
        except BaseException:
            for fd in fds:
                self.kernel.close(fd)
            raise
        self.eventfds = fds
        return list(fds)

    def disable(self) -> None:
        """Tear down every vector (DATA_NONE|ACTION_TRIGGER, count 0) and close the eventfds."""
        fds, self.eventfds = self.eventfds, []
        try:
            self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        finally:
            for fd in fds:
                self.kernel.close(fd)

    def mask(self, vector: int = 0) -> None:
        self._vector(vector)
        self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK, vector, 1)

    def unmask(self, vector: int = 0) -> None:
        self._vector(vector)
        self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, vector, 1)

    def trigger(self, vector: int = 0) -> None:
        """Fire the vector from software (loopback): its eventfd gets signalled."""
        self._vector(vector)
        self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, vector, 1)

    def _eventfd(self, vector: int) -> int:
        if self._guard.closed:
            raise self._guard.closed_error(IrqError, "wait")
        if not 0 <= vector < len(self.eventfds):
            raise IrqError(
                errno.EINVAL,
                self.device,
                "wait",
                detail=f"irq index {self.index} vector {vector} is not enabled",
                advice="call Irq.enable() first",
            )
        return self.eventfds[vector]

    def read(self, vector: int = 0) -> int:
        """Interrupts counted on ``vector`` since the last read; 0 when none (non-blocking)."""
        fd = self._eventfd(vector)
        try:
            data = self.kernel.read(fd, 8)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise IrqError.from_oserror(exc, self.device, "read eventfd") from exc
        return int.from_bytes(data, sys.byteorder)

    async def wait(self, vector: int = 0) -> int:
        """Wait for interrupts on ``vector``; returns how many arrived."""
        fd = self._eventfd(vector)
        while True:
            await anyio.wait_readable(fd)
            # Another reader may have drained the counter since the wakeup.
            count = self.read(vector)
            if count:
                return count

    def close(self) -> None:
        """Disable the interrupt if this object enabled it. Idempotent."""
        if self.eventfds:
            self.disable()

    def shutdown(self) -> None:
        """Disable on the device's closing fd (the guard refuses uses by now)."""
        fds, self.eventfds = self.eventfds, []
        if not fds:
            return
        try:
            self._set_on(self._guard.fd, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        finally:
            for fd in fds:
                self.kernel.close(fd)

    def __repr__(self) -> str:
        return f"Irq(index={self.index}, count={self.count}, flags={self.flags!r})"


__all__ = ["Irq"]
