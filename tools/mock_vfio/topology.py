"""PCI topologies for the simulator: TOML files and parametric generators.

A topology lists bridges (root ports, switch ports, PCI bridges) and
functions (endpoints, VFs) with what the kernel would learn from them:
BARs, capabilities, reset methods, IOMMU groups and the driver bound at boot.
Everything is plain data; :mod:`mock_vfio.machine` turns it into live state.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

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
    index: int
    size: int
    kind: str = "mem32"  # "mem32" | "mem64" | "io"
    prefetch: bool = False

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


# --- TOML ------------------------------------------------------------------


class TopologyError(ValueError):
    """A topology that cannot be built: a bad spec, file, key or value (one line)."""


class _Table:
    """A TOML table read with the types the topology needs; errors name the table."""

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, dict):
            raise TopologyError(f"{where}: must be a table, not {raw!r}")
        self.raw: dict[str, Any] = raw
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def _bad(self, key: str, what: str) -> TopologyError:
        return TopologyError(f"{self.where}: {key} must be {what}, not {self.raw[key]!r}")

    def _need(self, key: str) -> None:
        if key not in self.raw:
            raise TopologyError(f"{self.where}: {key} is missing")

    def integer(self, key: str, default: int | None = None) -> int:
        if default is None:
            self._need(key)
        v = self.raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, "an integer")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.raw.get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def number(self, key: str, default: float) -> float:
        v = self.raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self._bad(key, "a number")
        return float(v)

    def string(self, key: str, default: str | None = None) -> str:
        if default is None:
            self._need(key)
        v = self.raw.get(key, default)
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def optional_str(self, key: str, default: str | None) -> str | None:
        """A string; an empty one (or an absent key with a None default) is None."""
        return (self.string(key) or None) if key in self.raw else default

    def words(self, key: str) -> tuple[str, ...]:
        """A string of space-separated words or a list of strings."""
        v = self.raw[key]
        if isinstance(v, str):
            return tuple(v.split())
        if isinstance(v, list) and all(isinstance(w, str) for w in v):
            return tuple(v)
        raise self._bad(key, "a string or a list of strings")

    def table(self, key: str) -> _Table:
        return _Table(self.raw[key], f"{self.where}: {key}")

    def tables(self, key: str, name: str) -> list[_Table]:
        v = self.raw.get(key, [])
        if not isinstance(v, list):
            raise self._bad(key, "a list of tables")
        return [_Table(t, f"{self.where}{name} {i + 1}") for i, t in enumerate(v)]

    def addr(self) -> str:
        try:
            return norm_addr(self.string("addr"))
        except TopologyError:
            raise
        except ValueError as exc:
            raise TopologyError(f"{self.where}: {exc}") from None

    def within(self, addr: str) -> _Table:
        """The same table, its errors naming ``addr`` too."""
        return _Table(self.raw, f"{self.where} ({addr})")


_BAR_KINDS = ("mem32", "mem64", "io")
_BRIDGE_KINDS = ("root_port", "upstream", "downstream", "pci_bridge")


def _bars(t: _Table, key: str, default: list[dict[str, Any]] | None = None) -> tuple[Bar, ...]:
    if key not in t and default is not None:
        t = _Table({key: default}, t.where)
    bars = []
    for b in t.tables(key, f": {key}"):
        kind = b.string("type", "mem32")
        if kind not in _BAR_KINDS:
            raise b._bad("type", " or ".join(_BAR_KINDS))
        index = b.integer("index")
        if not 0 <= index <= 5:
            raise b._bad("index", "0 to 5")
        bars.append(Bar(index, b.integer("size"), kind, b.boolean("prefetch", False)))
    return tuple(bars)


def _function(t: _Table) -> FunctionSpec:
    f = FunctionSpec(addr=t.addr())
    t = t.within(f.addr)
    ints = {
        "vendor": "vendor",
        "device": "device",
        "class": "class_code",
        "subsystem_vendor": "subsystem_vendor",
        "subsystem_device": "subsystem_device",
        "revision": "revision",
        "rom_size": "rom_size",
        "msi": "msi",
        "link_width": "link_width",
        "iommu_group": "iommu_group",
        "interrupt_pin": "interrupt_pin",
        "command": "command",
    }
    bools = ("pm", "pm_no_soft_reset", "pcie", "flr", "aer", "multifunction", "vga", "dsn")
    for key, attr in ints.items():
        if key in t:
            setattr(f, attr, t.integer(key))
    for key in bools:
        setattr(f, key, t.boolean(key, getattr(f, key)))
    f.pcie_type = t.string("pcie_type", f.pcie_type)
    f.model = t.string("model", f.model)
    f.native_driver = t.optional_str("native_driver", None)
    f.driver = t.optional_str("driver", f.driver)
    f.link_speed = t.number("link_speed", f.link_speed)
    f.memory_toggle_cost = t.number("memory_toggle_cost", 0.0)
    if f.memory_toggle_cost < 0:
        raise t._bad("memory_toggle_cost", "a number >= 0")
    if "capabilities" in t:
        caps = t.table("capabilities")
        f.cap_offsets = {str(k).upper(): caps.integer(k) for k in caps.raw}
    f.bars = _bars(t, "bars", [])
    if "msix" in t:
        m = t.table("msix")
        table_bar = m.integer("table_bar", 0)
        f.msix = Msix(
            m.integer("count"),
            table_bar,
            m.integer("table_offset", 0),
            m.integer("pba_bar", table_bar),
            m.integer("pba_offset", 0x800),
        )
    if "reset_method" in t:
        f.reset_methods = t.words("reset_method")
    if "reset_method_set" in t:
        f.reset_method_set = t.words("reset_method_set")
    if "sriov" in t:
        s = t.table("sriov")
        f.sriov_total = s.integer("total_vfs")
        f.sriov_initial = s.integer("num_vfs", 0)
        if not 0 <= f.sriov_initial <= f.sriov_total:
            raise TopologyError(
                f"{s.where}: num_vfs must be 0 to total_vfs ({f.sriov_total}), "
                f"not {f.sriov_initial}"
            )
        f.vf_device = s.integer("vf_device", f.device + 1)
        f.vf_offset = s.integer("offset", 1)
        f.vf_stride = s.integer("stride", 1)
        f.vf_bars = _bars(s, "bars", [{"index": 0, "size": 0x4000, "type": "mem64"}])
        f.vf_driver = s.optional_str("driver", "vfio-pci")
        f.vf_native_driver = s.optional_str("native_driver", None)
        f.vf_msix = s.integer("msix", 0)
    return f


def _bridge(t: _Table) -> BridgeSpec:
    b = BridgeSpec(addr=t.addr())
    t = t.within(b.addr)
    b.kind = t.string("kind", "root_port")
    if b.kind not in _BRIDGE_KINDS:
        raise t._bad("kind", " or ".join(_BRIDGE_KINDS))
    b.secondary = t.integer("secondary")
    b.subordinate = t.integer("subordinate", b.secondary)
    b.link_speed = t.number("link_speed", 0.0 if b.kind == "pci_bridge" else 8.0)
    b.hotplug_slot = t.boolean("hotplug_slot", False)
    b.iommu_group = t.integer("iommu_group", -1)
    b.vendor = t.integer("vendor", 0x8086)
    b.device = t.integer("device", 0)
    return b


def parse_toml(text: str, name: str = "custom") -> Topology:
    """A topology file's text; :class:`TopologyError` names what is wrong where."""
    try:
        data = _Table(tomllib.loads(text), name)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{name}: not valid TOML: {exc}") from None
    topo = Topology(name=data.string("name", name))
    topo.iommu_address_width = data.integer("iommu_address_width", 48)
    topo.iommu_coherent = data.boolean("iommu_coherent", True)
    topo.bridges = [_bridge(b) for b in data.tables("bridge", ": [[bridge]]")]
    topo.functions = [_function(f) for f in data.tables("device", ": [[device]]")]
    return topo


