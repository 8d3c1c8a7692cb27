"""``pread``/``pwrite`` on a vfio-pci device's regions (drivers/vfio/pci/vfio_pci_rdwr.c;
config space goes through :mod:`mock_vfio.config`)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from mock_vfio.config import PCI_COMMAND, PCI_COMMAND_MEMORY
from mock_vfio.trace import oserror
from mock_vfio.uapi import (
    CONFIG_INDEX,
    OFFSET_MASK,
    OFFSET_SHIFT,
    ROM_INDEX,
    VGA_INDEX,
)
from mock_vfio.version import MMIO_BLOCKING
from mock_vfio.vfio_device import VfioDeviceFile
from mock_vfio.vfio_pci_mmap import fault_in_bars, user_memory_enabled, zap_bars

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Device
    from mock_vfio.process import SimProcess


def setup_barmap(machine: Machine, dev: Device, index: int) -> None:
    """``vfio_pci_core_setup_barmap``: the first VFIO access of a BAR claims its region;
    under IO_STRICT_DEVMEM the claim revokes every sysfs mapping of it (``revoke_iomem``)."""
    if index in dev.claimed_bars:
        return
    dev.claimed_bars.add(index)
    live = sum(f.maps for f in dev.wc_files if f.index == index)
    if machine.io_strict_devmem and live:
        machine.counters.add("wc_revoked", live)


class VfioPciRdwr(VfioDeviceFile):
    def pread(self, proc: SimProcess, size: int, offset: int) -> bytes:
        dev = self._check_access()
        index, pos = offset >> OFFSET_SHIFT, offset & OFFSET_MASK
        if index == CONFIG_INDEX:
            cfg = dev.config
            if pos >= dev.spec.cfg_size:
                raise oserror(errno.EINVAL, "config offset")
            return cfg.read(pos, min(size, dev.spec.cfg_size - pos))
        if index == ROM_INDEX:
            rs = dev.spec.rom_size
            if not rs or pos >= rs:
                raise oserror(errno.EINVAL, "ROM")
            rom = bytearray(min(size, rs - pos))
            sig = b"\x55\xaa"
            for i in range(len(rom)):
                if pos + i < 2:
                    rom[i] = sig[pos + i]
            return bytes(rom)
        with dev.memory_lock.read():
            mem, n = self._bar_range(index, pos, size)
            if mem is None:
                return b"\xff" * n  # decoding off: nothing answers, the read is all ones
            if dev.model is not None:
                hooked = dev.model.mmio_read(index, pos, n)
                if hooked is not None:
                    return hooked
            data = bytearray(mem[pos : pos + n])
        self._mask_msix(index, pos, data, None)
        return bytes(data)

    def pwrite(self, proc: SimProcess, data: bytes, offset: int) -> int:
        dev = self._check_access()
        index, pos = offset >> OFFSET_SHIFT, offset & OFFSET_MASK
        if index == CONFIG_INDEX:
            if pos >= dev.spec.cfg_size:
                raise oserror(errno.EINVAL, "config offset")
            n = min(len(data), dev.spec.cfg_size - pos)
            self._config_write(pos, data[:n])
            return n
        if index == ROM_INDEX:
            raise oserror(errno.EINVAL, "ROM is read-only")
        with dev.memory_lock.read():
            mem, n = self._bar_range(index, pos, len(data))
            if mem is None:
                return n  # decoding off: the write goes nowhere
            chunk = bytearray(data[:n])
            if self._mask_msix(index, pos, chunk, mem):
                return n
            if dev.model is not None and dev.model.mmio_write(index, pos, bytes(chunk)):
                return n
            mem[pos : pos + n] = bytes(chunk)
        return n

    def _config_write(self, pos: int, data: bytes) -> None:
        """Config space in the kernel's pieces: the command register under memory_lock held
        for writing, zapping first when MEMORY ends up clear (vfio_basic_config_write)."""
        dev, end = self.dev, pos + len(data)
        if not pos <= PCI_COMMAND < end:
            dev.config.user_write(pos, data)
            return
        head, tail = PCI_COMMAND - pos, min(PCI_COMMAND + 2, end) - pos
        if head:
            dev.config.user_write(pos, data[:head])
        with dev.memory_lock.write():
            if not data[head] & PCI_COMMAND_MEMORY:
                zap_bars(dev, "memory")
            dev.config.user_write(PCI_COMMAND, data[head:tail])
            fault_in_bars(dev)
        if tail < len(data):
            dev.config.user_write(pos + tail, data[tail:])

    def _bar_range(self, index: int, pos: int, size: int) -> tuple[Any, int]:
        """The BAR's memory and the length to access; no memory while decoding is off before
        5.8 (the access reaches a device that does not answer)."""
        dev = self.dev
        if index == VGA_INDEX and dev.spec.vga:
            raise oserror(errno.EINVAL, "VGA access is not modelled")
        bar = dev.bar(index) if 0 <= index < ROM_INDEX else None
        if bar is None:
            raise oserror(errno.EINVAL, f"region {index}")
        if pos >= bar.size:
            raise oserror(errno.EINVAL, "offset past the BAR")
        n = min(size, bar.size - pos)
        if dev.low_power:
            raise oserror(errno.EIO, "device is in low power")
        if not bar.is_io and not user_memory_enabled(dev):
            if self.machine.kernel_version < MMIO_BLOCKING:
                return None, n
            # __vfio_pci_memory_enabled(): BAR access with decoding off fails
            raise oserror(errno.EIO, "PCI_COMMAND_MEMORY is clear")
        setup_barmap(self.machine, dev, index)
        return dev.bar_memory(index), n

    def _mask_msix(self, index: int, pos: int, data: bytearray, mem: Any) -> bool:
        """vfio_pci_bar_rw skips the MSI-X table: reads fill 0xff, writes drop."""
        m = self.dev.spec.msix
        if m is None or m.table_bar != index:
            return False
        lo, hi = m.table_offset, m.table_offset + m.count * 16
        touched = False
        for i in range(len(data)):
            if lo <= pos + i < hi:
                touched = True
                if mem is None:
                    data[i] = 0xFF
                else:
                    data[i] = mem[pos + i]
        if mem is not None and touched:
            mem[pos : pos + len(data)] = bytes(data)
            return True
        return False
