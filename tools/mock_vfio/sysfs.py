"""``/sys`` as a simulated process sees it, served from the model: ``/sys/bus/pci`` with its
devices and drivers (drivers/pci/pci-driver.c, drivers/base/bus.c), ``/sys/devices``,
``/sys/kernel/iommu_groups`` and ``/sys/module``.

Paths and link targets follow the real kernel's layout: ``/sys/bus/pci/devices/X``
links to ``../../../devices/pci0000:00/<bridges>/X``; ``iommu_group`` and
``driver`` are relative links.  A device's own attributes are in :mod:`pci_sysfs`.
"""

from __future__ import annotations

import errno
import functools
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mock_vfio.kernfs import Attr, Dir, Link, Node, const
from mock_vfio.pci_driver import bind, known_drivers, probe, unbind
from mock_vfio.pci_sysfs import bridge_entry, device_entry, device_listing, write_enable_sriov
from mock_vfio.topology import norm_addr, split_addr
from mock_vfio.trace import oserror
from mock_vfio.version import VFIO_PCI_CORE

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Bridge, Device


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


def lookup(m: Machine, p: list[str]) -> Node | None:
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
                return Dir(lambda: sorted([*m.bridges, *m.devices]))
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
                return Dir(functools.partial(device_listing, m, dev))
            rest = p[i + 1 :]
            if rest[0] == "vfio-dev":
                if not dev.vfio_pci or not m.cdev:
                    return None
                if len(rest) == 1:
                    return Dir([f"vfio{dev.minor}"])
                if rest[1] != f"vfio{dev.minor}":
                    return None
                if len(rest) == 2:
                    return Dir(["dev", "device"])
                if len(rest) == 3 and rest[2] == "dev":
                    return Attr(const(f"511:{dev.minor}\n"))
                if len(rest) == 3 and rest[2] == "device":
                    return Link("../../../" + dev.addr)
                return None
            if len(rest) == 1:
                return device_entry(m, dev, rest[0], depth)
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
            return bridge_entry(m, owner, p[i], i + 1)
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
        if m.kernel_version >= VFIO_PCI_CORE:
            mods["vfio_pci_core"] = {"disable_idle_d3": "N"}
        if n == 1:
            return Dir(sorted(mods))
        if p[1] not in mods:
            return None
        if p[1] == "vfio_pci_core" and n >= 3 and p[2] == "holders":
            # the modules that use it: vfio_pci and every variant driver loaded
            return Dir(_core_holders(m)) if n == 3 else None
        if n == 2:
            return Dir(["holders", "parameters"] if p[1] == "vfio_pci_core" else ["parameters"])
        if p[2] != "parameters":
            return None
        if n == 3:
            return Dir(sorted(mods[p[1]]))
        if n == 4 and p[3] in mods[p[1]]:
            val = mods[p[1]][p[3]]
            if (p[1], p[3]) == ("vfio_pci", "enable_sriov"):  # module_param(..., 0644)
                return Attr(lambda: val + "\n", lambda v: write_enable_sriov(m, v))
            return Attr(lambda: val + "\n")
    return None


def _core_holders(m: Machine) -> list[str]:
    names = {"vfio_pci"}
    for d in list(m.devices.values()):
        for drv in (d.driver, d.spec.driver):
            if drv is not None and drv.endswith("_vfio_pci"):
                names.add(drv)  # a variant driver's module bears its name
    return sorted(names)


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
    drivers = known_drivers(m)
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
    bind(m, dev, drv)


def _unbind(m: Machine, drv: str, v: str) -> None:
    dev = _dev_arg(m, v)
    if dev.driver != drv:
        raise oserror(errno.ENODEV, f"{dev.addr} is not bound to {drv}")
    unbind(m, dev)


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
            probe(m, dev)


def _remove_id(m: Machine, drv: str, v: str) -> None:
    fields = v.split()
    try:
        m.vfio_pci_ids.discard((int(fields[0], 16), int(fields[1], 16)))
    except (ValueError, IndexError) as e:
        raise oserror(errno.EINVAL, "remove_id") from e


def _drivers_probe(m: Machine, v: str) -> None:
    probe(m, _dev_arg(m, v))
