"""The sysfs, devfs and procfs a simulated process sees, served from the model.

Paths and link targets follow the real kernel's layout: ``/sys/bus/pci/devices/X``
links to ``../../../devices/pci0000:00/<bridges>/X``; ``iommu_group`` and
``driver`` are relative links; ``/proc/<pid>/fd/N`` reads like the kernel's.
"""

from __future__ import annotations

import errno
import functools
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mock_vfio.files import File
from mock_vfio.machine import Bridge, Device, Machine
from mock_vfio.topology import norm_addr, split_addr
from mock_vfio.trace import oserror

if TYPE_CHECKING:
    from mock_vfio.process import SimProcess

_SPEED_NAMES = {
    0.0: "Unknown",
    2.5: "2.5 GT/s PCIe",
    5.0: "5.0 GT/s PCIe",
    8.0: "8.0 GT/s PCIe",
    16.0: "16.0 GT/s PCIe",
    32.0: "32.0 GT/s PCIe",
    64.0: "64.0 GT/s PCIe",
}
_ALL_METHODS = ("device_specific", "acpi", "flr", "af_flr", "pm", "bus", "cxl_bus")


class Dir:
    """A directory; a callable listing is computed only when someone lists it
    (path walks pass through directories far more often than they list them)."""

    def __init__(self, entries: list[str] | Callable[[], list[str]]) -> None:
        self._entries = entries

    @property
    def entries(self) -> list[str]:
        e = self._entries
        return e() if callable(e) else e


@dataclass
class Link:
    target: str


@dataclass
class Attr:
    read: Callable[[], str] | None = None
    write: Callable[[str], None] | None = None
    binary: bool = False


@dataclass
class DevNode:
    opener: Callable[[SimProcess], File]


Node = Dir | Link | Attr | DevNode


# --- device paths ----------------------------------------------------------------------------


def _parent_bridge(m: Machine, bus: int) -> Bridge | None:
    if bus == 0:
        return None
    return m._bus_bridge.get(bus)


def _chain(m: Machine, addr: str) -> list[str]:
    """Addresses from the root bus down to ``addr`` (bridges first)."""
    chains = _index(m).chains
    found = chains.get(addr)
    if found is None:
        found = chains[addr] = _walk_chain(m, addr)
    return found


def _walk_chain(m: Machine, addr: str) -> list[str]:
    dev = m.devices.get(addr)
    if dev is not None and dev.is_vf and dev.spec.physfn:
        # VFs sit next to their PF in the device tree
        return [*_chain(m, dev.spec.physfn)[:-1], addr]
    out = [addr]
    bus = split_addr(addr)[1]
    seen = 0
    while seen < 64:
        br = _parent_bridge(m, bus)
        if br is None:
            break
        out.append(br.addr)
        bus = split_addr(br.addr)[1]
        seen += 1
    return list(reversed(out))


def _real(m: Machine, addr: str) -> list[str]:
    return ["devices", f"pci{addr[:4]}:00", *_chain(m, addr)]


def device_syspath(m: Machine, dev: Device) -> str:
    return "/sys/" + "/".join(_real(m, dev.addr))


def _up(depth: int) -> str:
    return "../" * depth


# --- lookup ----------------------------------------------------------------------------------


def _const(text: str) -> Callable[[], str]:
    return lambda: text


def _hex(v: int, width: int) -> str:
    return f"0x{v:0{width}x}\n"


def _resource(dev: Device) -> str:
    lines = []
    for i in range(13):
        bar = dev.bar(i) if i < 6 else None
        if bar is not None:
            start = dev.host_bars[i]
            flags = 0x40101 if bar.is_io else 0x40200
            flags |= 0x2000 if bar.prefetch else 0
            flags |= 0x100000 if bar.is_64 else 0
            lines.append(f"0x{start:016x} 0x{start + bar.size - 1:016x} 0x{flags:016x}")
        elif i == 6 and dev.spec.rom_size:
            start = dev.host_bars[6]
            lines.append(f"0x{start:016x} 0x{start + dev.spec.rom_size - 1:016x} 0x{0x46200:016x}")
        else:
            lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
    return "\n".join(lines) + "\n"


