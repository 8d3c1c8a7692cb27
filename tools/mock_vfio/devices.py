"""Device models behind BAR memory: a base class and the e1000e's I/O window (QEMU's ``edu`` is
:mod:`mock_vfio.edu`).

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


# The e1000e (8086:10d3, QEMU hw/net/e1000e.c): its I/O BAR is an indirect window onto
# the registers of BAR0.  A 4-byte write to IOADDR (I/O offset 0) picks a register
# offset; a 4-byte access to IODATA (offset 4) reads or writes that register.
E1000E_IOADDR = 0x00
E1000E_IODATA = 0x04
E1000E_STATUS = 0x08
E1000E_MMIO_BAR, E1000E_IO_BAR = 0, 2
# STATUS after reset as the model shows it: full duplex, link up, 1000 Mb/s, GIO master
# enabled (a value of the register's layout; the guest's may differ in other bits)
E1000E_STATUS_VALUE = 0x00080083


class E1000e(DeviceModel):
    """BAR0 is plain memory with STATUS filled in; the I/O BAR is the IOADDR/IODATA window.

    The window is reached with pread/pwrite only (an I/O BAR has no mmap), so every access
    through it comes here, exactly.
    """

    def __init__(self, dev: Device) -> None:
        super().__init__(dev)
        self.ioaddr = 0

    def init_bar(self, index: int, mem: mmap.mmap) -> None:
        if index == E1000E_MMIO_BAR:
            mem[E1000E_STATUS : E1000E_STATUS + 4] = E1000E_STATUS_VALUE.to_bytes(4, "little")

    def reset(self) -> None:
        with self.lock:
            self.ioaddr = 0
        self.init_bar(E1000E_MMIO_BAR, self.dev.bar_memory(E1000E_MMIO_BAR))

    def _reg(self) -> tuple[mmap.mmap, int] | None:
        mem = self.dev.bar_memory(E1000E_MMIO_BAR)
        off = self.ioaddr
        return (mem, off) if off % 4 == 0 and off + 4 <= len(mem) else None

    def mmio_read(self, index: int, off: int, size: int) -> bytes | None:
        if index != E1000E_IO_BAR:
            return super().mmio_read(index, off, size)
        out = bytearray(size)
        with self.lock:
            for o, w in accesses(off, size):
                value = 0
                if w == 4 and o == E1000E_IOADDR:
                    value = self.ioaddr
                elif w == 4 and o == E1000E_IODATA and (reg := self._reg()) is not None:
                    mem, r = reg
                    value = int.from_bytes(mem[r : r + 4], "little")
                out[o - off : o - off + w] = value.to_bytes(w, "little")
        return bytes(out)

    def mmio_write(self, index: int, off: int, data: bytes) -> bool:
        if index != E1000E_IO_BAR:
            return super().mmio_write(index, off, data)
        with self.lock:
            for o, w in accesses(off, len(data)):
                value = int.from_bytes(data[o - off : o - off + w], "little")
                if w == 4 and o == E1000E_IOADDR:
                    self.ioaddr = value
                elif w == 4 and o == E1000E_IODATA and (reg := self._reg()) is not None:
                    mem, r = reg
                    mem[r : r + 4] = value.to_bytes(4, "little")
        return True


def make_model(name: str, dev: Device) -> DeviceModel:
    from mock_vfio.edu import Edu  # edu.py builds on DeviceModel

    models: dict[str, type[DeviceModel]] = {"generic": DeviceModel, "edu": Edu, "e1000e": E1000e}
    try:
        return models[name](dev)
    except KeyError:
        raise ValueError(f"unknown device model {name!r}; known: {', '.join(models)}") from None
