"""QEMU's educational device (hw/misc/edu.c, docs/specs/edu.rst) as a device model."""

from __future__ import annotations

import ctypes
import math
import mmap
import threading
import time
from typing import TYPE_CHECKING, Any

from mock_vfio.devices import DeviceModel, accesses
from mock_vfio.trace import Event, now, thread_name

if TYPE_CHECKING:
    from mock_vfio.pci import Device


# QEMU hw/misc/edu.c register map (docs/specs/edu.rst)
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
EDU_DMA_BUF = 0x40000  # in the device's DMA space only, not in BAR0
EDU_DMA_SIZE = 4096
EDU_ID_VALUE = 0x010000ED
EDU_STATUS_COMPUTING = 0x01
EDU_STATUS_IRQFACT = 0x80
EDU_DMA_START = 0x1
EDU_DMA_FROM_DEV = 0x2  # direction: 0 = RAM -> device buffer, 1 = device -> RAM
EDU_DMA_IRQ = 0x4
EDU_IRQ_FACT = 0x00000001
EDU_IRQ_DMA = 0x00000100
EDU_DMA_MASK = (1 << 28) - 1  # the dma_mask property's default
EDU_DMA_TIME = 0.100  # the DMA timer fires 100 ms (virtual clock) after the start
# What 0x08 shows through a mapping once it is re-armed (see Edu); storing it
# would start a 4-billion-step factorial on QEMU, so no driver does.
EDU_FACT_ARMED = 0xFFFFFFFF

_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
_REGS_END = 0x100  # the register block the model keeps in the mapping
# The registers as they sit in the mapping: offset -> width.
_VIEW = {
    EDU_ID: 4,
    EDU_LIVENESS: 4,
    EDU_FACTORIAL: 4,
    EDU_STATUS: 4,
    EDU_IRQ_STATUS: 4,
    EDU_IRQ_RAISE: 4,
    EDU_IRQ_ACK: 4,
    EDU_DMA_SRC: 8,
    EDU_DMA_DST: 8,
    EDU_DMA_COUNT: 8,
    EDU_DMA_CMD: 8,
}
_PCI_COMMAND_MASTER = 0x4
_MSI_INDEX = 1  # VFIO_PCI_MSI_IRQ_INDEX


class _DmaBuffer:
    """The edu's 4 KiB buffer, indexed by its address in the device's DMA space."""

    def __init__(self) -> None:
        self.data = bytearray(EDU_DMA_SIZE)
        self._c = (ctypes.c_char * EDU_DMA_SIZE).from_buffer(self.data)

    def _index(self, addr: int) -> int:
        if not EDU_DMA_BUF <= addr < EDU_DMA_BUF + EDU_DMA_SIZE:
            raise IndexError(f"{addr:#x} is outside the edu DMA buffer")
        return addr - EDU_DMA_BUF

    def __getitem__(self, addr: int) -> int:
        return self.data[self._index(addr)]

    def __setitem__(self, addr: int, value: int) -> None:
        self.data[self._index(addr)] = value

    def address(self, addr: int) -> int:
        return ctypes.addressof(self._c) + self._index(addr)

    def clear(self) -> None:
        self.data[:] = bytes(EDU_DMA_SIZE)


