"""Device interrupts (INTx, MSI, MSI-X, error and request) delivered on eventfds.

VFIO_DEVICE_SET_IRQS with DATA_EVENTFD|ACTION_TRIGGER wires vectors to
eventfds; the kernel signals the eventfd on each interrupt, and the counter
read back says how many arrived since the last read.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import threading

import anyio
import anyio.from_thread
import anyio.lowlevel

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
        # Guards eventfds, _epoch (bumped at each rewiring), the counts carried
        # over a re-enable and the waiters; never held across a wait.
        self._lock = threading.Lock()
        self._epoch = 0
        self._pending: dict[int, int] = {}
        self._waits: list[tuple[int, anyio.lowlevel.EventLoopToken, int]] = []

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
        """Wire vectors 0..count-1 (default: all) to new eventfds; returns them.

        Enabling again rewires to fresh eventfds: interrupts counted on the old
        ones are carried over, and tasks in :meth:`wait` go on waiting on the
        new ones.
        """
        count = self.count if count is None else count
        if not 0 < count <= self.count:
            raise IrqError(
                errno.EINVAL,
                self.device,
                detail=f"irq index {self.index}: cannot enable {count} of {self.count} vectors",
            )
        old = self.eventfds
        fds: list[int] = []
        try:
            with raise_as(IrqError, self.device, "eventfd"):
                for _ in range(count):
                    fds.append(self.kernel.eventfd(0, EFD_NONBLOCK))
            if old:
                # MSI and MSI-X take a new vector count only from disabled.
                self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
                self._swap([])
            self._set(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0, count, fds)
        except BaseException:
            for fd in fds:
                self.kernel.close(fd)
            if old and not self.eventfds:
                self._retire(old, carry=False)
            raise
        self._swap(fds)
        if old:
            self._retire(old, carry=True)
        return list(fds)

    def disable(self) -> None:
        """Tear down every vector (DATA_NONE|ACTION_TRIGGER, count 0) and close the eventfds.

        A task waiting in :meth:`wait` gets an :class:`IrqError` (EBADF).
        """
        fds = self._swap([])
        try:
            self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        finally:
            self._retire(fds, carry=False)

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

    # --- eventfds: swapped, read and closed under the lock --------------------------
    def _swap(self, fds: list[int]) -> list[int]:
        """Install ``fds`` as the vectors' eventfds; returns the previous ones."""
        with self._lock:
            old, self.eventfds = self.eventfds, fds
            self._epoch += 1
        return old

    def _retire(self, fds: list[int], *, carry: bool) -> None:
        """Close eventfds the kernel no longer signals, after waking their waiters.

        ``carry``: what they counted is kept for the vectors that exist still
        (a re-enable), so :meth:`read` and :meth:`wait` return it.  A closed
        number is handed to the next eventfd or open, so the waiters' event
        loops must forget it first: ``anyio.notify_closing`` on their loop
        thread, which wakes them with ClosedResourceError.
        """
        if not fds:
            return
        with self._lock:
            if carry:
                for vector, fd in enumerate(fds[: len(self.eventfds)]):
                    # A failed read loses that count, never the close below.
                    with contextlib.suppress(OSError):
                        self._pending[vector] = self._pending.get(vector, 0) + self._drain(fd)
            else:
                self._pending.clear()
            waits = {(fd, token, thread) for fd, token, thread in self._waits if fd in fds}
        here = threading.get_ident()
        for fd, token, thread in waits:
            # A loop that has ended took its waiters with it: nothing to wake.
            with contextlib.suppress(RuntimeError):
                if thread == here:
                    anyio.notify_closing(fd)
                else:
                    anyio.from_thread.run_sync(anyio.notify_closing, fd, token=token)
        for fd in fds:
            self.kernel.close(fd)

    def _drain(self, fd: int) -> int:
        try:
            data = self.kernel.read(fd, 8)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise IrqError.from_oserror(exc, self.device, "read eventfd") from exc
        return int.from_bytes(data, sys.byteorder)

    def _not_enabled(self, vector: int, step: str) -> IrqError:
        if self._guard.closed:
            return self._guard.closed_error(IrqError, step)
        return IrqError(
            errno.EINVAL,
            self.device,
            step,
            detail=f"irq index {self.index} vector {vector} is not enabled",
            advice="call Irq.enable() first",
        )

    def read(self, vector: int = 0) -> int:
        """Interrupts counted on ``vector`` since the last read; 0 when none (non-blocking)."""
        with self._lock:
            if self._guard.closed or not 0 <= vector < len(self.eventfds):
                raise self._not_enabled(vector, "read eventfd")
            return self._pending.pop(vector, 0) + self._drain(self.eventfds[vector])

    async def wait(self, vector: int = 0) -> int:
        """Wait for interrupts on ``vector``; returns how many arrived.

        Follows a re-enable to the new eventfd; raises :class:`IrqError` (EBADF)
        when the interrupt is disabled or the device closed meanwhile.
        """
        while True:
            with self._lock:
                if self._guard.closed or not 0 <= vector < len(self.eventfds):
                    raise self._not_enabled(vector, "wait")
                count = self._pending.pop(vector, 0)
                if count:
                    return count
                fd, epoch = self.eventfds[vector], self._epoch
                me = (fd, anyio.lowlevel.current_token(), threading.get_ident())
                self._waits.append(me)
            try:
                try:
                    await anyio.wait_readable(fd)
                except anyio.ClosedResourceError:
                    if self._guard.closed or not 0 <= vector < len(self.eventfds):
                        raise IrqError(
                            errno.EBADF,
                            self.device,
                            "wait",
                            detail=f"irq index {self.index} vector {vector} was disabled "
                            "while a task waited on it"
                            + (" (the device is closed)" if self._guard.closed else ""),
                        ) from None
                    continue  # re-enabled: wait on the new eventfd
                with self._lock:
                    # Rewired since the wake-up: fd may be closed or reused by now.
                    if epoch != self._epoch:
                        continue
                    # Another reader may have drained the counter since the wakeup.
                    count = self._drain(fd)
            finally:
                with self._lock:
                    self._waits.remove(me)
            if count:
                return count

    def close(self) -> None:
        """Disable the interrupt if this object enabled it. Idempotent."""
        if self.eventfds:
            self.disable()

    def shutdown(self) -> None:
        """Disable on the device's closing fd (the guard refuses uses by now)."""
        fds = self._swap([])
        if not fds:
            return
        try:
            self._set_on(self._guard.fd, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        finally:
            self._retire(fds, carry=False)

    def __repr__(self) -> str:
        return f"Irq(index={self.index}, count={self.count}, flags={self.flags!r})"


__all__ = ["Irq"]