def _write_override(dev: Device, data: str) -> None:
    val = data.rstrip("\n")
    if len(val) >= 4095:
        raise oserror(errno.EINVAL, "driver_override too long")
    dev.driver_override = val or None


def _write_reset_method(dev: Device, data: str) -> None:
    val = data.strip()
    if val == "default":
        dev.reset_methods = list(dev.default_reset_methods())
        return
    names = val.split()
    for n in names:
        if n not in _ALL_METHODS:
            raise oserror(errno.EINVAL, f"unknown reset method {n!r}")
        if not dev.method_works(n) and n not in dev.default_reset_methods():
            raise oserror(errno.EINVAL, f"reset method {n!r} not supported by {dev.addr}")
    dev.reset_methods = names


def _write_numvfs(m: Machine, dev: Device, data: str) -> None:
    try:
        n = int(data.strip(), 0)
    except ValueError as e:
        raise oserror(errno.EINVAL, "sriov_numvfs") from e
    m.host.sriov_configure(dev, n)


def _write_autoprobe(m: Machine, dev: Device, data: str) -> None:
    # sriov_drivers_autoprobe_store: kstrtobool, anything else is EINVAL
    val = data.strip().lower()
    if val in ("1", "y", "yes", "on", "true"):
        m.host.autoprobe[dev.addr] = True
    elif val in ("0", "n", "no", "off", "false"):
        m.host.autoprobe[dev.addr] = False
    else:
        raise oserror(errno.EINVAL, "sriov_drivers_autoprobe")


def _write_enable_sriov(m: Machine, data: str) -> None:
    val = data.strip()
    if val not in ("Y", "N", "1", "0", "y", "n"):
        raise oserror(errno.EINVAL, "enable_sriov")
    m.host.vfio_enable_sriov = val in ("Y", "1", "y")


def _write_reset(m: Machine, dev: Device, data: str) -> None:
    if data.strip() != "1":
        raise oserror(errno.EINVAL, "reset")
    if not m.function_reset(dev, "sysfs"):
        raise oserror(errno.ENOTTY, f"{dev.addr} has no reset method")


def _write_remove(m: Machine, dev: Device, data: str) -> None:
    if data.strip() == "1":
        m.remove_device(dev.addr)


