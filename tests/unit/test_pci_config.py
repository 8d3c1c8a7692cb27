"""Config-space fields and the capability walk on byte fixtures."""

from __future__ import annotations

import struct

from vfiopy.pci import Capability, CapId, Command, ConfigSpace, ExtCapId, walk_capabilities


def _config(size: int = 0x1000) -> bytearray:
    c = bytearray(size)
    struct.pack_into("<HH", c, 0, 0x8086, 0x10D3)
    struct.pack_into("<H", c, 0x04, 0x0406)  # MEMORY | MASTER | INTX_DISABLE
    struct.pack_into("<H", c, 0x06, 0x0010)  # capability list present
    c[0x08:0x0C] = bytes([0x03, 0x00, 0x00, 0x02])  # rev 3, class 020000
    c[0x34] = 0x40
    c[0x40:0x42] = bytes([CapId.PM, 0x50])
    c[0x50:0x52] = bytes([CapId.MSI, 0x70])
    c[0x70:0x72] = bytes([CapId.EXP, 0xA0])
    c[0xA0:0xA2] = bytes([CapId.MSIX, 0x00])
    if size > 0x100:
        struct.pack_into("<I", c, 0x100, 0x140 << 20 | 1 << 16 | ExtCapId.ERR)
        struct.pack_into("<I", c, 0x140, 0x150 << 20 | 1 << 16 | ExtCapId.DSN)
        struct.pack_into("<I", c, 0x150, 0x000 << 20 | 1 << 16 | ExtCapId.SRIOV)
    return c


class Bytes:
    """A config region backed by a bytearray (what ConfigSpace needs of a Region)."""

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.size = len(data)

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.data[off : off + n])

    def write(self, off: int, data: bytes) -> None:
        self.data[off : off + len(data)] = data


def test_walk_standard_and_extended() -> None:
    caps = walk_capabilities(bytes(_config()))
    assert [(c.id, c.offset, c.extended) for c in caps] == [
        (CapId.PM, 0x40, False),
        (CapId.MSI, 0x50, False),
        (CapId.EXP, 0x70, False),
        (CapId.MSIX, 0xA0, False),
        (ExtCapId.ERR, 0x100, True),
        (ExtCapId.DSN, 0x140, True),
        (ExtCapId.SRIOV, 0x150, True),
    ]
    assert caps[0].name == "Power Management"
    assert caps[3].name == "MSI-X"
    assert caps[4].name == "Advanced Error Reporting" and caps[4].version == 1
    assert Capability(0x42, 0x60).name == "cap 0x42"


def test_conventional_config_has_no_extended_walk() -> None:
    caps = walk_capabilities(bytes(_config(0x100)))
    assert len(caps) == 4 and not any(c.extended for c in caps)


def test_no_capability_list_bit() -> None:
    c = _config()
    struct.pack_into("<H", c, 0x06, 0)
    assert all(cap.extended for cap in walk_capabilities(bytes(c)))


def test_loops_and_bad_pointers_end_the_walk() -> None:
    c = _config()
    c[0xA1] = 0x50  # MSI-X points back to MSI: a loop
    struct.pack_into("<I", c, 0x150, 0x100 << 20 | ExtCapId.SRIOV)  # back to AER
    caps = walk_capabilities(bytes(c))
    assert [cap.offset for cap in caps] == [0x40, 0x50, 0x70, 0xA0, 0x100, 0x140, 0x150]

    c = _config()
    c[0x51] = 0x10  # into the header
    assert [cap.offset for cap in walk_capabilities(bytes(c)) if not cap.extended] == [0x40, 0x50]

    c = _config()
    c[0x34] = 0xFF  # off the end, low bits reserved: 0xFC, a byte short of an entry
    c[0xFC] = 0xFF  # all-ones: a dead device
    assert [cap for cap in walk_capabilities(bytes(c)) if not cap.extended] == []

    c = _config()
    struct.pack_into("<I", c, 0x100, 0xFFFFFFFF)
    assert not any(cap.extended for cap in walk_capabilities(bytes(c)))


def test_every_byte_pointing_to_itself_terminates() -> None:
    c = bytearray([0x40] * 0x1000)
    c[0x06] = 0x10
    struct.pack_into("<I", c, 0x100, 0x100 << 20 | 1)
    caps = walk_capabilities(bytes(c))
    assert len(caps) == 2


def test_config_space_fields() -> None:
    c = _config()
    cfg = ConfigSpace(Bytes(c))
    assert cfg.vendor_id == 0x8086 and cfg.device_id == 0x10D3
    assert cfg.command == Command.MEMORY | Command.MASTER | Command.INTX_DISABLE
    assert cfg.class_code == 0x020000 and cfg.revision_id == 3
    assert cfg.status & 0x10
    cfg.command = Command.MEMORY
    assert c[4:6] == b"\x02\x00"
    cfg.write32(0x10, 0xFEDC_BA98)
    assert cfg.read32(0x10) == 0xFEDC_BA98 and cfg.read8(0x10) == 0x98
    found = cfg.find_capability(CapId.MSIX)
    assert found is not None and found.offset == 0xA0
    found = cfg.find_capability(ExtCapId.SRIOV, extended=True)
    assert found is not None and found.offset == 0x150
    assert cfg.find_capability(CapId.VPD) is None