class Edu(DeviceModel):
    """QEMU's educational device: id, liveness, factorial, interrupts, a DMA engine.

    The registers live in this object, as in QEMU; BAR0's memory is a view of
    them for the driver's mapping, with every offset QEMU does not decode
    reading all ones (the DMA buffer at 0x40000 too: it is in DMA space only).

    Through the device fd a store or load is exact: each access (split as
    vfio-pci splits it) goes to the registers as one MMIO access goes to
    QEMU, which acts on every store, whatever the value.

    Through a mapping a store is plain memory, so the model learns of it by
    comparing the view with what it last put there, when the device thread
    looks (every ``poll_interval``) or at the next access through the fd.  On
    real hardware a load after a store flushes the posted write; here a read
    through the fd (the ID register, say) right after a store plays that part:
    it makes the device see the store at once, so status bit 0 already reads 1
    when the driver starts polling.  A driver that polls without it can read
    the status before the device has noticed the store.

    To see every store a register must show, between stores, a value the
    driver does not store.  The write-only 0x60 and 0x64 show 0 (QEMU reads all
    ones there; a store of 0 to them is a no-op, except that 0x60 re-sends a
    pending interrupt).  The DMA registers are exact: stores to them while a
    transfer runs, and 0x98 without the start bit, are ignored, and an idle
    0x98 never shows the start bit.  The factorial register must read back its
    result, so it keeps it until the driver turns to other work (a store to
    0x04, 0x60, the DMA registers, or to 0x20 that sets bit 7), then shows
    ``EDU_FACT_ARMED`` in the mapping (through the fd it still reads the
    result), so that n! after 1! or 2!, or 0! after a reset, is seen.
    Limits of the mapping path, all exact through the fd:
    - a store of the value a register shows is invisible: ~x to 0x04 right
      after x, n to 0x08 right after computing n! = n with no other work in
      between, ``EDU_FACT_ARMED`` to 0x08, 0 to 0x60 or 0x64;
    - a 4-byte store to a DMA register is merged with its other half, where
      QEMU zero-extends a store to 0x80/0x88/0x90/0x98 and ignores one to the
      upper half;
    - a store landing while the model rewrites that same register is lost
      (there is no atomic exchange on plain memory from here);
    - stores to undecoded offsets beyond the register block stay in memory.
    """

    def __init__(self, dev: Device) -> None:
        super().__init__(dev)
        self.buffer = _DmaBuffer()
        self._image = b""  # the register block as the model last wrote it
        self._clear()

    def _clear(self) -> None:
        self.liveness = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0
        self._dma_due: float | None = None
        self._fact_view = EDU_FACT_ARMED
        self._fact_started = -1  # device-thread tick at which a factorial was stored
        self._ticks = 0
        self._notify = False
        self.buffer.clear()

    def _mem(self) -> mmap.mmap:
        return self.dev.bar_memory(0)

    def init_bar(self, index: int, mem: mmap.mmap) -> None:
        if index == 0:
            self._fill(mem)

    def _fill(self, mem: mmap.mmap) -> None:
        mem[:] = b"\xff" * len(mem)
        self._image = b""
        self._render(mem, bytes(mem[:_REGS_END]))

    def reset(self) -> None:
        with self.lock:
            self._clear()
            if 0 in self.dev._bar_mem:
                self._fill(self._mem())

    # --- the registers, as QEMU's MMIO handlers see one access --------------------

    def _load(self, off: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if size != 4 and (off < 0x80 or size != 8):
            return ones
        value = {
            EDU_ID: EDU_ID_VALUE,
            EDU_LIVENESS: self.liveness,
            EDU_FACTORIAL: self.fact,
            EDU_STATUS: self.status,
            EDU_IRQ_STATUS: self.irq_status,
            EDU_DMA_SRC: self.dma_src,
            EDU_DMA_DST: self.dma_dst,
            EDU_DMA_COUNT: self.dma_count,
            EDU_DMA_CMD: self.dma_cmd,
        }.get(off, ones)
        return value & ones

    def _store(self, off: int, size: int, value: int) -> None:
        if size != 4 and (off < 0x80 or size != 8):
            return
        running = bool(self.dma_cmd & EDU_DMA_START)
        if off == EDU_LIVENESS:
            self.liveness = ~value & _M32
        elif off == EDU_FACTORIAL:
            if self.status & EDU_STATUS_COMPUTING:
                return  # QEMU ignores it until the thread is done
            self.fact = value & _M32
            self.status |= EDU_STATUS_COMPUTING
            self._fact_view = self.fact  # reads the operand while computing
            self._fact_started = self._ticks
            return
        elif off == EDU_STATUS:
            if value & EDU_STATUS_IRQFACT:
                if self.status & EDU_STATUS_IRQFACT:
                    return
                self.status |= EDU_STATUS_IRQFACT
            else:
                self.status &= ~EDU_STATUS_IRQFACT
                return
        elif off == EDU_IRQ_RAISE:
            self.irq_status |= value & _M32
            self._notify = self._notify or bool(self.irq_status)
        elif off == EDU_IRQ_ACK:
            self.irq_status &= ~value & _M32
            return
        elif off in (EDU_DMA_SRC, EDU_DMA_DST, EDU_DMA_COUNT, EDU_DMA_CMD):
            if off == EDU_DMA_CMD and not value & EDU_DMA_START:
                return
            if not running:
                setattr(self, _DMA_FIELDS[off], value & _M64)
                if off == EDU_DMA_CMD:
                    scale = self.dev.machine.time_scale
                    self._dma_due = time.monotonic() + EDU_DMA_TIME * scale
        else:
            return  # read-only or not decoded
        if not self.status & EDU_STATUS_COMPUTING:
            self._fact_view = EDU_FACT_ARMED  # the driver turned to other work

    # --- the mapping ----------------------------------------------------------------

    def _view(self) -> bytes:
        out = bytearray(b"\xff" * _REGS_END)
        for off, width in _VIEW.items():
            if off == EDU_FACTORIAL:
                value = self._fact_view
            elif off in (EDU_IRQ_RAISE, EDU_IRQ_ACK):
                value = 0
            else:
                value = self._load(off, width)
            out[off : off + width] = value.to_bytes(width, "little")
        return bytes(out)

    def _take_stores(self, seen: bytes) -> None:
        """Registers the driver changed through a mapping, each taken as one store."""
        for off, width in _VIEW.items():
            new = seen[off : off + width]
            if self._image and new != self._image[off : off + width]:
                self._store(off, width, int.from_bytes(new, "little"))

    def _render(self, mem: mmap.mmap, seen: bytes) -> None:
        """Put the registers into the mapping, touching only what differs."""
        view = self._view()
        for off in range(0, _REGS_END, 4):
            width = 8 if off >= 0x80 else 4
            if off % width:
                continue
            if view[off : off + width] != seen[off : off + width]:
                mem[off : off + width] = view[off : off + width]
        self._image = view

    # --- the device ---------------------------------------------------------------

    def service(self) -> None:
        if self.dev.removed:
            return
        on_thread = threading.current_thread() is self._thread
        with self.lock:
            mem = self._mem()
            seen = bytes(mem[:_REGS_END])
            if on_thread:
                self._ticks += 1
            if seen != self._image:
                self._take_stores(seen)
            if on_thread:
                self._finish_factorial()
            self._run_dma()
            self._render(mem, seen)
        self._deliver()

    def _finish_factorial(self) -> None:
        # QEMU's edu thread: done a moment after the store, never within it.
        if not self.status & EDU_STATUS_COMPUTING or self._ticks <= self._fact_started:
            return
        n = self.fact
        self.fact = 0 if n >= 34 else math.factorial(n) & _M32  # 34! is 0 mod 2**32
        self._fact_view = self.fact
        self.status &= ~EDU_STATUS_COMPUTING
        if self.status & EDU_STATUS_IRQFACT:
            self.irq_status |= EDU_IRQ_FACT
            self._notify = True

    def _run_dma(self) -> None:
        if self._dma_due is None or time.monotonic() < self._dma_due:
            return
        self._dma_due = None
        if self.dma_cmd & EDU_DMA_START:
            self._dma(self.buffer, self.dma_cmd)
            self.dma_cmd &= ~EDU_DMA_START
            if self.dma_cmd & EDU_DMA_IRQ:
                self.irq_status |= EDU_IRQ_DMA
                self._notify = True

    def _bus_master(self) -> bool:
        return bool(self.dev.config.command() & _PCI_COMMAND_MASTER)

    def _deliver(self) -> None:
        """Send the interrupt edu_raise_irq asked for: MSI is a memory write, INTx a level
        (edu_raise_irq / edu_lower_irq: asserted while irq_status is non-zero)."""
        with self.lock:
            notify, self._notify = self._notify, False
            level = bool(self.irq_status)
        if self.dev.irq_type != _MSI_INDEX:
            self.dev.set_intx(level)
            return
        if not notify:
            return
        if not self._bus_master():
            self.dev.machine.counters.add("msi_dropped")  # no bus master: the write never leaves
            return
        self.dev.raise_irq(0)

    def _guest_error(self, what: str, value: Any) -> None:
        """QEMU's qemu_log_mask(LOG_GUEST_ERROR, ...): a trace event and a counter."""
        t = now()
        self.dev.machine.record(
            Event("guest_error", t, t, thread_name(), self.dev.addr, cause=what, value=value)
        )
        self.dev.machine.counters.add(f"dma_{what}")

    def _dma(self, buffer: _DmaBuffer, cmd: int) -> None:
        to_ram = bool(cmd & EDU_DMA_FROM_DEV)
        count = self.dma_count
        dev_addr = self.dma_src if to_ram else self.dma_dst
        addr = self.dma_dst if to_ram else self.dma_src
        if not (dev_addr >= EDU_DMA_BUF and dev_addr + count <= EDU_DMA_BUF + EDU_DMA_SIZE):
            self.dev.machine.counters.add("dma_errors")
            return
        iova = addr & EDU_DMA_MASK
        if iova != addr:
            self._guest_error("clamped", (addr, iova))
        if not self._bus_master():
            # pci_dma_read/write go through the bus master address space,
            # which is disabled while PCI_COMMAND_MASTER is clear.
            self.dev.machine.counters.add("dma_no_master")
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
        if count:
            local = buffer.address(dev_addr)
            if to_ram:
                ctypes.memmove(vaddr, local, count)
            else:
                ctypes.memmove(local, vaddr, count)
        self.dev.machine.counters.add("dma_transfers")

    # --- the device fd ----------------------------------------------------------------

    def mmio_read(self, index: int, off: int, size: int) -> bytes | None:
        if index != 0:
            return super().mmio_read(index, off, size)
        self.service()
        with self.lock:
            return b"".join(self._load(o, w).to_bytes(w, "little") for o, w in accesses(off, size))

    def mmio_write(self, index: int, off: int, data: bytes) -> bool:
        if index != 0:
            return super().mmio_write(index, off, data)
        self.service()  # earlier stores through a mapping come first
        with self.lock:
            for o, w in accesses(off, len(data)):
                rel = o - off
                self._store(o, w, int.from_bytes(data[rel : rel + w], "little"))
        self.service()
        return True


_DMA_FIELDS = {
    EDU_DMA_SRC: "dma_src",
    EDU_DMA_DST: "dma_dst",
    EDU_DMA_COUNT: "dma_count",
    EDU_DMA_CMD: "dma_cmd",
}