def _device_entry(m: Machine, dev: Device, name: str, depth: int) -> Node | None:
    s = dev.spec
    simple: dict[str, Callable[[], str]] = {
        "vendor": lambda: _hex(s.vendor, 4),
        "device": lambda: _hex(s.device, 4),
        "class": lambda: _hex(s.class_code, 6),
        "subsystem_vendor": lambda: _hex(s.subsystem_vendor, 4),
        "subsystem_device": lambda: _hex(s.subsystem_device, 4),
        "revision": lambda: _hex(s.revision, 2),
        "resource": lambda: _resource(dev),
        "numa_node": lambda: "-1\n",
        "enable": lambda: (
            "1\n" if dev.open_count or dev.driver not in (None, "vfio-pci") else "0\n"
        ),
        "irq": lambda: "16\n" if s.interrupt_pin and not dev.is_vf else "0\n",
        "local_cpulist": lambda: "0-3\n",
        "power_state": lambda: "D3hot\n" if dev.low_power else "D0\n",
        "current_link_speed": lambda: _SPEED_NAMES.get(s.link_speed, "Unknown") + "\n",
        "max_link_speed": lambda: _SPEED_NAMES.get(s.link_speed, "Unknown") + "\n",
        "current_link_width": lambda: f"{s.link_width}\n",
        "max_link_width": lambda: f"{s.link_width}\n",
    }
    if name in simple:
        if not s.pcie and "link" in name:
            return None
        return Attr(simple[name])
    if name == "config":
        return Attr(lambda: dev.config.read(0, s.cfg_size).decode("latin-1"), binary=True)
    if name == "driver_override":
        return Attr(
            lambda: (dev.driver_override or "(null)") + "\n", lambda v: _write_override(dev, v)
        )
    if name == "reset_method":
        if not dev.reset_methods:
            return None  # the attribute is hidden when no reset method is enabled
        return Attr(
            lambda: " ".join(dev.reset_methods) + "\n", lambda v: _write_reset_method(dev, v)
        )
    if name == "reset":
        return Attr(None, lambda v: _write_reset(m, dev, v))
    if name == "remove":
        return Attr(None, lambda v: _write_remove(m, dev, v))
    if name == "iommu_group":
        return Link(_up(depth) + f"kernel/iommu_groups/{dev.group_id}")
    if name == "subsystem":
        return Link(_up(depth) + "bus/pci")
    if name == "driver":
        return Link(_up(depth) + f"bus/pci/drivers/{dev.driver}") if dev.driver else None
    if name == "vfio-dev":
        if dev.driver == "vfio-pci" and m.cdev:
            return Dir([f"vfio{dev.minor}"])
        return None
    if s.sriov_total:
        if name == "sriov_totalvfs":
            return Attr(lambda: f"{s.sriov_total}\n")
        if name == "sriov_numvfs":
            return Attr(lambda: f"{dev.numvfs}\n", lambda v: _write_numvfs(m, dev, v))
        if name == "sriov_offset":
            return Attr(lambda: f"{s.vf_offset}\n")
        if name == "sriov_stride":
            return Attr(lambda: f"{s.vf_stride}\n")
        if name == "sriov_vf_device":
            return Attr(lambda: f"{s.vf_device:x}\n")
        if name == "sriov_drivers_autoprobe":
            return Attr(
                lambda: f"{int(m.host.sriov_autoprobe(dev))}\n",
                lambda v: _write_autoprobe(m, dev, v),
            )
        if name.startswith("virtfn") and name[6:].isdigit():
            i = int(name[6:])
            if i < len(dev.vfs):
                return Link(f"../{dev.vfs[i].addr}")
            return None
    if name == "physfn" and s.physfn:
        return Link(f"../{s.physfn}")
    return None


def _device_listing(m: Machine, dev: Device) -> list[str]:
    names = [
        "vendor",
        "device",
        "class",
        "subsystem_vendor",
        "subsystem_device",
        "revision",
        "resource",
        "numa_node",
        "enable",
        "irq",
        "local_cpulist",
        "power_state",
        "config",
        "driver_override",
        "reset_method",
        "reset",
        "remove",
        "iommu_group",
        "subsystem",
        "driver",
        "vfio-dev",
        "current_link_speed",
        "max_link_speed",
        "current_link_width",
        "max_link_width",
        "sriov_totalvfs",
        "sriov_numvfs",
        "sriov_offset",
        "sriov_stride",
        "sriov_vf_device",
        "sriov_drivers_autoprobe",
        "physfn",
    ]
    names += [f"virtfn{i}" for i in range(len(dev.vfs))]
    return [n for n in names if _device_entry(m, dev, n, 4) is not None]


def _bridge_entry(m: Machine, br: Bridge, name: str, depth: int) -> Node | None:
    b = br.spec
    attrs: dict[str, Callable[[], str]] = {
        "vendor": lambda: _hex(b.vendor, 4),
        "device": lambda: _hex(b.device, 4),
        "class": lambda: _hex(0x060400, 6),
        "secondary_bus_number": lambda: f"{b.secondary}\n",
        "subordinate_bus_number": lambda: f"{b.subordinate}\n",
        "current_link_speed": lambda: _SPEED_NAMES.get(b.link_speed, "Unknown") + "\n",
        "numa_node": lambda: "-1\n",
        "reset_method": lambda: "pm\n",
    }
    if name in attrs:
        return Attr(attrs[name])
    if name == "iommu_group":
        return Link(_up(depth) + f"kernel/iommu_groups/{br.group}")
    if name == "driver":
        return Link(_up(depth) + "bus/pci/drivers/pcieport")
    return None


