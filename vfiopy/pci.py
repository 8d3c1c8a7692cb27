"""PCI configuration space: fields, and the capability lists.

Values are little-endian (PCI spec).  Through VFIO some fields are
virtualised by vfio-pci (BARs, MSI/MSI-X, parts of the command register), so
what reads back here is the kernel's view, not always the hardware's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

CONFIG_SPACE_SIZE = 0x100
CONFIG_SPACE_EXP_SIZE = 0x1000

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

STATUS_CAP_LIST = 0x10
# A standard capability lives in the device-specific part of the 256 bytes;
# a pointer below 0x40 is corrupt (it would point into the header).
_STD_CAP_MIN = 0x40
# Worst case, every dword of config space is a capability: more steps is a loop.
_MAX_STD_CAPS = (CONFIG_SPACE_SIZE - _STD_CAP_MIN) // 4
_MAX_EXT_CAPS = (CONFIG_SPACE_EXP_SIZE - CONFIG_SPACE_SIZE) // 4


class Command(enum.IntFlag):
    IO = 0x1
    MEMORY = 0x2
    MASTER = 0x4
    SERR = 0x100
    INTX_DISABLE = 0x400


class CapId(enum.IntEnum):
    """Standard capability ids (PCI Code and ID Assignment spec)."""

    PM = 0x01
    AGP = 0x02
    VPD = 0x03
    SLOTID = 0x04
    MSI = 0x05
    CHSWP = 0x06
    PCIX = 0x07
    HT = 0x08
    VNDR = 0x09
    DBG = 0x0A
    CCRC = 0x0B
    SHPC = 0x0C
    SSVID = 0x0D
    AGP3 = 0x0E
    SECDEV = 0x0F
    EXP = 0x10
    MSIX = 0x11
    SATA = 0x12
    AF = 0x13
    EA = 0x14


class ExtCapId(enum.IntEnum):
    """PCIe extended capability ids."""

    ERR = 0x01  # AER
    VC = 0x02
    DSN = 0x03
    PWR = 0x04
    RCLD = 0x05
    RCILC = 0x06
    RCEC = 0x07
    MFVC = 0x08
    VC9 = 0x09
    RCRB = 0x0A
    VNDR = 0x0B
    CAC = 0x0C
    ACS = 0x0D
    ARI = 0x0E
    ATS = 0x0F
    SRIOV = 0x10
    MRIOV = 0x11
    MCAST = 0x12
    PRI = 0x13
    AMD_XXX = 0x14
    REBAR = 0x15
    DPA = 0x16
    TPH = 0x17
    LTR = 0x18
    SECPCI = 0x19
    PMUX = 0x1A
    PASID = 0x1B
    DPC = 0x1D
    L1SS = 0x1E
    PTM = 0x1F
    DVSEC = 0x23
    DLF = 0x25
    PL_16GT = 0x26
    DOE = 0x2E


_STD_NAMES: dict[int, str] = {
    CapId.PM: "Power Management",
    CapId.MSI: "MSI",
    CapId.VPD: "VPD",
    CapId.PCIX: "PCI-X",
    CapId.VNDR: "Vendor Specific",
    CapId.SSVID: "Subsystem Vendor ID",
    CapId.EXP: "PCI Express",
    CapId.MSIX: "MSI-X",
    CapId.SATA: "SATA",
    CapId.AF: "Advanced Features",
    CapId.EA: "Enhanced Allocation",
}
_EXT_NAMES: dict[int, str] = {
    ExtCapId.ERR: "Advanced Error Reporting",
    ExtCapId.VC: "Virtual Channel",
    ExtCapId.DSN: "Device Serial Number",
    ExtCapId.PWR: "Power Budgeting",
    ExtCapId.VNDR: "Vendor Specific",
    ExtCapId.ACS: "Access Control Services",
    ExtCapId.ARI: "Alternative Routing-ID",
    ExtCapId.ATS: "Address Translation Services",
    ExtCapId.SRIOV: "SR-IOV",
    ExtCapId.PRI: "Page Request",
    ExtCapId.REBAR: "Resizable BAR",
    ExtCapId.TPH: "TPH Requester",
    ExtCapId.LTR: "Latency Tolerance Reporting",
    ExtCapId.SECPCI: "Secondary PCIe",
    ExtCapId.PASID: "PASID",
    ExtCapId.DPC: "Downstream Port Containment",
    ExtCapId.L1SS: "L1 PM Substates",
    ExtCapId.PTM: "Precision Time Measurement",
    ExtCapId.DVSEC: "Designated Vendor-Specific",
    ExtCapId.DLF: "Data Link Feature",
    ExtCapId.PL_16GT: "Physical Layer 16.0 GT/s",
    ExtCapId.DOE: "Data Object Exchange",
}


@dataclass(frozen=True)
class Capability:
    """A capability found in config space: standard, or PCIe extended (offset >= 0x100)."""

    id: int
    offset: int
    extended: bool = False
    version: int = 0

    @property
    def name(self) -> str:
        table = _EXT_NAMES if self.extended else _STD_NAMES
        kind = "ext " if self.extended else ""
        return table.get(self.id, f"{kind}cap {self.id:#04x}")


def _le(data: bytes, off: int, n: int) -> int:
    return int.from_bytes(data[off : off + n], "little")


def walk_capabilities(data: bytes) -> list[Capability]:
    """Every capability in a config-space image, standard list first.

    A corrupt list (pointer into the header or off the end, or a loop) ends
    the walk at the last good entry instead of failing or spinning.
    """
    caps: list[Capability] = []
    if len(data) >= _STD_CAP_MIN and _le(data, STATUS, 2) & STATUS_CAP_LIST:
        seen: set[int] = set()
        ptr = data[CAPABILITY_LIST] & 0xFC  # the low two bits are reserved
        while _STD_CAP_MIN <= ptr <= len(data) - 2 and ptr not in seen:
            if len(seen) >= _MAX_STD_CAPS:
                break
            seen.add(ptr)
            cap_id = data[ptr]
            if cap_id == 0xFF:  # all-ones: the device stopped answering
                break
            caps.append(Capability(cap_id, ptr))
            ptr = data[ptr + 1] & 0xFC
    if len(data) > CONFIG_SPACE_SIZE:
        seen = set()
        ptr = CONFIG_SPACE_SIZE
        while CONFIG_SPACE_SIZE <= ptr <= len(data) - 4 and ptr not in seen:
            if len(seen) >= _MAX_EXT_CAPS:
                break
            seen.add(ptr)
            header = _le(data, ptr, 4)
            # 0 at 0x100 means no extended capabilities; all-ones, a dead device.
            if header in (0, 0xFFFFFFFF):
                break
            cap_id = header & 0xFFFF
            if cap_id:  # id 0 is a placeholder the kernel leaves for hidden caps
                caps.append(Capability(cap_id, ptr, True, (header >> 16) & 0xF))
            ptr = (header >> 20) & 0xFFC
    return caps


class ConfigIO(Protocol):
    """What :class:`ConfigSpace` needs: a :class:`~vfiopy.region.Region` provides it."""

    @property
    def size(self) -> int: ...
    def read(self, off: int, n: int) -> bytes: ...
    def write(self, off: int, data: bytes) -> None: ...


class ConfigSpace:
    """Config space of a device through its VFIO config region (pread/pwrite)."""

    def __init__(self, region: ConfigIO) -> None:
        self.region = region

    def read8(self, off: int) -> int:
        return self.region.read(off, 1)[0]

    def read16(self, off: int) -> int:
        return int.from_bytes(self.region.read(off, 2), "little")

    def read32(self, off: int) -> int:
        return int.from_bytes(self.region.read(off, 4), "little")

    def write8(self, off: int, value: int) -> None:
        self.region.write(off, value.to_bytes(1, "little"))

    def write16(self, off: int, value: int) -> None:
        self.region.write(off, value.to_bytes(2, "little"))

    def write32(self, off: int, value: int) -> None:
        self.region.write(off, value.to_bytes(4, "little"))

    @property
    def vendor_id(self) -> int:
        return self.read16(VENDOR_ID)

    @property
    def device_id(self) -> int:
        return self.read16(DEVICE_ID)

    @property
    def command(self) -> Command:
        return Command(self.read16(COMMAND))

    @command.setter
    def command(self, value: int) -> None:
        self.write16(COMMAND, int(value))

    def enable_bus_master(self) -> bool:
        """Set PCI_COMMAND_MASTER in one read-modify-write that keeps every other bit
        (MEMORY above all: each MEMORY flip remaps the BARs under a hypervisor, 1.8 s for a
        128 GB BAR under Hyper-V); no write when it is set already.  True when it wrote."""
        cmd = self.read16(COMMAND)
        if cmd & Command.MASTER:
            return False
        self.write16(COMMAND, cmd | Command.MASTER)
        return True

    @property
    def status(self) -> int:
        return self.read16(STATUS)

    @property
    def revision_id(self) -> int:
        return self.read8(REVISION_ID)

    @property
    def class_code(self) -> int:
        """The 24-bit class code (base class, subclass, programming interface)."""
        return self.read32(REVISION_ID) >> 8

    @property
    def header_type(self) -> int:
        return self.read8(HEADER_TYPE) & 0x7F

    @property
    def multifunction(self) -> bool:
        return bool(self.read8(HEADER_TYPE) & 0x80)

    @property
    def subsystem_vendor_id(self) -> int:
        return self.read16(SUBSYSTEM_VENDOR_ID)

    @property
    def subsystem_id(self) -> int:
        return self.read16(SUBSYSTEM_ID)

    @property
    def interrupt_pin(self) -> int:
        return self.read8(INTERRUPT_PIN)

    def snapshot(self) -> bytes:
        """The whole config space (256 bytes, or 4 KiB for PCIe) in one read."""
        size = min(self.region.size, CONFIG_SPACE_EXP_SIZE)
        return self.region.read(0, size)

    def capabilities(self) -> list[Capability]:
        return walk_capabilities(self.snapshot())

    def find_capability(self, cap_id: int, extended: bool = False) -> Capability | None:
        """The first capability with ``cap_id`` (PCIe extended when ``extended``)."""
        for cap in self.capabilities():
            if cap.id == cap_id and cap.extended == extended:
                return cap
        return None


__all__ = [
    "CapId",
    "Capability",
    "Command",
    "ConfigIO",
    "ConfigSpace",
    "ExtCapId",
    "walk_capabilities",
]