# --- parametric topologies ---------------------------------------------------


def gpus(n: int, per_switch: int = 4) -> Topology:
    """N GPUs (function 0) with HD audio (function 1), each alone on a bus behind a
    switch downstream port; bus reset only, both functions one group and one set."""
    t = Topology(name=f"gpus:{n}")
    bus = 1
    group = 0
    for sw in range((n + per_switch - 1) // per_switch):
        rp = make_addr(0, 1 + sw // 8, sw % 8)
        up_bus = bus
        count = min(per_switch, n - sw * per_switch)
        sub = up_bus + 1 + count
        t.bridges.append(
            BridgeSpec(rp, "root_port", up_bus, sub, 16.0, iommu_group=group, device=0x1901)
        )
        group += 1
        t.bridges.append(
            BridgeSpec(
                make_addr(up_bus, 0, 0),
                "upstream",
                up_bus + 1,
                sub,
                16.0,
                False,
                group,
                0x10B5,
                0x8747,
            )
        )
        group += 1
        for i in range(count):
            dbus = up_bus + 2 + i
            t.bridges.append(
                BridgeSpec(
                    make_addr(up_bus + 1, i, 0),
                    "downstream",
                    dbus,
                    dbus,
                    16.0,
                    False,
                    group,
                    0x10B5,
                    0x8747,
                )
            )
            group += 1
        bus = sub + 1
    gi = 0
    for b in list(t.bridges):
        if b.kind != "downstream" or gi >= n:
            continue
        gi += 1
        g = group
        group += 1
        gpu = FunctionSpec(
            addr=make_addr(b.secondary, 0, 0),
            vendor=0x10DE,
            device=0x2330,
            class_code=0x030200,
            subsystem_vendor=0x10DE,
            subsystem_device=0x16C1,
            bars=(
                Bar(0, 16 << 20, "mem32"),
                Bar(1, 256 << 20, "mem64", prefetch=True),
                Bar(3, 32 << 20, "mem64", prefetch=True),
            ),
            rom_size=512 << 10,
            msi=1,
            msix=Msix(6, 0, 0xB90000, 0, 0xBA0000),
            link_speed=16.0,
            aer=True,
            reset_methods=("bus",),
            iommu_group=g,
            native_driver="nvidia",
            multifunction=True,
        )
        audio = FunctionSpec(
            addr=make_addr(b.secondary, 0, 1),
            vendor=0x10DE,
            device=0x22A3,
            class_code=0x040300,
            subsystem_vendor=0x10DE,
            subsystem_device=0x16C1,
            bars=(Bar(0, 16 << 10, "mem32"),),
            msi=1,
            link_speed=16.0,
            reset_methods=("bus",),
            iommu_group=g,
            native_driver="snd_hda_intel",
            interrupt_pin=2,
            multifunction=True,
        )
        t.functions += [gpu, audio]
    return t


def vfs(n: int) -> Topology:
    """One NIC PF with N VFs (FLR, one group each) behind a root port."""
    t = Topology(name=f"vfs:{n}")
    t.bridges.append(
        BridgeSpec(
            make_addr(0, 1, 0),
            "root_port",
            1,
            1 + (n + 1) // 256 + 1,
            16.0,
            iommu_group=0,
            device=0x1901,
        )
    )
    pf = FunctionSpec(
        addr=make_addr(1, 0, 0),
        vendor=0x8086,
        device=0x1592,
        class_code=0x020000,
        subsystem_vendor=0x8086,
        subsystem_device=0x0002,
        bars=(Bar(0, 32 << 20, "mem64", True), Bar(3, 64 << 10, "mem64", True)),
        msix=Msix(64, 3, 0, 3, 0x8000),
        link_speed=16.0,
        flr=True,
        aer=True,
        iommu_group=1,
        driver="ice",
        native_driver="ice",
        sriov_total=max(n, 1),
        sriov_initial=n,
        vf_device=0x1889,
        vf_bars=(Bar(0, 64 << 10, "mem64", True), Bar(3, 16 << 10, "mem64", True)),
        vf_driver="vfio-pci",
        vf_native_driver="iavf",
        vf_msix=5,
    )
    t.functions.append(pf)
    return t


def nvme(n: int) -> Topology:
    """N NVMe drives with FLR, one per root port."""
    t = Topology(name=f"nvme:{n}")
    for i in range(n):
        bus = i + 1
        t.bridges.append(
            BridgeSpec(
                make_addr(0, 1 + i // 8, i % 8),
                "root_port",
                bus,
                bus,
                16.0,
                iommu_group=2 * i,
                device=0x1901,
            )
        )
        t.functions.append(
            FunctionSpec(
                addr=make_addr(bus, 0, 0),
                vendor=0x144D,
                device=0xA80A,
                class_code=0x010802,
                subsystem_vendor=0x144D,
                subsystem_device=0xA801,
                bars=(Bar(0, 16 << 10, "mem64"),),
                msi=1,
                msix=Msix(33, 0, 0x3000, 0, 0x2000),
                link_speed=16.0,
                link_width=4,
                flr=True,
                aer=True,
                iommu_group=2 * i + 1,
                native_driver="nvme",
            )
        )
    return t


def _topology_dir() -> Path:
    return Path(str(resources.files("mock_vfio") / "topologies"))


def available() -> list[str]:
    """Names accepted by :func:`load_topology`."""
    named = sorted(p.stem for p in _topology_dir().glob("*.toml"))
    return [*named, "gpus:N", "vfs:N", "nvme:N"]


# --- validation ------------------------------------------------------------------

MAX_FUNCTIONS = 65536  # functions and VFs of one topology (a PCI segment's routing IDs)
MAX_BAR_SIZE = 1 << 48
MAX_FILE_BYTES = 16 << 20
# The largest N whose addresses fit one PCI segment (bus numbers 0-255).
GENERATOR_MAX = {"gpus": 169, "vfs": 65022, "nvme": 248}


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


def load_topology(spec: str | Path | Topology) -> Topology:
    """A ready name, ``gpus:N`` / ``vfs:N`` / ``nvme:N``, or a path to a TOML file."""
    if isinstance(spec, Topology):
        return spec
    s = str(spec).strip()
    kind, colon, num = s.partition(":")
    gens = {"gpus": gpus, "vfs": vfs, "nvme": nvme}
    if kind in gens and colon:
        if not (num.isascii() and num.isdigit()):
            raise TopologyError(f"{kind}:N needs a whole number N >= 0, not {s!r}")
        if int(num) > GENERATOR_MAX[kind]:
            raise TopologyError(
                f"{s}: at most {kind}:{GENERATOR_MAX[kind]} fits one PCI segment's 256 buses"
            )
        topo = gens[kind](int(num))
    elif s.endswith(".toml") or "/" in s:
        topo = _read_file(Path(s))
    else:
        path = _topology_dir() / f"{s}.toml"
        if not s or not path.is_file():
            raise TopologyError(f"unknown topology {s!r}; known: {', '.join(available())}")
        topo = _read_file(path)
    validate(topo)
    topo.assign_groups()
    return topo


def _read_file(path: Path) -> Topology:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TopologyError(
                f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB; a topology may have at most "
                f"{MAX_FUNCTIONS} functions"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(f"no such topology file: {path}") from None
    except OSError as exc:
        raise TopologyError(f"cannot read topology file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TopologyError(f"{path}: not a TOML file (not UTF-8 text)") from None
    return parse_toml(text, path.stem)


# --- TOML writer ---------------------------------------------------------------------

_FN_DEFAULTS = FunctionSpec(addr="0000:00:00.0")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _str(s: str) -> str:
    """A TOML basic string."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _str(k)


def _int(v: int, width: int = 0) -> str:
    """Hexadecimal like lspci where it reads better; TOML has no negative hex."""
    return f"0x{v:0{width}x}" if v >= 0 else str(v)


def _float(v: float) -> str:
    return repr(float(v))


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _methods(ms: tuple[str, ...]) -> str:
    if all(m and not any(c.isspace() for c in m) for m in ms):
        return _str(" ".join(ms))
    return "[" + ", ".join(_str(m) for m in ms) + "]"


def _bar(b: Bar, full: bool) -> str:
    s = f"{{ index = {b.index}, size = {_int(b.size)}, type = {_str(b.kind)}"
    if b.prefetch or full:
        s += f", prefetch = {_bool(b.prefetch)}"
    return s + " }"


def _bar_lines(key: str, bars: tuple[Bar, ...], full: bool) -> list[str]:
    if not bars:
        return [f"{key} = []"]
    return [f"{key} = [", *(f"  {_bar(b, full)}," for b in bars), "]"]


def _msix(m: Msix) -> str:
    return (
        f"{{ count = {m.count}, table_bar = {m.table_bar}, table_offset = {_int(m.table_offset)},"
        f" pba_bar = {m.pba_bar}, pba_offset = {_int(m.pba_offset)} }}"
    )


def _has_sriov(f: FunctionSpec) -> bool:
    d = _FN_DEFAULTS
    return (
        f.sriov_total,
        f.sriov_initial,
        f.vf_device,
        f.vf_offset,
        f.vf_stride,
        f.vf_bars,
        f.vf_driver,
        f.vf_native_driver,
        f.vf_msix,
    ) != (
        d.sriov_total,
        d.sriov_initial,
        d.vf_device,
        d.vf_offset,
        d.vf_stride,
        d.vf_bars,
        d.vf_driver,
        d.vf_native_driver,
        d.vf_msix,
    )


def _function_lines(f: FunctionSpec, full: bool) -> list[str]:
    if f.physfn is not None:
        raise ValueError(f"{f.addr} is a VF: the file describes VFs in their PF's sriov table")
    d = _FN_DEFAULTS
    # (key, rendered value, equal to what the parser assumes when the key is absent)
    keyed: list[tuple[str, str, bool]] = [
        ("vendor", _int(f.vendor, 4), f.vendor == d.vendor),
        ("device", _int(f.device, 4), f.device == d.device),
        ("class", _int(f.class_code, 6), f.class_code == d.class_code),
        ("subsystem_vendor", _int(f.subsystem_vendor, 4), f.subsystem_vendor == d.subsystem_vendor),
        ("subsystem_device", _int(f.subsystem_device, 4), f.subsystem_device == d.subsystem_device),
        ("revision", _int(f.revision, 2), f.revision == d.revision),
    ]
    if f.command is not None:
        keyed.append(("command", _int(f.command), False))
    keyed += [
        ("iommu_group", str(f.iommu_group), f.iommu_group == d.iommu_group),
        ("driver", _str(f.driver or ""), f.driver == d.driver),
    ]
    if f.native_driver is not None:
        keyed.append(("native_driver", _str(f.native_driver), False))
    keyed += [
        ("model", _str(f.model), f.model == d.model),
        ("pcie", _bool(f.pcie), f.pcie == d.pcie),
        ("pcie_type", _str(f.pcie_type), f.pcie_type == d.pcie_type),
        ("link_speed", _float(f.link_speed), f.link_speed == d.link_speed),
        ("link_width", str(f.link_width), f.link_width == d.link_width),
        ("pm", _bool(f.pm), f.pm == d.pm),
        ("pm_no_soft_reset", _bool(f.pm_no_soft_reset), f.pm_no_soft_reset == d.pm_no_soft_reset),
        ("msi", str(f.msi), f.msi == d.msi),
    ]
    if f.msix is not None:
        keyed.append(("msix", _msix(f.msix), False))
    keyed += [
        ("flr", _bool(f.flr), f.flr == d.flr),
        ("aer", _bool(f.aer), f.aer == d.aer),
        ("dsn", _bool(f.dsn), f.dsn == d.dsn),
        ("vga", _bool(f.vga), f.vga == d.vga),
    ]
    if f.reset_methods is not None:
        keyed.append(("reset_method", _methods(f.reset_methods), False))
    if f.reset_method_set is not None:
        keyed.append(("reset_method_set", _methods(f.reset_method_set), False))
    keyed += [
        ("multifunction", _bool(f.multifunction), f.multifunction == d.multifunction),
        ("interrupt_pin", str(f.interrupt_pin), f.interrupt_pin == d.interrupt_pin),
        ("rom_size", _int(f.rom_size), f.rom_size == d.rom_size),
        (
            "memory_toggle_cost",
            _float(f.memory_toggle_cost),
            f.memory_toggle_cost == d.memory_toggle_cost,
        ),
    ]
    caps = ", ".join(f"{_key(k.upper())} = {_int(v)}" for k, v in f.cap_offsets.items())
    keyed.append(("capabilities", f"{{ {caps} }}" if caps else "{}", not f.cap_offsets))
    lines = ["[[device]]", f"addr = {_str(f.addr)}"]
    lines += [f"{k} = {v}" for k, v, default in keyed if full or not default]
    if f.bars or full:
        lines += _bar_lines("bars", f.bars, full)
    if _has_sriov(f):
        # a sub-table of this [[device]]: it has to come after the device's own keys
        lines += [
            "[device.sriov]",
            f"total_vfs = {f.sriov_total}",
            f"num_vfs = {f.sriov_initial}",
            f"vf_device = {_int(f.vf_device, 4)}",
            f"offset = {f.vf_offset}",
            f"stride = {f.vf_stride}",
            f"driver = {_str(f.vf_driver or '')}",
        ]
        if f.vf_native_driver is not None:
            lines.append(f"native_driver = {_str(f.vf_native_driver)}")
        lines.append(f"msix = {f.vf_msix}")
        lines += _bar_lines("bars", f.vf_bars, full)
    return lines


def _bridge_lines(b: BridgeSpec, full: bool) -> list[str]:
    speed = 0.0 if b.kind == "pci_bridge" else 8.0
    keyed: list[tuple[str, str, bool]] = [
        ("kind", _str(b.kind), b.kind == "root_port"),
        ("secondary", str(b.secondary), False),
        ("subordinate", str(b.subordinate), b.subordinate == b.secondary),
        ("link_speed", _float(b.link_speed), b.link_speed == speed),
        ("hotplug_slot", _bool(b.hotplug_slot), not b.hotplug_slot),
        ("iommu_group", str(b.iommu_group), b.iommu_group == -1),
        ("vendor", _int(b.vendor, 4), b.vendor == 0x8086),
        ("device", _int(b.device, 4), b.device == 0),
    ]
    lines = ["[[bridge]]", f"addr = {_str(b.addr)}"]
    return lines + [f"{k} = {v}" for k, v, default in keyed if full or not default]


def dump_toml(topo: Topology, *, full: bool = False) -> str:
    """``topo`` as a TOML file that :func:`parse_toml` reads back equal.

    Keys whose value is what the parser assumes when they are absent are left
    out unless ``full``. VFs are not listed: the PF's ``sriov`` table makes them.
    """
    lines = [f"name = {_str(topo.name)}"]
    if full or topo.iommu_address_width != 48:
        lines.append(f"iommu_address_width = {topo.iommu_address_width}")
    if full or not topo.iommu_coherent:
        lines.append(f"iommu_coherent = {_bool(topo.iommu_coherent)}")
    for b in topo.bridges:
        lines += ["", *_bridge_lines(b, full)]
    for f in topo.functions:
        lines += ["", *_function_lines(f, full)]
    return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------------

_GENERATORS = {
    "gpus:N": "N GPUs + HD audio function, 4 per PCIe switch, bus reset only",
    "vfs:N": "one NIC PF with N SR-IOV VFs, FLR, a group and device set per VF",
    "nvme:N": "N NVMe drives, one per root port, FLR",
}


def describe(name: str) -> str:
    """One line about a name from :func:`available`: a ready file's first comment line."""
    if name in _GENERATORS:
        return _GENERATORS[name]
    path = _topology_dir() / f"{name}.toml"
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().rstrip(",:;")
        if line.strip():
            break
    return ""


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mock_vfio", description="Simulator topologies.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the names load_topology accepts, one line about each")
    dump = sub.add_parser("dump", help="a topology as TOML (a name, gpus:N ..., or a file)")
    dump.add_argument("spec")
    dump.add_argument(
        "--full", action="store_true", help="write every key, also those at their default"
    )
    args = ap.parse_args(argv)
    if args.cmd == "list":
        names = available()
        width = max(len(n) for n in names)
        for n in names:
            print(f"{n:<{width}}  {describe(n)}")
        return 0
    try:
        topo = load_topology(args.spec)
    except ValueError as e:
        ap.error(str(e))
    print(dump_toml(topo, full=args.full), end="")
    return 0
