"""QEMU's e1000e (an Intel 82574L; hw/net/e1000e_core.c) as a device model: the registers a
driver's probe reads (STATUS, the receive address, the EEPROM through EERD), its interrupt
causes and their MSI-X routing (ICR, ICS, IMS, IMC, IVAR), and the I/O-port window onto them."""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

from mock_vfio.devices import DeviceModel, accesses

if TYPE_CHECKING:
    from mock_vfio.pci import Device

_PCI_COMMAND_MASTER = 0x4
_MSI_INDEX, _MSIX_INDEX = 1, 2  # VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX

# The e1000e (8086:10d3, QEMU hw/net/e1000e.c and e1000e_core.c): its I/O BAR is an indirect
# window onto the registers of BAR0.  A 4-byte write to IOADDR (I/O offset 0) picks a register
# offset; a 4-byte access to IODATA (offset 4) reads or writes that register.
E1000E_IOADDR = 0x00
E1000E_IODATA = 0x04
E1000E_STATUS = 0x08
E1000E_EERD = 0x14
E1000E_ICR = 0xC0
E1000E_ICS = 0xC8
E1000E_IMS = 0xD0
E1000E_IMC = 0xD8
E1000E_IVAR = 0xE4
E1000E_RAL0, E1000E_RAH0 = 0x5400, 0x5404
E1000E_MMIO_BAR, E1000E_IO_BAR = 0, 2
# STATUS after reset as QEMU's e1000e shows it (read in the guest): full duplex, link up,
# 1000 Mb/s, auto-speed 1000, GIO master enabled
E1000E_STATUS_VALUE = 0x00080283
E1000E_RAH_AV = 1 << 31  # "address valid", set by QEMU's reset (e1000x_reset_mac_addr)
# EERD on the 82574: start bit 0, done bit 1, word address from bit 2, data from bit 16
E1000E_EERD_START, E1000E_EERD_DONE = 0x1, 0x2
E1000E_EERD_ADDR_SHIFT, E1000E_EERD_DATA_SHIFT = 2, 16
E1000E_EEPROM_WORDS = 64
E1000E_EEPROM_CHECKSUM_WORD, E1000E_EEPROM_SUM = 0x3F, 0xBABA
E1000E_ICR_OTHER = 1 << 24
E1000E_ICR_ASSERTED = 1 << 31
# Causes that also set OTHER under MSI-X (QEMU's E1000_ICR_OTHER_CAUSES: LSC, RXO, MDAC,
# SRPD, ACK, MNG)
E1000E_OTHER_CAUSES = 0x4 | 0x40 | 0x200 | 0x10000 | 0x20000 | 0x40000
# The MSI-X causes (RXQ0, RXQ1, TXQ0, TXQ1, OTHER) and the shift of each one's IVAR field:
# vector in bits 2:0, valid in bit 3.
_E1000E_IVAR_FIELDS = ((1 << 20, 0), (1 << 21, 4), (1 << 22, 8), (1 << 23, 12), (1 << 24, 16))
_E1000E_IVAR_VALID, _E1000E_IVAR_VECTOR = 0x8, 0x7


def e1000e_mac(index: int) -> bytes:
    """The MAC QEMU gives its ``index``-th NIC without mac= (qemu_macaddr_default_if_unset)."""
    return bytes((0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index))


