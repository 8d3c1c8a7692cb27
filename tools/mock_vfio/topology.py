"""PCI topologies for the simulator: the spec and its validation.

A topology lists bridges (root ports, switch ports, PCI bridges) and
functions (endpoints, VFs) with what the kernel would learn from them:
BARs, capabilities, reset methods, IOMMU groups and the driver bound at boot.
Everything is plain data; :mod:`mock_vfio.machine` turns it into live state.
TOML files and names are read by :mod:`topology_load`, the parametric topologies
made by :mod:`topology_gen`, and TOML written by :mod:`topology_dump`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

_ADDR = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def norm_addr(addr: str) -> str:
    """``01:00.0`` or ``0000:01:00.0`` -> ``0000:01:00.0`` (lower case)."""
    m = _ADDR.match(addr.strip())
    if not m:
        raise ValueError(f"bad PCI address {addr!r}")
    dom = m.group(1) or "0000"
    return f"{dom}:{m.group(2)}:{m.group(3)}.{m.group(4)}".lower()


def split_addr(addr: str) -> tuple[int, int, int, int]:
    """(domain, bus, slot, function) of a normalised address."""
    dom, bus, rest = addr.split(":")
    slot, fn = rest.split(".")
    return int(dom, 16), int(bus, 16), int(slot, 16), int(fn)


def make_addr(bus: int, slot: int, fn: int, domain: int = 0) -> str:
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{fn}"


@dataclass(frozen=True, slots=True)
class Bar:
    """A BAR.  A memory BAR smaller than a page starts a page of its own, as firmware that
    gives the device its own bridge window places it; ``page_offset`` puts it that far into
    its page instead (another resource's page, which vfio-pci will not mmap)."""

    index: int
    size: int
    kind: str = "mem32"  # "mem32" | "mem64" | "io"
    prefetch: bool = False
    page_offset: int = 0

    @property
    def is_io(self) -> bool:
        return self.kind == "io"

    @property
    def is_64(self) -> bool:
        return self.kind == "mem64"


@dataclass(frozen=True, slots=True)
class Msix:
    count: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


# Link speeds as the kernel names them, in GT/s; 0 means conventional PCI.
LINK_SPEEDS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}


@dataclass(slots=True)
class FunctionSpec:
    addr: str
    vendor: int = 0x1AF4
    device: int = 0x1000
    class_code: int = 0xFF0000
    subsystem_vendor: int = 0
    subsystem_device: int = 0
    revision: int = 1
    bars: tuple[Bar, ...] = ()
    rom_size: int = 0
    msi: int = 0  # vectors; 0 = no MSI capability
    msix: Msix | None = None
    pm: bool = True
    pm_no_soft_reset: bool = False  # PMCSR No_Soft_Reset: a D3hot->D0 cycle does not reset
    pcie: bool = True
    pcie_type: str = "endpoint"  # "endpoint" | "legacy" | "rciep"
    link_speed: float = 8.0
    link_width: int = 16
    flr: bool = False
    aer: bool = False
    reset_methods: tuple[str, ...] | None = None  # None: probe from the capabilities
    reset_method_set: tuple[str, ...] | None = None  # what an admin wrote to reset_method
    iommu_group: int = -1
    driver: str | None = "vfio-pci"
    native_driver: str | None = None  # what drivers_probe binds without an override
    model: str = "generic"
    interrupt_pin: int = 1
    multifunction: bool = False
    # PCI_COMMAND as firmware left it (None: 0 when bound to vfio-pci, decoding on otherwise)
    command: int | None = None
    # Capability offsets by name (PM, MSI, EXP, MSIX; ERR, DSN extended); others follow on
    cap_offsets: dict[str, int] = field(default_factory=dict)
    dsn: bool = False  # Device Serial Number extended capability
    vga: bool = False
    # Model seconds each PCI_COMMAND_MEMORY flip costs (a hypervisor remapping the BARs:
    # 1.8 s for a 128 GB BAR under Hyper-V); 0 on bare metal
    memory_toggle_cost: float = 0.0
    # SR-IOV (PF side)
    sriov_total: int = 0
    sriov_initial: int = 0
    vf_device: int = 0
    vf_offset: int = 1
    vf_stride: int = 1
    vf_bars: tuple[Bar, ...] = ()
    vf_driver: str | None = "vfio-pci"
    vf_native_driver: str | None = None
    vf_msix: int = 0
    # VF side
    physfn: str | None = None
    vf_index: int = -1

    @property
    def cfg_size(self) -> int:
        return 4096 if self.pcie else 256


@dataclass(slots=True)
class BridgeSpec:
    addr: str
    kind: str = "root_port"  # "root_port" | "upstream" | "downstream" | "pci_bridge"
    secondary: int = 0
    subordinate: int = 0
    link_speed: float = 8.0  # of the link below it; 0 for a conventional bus
    hotplug_slot: bool = False  # slot reset possible: device set keyed by slot
    iommu_group: int = -1
    vendor: int = 0x8086
    device: int = 0x0000


