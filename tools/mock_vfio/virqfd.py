"""The kernel's eventfd listeners (``vfio_virqfd``): an eventfd the user signals runs an action.

vfio-pci uses them for the INTx unmask (resample) eventfd and for ioeventfds
(``VFIO_DEVICE_IOEVENTFD``, Linux 4.17, 30656177c408): the user writes the eventfd and the
kernel unmasks the line or performs a pre-programmed BAR write, with no ioctl.  Like
``virqfd_wakeup``, each wake-up consumes the eventfd's counter and runs the action once, and a
count already pending when the listener is installed runs it at once.

One thread per machine waits on every registered eventfd with epoll.  ``remove`` returns only
after an action that was running has finished, so nothing runs after it (``vfio_virqfd_disable``
flushes its work the same way).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable


class Virqfds:
    """The machine's eventfd listeners: ``add`` a dup of the user's eventfd and an action."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._actions: dict[int, Callable[[], None]] = {}
        self._running: int | None = None  # the fd whose action runs now
        self._epoll: select.epoll | None = None
        self._wake = -1
        self._thread: threading.Thread | None = None

    def add(self, fd: int, action: Callable[[], None]) -> None:
        """Listen on ``fd`` (ours: closed by :meth:`remove`) and run ``action`` per signal."""
        with self._lock:
            if self._epoll is None:
                self._epoll = select.epoll()
                self._wake = os.eventfd(0, os.EFD_NONBLOCK)
                self._epoll.register(self._wake, select.EPOLLIN)
                self._thread = threading.Thread(target=self._run, name="sim-virqfd", daemon=True)
                self._thread.start()
            self._actions[fd] = action
            self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        """Stop listening on ``fd`` and close it; waits for its running action to end."""
        with self._lock:
            if self._actions.pop(fd, None) is None:
                return
            assert self._epoll is not None
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
            while self._running == fd and threading.current_thread() is not self._thread:
                self._lock.wait()
        os.close(fd)

    def close(self) -> None:
        """Remove every listener and end the thread."""
        with self._lock:
            fds = list(self._actions)
        for fd in fds:
            self.remove(fd)
        with self._lock:
            epoll, thread, self._epoll, self._thread = self._epoll, self._thread, None, None
        if epoll is None:
            return
        os.eventfd_write(self._wake, 1)
        if thread is not None:
            thread.join(timeout=1.0)
        epoll.close()
        os.close(self._wake)

    def _run(self) -> None:
        epoll = self._epoll
        assert epoll is not None
        while True:
            try:
                events = epoll.poll()
            except (OSError, ValueError):  # closed under us
                return
            for fd, _ in events:
                if fd == self._wake:
                    return
                with self._lock:
                    action = self._actions.get(fd)
                    if action is None:
                        continue
                    try:
                        os.eventfd_read(fd)  # the counter is consumed, as virqfd_wakeup does
                    except BlockingIOError:
                        continue
                    self._running = fd
                try:
                    action()
                except (OSError, ValueError):  # the device went away meanwhile
                    pass
                finally:
                    with self._lock:
                        self._running = None
                        self._lock.notify_all()
