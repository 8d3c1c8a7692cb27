"""Reading topologies: TOML files, the ready ones shipped in ``topologies/`` and the
``gpus:N`` / ``vfs:N`` / ``nvme:N`` names (:func:`load_topology`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mock_vfio.topology import (
    MAX_FUNCTIONS,
    Bar,
    BridgeSpec,
    FunctionSpec,
    Msix,
    Topology,
    TopologyError,
    norm_addr,
    validate,
)
from mock_vfio.topology_gen import gpus, nvme, vfs
from mock_vfio.uapi import PAGE

MAX_FILE_BYTES = 16 << 20
# The largest N whose addresses fit one PCI segment (bus numbers 0-255).
GENERATOR_MAX = {"gpus": 169, "vfs": 65022, "nvme": 248}


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
        size, page_offset = b.integer("size"), b.integer("page_offset", 0)
        if page_offset and (
            kind == "io" or size >= PAGE or page_offset % size or page_offset >= PAGE
        ):
            raise b._bad(
                "page_offset", f"a multiple of a sub-page memory BAR's size below {PAGE:#x}"
            )
        bars.append(Bar(index, size, kind, b.boolean("prefetch", False), page_offset))
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
    import tomllib  # here: the generated topologies (gpus:N, ...) need no TOML

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


def topology_dir() -> Path:
    from importlib import resources  # here: the generated topologies need no files

    return Path(str(resources.files("mock_vfio") / "topologies"))


def available() -> list[str]:
    """Names accepted by :func:`load_topology`."""
    named = sorted(p.stem for p in topology_dir().glob("*.toml"))
    return [*named, "gpus:N", "vfs:N", "nvme:N"]


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
        path = topology_dir() / f"{s}.toml"
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
