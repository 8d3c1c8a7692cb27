"""PCI configuration space of a simulated function, as vfio-pci exposes it.

The bytes are built from the topology (header, capabilities, extended
capabilities).  User accesses go through :meth:`ConfigSpace.user_write`, which
applies vfio-pci's virtualisation (drivers/vfio/pci/vfio_pci_config.c): BARs
are virtual registers that read back the sizing mask after an all-ones write,
the command register reaches the device (PCI_COMMAND_MEMORY changes are
reported to the owner), MSI/MSI-X control and MSI address/data are virtual,
read-only fields drop writes, and the PCIe "Initiate FLR" bit triggers a
function reset.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from mock_vfio.topology import LINK_SPEEDS, Bar, FunctionSpec

PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_BAR0 = 0x10
PCI_ROM = 0x30
PCI_CAP_PTR = 0x34

CAP_PM = 0x01
CAP_MSI = 0x05
CAP_PCIE = 0x10
CAP_MSIX = 0x11
EXT_CAP_AER = 0x0001
EXT_CAP_DSN = 0x0003
EXT_CAP_SRIOV = 0x0010
# Names of the capabilities a topology may place (FunctionSpec.cap_offsets); 0x1000 | extended.
_CAP_NAMES = {
    CAP_PM: "PM",
    CAP_MSI: "MSI",
    CAP_PCIE: "EXP",
    CAP_MSIX: "MSIX",
    0x1000 | EXT_CAP_AER: "ERR",
    0x1000 | EXT_CAP_DSN: "DSN",
    0x1000 | EXT_CAP_SRIOV: "SRIOV",
}

_PCIE_TYPES = {"endpoint": 0, "legacy": 1, "rciep": 9}


class ConfigSpace:
    """Config bytes plus the positions of the capabilities vfio-pci virtualises."""

    __slots__ = (
        "bar_vals",
        "bars",
        "caps",
        "data",
        "on_command",
        "on_flr",
        "rom_size",
        "rom_val",
        "wmask",
    )

    def __init__(self, spec: FunctionSpec, host_bars: dict[int, int]) -> None:
        size = spec.cfg_size
        self.data = bytearray(size)
        self.wmask = bytearray(size)  # bits the user may change (virtual or passed through)
        self.caps: dict[int, int] = {}
        self.bars: dict[int, Bar] = {b.index: b for b in spec.bars}
        self.bar_vals: dict[int, int] = {}
        self.rom_size = spec.rom_size
        self.rom_val = 0
        self.on_command: Callable[[int, int], None] | None = None
        self.on_flr: Callable[[], None] | None = None
        d = self.data
        struct.pack_into("<HH", d, 0, spec.vendor, spec.device)
        d[8] = spec.revision
        d[9:12] = spec.class_code.to_bytes(3, "little")
        d[0x0E] = 0x80 if spec.multifunction else 0x00
        struct.pack_into("<HH", d, 0x2C, spec.subsystem_vendor, spec.subsystem_device)
        d[0x3D] = spec.interrupt_pin if spec.physfn is None else 0
        d[0x3C] = 0x0B if d[0x3D] else 0
        self._wm(PCI_COMMAND, 2, 0x0547)
        self._wm(0x0C, 2, 0xFFFF)  # cache line size, latency timer
        self._wm(0x3C, 1, 0xFF)  # interrupt line is virtual
        for b in spec.bars:
            self.bar_vals[b.index] = host_bars.get(b.index, 0)
        self.rom_val = host_bars.get(6, 0)
        # capabilities, chained from 0x40 unless the topology places them
        pos = 0x40
        chain: list[tuple[int, int]] = []
        if spec.pm:
            chain.append((CAP_PM, 8))
        if spec.msi:
            chain.append((CAP_MSI, 24))
        if spec.pcie:
            chain.append((CAP_PCIE, 60))
        if spec.msix:
            chain.append((CAP_MSIX, 12))
        prev = PCI_CAP_PTR
        for cap, length in chain:
            at = spec.cap_offsets.get(_CAP_NAMES[cap], pos)
            d[prev] = at
            d[at] = cap
            self.caps[cap] = at
            prev = at + 1
            self._init_cap(spec, cap, at)
            pos = max(pos, (at + length + 3) & ~3)
        if chain:
            d[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        if spec.pcie:
            ext: list[tuple[int, int]] = []
            if spec.aer:
                ext.append((EXT_CAP_AER, 0x48))
            if spec.dsn:
                ext.append((EXT_CAP_DSN, 12))
            if spec.sriov_total:
                ext.append((EXT_CAP_SRIOV, 0x40))
            places: list[int] = []
            epos = 0x100
            for cap, length in ext:
                at = spec.cap_offsets.get(_CAP_NAMES[0x1000 | cap], epos)
                places.append(at)
                epos = max(epos, at + length)
            for i, ((cap, _), epos) in enumerate(zip(ext, places, strict=True)):
                nxt = places[i + 1] if i + 1 < len(ext) else 0
                struct.pack_into("<I", d, epos, cap | (1 << 16) | (nxt << 20))
                self.caps[0x1000 | cap] = epos
                if cap == EXT_CAP_SRIOV:
                    struct.pack_into(
                        "<HHHHHH",
                        d,
                        epos + 0x0C,
                        spec.sriov_total,
                        spec.sriov_total,
                        0,
                        0,
                        spec.vf_offset,
                        spec.vf_stride,
                    )
                    struct.pack_into("<H", d, epos + 0x1A, spec.vf_device)

    def _wm(self, off: int, size: int, mask: int) -> None:
        self.wmask[off : off + size] = mask.to_bytes(size, "little")

    def _init_cap(self, spec: FunctionSpec, cap: int, pos: int) -> None:
        d = self.data
        if cap == CAP_PM:
            struct.pack_into("<H", d, pos + 2, 0x0003)  # PM 1.2
            struct.pack_into("<H", d, pos + 4, 0x0008 if spec.pm_no_soft_reset else 0)
            self._wm(pos + 4, 2, 0x0003)
        elif cap == CAP_MSI:
            mmc = max(spec.msi, 1).bit_length() - 1
            struct.pack_into("<H", d, pos + 2, (mmc << 1) | 0x80 | 0x100)
            self._wm(pos + 2, 2, 0x0071)  # enable, multiple message enable: virtual
            self._wm(pos + 4, 10, (1 << 80) - 4)  # address (dword aligned) and data
            self._wm(pos + 16, 4, 0xFFFFFFFF)  # mask bits
        elif cap == CAP_PCIE:
            ptype = _PCIE_TYPES.get(spec.pcie_type, 0)
            struct.pack_into("<H", d, pos + 2, 0x0002 | (ptype << 4))
            struct.pack_into("<I", d, pos + 4, (1 << 28) if spec.flr else 0)
            self._wm(pos + 8, 2, 0xFFFF)
            sp = LINK_SPEEDS.get(spec.link_speed, 1)
            struct.pack_into("<I", d, pos + 0x0C, sp | (spec.link_width << 4))
            struct.pack_into("<H", d, pos + 0x12, sp | (spec.link_width << 4))
            struct.pack_into("<I", d, pos + 0x2C, (0x7F >> (7 - sp)) << 1)  # link cap 2
        elif cap == CAP_MSIX and spec.msix:
            m = spec.msix
            struct.pack_into("<H", d, pos + 2, m.count - 1)
            struct.pack_into("<I", d, pos + 4, m.table_offset | m.table_bar)
            struct.pack_into("<I", d, pos + 8, m.pba_offset | m.pba_bar)
            self._wm(pos + 2, 2, 0xC000)  # enable and function mask: virtual

    # --- reads ---------------------------------------------------------------

    def _bar_dword(self, slot: int) -> int:
        bar = self.bars.get(slot)
        if bar is None:
            prev = self.bars.get(slot - 1)
            if prev is not None and prev.is_64:
                return (self.bar_vals[slot - 1] >> 32) & ((~(prev.size - 1) >> 32) & 0xFFFFFFFF)
            return 0
        val = self.bar_vals[bar.index]
        if bar.is_io:
            return (val & ~(bar.size - 1) & 0xFFFFFFFC) | 0x1
        flags = (0x4 if bar.is_64 else 0) | (0x8 if bar.prefetch else 0)
        return (val & ~(bar.size - 1) & 0xFFFFFFF0) | flags

    def read(self, off: int, size: int) -> bytes:
        out = bytearray(self.data[off : off + size])
        for slot in range(6):
            lo = PCI_BAR0 + 4 * slot
            if off < lo + 4 and lo < off + size:
                v = self._bar_dword(slot).to_bytes(4, "little")
                for i in range(4):
                    if off <= lo + i < off + size:
                        out[lo + i - off] = v[i]
        if off < PCI_ROM + 4 and off + size > PCI_ROM:
            rv = (self.rom_val & ~(self.rom_size - 1) & 0xFFFFF801) if self.rom_size else 0
            v = rv.to_bytes(4, "little")
            for i in range(4):
                if off <= PCI_ROM + i < off + size:
                    out[PCI_ROM + i - off] = v[i]
        return bytes(out)

    def command(self) -> int:
        return int.from_bytes(self.data[4:6], "little")

    def set_command(self, value: int) -> None:
        self.data[4:6] = (value & 0xFFFF).to_bytes(2, "little")

    # --- writes --------------------------------------------------------------

    def user_write(self, off: int, data: bytes) -> None:
        end = off + len(data)
        old_cmd = self.command()
        pcie = self.caps.get(CAP_PCIE)
        old_devctl = int.from_bytes(self.data[pcie + 8 : pcie + 10], "little") if pcie else 0
        for i, byte in enumerate(data):
            pos = off + i
            if PCI_BAR0 <= pos < PCI_BAR0 + 24 or PCI_ROM <= pos < PCI_ROM + 4:
                continue
            m = self.wmask[pos]
            self.data[pos] = (self.data[pos] & ~m) | (byte & m)
        for slot in range(6):
            lo = PCI_BAR0 + 4 * slot
            if off < lo + 4 and lo < end:
                self._write_bar(slot, self._merge(lo, off, data, self._bar_dword(slot)))
        if off < PCI_ROM + 4 and end > PCI_ROM and self.rom_size:
            self.rom_val = self._merge(PCI_ROM, off, data, self.rom_val)
        new_cmd = self.command()
        if new_cmd != old_cmd and self.on_command is not None:
            self.on_command(old_cmd, new_cmd)
        if pcie and off < pcie + 10 and pcie + 8 < end:
            devctl = int.from_bytes(self.data[pcie + 8 : pcie + 10], "little")
            if devctl & 0x8000:
                # Initiate FLR reads back as zero; vfio-pci turns it into a function reset.
                self.data[pcie + 9] &= 0x7F
                if not old_devctl & 0x8000 and self.on_flr is not None:
                    self.on_flr()

    @staticmethod
    def _merge(reg: int, off: int, data: bytes, cur: int) -> int:
        b = bytearray(cur.to_bytes(4, "little"))
        for i in range(4):
            if off <= reg + i < off + len(data):
                b[i] = data[reg + i - off]
        return int.from_bytes(b, "little")

    def _write_bar(self, slot: int, value: int) -> None:
        bar = self.bars.get(slot)
        if bar is not None:
            cur = self.bar_vals[slot]
            self.bar_vals[slot] = (cur & ~0xFFFFFFFF) | value
            return
        prev = self.bars.get(slot - 1)
        if prev is not None and prev.is_64:
            cur = self.bar_vals[slot - 1]
            self.bar_vals[slot - 1] = (cur & 0xFFFFFFFF) | (value << 32)

    # --- capability helpers ----------------------------------------------------

    def msi_count(self) -> int:
        pos = self.caps.get(CAP_MSI)
        if pos is None:
            return 0
        ctl = int.from_bytes(self.data[pos + 2 : pos + 4], "little")
        return 1 << ((ctl >> 1) & 7)

    def msix_count(self) -> int:
        pos = self.caps.get(CAP_MSIX)
        if pos is None:
            return 0
        return (int.from_bytes(self.data[pos + 2 : pos + 4], "little") & 0x7FF) + 1

    def set_power_state(self, state: int) -> None:
        pos = self.caps.get(CAP_PM)
        if pos is not None:
            self.data[pos + 4] = (self.data[pos + 4] & ~3) | (state & 3)

    def power_state(self) -> int:
        pos = self.caps.get(CAP_PM)
        return self.data[pos + 4] & 3 if pos is not None else 0
