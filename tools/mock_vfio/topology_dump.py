"""Writing topologies as TOML (:func:`dump_toml`), and the command line that lists and
dumps them (``python -m mock_vfio``)."""

from __future__ import annotations

import re

from mock_vfio.topology import Bar, BridgeSpec, FunctionSpec, Msix, Topology
from mock_vfio.topology_load import available, load_topology, topology_dir

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
    if b.page_offset:
        s += f", page_offset = {_int(b.page_offset)}"
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


_GENERATORS = {
    "gpus:N": "N GPUs + HD audio function, 4 per PCIe switch, bus reset only",
    "vfs:N": "one NIC PF with N SR-IOV VFs, FLR, a group and device set per VF",
    "nvme:N": "N NVMe drives, one per root port, FLR",
}


def describe(name: str) -> str:
    """One line about a name from :func:`available`: a ready file's first comment line."""
    if name in _GENERATORS:
        return _GENERATORS[name]
    path = topology_dir() / f"{name}.toml"
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
