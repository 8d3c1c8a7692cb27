"""Device models behind BAR memory: a base class and QEMU's ``edu``.

MMIO through an mmap is plain memory, so a model sees user stores only by
looking: a daemon thread services the registers while the device is open
(about every half millisecond), and pread/pwrite on the device fd service them
synchronously, so accesses through the fd are exact and accesses through a
mapping settle within a poll period.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import struct
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mock_vfio.machine import Device


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


# QEMU hw/misc/edu.c register map
EDU_ID = 0x00
EDU_LIVENESS = 0x04
EDU_FACTORIAL = 0x08
EDU_STATUS = 0x20
EDU_IRQ_STATUS = 0x24
EDU_IRQ_RAISE = 0x60
EDU_IRQ_ACK = 0x64
EDU_DMA_SRC = 0x80
EDU_DMA_DST = 0x88
EDU_DMA_COUNT = 0x90
EDU_DMA_CMD = 0x98
EDU_DMA_BUF = 0x40000
EDU_DMA_SIZE = 4096
EDU_STATUS_COMPUTING = 0x01
EDU_STATUS_IRQFACT = 0x80
EDU_DMA_START = 0x1
EDU_DMA_FROM_DEV = 0x2  # direction: 0 = RAM -> device buffer, 1 = device -> RAM
EDU_DMA_IRQ = 0x4
EDU_IRQ_FACT = 0x00000001
EDU_IRQ_DMA = 0x00000100


class Edu(DeviceModel):
    """QEMU's educational device: id, liveness, factorial, interrupts, a DMA engine."""

    def __init__(self, dev: Device) -> None:
        super().__init__(dev)
        self.irq_status = 0
        self._live = 0
        self._fact = 0

    def _mem(self) -> mmap.mmap:
        return self.dev.bar_memory(0)

    def init_bar(self, index: int, mem: mmap.mmap) -> None:
        if index == 0:
            self._fill(mem)

    def _fill(self, mem: mmap.mmap) -> None:
        mem[0:0x100] = bytes(0x100)
        struct.pack_into("<I", mem, EDU_ID, 0x010000ED)
        struct.pack_into("<I", mem, EDU_LIVENESS, 0)
        self._live = 0
        self._fact = 0
        self.irq_status = 0

    def reset(self) -> None:
        with self.lock:
            if 0 in self.dev._bar_mem:
                self._fill(self._mem())

    @staticmethod
    def _r32(mem: mmap.mmap, off: int) -> int:
        return int(struct.unpack_from("<I", mem, off)[0])

    @staticmethod
    def _r64(mem: mmap.mmap, off: int) -> int:
        return int(struct.unpack_from("<Q", mem, off)[0])

    def service(self) -> None:
        if self.dev.removed:
            return
        raise_bits = 0
        with self.lock:
            mem = self._mem()
            if self._r32(mem, EDU_ID) != 0x010000ED:
                struct.pack_into("<I", mem, EDU_ID, 0x010000ED)  # read-only
            live = self._r32(mem, EDU_LIVENESS)
            if live != self._live:
                self._live = ~live & 0xFFFFFFFF
                struct.pack_into("<I", mem, EDU_LIVENESS, self._live)
            fact = self._r32(mem, EDU_FACTORIAL)
            if fact != self._fact:
                result = math.factorial(min(fact, 40)) & 0xFFFFFFFF if fact else 1
                struct.pack_into("<I", mem, EDU_FACTORIAL, result)
                self._fact = result
                if self._r32(mem, EDU_STATUS) & EDU_STATUS_IRQFACT:
                    raise_bits |= EDU_IRQ_FACT
            status = self._r32(mem, EDU_STATUS)
            if status & EDU_STATUS_COMPUTING:
                struct.pack_into("<I", mem, EDU_STATUS, status & ~EDU_STATUS_COMPUTING)
            v = self._r32(mem, EDU_IRQ_RAISE)
            if v:
                struct.pack_into("<I", mem, EDU_IRQ_RAISE, 0)
                raise_bits |= v
            v = self._r32(mem, EDU_IRQ_ACK)
            if v:
                struct.pack_into("<I", mem, EDU_IRQ_ACK, 0)
                self.irq_status &= ~v
            cmd = self._r64(mem, EDU_DMA_CMD)
            if cmd & EDU_DMA_START:
                self._dma(mem, cmd)
                struct.pack_into("<Q", mem, EDU_DMA_CMD, cmd & ~EDU_DMA_START)
                if cmd & EDU_DMA_IRQ:
                    raise_bits |= EDU_IRQ_DMA
            if raise_bits:
                self.irq_status |= raise_bits
            struct.pack_into("<I", mem, EDU_IRQ_STATUS, self.irq_status)
        if raise_bits:
            self.dev.raise_irq(0)

    def _dma(self, mem: mmap.mmap, cmd: int) -> None:
        src, dst = self._r64(mem, EDU_DMA_SRC), self._r64(mem, EDU_DMA_DST)
        count = self._r64(mem, EDU_DMA_COUNT)
        to_ram = bool(cmd & EDU_DMA_FROM_DEV)
        dev_addr = src if to_ram else dst
        iova = dst if to_ram else src
        if not (dev_addr >= EDU_DMA_BUF and dev_addr + count <= EDU_DMA_BUF + EDU_DMA_SIZE):
            self.dev.machine.counters.add("dma_errors")
            return
        space = self.dev.dma
        if space is None:
            self.dev.machine.counters.add("dma_faults")
            return
        try:
            vaddr = space.translate(iova, count, write=to_ram)
        except OSError:
            self.dev.machine.counters.add("dma_faults")
            return
        buf = self.dev.bar_address(0) + dev_addr
        if to_ram:
            ctypes.memmove(vaddr, buf, count)
        else:
            ctypes.memmove(buf, vaddr, count)
        self.dev.machine.counters.add("dma_transfers")


_MODELS: dict[str, type[DeviceModel]] = {"generic": DeviceModel, "edu": Edu}


def make_model(name: str, dev: Device) -> DeviceModel:
    try:
        return _MODELS[name](dev)
    except KeyError:
        raise ValueError(f"unknown device model {name!r}; known: {', '.join(_MODELS)}") from None
