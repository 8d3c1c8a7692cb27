"""Config space and the capability walk on random images: never an exception, never a loop,
every capability where a list can put one; a list built at random is read back exactly."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from vfiopy.pci import Capability, Command, ConfigSpace, walk_capabilities

CONFIG_SIZES = st.sampled_from([0, 1, 0x3F, 0x40, 0x41, 0xFF, 0x100, 0x101, 0x103, 0x104, 0x1000])


@st.composite
def config_images(draw: st.DrawFn) -> bytes:
    """Any bytes of a config space's sizes, with the capability list bit often set."""
    size = draw(st.one_of(CONFIG_SIZES, st.integers(0, 0x1100)))
    data = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if size > 0x34 and draw(st.booleans()):
        data[0x06] |= 0x10
        data[0x34] = draw(st.integers(0, 0xFF))
    return bytes(data)


def check_walk(data: bytes, caps: list[Capability]) -> None:
    std = [c for c in caps if not c.extended]
    ext = [c for c in caps if c.extended]
    assert caps == std + ext  # the standard list first
    for c in std:
        assert 0x40 <= c.offset <= len(data) - 2 and c.offset % 4 == 0
        assert c.id == data[c.offset] != 0xFF
    for c in ext:
        assert 0x100 <= c.offset <= len(data) - 4 and c.offset % 4 == 0
        header = int.from_bytes(data[c.offset : c.offset + 4], "little")
        assert c.id == header & 0xFFFF != 0 and c.version == (header >> 16) & 0xF
    # Each offset once: a loop ends the walk.
    assert len({c.offset for c in std}) == len(std) and len({c.offset for c in ext}) == len(ext)
    assert all(isinstance(c.name, str) and c.name for c in caps)


@given(config_images())
def test_any_image_walks_without_error_or_loop(data: bytes) -> None:
    check_walk(data, walk_capabilities(data))


@st.composite
def capability_lists(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int, bool, int]]]:
    """A PCIe config space with a random well-formed standard and extended list."""
    data = bytearray([draw(st.sampled_from([0x00, 0xFF, 0x5A]))] * 0x1000)
    for off, value in draw(st.dictionaries(st.integers(0, 0xFFF), st.integers(0, 0xFF))).items():
        data[off] = value  # noise between the capabilities
    std_slots = draw(st.lists(st.integers(0x40 // 4, 0xFC // 4), unique=True, max_size=12))
    ext_slots = draw(st.lists(st.integers(0x104 // 4, 0xFFC // 4), unique=True, max_size=12))
    expected: list[tuple[int, int, bool, int]] = []
    status = int.from_bytes(data[0x06:0x08], "little")
    if std_slots:
        status |= 0x10
        offsets = [s * 4 for s in std_slots]
        data[0x34] = offsets[0] | draw(st.integers(0, 3))  # reserved low bits are ignored
        for i, off in enumerate(offsets):
            cap_id = draw(st.integers(0, 0xFE))
            nxt = offsets[i + 1] if i + 1 < len(offsets) else 0
            data[off] = cap_id
            data[off + 1] = nxt | draw(st.integers(0, 3))
            expected.append((cap_id, off, False, 0))
    else:
        status &= ~0x10
    data[0x06:0x08] = status.to_bytes(2, "little")
    # The extended list starts at 0x100; an empty one is a zero header there.
    offsets = [0x100] + [s * 4 for s in ext_slots] if ext_slots else []
    if not offsets:
        data[0x100:0x104] = bytes(4)
    for i, off in enumerate(offsets):
        cap_id = draw(st.integers(1, 0xFFFE))  # 0: a hidden cap; 0xFFFF: a dead device
        version = draw(st.integers(0, 0xF))
        nxt = offsets[i + 1] if i + 1 < len(offsets) else 0
        struct.pack_into("<I", data, off, nxt << 20 | version << 16 | cap_id)
        expected.append((cap_id, off, True, version))
    return bytes(data), expected


@given(capability_lists())
def test_a_well_formed_list_is_read_back_in_order(
    image: tuple[bytes, list[tuple[int, int, bool, int]]],
) -> None:
    data, expected = image
    caps = walk_capabilities(data)
    assert [(c.id, c.offset, c.extended, c.version) for c in caps] == expected
    check_walk(data, caps)


class Bytes:
    """A config region backed by a bytearray."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.size = len(data)

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.data[off : off + n])

    def write(self, off: int, data: bytes) -> None:
        self.data[off : off + len(data)] = data


@given(st.binary(min_size=0x100, max_size=0x100), st.integers(0, 0xFFFF))
def test_header_fields_are_the_bytes_little_endian(data: bytes, command: int) -> None:
    cfg = ConfigSpace(Bytes(data))
    vendor, device, cmd, status = struct.unpack_from("<HHHH", data, 0)
    assert (cfg.vendor_id, cfg.device_id, int(cfg.command), cfg.status) == (
        vendor,
        device,
        cmd,
        status,
    )
    assert cfg.revision_id == data[0x08]
    assert cfg.class_code == int.from_bytes(data[0x09:0x0C], "little")
    assert cfg.header_type == data[0x0E] & 0x7F and cfg.multifunction == bool(data[0x0E] & 0x80)
    assert (cfg.subsystem_vendor_id, cfg.subsystem_id) == struct.unpack_from("<HH", data, 0x2C)
    assert cfg.interrupt_pin == data[0x3D]
    assert cfg.snapshot() == data
    assert cfg.capabilities() == walk_capabilities(data)
    cfg.command = Command(command)
    assert int(cfg.command) == command and cfg.snapshot()[6:] == data[6:]


@given(config_images(), st.integers(0, 0xFFFF), st.booleans())
def test_find_capability_is_the_first_of_the_walk(data: bytes, cap_id: int, extended: bool) -> None:
    cfg = ConfigSpace(Bytes(data))
    found = cfg.find_capability(cap_id, extended)
    first = next(
        (c for c in walk_capabilities(data) if c.id == cap_id and c.extended == extended), None
    )
    assert found == first