@dataclass
class _Index:
    """Per-machine lookups that path walks ask for every component: without them a
    2048-VF tree makes each walk quadratic.  Devices only appear or vanish (SR-IOV,
    removal), never move, so the device and bridge counts tell when it is stale."""

    key: tuple[int, int]
    children: dict[tuple[str, str | None], list[str]] | None = None
    chains: dict[str, list[str]] = field(default_factory=dict)


_INDEX: weakref.WeakKeyDictionary[Machine, _Index] = weakref.WeakKeyDictionary()


def _index(m: Machine) -> _Index:
    key = (len(m.bridges), len(m.devices))
    found = _INDEX.get(m)
    if found is None or found.key != key:
        found = _INDEX[m] = _Index(key)
    return found


def _children(m: Machine, bus_owner: Bridge | None, domain: str) -> list[str]:
    idx = _index(m)
    if idx.children is None:
        children: dict[tuple[str, str | None], list[str]] = {}
        for addr in sorted([*m.bridges, *m.devices]):
            children.setdefault((addr[:4], _parent_of(m, addr)), []).append(addr)
        idx.children = children
    return list(idx.children.get((domain, bus_owner.addr if bus_owner else None), []))


def _parent_of(m: Machine, addr: str) -> str | None:
    ch = _chain(m, addr)
    return ch[-2] if len(ch) > 1 else None


def _lookup(proc: SimProcess, parts: list[str]) -> Node | None:
    m = proc.machine
    n = len(parts)
    if n == 0:
        return Dir(["dev", "proc", "sys"])
    top = parts[0]
    if top == "sys":
        return _lookup_sys(m, parts[1:])
    if top == "dev":
        return _lookup_dev(m, parts[1:])
    if top == "proc":
        return _lookup_proc(proc, parts[1:])
    return None


