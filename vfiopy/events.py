"""The kernel's two device events: the request interrupt and the error interrupt.

vfio-pci gives every device two interrupt indexes that no device raises:

- **request** (``VFIO_PCI_REQ_IRQ_INDEX``): the host wants the device back.  Unbinding it
  from vfio-pci (or removing it) runs ``vfio_unregister_group_dev`` (drivers/vfio/vfio_main.c;
  ``vfio_del_group_dev`` in vfio.c before 5.13), which calls ``vfio_pci_core_request``: the
  request eventfd is signalled at once and again every 10 s while the unbind waits, forever,
  for the last file reference to go.  A user with no eventfd wired only gets a warning in the
  host's log ("No device request channel registered, blocked until released by user") and
  the unbind hangs until it exits.
- **error** (``VFIO_PCI_ERR_IRQ_INDEX``, PCIe only): AER reported an error on the device
  (``vfio_pci_aer_err_detected``).

:func:`request_event` and :func:`error_event` wire the index to an eventfd and give an
object to ``await``.  ``Session(release_on_request=True)`` goes further: a thread of the
session watches every device's request eventfd and closes the device (mappings, interrupts,
fd) as soon as the kernel asks, so the unbind completes instead of blocking.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from vfiopy._log import get_logger
from vfiopy._uapi import PciIrq
from vfiopy.errors import DeviceInfoError, IrqError
from vfiopy.irq import Irq
from vfiopy.kernel import EFD_NONBLOCK, POLLIN, Kernel

if TYPE_CHECKING:
    from vfiopy.device import Device

log = get_logger(__name__)


class DeviceEvent:
    """A device's request or error interrupt, wired to an eventfd, to await."""

    def __init__(self, device: Device, index: PciIrq) -> None:
        name = "request" if index == PciIrq.REQ else "error"
        try:
            irq = device.irq(index)
        except DeviceInfoError as exc:
            if exc.errno == errno.EINVAL and index == PciIrq.ERR:
                exc.advice = "the error interrupt exists only for PCI Express devices"
            raise
        if irq.count < 1:
            raise IrqError(
                errno.EOPNOTSUPP,
                device.name,
                f"{name} event",
                detail=f"irq index {int(index)} has no vector",
                advice="the error interrupt exists only for PCI Express devices",
            )
        self.device = device
        self.kind = name
        self.irq: Irq = irq
        if not irq.enabled:
            irq.enable(1)

    def pending(self) -> int:
        """How often the kernel signalled since the last look; 0 when it did not (no wait)."""
        return self.irq.read(0)

    async def wait(self) -> int:
        """Wait until the kernel signals; returns how often it did.

        Raises :class:`IrqError` (EBADF) when the device is closed meanwhile.
        """
        return await self.irq.wait(0)

    def close(self) -> None:
        """Unwire the eventfd. Idempotent; the device's close does it too."""
        self.irq.close()

    def __repr__(self) -> str:
        return f"DeviceEvent({self.device.name}, {self.kind})"


def request_event(device: Device) -> DeviceEvent:
    """The device's request interrupt: signalled when the host wants the device back."""
    return DeviceEvent(device, PciIrq.REQ)


def error_event(device: Device) -> DeviceEvent:
    """The device's error interrupt (AER, PCI Express devices only)."""
    return DeviceEvent(device, PciIrq.ERR)


class RequestWatcher:
    """One thread that waits on many devices' request eventfds and calls ``on_request``.

    ``on_request(device)`` runs on the watcher's thread (a Session closes the device there).
    :meth:`remove` returns only once the thread no longer polls the device's eventfd, so the
    caller may close the device (and its eventfd) right after.
    """

    def __init__(self, kernel: Kernel, on_request: Callable[[Device], None]) -> None:
        self.kernel = kernel
        self._on_request = on_request
        self._cond = threading.Condition()
        self._watched: dict[int, tuple[Device, DeviceEvent]] = {}  # eventfd -> device
        self._gen = 0  # bumped by every change of _watched
        self._polling: int | None = None  # the generation the thread polls, None when not
        self._stopping = False
        self._wake = kernel.eventfd(0, EFD_NONBLOCK)
        self._thread: threading.Thread | None = None

    def add(self, device: Device) -> DeviceEvent:
        event = request_event(device)
        with self._cond:
            if self._stopping:
                raise IrqError(errno.EBADF, device.name, "watch request", "the watcher stopped")
            self._watched[event.irq.eventfds[0]] = (device, event)
            self._changed()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="vfiopy-request-watcher", daemon=True
                )
                self._thread.start()
        return event

    def remove(self, device: Device) -> None:
        with self._cond:
            fds = [fd for fd, (d, _) in self._watched.items() if d is device]
            if not fds:
                return
            for fd in fds:
                del self._watched[fd]
            self._changed()
            gen = self._gen
            if threading.current_thread() is not self._thread:
                self._cond.wait_for(lambda: self._polling is None or self._polling >= gen)

    def _changed(self) -> None:
        """Under the lock: a new set to poll; wake the thread out of the old one."""
        self._gen += 1
        with contextlib.suppress(BlockingIOError):
            self.kernel.write(self._wake, (1).to_bytes(8, "little"))

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                watched = dict(self._watched)
                self._polling = self._gen
                self._cond.notify_all()
            try:
                ready = self.kernel.poll(
                    [(self._wake, POLLIN), *((fd, POLLIN) for fd in watched)], -1
                )
            finally:
                with self._cond:
                    self._polling = None
                    self._cond.notify_all()
            with contextlib.suppress(BlockingIOError):
                self.kernel.read(self._wake, 8)
            for fd, _ in ready:
                with self._cond:
                    entry = self._watched.get(fd)
                if entry is None or fd not in watched or entry[0] is not watched[fd][0]:
                    continue  # removed meanwhile: its fd may be another file by now
                device, event = entry
                try:
                    count = event.pending()
                except IrqError:
                    continue  # closed meanwhile
                if not count:
                    continue
                log.info("device requested by the kernel", bdf=device.name, count=count)
                try:
                    self._on_request(device)
                except Exception as exc:  # the watcher must outlive one device's failure
                    log.warning(
                        "release on request failed",
                        bdf=device.name,
                        errno=getattr(exc, "errno", None),
                        error=str(exc),
                    )

    def stop(self) -> None:
        """Stop the thread and close its wake-up eventfd. Idempotent."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._watched.clear()
            self._changed()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.kernel.close(self._wake)


__all__ = ["DeviceEvent", "RequestWatcher", "error_event", "request_event"]
