"""Device interrupts (INTx, MSI, MSI-X, error and request) delivered on eventfds.

VFIO_DEVICE_SET_IRQS with DATA_EVENTFD|ACTION_TRIGGER wires vectors to
eventfds; the kernel signals the eventfd on each interrupt, and the counter
read back says how many arrived since the last read.

INTx is level-triggered and AUTOMASKED: vfio-pci masks the line when it
signals, and the driver unmasks it once it has quieted the device, with
ACTION_UNMASK or, without an ioctl, by writing the resample eventfd it
registered with DATA_EVENTFD|ACTION_UNMASK (``vfio_virqfd``, in vfio-pci since
its first release); a line still asserted at the unmask fires again at once.

MSI-X vectors can be added while others are live from Linux 6.5 (e4163438e015,
dynamic MSI-X), where the platform allocates them dynamically; the kernel says
so by leaving VFIO_IRQ_INFO_NORESIZE clear on the MSI-X index (6c8017c6a58d).
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import sys
import threading
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.lowlevel

from vfiopy._fdguard import FdGuard
from vfiopy._log import get_logger
from vfiopy._uapi import Closable, IrqInfoFlag, IrqSetFlag, PciIrq, Struct, ffi, ioctl
from vfiopy.errors import DeviceInfoError, IrqError, raise_as
from vfiopy.kernel import EFD_NONBLOCK, Kernel
from vfiopy.kmodel import MSIX_DYNAMIC, format_version

log = get_logger(__name__)

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
        self.resample_fd: int | None = None  # INTx: the unmask eventfd, once registered
        # Guards eventfds, _epoch (bumped at each rewiring), the counts carried
        # over a re-enable and the waiters; never held across a wait.
        self._lock = threading.Lock()
        self._epoch = 0
        self._pending: dict[int, int] = {}
        self._waits: list[tuple[int, anyio.lowlevel.EventLoopToken, int]] = []

    @property
    def enabled(self) -> bool:
        return bool(self.eventfds)

    @property
    def resizable(self) -> bool:
        """Whether vectors can be added while others are live (VFIO_IRQ_INFO_NORESIZE clear:
        MSI-X on Linux 6.5+ where the platform allocates MSI-X vectors dynamically)."""
        return not self.flags & IrqInfoFlag.NORESIZE

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

    def enable(self, count: int | None = None, *, resample: bool = False) -> list[int]:
        """Wire vectors 0..count-1 (default: all) to new eventfds; returns them.

        Enabling again rewires to fresh eventfds: interrupts counted on the old
        ones are carried over, and tasks in :meth:`wait` go on waiting on the
        new ones.  ``resample`` (INTx only): also register the unmask eventfd
        (:meth:`unmask_eventfd`, then in :attr:`resample_fd`).
        """
        if resample:
            self._require_intx("a resample eventfd")
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
                # MSI and MSI-X take a new vector count only from disabled; the
                # kernel drops an INTx unmask eventfd with the interrupt.
                self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
                self._swap([])
                self._drop_resample()
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
        if resample:
            try:
                self.unmask_eventfd()
            except BaseException:
                self.disable()  # all or nothing: no INTx left without its resample eventfd
                raise
        return list(fds)

    def add_vectors(self, n: int) -> list[int]:
        """Wire ``n`` more vectors after the live ones; returns their new eventfds.

        The live vectors keep their eventfds (and tasks waiting on them keep
        waiting).  Where the kernel leaves NORESIZE clear (MSI-X, Linux 6.5+)
        the new vectors are added in place, the live ones untouched.  Else
        vfiopy disables the index and enables it again with the same eventfds
        plus the new ones, and logs ``irq.vectors_added`` with ``in_place``
        False: an interrupt the device raises in between is lost, so check the
        device's own status after growing.
        """
        live = list(self.eventfds)
        if not live:
            raise self._not_enabled(0, "add vectors")
        if n < 1 or len(live) + n > self.count:
            raise IrqError(
                errno.EINVAL,
                self.device,
                "add vectors",
                detail=f"irq index {self.index}: cannot add {n} to {len(live)} of "
                f"{self.count} vectors",
            )
        new: list[int] = []
        try:
            with raise_as(IrqError, self.device, "eventfd"):
                for _ in range(n):
                    new.append(self.kernel.eventfd(0, EFD_NONBLOCK))
            if self.resizable:
                self._set(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, len(live), n, new)
            else:
                self._reenable(live, new)
        except BaseException:
            for fd in new:
                self.kernel.close(fd)
            raise
        with self._lock:
            self.eventfds = live + new  # same numbers for the live vectors: no epoch change
        log.info(
            "irq.vectors_added",
            device=self.device,
            index=self.index,
            added=n,
            vectors=len(live) + n,
            in_place=self.resizable,
            reason=None
            if self.resizable
            else f"VFIO_IRQ_INFO_NORESIZE is set (before Linux {format_version(MSIX_DYNAMIC)}, "
            "not MSI-X, or no dynamic MSI-X on this platform): the index was disabled and "
            "enabled again",
        )
        return list(new)

    def _reenable(self, live: list[int], new: list[int]) -> None:
        """Disable, then enable live+new vectors with the same eventfds; on failure put
        the live ones back, and if even that fails retire them (the index is disabled)."""
        trigger = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
        self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        try:
            self._set(trigger, 0, len(live) + len(new), live + new)
        except BaseException:
            try:
                self._set(trigger, 0, len(live), live)
            except BaseException:
                self._retire(self._swap([]), carry=False)
                raise
            raise

    # --- INTx: level-triggered, automasked -------------------------------------------
    def _require_intx(self, what: str) -> None:
        if self.index != PciIrq.INTX:
            raise IrqError(
                errno.EINVAL,
                self.device,
                detail=f"irq index {self.index} has no {what}: only INTx is level-triggered "
                "and automasked",
            )

    def unmask_eventfd(self) -> int:
        """Register an eventfd that unmasks INTx when written (DATA_EVENTFD|ACTION_UNMASK);
        returns it (also :attr:`resample_fd`).  INTx must be enabled; :meth:`disable`
        closes it."""
        self._require_intx("unmask eventfd")
        if not self.eventfds:
            raise self._not_enabled(0, "unmask eventfd")
        if self.resample_fd is not None:
            return self.resample_fd
        with raise_as(IrqError, self.device, "eventfd"):
            fd = self.kernel.eventfd(0, EFD_NONBLOCK)
        try:
            self._set(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK, 0, 1, [fd])
        except BaseException:
            self.kernel.close(fd)
            raise
        self.resample_fd = fd
        return fd

    def _drop_resample(self) -> None:
        """Close the unmask eventfd once the kernel no longer listens to it."""
        fd, self.resample_fd = self.resample_fd, None
        if fd is not None:
            self.kernel.close(fd)

    def resample(self) -> None:
        """Unmask INTx: a write to the resample eventfd when there is one (no ioctl), else
        ACTION_UNMASK.  If the device still asserts the line it fires again at once."""
        self._require_intx("unmask")
        fd = self.resample_fd
        if fd is None:
            self.unmask()
            return
        with raise_as(IrqError, self.device, "write resample eventfd"):
            self.kernel.write(fd, (1).to_bytes(8, sys.byteorder))

    async def handle_level(self, service: Callable[[int], object]) -> int:
        """One level-triggered INTx interrupt: wait for it, let ``service(count)`` quiet
        the device (a function or a coroutine function), then :meth:`resample`.

        Returns the count.  If ``service`` raises, the line stays masked (no interrupt
        storm from a device left asserting) and the exception propagates.
        """
        self._require_intx("level-triggered handler")
        count = await self.wait(0)
        done = service(count)
        if inspect.isawaitable(done):
            await done
        self.resample()
        return count

    def disable(self) -> None:
        """Tear down every vector (DATA_NONE|ACTION_TRIGGER, count 0) and close the eventfds.

        A task waiting in :meth:`wait` gets an :class:`IrqError` (EBADF).
        """
        fds = self._swap([])
        try:
            self._set(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        finally:
            self._retire(fds, carry=False)
            self._drop_resample()

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
            self._drop_resample()

    def __repr__(self) -> str:
        return f"Irq(index={self.index}, count={self.count}, flags={self.flags!r})"


__all__ = ["Irq"]
