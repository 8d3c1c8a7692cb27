"""Trace events, counters and fault injection of the simulated kernel."""

from __future__ import annotations

import errno as _errno
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Event:
    """One thing the simulated kernel did.

    ``kind`` is the event type: ``reset``, ``lock_wait``, ``open``, ``release``,
    ``command_memory``, ``hot_reset``, ``irq``, ``bind``, ``unbind``, ``remove``.
    A reset carries ``method`` (``flr``, ``pm``, ``bus``, ``slot``) and ``cause``
    (``open``, ``release``, ``devset``, ``ioctl``, ``hot_reset``, ``config``);
    a ``command_memory`` event carries ``value`` (the new PCI_COMMAND_MEMORY bit).
    """

    kind: str
    start: float
    end: float
    thread: str
    device: str | None = None
    devset: str | None = None
    method: str | None = None
    cause: str | None = None
    pid: int | None = None
    value: Any = None

    @property
    def duration(self) -> float:
        return self.end - self.start


class Counters:
    """Thread-safe named counters, read like a dict (missing names are 0)."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def get(self, name: str, default: int = 0) -> int:
        with self._lock:
            return self._c.get(name, default)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._c

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._c)

    def items(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._c.items())

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    def __repr__(self) -> str:
        return f"Counters({self.as_dict()!r})"


def now() -> float:
    return time.monotonic()


def thread_name() -> str:
    return threading.current_thread().name


@dataclass(slots=True)
class _Rule:
    name: str
    errno: int
    device: str | None
    count: int | None


class Faults:
    """Injected failures: errnos on calls, slow or hung resets.

    ``fail(name, errno)`` matches a Kernel method name (``open``, ``close``,
    ``ioctl``, ``pread``, ``mmap``, ``write_text``...) or an ioctl name
    (``VFIO_DEVICE_GET_INFO``, ``IOMMU_IOAS_MAP``); ``device`` restricts it to
    calls concerning that PCI address; ``count=None`` fails forever.
    """

    def __init__(self) -> None:
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._slow: dict[str, float] = {}
        self._hang: dict[str, threading.Event] = {}
        self._hung = threading.Condition(self._lock)
        self._hung_now: dict[str, int] = {}  # target -> resets waiting on its hang now

    def fail(self, name: str, errno: int, device: str | None = None, count: int | None = 1) -> None:
        with self._lock:
            self._rules.append(_Rule(name, errno, device, count))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._slow.clear()
            hangs = list(self._hang.values())
            self._hang.clear()
        for ev in hangs:
            ev.set()

    def check(self, names: tuple[str, ...], device: str | None) -> None:
        """Raise the first matching injected errno (and use one of its counts)."""
        with self._lock:
            for rule in self._rules:
                if rule.name not in names:
                    continue
                if rule.device is not None and rule.device != device:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
                raise OSError(rule.errno, f"{os.strerror(rule.errno)} (injected)")

    def slow_reset(self, target: str, seconds: float) -> None:
        """Add ``seconds`` (model time, scaled) to every reset of a device or device set."""
        with self._lock:
            self._slow[target] = seconds

    def hang_reset(self, target: str, event: threading.Event | None = None) -> threading.Event:
        """Make resets of ``target`` block until ``event`` is set; returns the event."""
        ev = event if event is not None else threading.Event()
        with self._lock:
            self._hang[target] = ev
        return ev

    def reset_delay(self, targets: tuple[str, ...]) -> tuple[float, threading.Event | None]:
        with self._lock:
            extra = sum(self._slow.get(t, 0.0) for t in targets)
            hang = next((self._hang[t] for t in targets if t in self._hang), None)
        return extra, hang

    def hung(self, targets: tuple[str, ...], hang: threading.Event) -> None:
        """Wait on ``hang`` for a reset of ``targets``, seen by :meth:`wait_hung` meanwhile."""
        with self._hung:
            for t in targets:
                self._hung_now[t] = self._hung_now.get(t, 0) + 1
            self._hung.notify_all()
        try:
            hang.wait()
        finally:
            with self._hung:
                for t in targets:
                    self._hung_now[t] -= 1

    def wait_hung(self, target: str, timeout: float) -> bool:
        """Whether a reset of ``target`` is waiting on its hang (waits up to ``timeout``)."""
        with self._hung:
            return self._hung.wait_for(lambda: self._hung_now.get(target, 0) > 0, timeout)


def oserror(err: int, what: str = "") -> OSError:
    msg = os.strerror(err)
    return OSError(err, f"{msg}: {what}" if what else msg)


ENODEV = _errno.ENODEV