def _lookup_sys(m: Machine, p: list[str]) -> Node | None:
    n = len(p)
    if n == 0:
        return Dir(["block", "bus", "class", "devices", "kernel", "module"])
    if p[0] in ("block", "class"):
        from mock_vfio.hostfs import lookup_block, lookup_class

        return (lookup_block if p[0] == "block" else lookup_class)(m, p[1:])
    if p[0] == "bus":
        if n == 1:
            return Dir(["pci"])
        if p[1] != "pci":
            return None
        if n == 2:
            return Dir(["devices", "drivers", "drivers_autoprobe", "drivers_probe", "rescan"])
        if p[2] == "devices":
            if n == 3:
                return Dir(sorted(list(m.bridges) + list(m.devices)))
            if n == 4 and (p[3] in m.devices or p[3] in m.bridges):
                return Link("../../../" + "/".join(_real(m, p[3])))
            return None
        if p[2] == "drivers_probe" and n == 3:
            return Attr(None, lambda v: _drivers_probe(m, v))
        if p[2] == "drivers_autoprobe" and n == 3:
            return Attr(lambda: "1\n")
        if p[2] == "rescan" and n == 3:
            return Attr(None, lambda v: None)
        if p[2] == "drivers":
            return _lookup_driver(m, p[3:])
        return None
    if p[0] == "devices":
        if n == 1:
            return Dir(["pci0000:00", "system", "virtual"])
        if not p[1].startswith("pci") or n < 2:
            return None
        dom = p[1][3:7]
        if n == 2:
            return Dir(_children(m, None, dom))
        # walk the chain of addresses
        i = 2
        owner: Bridge | None = None
        while i < n:
            comp = p[i]
            if comp in m.devices or comp in m.bridges:
                addr = comp  # already canonical: the common case, no parsing
            else:
                try:
                    addr = norm_addr(comp)
                except ValueError:
                    break
            if addr != comp or _parent_of(m, addr) != (owner.addr if owner else None):
                return None
            if addr in m.bridges:
                owner = m.bridges[addr]
                i += 1
                continue
            if addr not in m.devices:
                return None
            dev = m.devices[addr]
            depth = i + 1  # components under /sys of the device directory
            if i + 1 == n:
                return Dir(functools.partial(_device_listing, m, dev))
            rest = p[i + 1 :]
            if rest[0] == "vfio-dev":
                if dev.driver != "vfio-pci" or not m.cdev:
                    return None
                if len(rest) == 1:
                    return Dir([f"vfio{dev.minor}"])
                if rest[1] != f"vfio{dev.minor}":
                    return None
                if len(rest) == 2:
                    return Dir(["dev", "device"])
                if len(rest) == 3 and rest[2] == "dev":
                    return Attr(_const(f"511:{dev.minor}\n"))
                if len(rest) == 3 and rest[2] == "device":
                    return Link("../../../" + dev.addr)
                return None
            if len(rest) == 1:
                return _device_entry(m, dev, rest[0], depth)
            if rest[0] in ("net", "nvme"):
                from mock_vfio.hostfs import lookup_below

                return lookup_below(m, dev, rest)
            return None
        if i == n and owner is not None:
            return Dir(
                [
                    "vendor",
                    "device",
                    "class",
                    "secondary_bus_number",
                    "subordinate_bus_number",
                    "current_link_speed",
                    "numa_node",
                    "reset_method",
                    "iommu_group",
                    "driver",
                    *_children(m, owner, dom),
                ]
            )
        if owner is not None and i == n - 1:
            return _bridge_entry(m, owner, p[i], i + 1)
        return None
    if p[0] == "kernel":
        if n == 1:
            return Dir(["iommu_groups"])
        if p[1] != "iommu_groups":
            return None
        if n == 2:
            return Dir(lambda: [str(g) for g in sorted(_group_ids(m))])
        members = _group_members(m, int(p[2])) if p[2].isdigit() else []
        if not members:
            return None
        if n == 3:
            return Dir(["devices", "reserved_regions", "type"])
        if n == 4 and p[3] == "type":
            return Attr(lambda: "DMA-FQ\n")
        if n == 4 and p[3] == "reserved_regions":
            return Attr(lambda: "0x00000000fee00000 0x00000000feefffff msi\n")
        if p[3] != "devices":
            return None
        if n == 4:
            return Dir(sorted(members))
        if n == 5 and p[4] in members:
            return Link("../../../../" + "/".join(_real(m, p[4])))
        return None
    if p[0] == "module":
        mods = {
            "vfio": {"enable_unsafe_noiommu_mode": "N"},
            "vfio_pci": {
                "disable_idle_d3": "N",
                "enable_sriov": "Y" if m.host.vfio_enable_sriov else "N",
            },
            "vfio_iommu_type1": {"dma_entry_limit": "65535", "allow_unsafe_interrupts": "N"},
        }
        if m.iommufd:
            mods["iommufd"] = {}
        if n == 1:
            return Dir(sorted(mods))
        if p[1] not in mods:
            return None
        if n == 2:
            return Dir(["parameters"])
        if p[2] != "parameters":
            return None
        if n == 3:
            return Dir(sorted(mods[p[1]]))
        if n == 4 and p[3] in mods[p[1]]:
            val = mods[p[1]][p[3]]
            if (p[1], p[3]) == ("vfio_pci", "enable_sriov"):  # module_param(..., 0644)
                return Attr(lambda: val + "\n", lambda v: _write_enable_sriov(m, v))
            return Attr(lambda: val + "\n")
    return None


def _group_members(m: Machine, gid: int) -> list[str]:
    """The addresses in group ``gid`` (one group: opening a device asks this for its own)."""
    members = [b.addr for b in m.bridges.values() if b.group == gid]
    g = m.groups.get(gid)
    if g is not None:
        members += [d.addr for d in list(g.devices)]
    return members