class E1000e(DeviceModel):
    """The registers an e1000e driver needs first, and the IOADDR/IODATA window onto them.

    BAR0 is plain memory with STATUS and RAL0/RAH0 (the MAC, address-valid set) filled in at
    reset, as QEMU's e1000e_core_reset does (the MAC is QEMU's default for the NIC's place in
    the topology: 52:54:00:12:34:56 for the first); the EEPROM holds the MAC in words 0-2 and the
    82574's checksum (words 0x00-0x3F sum to 0xBABA), read through EERD.  Interrupts follow
    QEMU's e1000e_update_interrupt_state: ICS sets causes in ICR, IMS/IMC set and clear the
    mask, a write to ICR clears the causes written (OTHER takes the other causes with it), and
    a cause both set and unmasked sends one message until it is cleared: under MSI-X on the
    vector IVAR routes it to (the other causes set OTHER, routed by IVAR's OTHER field), under
    MSI on vector 0; either only with bus mastering on.  INTx is a level: asserted while a
    cause is set and unmasked.

    Stores through the mapping are seen as Edu's are: by comparing each register with what
    the model last showed there, on the device thread or at the next access through the fd.
    So a store of the value a register shows is invisible: ICR shows INT_ASSERTED (bit 31)
    while a cause is set, and a driver clears the causes it handled by writing them without
    that bit, as QEMU allows; and a store landing while the model rewrites that register is
    lost.  Reads do not clear ICR here (QEMU clears it on a read without
    MSI-X, and reads through a mapping are invisible).  The window is reached with
    pread/pwrite only (an I/O BAR has no mmap), so every access through it is exact.
    """

    def __init__(self, dev: Device) -> None:
        super().__init__(dev)
        # Numbered in creation order, as QEMU numbers its NICs in command-line order.
        mac = e1000e_mac(sum(isinstance(d.model, E1000e) for d in dev.machine.devices.values()))
        words = [0] * E1000E_EEPROM_WORDS
        words[0:3] = [mac[i] | mac[i + 1] << 8 for i in (0, 2, 4)]
        words[11] = words[13] = dev.spec.device  # as QEMU's e1000x_core_prepare_eeprom
        words[E1000E_EEPROM_CHECKSUM_WORD] = (E1000E_EEPROM_SUM - sum(words)) & 0xFFFF
        self.mac = mac
        self.eeprom = tuple(words)
        self._clear()

    def _clear(self) -> None:
        self.ioaddr = 0
        self.icr = self.ims = 0
        self.eerd = E1000E_EERD_DONE
        self._pending = 0  # causes already signalled (QEMU's msi_causes_pending)
        self._due = 0  # causes to signal once the lock is dropped
        self._level = False  # the INTx level the model last drove
        self._shown: dict[int, int] = {}

    def _mem(self) -> mmap.mmap:
        return self.dev.bar_memory(E1000E_MMIO_BAR)

    def init_bar(self, index: int, mem: mmap.mmap) -> None:
        if index == E1000E_MMIO_BAR:
            ral = int.from_bytes(self.mac[:4], "little")
            rah = int.from_bytes(self.mac[4:], "little") | E1000E_RAH_AV
            for off, value in ((E1000E_STATUS, E1000E_STATUS_VALUE), (E1000E_RAL0, ral)):
                mem[off : off + 4] = value.to_bytes(4, "little")
            mem[E1000E_RAH0 : E1000E_RAH0 + 4] = rah.to_bytes(4, "little")
            self._render(mem)

    def reset(self) -> None:
        with self.lock:
            self._clear()
            self.init_bar(E1000E_MMIO_BAR, self._mem())

    # --- the registers, as QEMU's e1000e_core_write/read see one 4-byte access ----------

    def _view(self) -> dict[int, int]:
        return {
            E1000E_EERD: self.eerd,
            E1000E_ICR: self.icr,
            E1000E_ICS: self.icr,  # QEMU reads ICS as ICR (without the clear)
            E1000E_IMS: self.ims,
            E1000E_IMC: 0,  # write-only
        }

    def _store(self, off: int, value: int) -> None:
        if off == E1000E_EERD:
            word = value >> E1000E_EERD_ADDR_SHIFT & 0x3FFF
            done = value & E1000E_EERD_START and word < E1000E_EEPROM_WORDS
            data = self.eeprom[word] if done else 0
            flags = E1000E_EERD_DONE if done else 0
            self.eerd = flags | word << E1000E_EERD_ADDR_SHIFT | data << E1000E_EERD_DATA_SHIFT
            return
        if off == E1000E_ICS:
            self.icr |= value
        elif off == E1000E_IMS:
            self.ims |= value
        elif off == E1000E_IMC:
            self.ims &= ~value
        elif off == E1000E_ICR:
            self.icr &= ~value
            if value & E1000E_ICR_OTHER:
                self.icr &= ~E1000E_OTHER_CAUSES
        self._update()

    def _update(self) -> None:
        """QEMU's e1000e_update_interrupt_state: which causes get a message now."""
        if self.dev.irq_type == _MSIX_INDEX and self.icr & E1000E_OTHER_CAUSES:
            self.icr |= E1000E_ICR_OTHER
        self.icr &= ~E1000E_ICR_ASSERTED
        if self.icr:
            self.icr |= E1000E_ICR_ASSERTED
        causes = self.icr & self.ims & ~E1000E_ICR_ASSERTED
        self._pending &= causes
        self._due |= causes & ~self._pending
        self._pending |= causes

    def _render(self, mem: mmap.mmap) -> None:
        """Put the registers into the mapping, touching only what differs."""
        view = self._view()
        for off, value in view.items():
            data = value.to_bytes(4, "little")
            if mem[off : off + 4] != data:
                mem[off : off + 4] = data
        self._shown = view

    def _take_stores(self, mem: mmap.mmap) -> None:
        for off, shown in self._shown.items():
            value = int.from_bytes(mem[off : off + 4], "little")
            if value != shown:
                self._store(off, value)

    def service(self) -> None:
        if self.dev.removed:
            return
        with self.lock:
            mem = self._mem()
            self._take_stores(mem)
            self._render(mem)
        self._deliver()

    def _deliver(self) -> None:
        kind = self.dev.irq_type
        with self.lock:
            due, self._due = self._due, 0
            level = bool(self.icr & self.ims & ~E1000E_ICR_ASSERTED)
            moved = level != self._level
            self._level = level
            ivar = int.from_bytes(self._mem()[E1000E_IVAR : E1000E_IVAR + 4], "little")
        if kind not in (_MSI_INDEX, _MSIX_INDEX):
            # QEMU's e1000e_raise/lower_legacy_irq: the line follows the level; driven only
            # when it moves, so a line the model has not raised stays as others left it.
            if moved:
                self.dev.set_intx(level)
            return
        if not due:
            return
        if not self.dev.config.command() & _PCI_COMMAND_MASTER:
            self.dev.machine.counters.add("msi_dropped")  # a message is a memory write
            return
        if kind == _MSI_INDEX:
            self.dev.raise_irq(0)
            return
        for cause, shift in _E1000E_IVAR_FIELDS:
            entry = ivar >> shift & 0xF
            if due & cause and entry & _E1000E_IVAR_VALID:
                self.dev.raise_irq(entry & _E1000E_IVAR_VECTOR)

    # --- the device fd: BAR0 and the I/O window --------------------------------------------

    def _write_register(self, off: int, data: bytes) -> None:
        """Stores through the fd, exact: each 4-byte access to a register the model keeps."""
        mem = self._mem()
        with self.lock:
            self._take_stores(mem)  # earlier stores through a mapping come first
            for o, w in accesses(off, len(data)):
                value = data[o - off : o - off + w]
                if w == 4 and o in self._shown:
                    self._store(o, int.from_bytes(value, "little"))
                elif o >= 0 and o + w <= len(mem):
                    mem[o : o + w] = value
            self._render(mem)
        self._deliver()

    def _window_register(self) -> int | None:
        off = self.ioaddr
        return off if off % 4 == 0 and off + 4 <= len(self._mem()) else None

    def mmio_read(self, index: int, off: int, size: int) -> bytes | None:
        if index != E1000E_IO_BAR:
            return super().mmio_read(index, off, size)
        self.service()
        out = bytearray(size)
        with self.lock:
            for o, w in accesses(off, size):
                value = 0
                if w == 4 and o == E1000E_IOADDR:
                    value = self.ioaddr
                elif w == 4 and o == E1000E_IODATA and (reg := self._window_register()) is not None:
                    value = int.from_bytes(self._mem()[reg : reg + 4], "little")
                out[o - off : o - off + w] = value.to_bytes(w, "little")
        return bytes(out)

    def mmio_write(self, index: int, off: int, data: bytes) -> bool:
        if index == E1000E_MMIO_BAR:
            self._write_register(off, data)
            return True
        if index != E1000E_IO_BAR:
            return super().mmio_write(index, off, data)
        for o, w in accesses(off, len(data)):
            value = data[o - off : o - off + w]
            if w == 4 and o == E1000E_IOADDR:
                with self.lock:
                    self.ioaddr = int.from_bytes(value, "little")
            elif w == 4 and o == E1000E_IODATA and (reg := self._window_register()) is not None:
                self._write_register(reg, value)
        return True
