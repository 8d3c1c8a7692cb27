"""The simulated edu against QEMU's (hw/misc/edu.c, docs/specs/edu.rst), register by register."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mock_vfio import Machine, SimProcess, load_topology

from vfiopy._uapi import PAGE_SIZE, Ioctl, IrqSetFlag, PciIrq, PciRegion, Struct, ffi, lib

from .conftest import EDU, open_device

CFG = PciRegion.CONFIG << 40
BAR_SIZE = 0x100000
IOVA = 0x200000


@dataclass
class Edu:
    """One open edu: device fd, BAR0 mapping, an MSI eventfd, two pages of DMA memory."""

    machine: Machine
    p: SimProcess
    container: int
    d: int
    bar: int
    efd: int
    va: int
    keep: Any

    def r32(self, off: int) -> int:
        return int(struct.unpack("<I", self.p.pread(self.d, 4, off))[0])

    def w32(self, off: int, value: int) -> None:
        self.p.pwrite(self.d, struct.pack("<I", value), off)

    def w64(self, off: int, value: int) -> None:
        self.p.pwrite(self.d, struct.pack("<Q", value), off)

    def map_w32(self, off: int, value: int) -> None:
        """A store through the mapping, then the posted-write flush through the fd."""
        lib.vfiopy_write32(self.bar + off, value)
        self.r32(0x00)

    def master(self, on: bool) -> None:
        cmd = struct.unpack("<H", self.p.pread(self.d, 2, CFG + 0x04))[0]
        cmd = cmd | 0x4 if on else cmd & ~0x4
        self.p.pwrite(self.d, struct.pack("<H", cmd), CFG + 0x04)

    def interrupts(self, timeout: float = 0.5) -> int:
        """How many MSIs arrived (0 after ``timeout`` without one)."""
        if not self.p.poll([(self.efd, 1)], int(timeout * 1000)):
            return 0
        return os.eventfd_read(self.efd)

    def wait_clear(self, off: int, bits: int) -> int:
        deadline = time.monotonic() + 2.0
        while (value := self.r32(off)) & bits:
            assert time.monotonic() < deadline, f"{off:#x} still reads {value:#x}"
            time.sleep(0.0005)
        return value

    def ram(self, page: int, n: int) -> bytes:
        return bytes(ffi.buffer(ffi.cast("char *", self.va + page * PAGE_SIZE), n))

    def dma(self, src: int, dst: int, count: int, cmd: int) -> None:
        self.wait_clear(0x98, 1)
        self.w64(0x80, src)
        self.w64(0x88, dst)
        self.w64(0x90, count)
        self.w64(0x98, cmd)


def _open(machine: Machine) -> Edu:
    p = machine.spawn()
    c, _, d = open_device(p, EDU)
    bar = p.mmap(d, BAR_SIZE, 0, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED)
    efd = p.eventfd(0, os.EFD_NONBLOCK)
    s = Struct("struct vfio_irq_set", 24)
    s.p.flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
    s.p.index, s.p.start, s.p.count = PciIrq.MSI, 0, 1
    ffi.cast("int32_t *", s.p.data)[0] = efd
    p.ioctl(d, Ioctl.DEVICE_SET_IRQS, s.p)
    keep = ffi.new("char[]", 3 * PAGE_SIZE)
    va = (int(ffi.cast("uintptr_t", keep)) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    m = Struct("struct vfio_iommu_type1_dma_map")
    m.p.flags, m.p.vaddr, m.p.iova, m.p.size = 3, va, IOVA, 2 * PAGE_SIZE
    p.ioctl(c, Ioctl.IOMMU_MAP_DMA, m.p)
    return Edu(machine, p, c, d, bar, efd, va, keep)


@pytest.fixture
def edu(qemu: Machine) -> Iterator[Edu]:
    e = _open(qemu)
    e.master(True)
    yield e
    e.p.munmap(e.bar, BAR_SIZE)
    e.p.close(e.efd)


def factorial(e: Edu, n: int, *, mapped: bool = False) -> int:
    (e.map_w32 if mapped else e.w32)(0x08, n)
    e.wait_clear(0x20, 0x01)
    return e.r32(0x08)


# --- every store counts, whatever the register holds -------------------------------------------


@pytest.mark.parametrize("mapped", [False, True], ids=["fd", "mapping"])
def test_factorial_acts_on_every_store(edu: Edu, mapped: bool) -> None:
    store = edu.map_w32 if mapped else edu.w32
    for n, want in ((0, 1), (1, 1), (1, 1), (2, 2), (2, 2), (0, 1)):  # 0 first: after a reset
        store(0x20, 0x80)  # an MSI when done, as examples/edu_driver.py asks for it
        assert factorial(edu, n, mapped=mapped) == want
        assert edu.interrupts() == 1, f"{n}! raised no interrupt"
        store(0x20, 0)
        assert lib.vfiopy_read32(edu.bar + 0x08) == want  # read back in the mapping too


def test_mapping_limit_same_value_with_no_other_work_between(edu: Edu) -> None:
    """Pinned limit: n stored through a mapping right after n! = n is not seen."""
    assert factorial(edu, 1, mapped=True) == 1
    model = edu.machine.device(EDU).model
    assert model is not None
    model.stop()  # hold the device's thread: a factorial stays in progress
    try:
        lib.vfiopy_write32(edu.bar + 0x08, 1)
        edu.r32(0x00)
        assert not edu.r32(0x20) & 0x01
        edu.w32(0x08, 1)  # through the fd it is
        assert edu.r32(0x20) & 0x01
    finally:
        model.start()


def test_liveness_inverts_every_store_through_the_fd(edu: Edu) -> None:
    for value in (0x1234, ~0x1234 & 0xFFFFFFFF, ~0x1234 & 0xFFFFFFFF, 0):
        edu.w32(0x04, value)
        assert edu.r32(0x04) == ~value & 0xFFFFFFFF
        assert lib.vfiopy_read32(edu.bar + 0x04) == ~value & 0xFFFFFFFF


def test_interrupt_raise_and_ack_through_the_mapping(edu: Edu) -> None:
    for _ in range(2):  # the same value twice: two interrupts
        edu.map_w32(0x60, 0x10)
        assert edu.interrupts() == 1
        assert edu.r32(0x24) == 0x10
        edu.map_w32(0x64, 0x10)
        assert edu.r32(0x24) == 0


# --- status --------------------------------------------------------------------------------------


def test_status_computing_is_set_by_the_store_and_blocks_new_ones(edu: Edu) -> None:
    model = edu.machine.device(EDU).model
    assert model is not None
    model.stop()  # hold the device's thread: the factorial cannot finish
    try:
        edu.w32(0x08, 5)
        assert edu.r32(0x20) & 0x01
        assert lib.vfiopy_read32(edu.bar + 0x20) & 0x01
        edu.w32(0x08, 6)  # ignored while computing
        assert edu.r32(0x08) == 5  # the operand, until done
        lib.vfiopy_write32(edu.bar + 0x08, 7)  # through the mapping: ignored too
        assert edu.r32(0x00) == 0x010000ED
        assert lib.vfiopy_read32(edu.bar + 0x08) == 5
    finally:
        model.start()
    edu.wait_clear(0x20, 0x01)
    assert edu.r32(0x08) == 120


def test_only_status_bit_7_is_writable(edu: Edu) -> None:
    edu.w32(0x20, 0xFFFFFFFF)
    assert edu.r32(0x20) == 0x80
    edu.map_w32(0x20, 0x01)
    assert edu.r32(0x20) == 0x00
    assert lib.vfiopy_read32(edu.bar + 0x20) == 0x00


# --- bus mastering ---------------------------------------------------------------------------------


def test_no_msi_and_no_dma_without_bus_master(edu: Edu) -> None:
    edu.master(False)
    edu.w32(0x60, 0x1)
    assert edu.interrupts(timeout=0.05) == 0
    assert edu.r32(0x24) == 0x1  # raised, but the message write never left
    assert edu.machine.counters["msi_dropped"] == 1
    edu.w32(0x64, 0x1)
    ffi.memmove(ffi.cast("char *", edu.va), b"lost", 4)
    edu.dma(IOVA, 0x40000, 4, 0x1)
    edu.dma(0x40000, IOVA + PAGE_SIZE, 4, 0x3)
    edu.wait_clear(0x98, 1)  # the engine still runs to completion
    assert edu.ram(1, 4) == bytes(4)
    assert edu.machine.counters["dma_no_master"] == 2
    assert edu.machine.counters["dma_transfers"] == 0
    edu.master(True)
    edu.w32(0x60, 0x2)
    assert edu.interrupts() == 1


# --- DMA -----------------------------------------------------------------------------------------


def test_dma_round_trip_keeps_28_address_bits(edu: Edu) -> None:
    ffi.memmove(ffi.cast("char *", edu.va), b"masked", 6)
    high = (0x5 << 28) | IOVA
    edu.dma(high, 0x40000, 6, 0x1)  # the device reads IOVA, not `high`
    edu.dma(0x40000, high + PAGE_SIZE, 6, 0x3 | 0x4)
    assert edu.interrupts() == 1
    assert edu.r32(0x24) == 0x100
    assert edu.ram(1, 6) == b"masked"
    clamps = [ev for ev in edu.machine.events("guest_error") if ev.cause == "clamped"]
    assert [ev.value for ev in clamps] == [(high, IOVA), (high + PAGE_SIZE, IOVA + PAGE_SIZE)]
    assert edu.machine.counters["dma_clamped"] == 2


def test_dma_buffer_is_not_in_bar0_and_undecoded_offsets_read_ones(edu: Edu) -> None:
    ffi.memmove(ffi.cast("char *", edu.va), b"secret", 6)
    edu.dma(IOVA, 0x40000, 6, 0x1)
    edu.wait_clear(0x98, 1)
    assert edu.p.pread(edu.d, 6, 0x40000) == b"\xff" * 6
    assert lib.vfiopy_read32(edu.bar + 0x40000) == 0xFFFFFFFF
    for off in (0x0C, 0x28, 0x60, 0x64, 0x84, 0xA0, 0xFFFFC):
        assert edu.r32(off) == 0xFFFFFFFF, hex(off)
    assert edu.p.pread(edu.d, 2, 0x00) == b"\xff\xff"  # below 0x80 only 4-byte reads decode
    edu.w32(0x0C, 0)  # not decoded: dropped
    assert edu.r32(0x0C) == 0xFFFFFFFF


def test_dma_takes_100_ms_of_model_time() -> None:
    scale = 0.5
    with Machine(load_topology("qemu-vmtest"), time_scale=scale) as m:
        e = _open(m)
        e.master(True)
        ffi.memmove(ffi.cast("char *", e.va), b"slow", 4)
        t0 = time.monotonic()
        e.dma(IOVA, 0x40000, 4, 0x1)
        assert e.r32(0x98) & 1
        e.w64(0x90, 1)  # ignored while the transfer runs
        assert e.r32(0x90) == 4
        e.wait_clear(0x98, 1)
        assert time.monotonic() - t0 >= 0.100 * scale
        e.dma(0x40000, IOVA + PAGE_SIZE, 4, 0x3)
        e.wait_clear(0x98, 1)
        assert e.ram(1, 4) == b"slow"
        e.p.munmap(e.bar, BAR_SIZE)