def _group_ids(m: Machine) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for b in m.bridges.values():
        out.setdefault(b.group, []).append(b.addr)
    for d in list(m.devices.values()):
        out.setdefault(d.group_id, []).append(d.addr)
    return out


def _lookup_driver(m: Machine, p: list[str]) -> Node | None:
    n = len(p)
    drivers = m.known_drivers()
    if n == 0:
        return Dir(drivers)
    drv = p[0]
    if drv not in drivers:
        return None
    if drv == "pcieport":
        bound = list(m.bridges)
    else:
        bound = [d.addr for d in list(m.devices.values()) if d.driver == drv]
    if n == 1:
        return Dir(["bind", "new_id", "remove_id", "uevent", "unbind", *sorted(bound)])
    if n == 2:
        name = p[1]
        if name == "bind":
            return Attr(None, lambda v: _bind(m, drv, v))
        if name == "unbind":
            return Attr(None, lambda v: _unbind(m, drv, v))
        if name == "new_id":
            return Attr(None, lambda v: _new_id(m, drv, v))
        if name == "remove_id":
            return Attr(None, lambda v: _remove_id(m, drv, v))
        if name == "uevent":
            return Attr(None, lambda v: None)
        if name in bound:
            return Link("../../../../" + "/".join(_real(m, name)))
    return None


def _dev_arg(m: Machine, v: str) -> Device:
    try:
        addr = norm_addr(v.strip())
    except ValueError as e:
        raise oserror(errno.ENODEV, v.strip()) from e
    dev = m.devices.get(addr)
    if dev is None:
        raise oserror(errno.ENODEV, addr)
    return dev


def _matches(m: Machine, dev: Device, drv: str) -> bool:
    if dev.driver_override is not None:
        return dev.driver_override == drv
    if drv == "vfio-pci":
        return (dev.spec.vendor, dev.spec.device) in m.vfio_pci_ids
    return drv == dev.spec.native_driver


def _bind(m: Machine, drv: str, v: str) -> None:
    dev = _dev_arg(m, v)
    # bind_store: only an unbound device the driver matches, else ENODEV
    if dev.driver is not None or not _matches(m, dev, drv):
        raise oserror(errno.ENODEV, f"{dev.addr} does not match {drv}")
    m.bind(dev, drv)


def _unbind(m: Machine, drv: str, v: str) -> None:
    dev = _dev_arg(m, v)
    if dev.driver != drv:
        raise oserror(errno.ENODEV, f"{dev.addr} is not bound to {drv}")
    m.unbind(dev)


def _new_id(m: Machine, drv: str, v: str) -> None:
    fields = v.split()
    if len(fields) < 2 or drv != "vfio-pci":
        raise oserror(errno.EINVAL, "new_id")
    try:
        ident = (int(fields[0], 16), int(fields[1], 16))
    except ValueError as e:
        raise oserror(errno.EINVAL, "new_id") from e
    m.vfio_pci_ids.add(ident)
    for dev in list(m.devices.values()):
        if dev.driver is None and (dev.spec.vendor, dev.spec.device) == ident:
            m.probe(dev)


def _remove_id(m: Machine, drv: str, v: str) -> None:
    fields = v.split()
    try:
        m.vfio_pci_ids.discard((int(fields[0], 16), int(fields[1], 16)))
    except (ValueError, IndexError) as e:
        raise oserror(errno.EINVAL, "remove_id") from e


def _drivers_probe(m: Machine, v: str) -> None:
    m.probe(_dev_arg(m, v))


