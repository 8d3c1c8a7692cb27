"""Device models behind BAR memory: the base class, plain memory (QEMU's ``edu`` is
:mod:`mock_vfio.edu`, its ``e1000e`` :mod:`mock_vfio.e1000e`).

MMIO through an mmap is plain memory, so a model sees user stores only by
looking: a daemon thread services the registers while the device is open
(about every half millisecond), and pread/pwrite on the device fd service them
synchronously, so accesses through the fd are exact and accesses through a
mapping settle within a poll period.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mock_vfio.pci import Device


class DeviceModel:
    """Behaviour of a device's BARs; the generic device is plain memory."""

    poll_interval = 0.0005

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.RLock()

    def init_bar(self, index: int, mem: mmap.mmap) -> None:
        """Fill a BAR's memory when it is first allocated."""

    def service(self) -> None:
        """Look at the registers and act on what the driver wrote."""

    def reset(self) -> None:
        """The device was reset (FLR, PM or bus reset)."""

    def mmio_read(self, index: int, off: int, size: int) -> bytes | None:
        self.service()
        return None

    def mmio_write(self, index: int, off: int, data: bytes) -> bool:
        mem = self.dev.bar_memory(index)
        with self.lock:
            mem[off : off + len(data)] = data
        self.service()
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        t = threading.Thread(target=self._run, name=f"sim-{self.dev.addr}", daemon=True)
        self._thread = t
        t.start()

    def stop(self) -> None:
        t = self._thread
        self._thread = None
        self._stop.set()
        if t is not None and t is not threading.current_thread():
            t.join(timeout=1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.service()
            except (ValueError, OSError):  # memory closed under us at shutdown
                return


def accesses(off: int, n: int) -> Iterator[tuple[int, int]]:
    """(offset, width) of the accesses vfio-pci makes for a pread/pwrite.

    The vmtest guest's kernel (6.1) splits into naturally aligned 4, 2 and 1
    byte accesses; 8-byte ones came later.
    """
    end = off + n
    while off < end:
        width = next(w for w in (4, 2, 1) if end - off >= w and not off % w)
        yield off, width
        off += width


def make_model(name: str, dev: Device) -> DeviceModel:
    from mock_vfio.e1000e import E1000e  # edu.py and e1000e.py build on DeviceModel
    from mock_vfio.edu import Edu

    models: dict[str, type[DeviceModel]] = {"generic": DeviceModel, "edu": Edu, "e1000e": E1000e}
    try:
        return models[name](dev)
    except KeyError:
        raise ValueError(f"unknown device model {name!r}; known: {', '.join(models)}") from None
