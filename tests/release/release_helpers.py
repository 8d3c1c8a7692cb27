"""Helpers shared by the release tests (trace arithmetic, signals during a release)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vfiopy.release._report import max_overlap
from vfiopy.sysfs import VFIO_DRIVER, Sysfs

MachineFactory = Callable[..., Any]
T = TypeVar("T")


def vfio_devices(kernel: Any) -> list[str]:
    """Every device bound to vfio-pci, as the kernel's sysfs shows it."""
    s = Sysfs(kernel)
    return [str(a) for a in s.devices() if s.driver(a) == VFIO_DRIVER]


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def signalled_while_releasing(m: Any, sig: int, count: int, run: Callable[[], T]) -> T:
    """``run()`` (a CLI run in this process) while ``sig`` comes ``count`` times, 50 ms
    apart, once ``m`` has begun a release. Meanwhile ``sig`` has a handler that does nothing,
    until the sending thread is done: it never reaches pytest's own action (SIGTERM's exit,
    SIGINT's KeyboardInterrupt), which the CLI's handlers would otherwise leave in place."""

    def send() -> None:
        if wait_until(lambda: bool(m.events("release")), timeout=10):
            for i in range(count):
                if i:
                    time.sleep(0.05)
                os.kill(os.getpid(), sig)

    old = signal.signal(sig, lambda *_: None)
    t = threading.Thread(target=send)
    try:
        t.start()
        return run()
    finally:
        t.join()
        signal.signal(sig, old)


def overlap(events: list[Any]) -> int:
    """The most intervals open at one instant."""
    return max_overlap((e.start, e.end) for e in events)


def devsets(m: Any) -> list[str]:
    return sorted({e.devset for e in m.unique_resets(cause="devset")})


def slow_resets(m: Any, addrs: list[str], seconds: float = 5.0) -> None:
    """Lengthen the resets of ``addrs`` (model seconds; 0.1 s more at the tests' time scale)
    so that thread start-up on a loaded machine is small beside them, and `concurrent` can
    see two of them overlap."""
    for a in addrs:
        m.faults.slow_reset(a, seconds)


def concurrent(resets: list[Any]) -> bool:
    """Whether ``resets`` ran on more than one thread, at least two of them at once.

    The invariant of a parallel release, where a close loop or a process exit runs every
    reset on one thread, one after another. Never "all N at once": workers start one after
    another, and on a busy machine the first may finish its domain (and take the next one)
    before the last has started. Use it on resets lengthened with `slow_resets`.
    """
    return len({e.thread for e in resets}) >= 2 and overlap(resets) >= 2