def _lookup_dev(m: Machine, p: list[str]) -> Node | None:
    n = len(p)
    if n == 0:
        return Dir(["iommu", "vfio"] if m.iommufd else ["vfio"])
    if p[0] == "iommu" and n == 1 and m.iommufd:
        return DevNode(lambda proc: proc.open_iommufd())
    if p[0] != "vfio":
        return None
    # Only listings walk every group or device; opening one node looks up just that one
    # (a 2048-VF machine opens 2048 groups).
    if n == 1:

        def listing() -> list[str]:
            groups = sorted(g for g in list(m.groups) if m.group_has_vfio(g))
            return ["vfio", *(str(g) for g in groups), *(["devices"] if m.cdev else [])]

        return Dir(listing)
    if n == 2 and p[1] == "vfio":
        return DevNode(lambda proc: proc.open_container())
    if n == 2 and p[1].isdigit() and m.group_has_vfio(int(p[1])):
        gid = int(p[1])
        return DevNode(lambda proc: proc.open_group(gid))
    if p[1] == "devices" and m.cdev:
        if n == 2:
            return Dir(
                lambda: [
                    f"vfio{i}"
                    for i in sorted(
                        d.minor for d in list(m.devices.values()) if d.driver == "vfio-pci"
                    )
                ]
            )
        if n == 3 and p[2].startswith("vfio") and p[2][4:].isdigit():
            minor = int(p[2][4:])
            if any(d.minor == minor and d.driver == "vfio-pci" for d in list(m.devices.values())):
                return DevNode(lambda proc: proc.open_cdev(minor))
    return None


def _lookup_proc(proc: SimProcess, p: list[str]) -> Node | None:
    m = proc.machine
    n = len(p)
    if n == 0:
        return Dir(lambda: ["self", "sys", *(str(x.pid) for x in m.processes)])
    if p[0] == "sys":
        # uname -r of the modelled kernel, as distributions number theirs
        tree = {("sys",): ["kernel"], ("sys", "kernel"): ["osrelease"]}
        if tuple(p) in tree:
            return Dir(tree[tuple(p)])
        if p == ["sys", "kernel", "osrelease"]:
            major, minor = m.kernel_version
            return Attr(_const(f"{major}.{minor}.0-mock\n"))
        return None
    if p[0] in ("mounts", "swaps", "net"):
        from mock_vfio.hostfs import lookup_proc

        return lookup_proc(m, p)
    if p[0] == "self":
        return Link(str(proc.pid)) if n == 1 else None
    if not p[0].isdigit():
        return None
    try:
        target = m.process(int(p[0]))
    except OSError:
        return None
    if not target.alive:
        return None
    if n == 1:
        return Dir(["comm", "fd", "fdinfo", "status"])
    if n == 2 and p[1] == "comm":
        return Attr(lambda: target.name + "\n")
    if n == 2 and p[1] == "status":
        return Attr(lambda: f"Name:\t{target.name}\nPid:\t{target.pid}\n")
    table = target.fd_table()
    if p[1] in ("fd", "fdinfo"):
        if n == 2:
            return Dir(lambda: [str(fd) for fd in sorted(table)])
        if n == 3 and p[2].isdigit() and int(p[2]) in table:
            f = table[int(p[2])]
            if p[1] == "fd":
                return Link(f.link())
            return Attr(lambda: f"pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1\n{f.fdinfo()}")
    return None


# --- resolution ----------------------------------------------------------------------------


def _split(path: str) -> list[str]:
    out: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if out:
                out.pop()
            continue
        out.append(comp)
    return out


def resolve(proc: SimProcess, path: str, follow_last: bool = True) -> Node:
    if not path.startswith("/"):
        raise oserror(errno.ENOENT, path)
    parts = _split(path)
    for _ in range(40):
        # The lookups serve no path through a symlink, so a whole path they answer
        # needs no walk: most paths asked for are canonical, and the walk below
        # looks up every prefix from the root.
        node = _lookup(proc, parts)
        if node is None:
            parts = _through_link(proc, parts, path)
            continue
        if isinstance(node, Link) and follow_last:
            parts = _follow(parts, len(parts), node)
            continue
        return node
    raise oserror(errno.ELOOP, path)