@dataclass(slots=True)
class Topology:
    name: str
    # IOMMU input address width: the top of the usable IOVA space (QEMU's intel-iommu: 39)
    iommu_address_width: int = 48
    # The IOMMU enforces cache coherency (VT-d snoop control): VFIO_DMA_CC_IOMMU once set
    iommu_coherent: bool = True
    bridges: list[BridgeSpec] = field(default_factory=list)
    functions: list[FunctionSpec] = field(default_factory=list)

    def assign_groups(self) -> None:
        """Give every bridge and function without an explicit group one of its own."""
        used = {f.iommu_group for f in self.functions} | {b.iommu_group for b in self.bridges}
        nxt = max(used | {-1}) + 1
        for b in self.bridges:
            if b.iommu_group < 0:
                b.iommu_group = nxt
                nxt += 1
        for f in self.functions:
            if f.iommu_group < 0:
                f.iommu_group = nxt
                nxt += 1

    def next_group(self) -> int:
        used = {f.iommu_group for f in self.functions} | {b.iommu_group for b in self.bridges}
        return max(used | {-1}) + 1


class TopologyError(ValueError):
    """A topology that cannot be built: a bad spec, file, key or value (one line)."""


# --- validation ------------------------------------------------------------------

MAX_FUNCTIONS = 65536  # functions and VFs of one topology (a PCI segment's routing IDs)
MAX_BAR_SIZE = 1 << 48
MAX_FILE_BYTES = 16 << 20


def validate(topo: Topology) -> None:
    """:class:`TopologyError` for what no PCI hierarchy has, or the simulator cannot hold:
    addresses past a segment's buses, slots and functions, a topology larger than
    :data:`MAX_FUNCTIONS`, an address used twice, a BAR size below 0 or above 2^48,
    a bridge whose secondary bus is not below it (a cycle), an SR-IOV offset of 0."""
    name = topo.name
    vfs = sum(max(f.sriov_total, 0) for f in topo.functions)
    if len(topo.functions) + vfs > MAX_FUNCTIONS:
        raise TopologyError(
            f"{name}: {len(topo.functions) + vfs} functions (VFs included); "
            f"a topology may have at most {MAX_FUNCTIONS}"
        )
    seen: dict[str, str] = {}

    def place(addr: str, what: str) -> None:
        _dom, bus, slot, fn = split_addr(addr)
        if bus > 0xFF or slot > 0x1F or fn > 7:
            raise TopologyError(
                f"{name}: {what} {addr} is outside a PCI segment (bus 00-ff, slot 00-1f, "
                "function 0-7); use fewer devices"
            )
        if addr in seen:
            raise TopologyError(f"{name}: {what} {addr} has the address of {seen[addr]}")
        seen[addr] = f"{what} {addr}"

    for b in topo.bridges:
        place(b.addr, "bridge")
        bus = split_addr(b.addr)[1]
        if not b.secondary <= b.subordinate <= 0xFF:
            raise TopologyError(
                f"{name}: bridge {b.addr}: needs secondary {b.secondary:#04x} <= subordinate "
                f"{b.subordinate:#04x} <= 0xff (a PCI segment has 256 buses)"
            )
        if b.secondary <= bus:
            raise TopologyError(
                f"{name}: bridge {b.addr}: its secondary bus {b.secondary:#04x} must be above "
                f"its own bus {bus:#04x}, or bridges form a cycle"
            )
    for f in topo.functions:
        place(f.addr, "device")
        sizes = [(f"BAR {b.index}", b.size) for b in f.bars] + [("rom_size", f.rom_size)]
        sizes += [(f"VF BAR {b.index}", b.size) for b in f.vf_bars if f.sriov_total]
        for what, size in sizes:
            if not 0 <= size <= MAX_BAR_SIZE:
                raise TopologyError(
                    f"{name}: device {f.addr}: {what} size {size} is not 0 to 2^48 bytes"
                )
        if f.sriov_total:
            _vf_addresses(f, name, place)


def _vf_addresses(f: FunctionSpec, name: str, place: Callable[[str, str], None]) -> None:
    if f.vf_offset < 1 or (f.sriov_total > 1 and f.vf_stride < 1):
        raise TopologyError(
            f"{name}: device {f.addr}: SR-IOV offset {f.vf_offset} and stride {f.vf_stride} "
            "must be >= 1 (a VF cannot have its PF's address)"
        )
    dom, bus, slot, fn = split_addr(f.addr)
    rid = (bus << 8) | (slot << 3) | fn
    last = rid + f.vf_offset + (f.sriov_total - 1) * f.vf_stride
    if last > 0xFFFF:
        raise TopologyError(
            f"{name}: device {f.addr}: {f.sriov_total} VFs run past bus ff of the segment"
        )
    for i in range(f.sriov_total):
        r = rid + f.vf_offset + i * f.vf_stride
        place(make_addr(r >> 8, (r >> 3) & 0x1F, r & 7, dom), f"VF {i} of {f.addr}")