def _follow(parts: list[str], i: int, link: Link) -> list[str]:
    """``parts`` with its first ``i`` components replaced by where ``link`` (the i-th) points."""
    base = [] if link.target.startswith("/") else parts[: i - 1]
    return _split("/" + "/".join(base) + "/" + link.target) + parts[i:]


def _through_link(proc: SimProcess, parts: list[str], path: str) -> list[str]:
    """The path with its first symlink followed; ENOENT/ENOTDIR when there is none."""
    for i in range(1, len(parts)):
        node = _lookup(proc, parts[:i])
        if node is None:
            break
        if isinstance(node, Link):
            return _follow(parts, i, node)
        if not isinstance(node, Dir):
            raise oserror(errno.ENOTDIR, path)
    raise oserror(errno.ENOENT, path)


def read_text(proc: SimProcess, path: str) -> str:
    node = resolve(proc, path)
    if isinstance(node, Dir):
        raise oserror(errno.EISDIR, path)
    if isinstance(node, DevNode):
        raise oserror(errno.EINVAL, f"{path} is a device node")
    if not isinstance(node, Attr) or node.read is None:
        raise oserror(errno.EACCES, path)
    text = node.read()
    if node.binary:
        # what LinuxKernel.read_text (ascii, errors=replace) makes of binary bytes
        return text.encode("latin-1").decode("ascii", errors="replace")
    return text


def write_text(proc: SimProcess, path: str, data: str) -> None:
    node = resolve(proc, path)
    if isinstance(node, Dir):
        raise oserror(errno.EISDIR, path)
    if not isinstance(node, Attr) or node.write is None:
        raise oserror(errno.EACCES, path)
    node.write(data)


def listdir(proc: SimProcess, path: str) -> list[str]:
    node = resolve(proc, path)
    if not isinstance(node, Dir):
        raise oserror(errno.ENOTDIR, path)
    return list(node.entries)


def readlink(proc: SimProcess, path: str) -> str:
    node = resolve(proc, path, follow_last=False)
    if not isinstance(node, Link):
        raise oserror(errno.EINVAL, f"{path} is not a symlink")
    return node.target


def exists(proc: SimProcess, path: str) -> bool:
    try:
        resolve(proc, path)
    except OSError:
        return False
    return True


def access(proc: SimProcess, path: str, mode: int) -> bool:
    try:
        node = resolve(proc, path)
    except OSError:
        return False
    if isinstance(node, Attr):
        if mode & os.R_OK and node.read is None:
            return False
        if mode & os.W_OK and node.write is None:
            return False
        if mode & os.X_OK:
            return False
    return True


class _TextFile(File):
    kind = "sysfs"

    def __init__(self, machine: Machine, path: str, attr: Attr) -> None:
        super().__init__(machine)
        self.path = path
        self.attr = attr

    def link(self) -> str:
        return self.path

    def pread(self, proc: SimProcess, size: int, offset: int) -> bytes:
        if self.attr.read is None:
            raise oserror(errno.EACCES, self.path)
        return self.attr.read().encode("latin-1")[offset : offset + size]

    def pwrite(self, proc: SimProcess, data: bytes, offset: int) -> int:
        if self.attr.write is None:
            raise oserror(errno.EACCES, self.path)
        self.attr.write(data.decode("latin-1"))
        return len(data)


def open_node(proc: SimProcess, path: str, flags: int) -> File:
    node = resolve(proc, path)
    if isinstance(node, DevNode):
        return node.opener(proc)
    if isinstance(node, Dir):
        raise oserror(errno.EISDIR, path)
    if isinstance(node, Attr):
        if path.endswith("/config"):
            parts = _split(path)
            for comp in reversed(parts):
                if comp in proc.machine.devices:
                    return proc.open_config(proc.machine.devices[comp], path)
        return _TextFile(proc.machine, path, node)
    raise oserror(errno.ENOENT, path)
