"""The files of host drivers' objects: /sys/class/{net,tty,graphics}, /sys/block, and
/proc/mounts, /proc/swaps, /proc/net/route and /proc/net/ipv6_route.

Link targets follow the kernel's layout (``/sys/class/net/IF`` ->
``../../devices/pci0000:00/<bridges>/<addr>/net/IF``), so a reader finds the PCI
device an object belongs to as a component of the target, as on a real host.
"""

from __future__ import annotations

import ipaddress

from mock_vfio.hostdrv import IFF_UP, NetState
from mock_vfio.kernfs import Attr, Dir, Link, Node
from mock_vfio.machine import Machine
from mock_vfio.pci import Device
from mock_vfio.sysfs import _real

_VIRTUAL_NET = ("lo",)


def _below(m: Machine, dev: Device, up: int, *tail: str) -> Link:
    return Link("../" * up + "/".join([*_real(m, dev.addr), *tail]))


def lookup_class(m: Machine, p: list[str]) -> Node | None:
    """``p`` is the path below /sys/class."""
    n = len(p)
    if n == 0:
        return Dir(["graphics", "net", "tty"])
    host = m.host
    if p[0] == "net":
        devs = host.netdevs()
        if n == 1:
            return Dir(sorted([*_VIRTUAL_NET, *devs]))
        name = p[1]
        if name in _VIRTUAL_NET:
            if n == 2:
                return Link(f"../../devices/virtual/net/{name}")
            return _net_attr(p[2], NetState(up=True)) if n == 3 else None
        dev = devs.get(name)
        if dev is None:
            return None
        if n == 2:
            return _below(m, dev, 2, "net", name)
        if n == 3:
            return _net_attr(p[2], host.net_state(dev.addr))
        return None
    if p[0] == "graphics":
        fbs = host.framebuffers()
        if n == 1:
            return Dir(sorted(fbs))
        dev = fbs.get(p[1])
        if dev is None or n > 2:
            return None
        return _below(m, dev, 2, "graphics", p[1])
    if p[0] == "tty":
        ttys = ["console", "tty0", "ttyS0", *host.serial]
        if n == 1:
            return Dir(sorted(ttys))
        name = p[1]
        if name == "console" and n == 3 and p[2] == "active":
            return Attr(lambda: " ".join(host.console) + "\n")
        if n != 2 or name not in ttys:
            return None
        if name in host.serial and host.serial[name] in m.devices:
            return _below(m, m.devices[host.serial[name]], 2, "tty", name)
        if name == "ttyS0":
            return Link("../../devices/platform/serial8250/tty/ttyS0")
        return Link(f"../../devices/virtual/tty/{name}")
    return None


def _net_attr(name: str, st: NetState) -> Node | None:
    if name == "operstate":
        return Attr(lambda: ("up" if st.up and st.carrier else "down") + "\n")
    if name == "flags":
        return Attr(lambda: f"{0x1002 | (IFF_UP if st.up else 0):#x}\n")
    return None


def lookup_block(m: Machine, p: list[str]) -> Node | None:
    """``p`` is the path below /sys/block."""
    disks = m.host.disk_devices()
    if not p:
        return Dir(sorted(disks))
    dev = disks.get(p[0])
    if dev is None:
        return None
    if len(p) == 1:
        ctrl = f"nvme{p[0][4:].split('n')[0]}"
        return _below(m, dev, 1, "nvme", ctrl, p[0])
    return _disk_node(m, dev, p[0], p[1:])


def lookup_below(m: Machine, dev: Device, rest: list[str]) -> Node | None:
    """What a host driver made below the device's directory: ``net/IF``,
    ``nvme/nvmeN/DISK``; ``rest`` is the path below the device."""
    if rest[0] == "net" and len(rest) >= 2 and m.host.netdevs().get(rest[1]) is dev:
        if len(rest) == 2:
            return Dir(["flags", "operstate"])
        return _net_attr(rest[2], m.host.net_state(dev.addr)) if len(rest) == 3 else None
    if rest[0] == "nvme" and len(rest) >= 3 and m.host.disk_devices().get(rest[2]) is dev:
        return _disk_node(m, dev, rest[2], rest[3:])
    return None


def _disk_node(m: Machine, dev: Device, disk: str, rest: list[str]) -> Node | None:
    st = m.host.disk_state(dev.addr)
    parts = [f"{disk}p{i}" for i in range(1, st.partitions + 1)]
    if not rest:
        return Dir(["device", "holders", "size", *parts])
    if rest[0] in parts:
        name, rest = rest[0], rest[1:]
        if not rest:
            return Dir(["holders", "partition", "size"])
    else:
        name = disk
    if rest == ["holders"]:
        return Dir(sorted(st.holders.get(name, [])))
    return None


def _route_hex(dest: str) -> tuple[str, str]:
    net = ipaddress.ip_network(dest, strict=False)
    as_le = int.from_bytes(net.network_address.packed, "little")
    mask = int.from_bytes(net.netmask.packed, "little")
    return f"{as_le:08X}", f"{mask:08X}"


def lookup_proc(m: Machine, p: list[str]) -> Node | None:
    """``p`` is the path below /proc (mounts, swaps, net/route, net/ipv6_route)."""
    host = m.host
    if p == ["mounts"]:

        def mounts() -> str:
            lines = [
                "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0",
                "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0",
            ]
            for dev in host.disk_devices().values():
                for name, where in sorted(host.disk_state(dev.addr).mounts.items()):
                    lines.append(f"/dev/{name} {where} ext4 rw,relatime 0 0")
            return "\n".join(lines) + "\n"

        return Attr(mounts)
    if p == ["swaps"]:

        def swaps() -> str:
            lines = ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"]
            for dev in host.disk_devices().values():
                for name in host.disk_state(dev.addr).swap:
                    lines.append(f"/dev/{name}\tpartition\t8388604\t\t0\t\t-2")
            return "\n".join(lines) + "\n"

        return Attr(swaps)
    if p == ["net"]:
        return Dir(["ipv6_route", "route"])
    if p == ["net", "route"]:

        def route() -> str:
            lines = [
                "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
            ]
            for name, dev in sorted(host.netdevs().items()):
                st = host.net_state(dev.addr)
                for dest in st.routes:
                    d, mask = _route_hex(dest)
                    lines.append(f"{name}\t{d}\t00000000\t0001\t0\t0\t100\t{mask}\t0\t0\t0")
            return "\n".join(lines) + "\n"

        return Attr(route)
    if p == ["net", "ipv6_route"]:

        def route6() -> str:
            lines = []
            for name, dev in sorted(host.netdevs().items()):
                st = host.net_state(dev.addr)
                for dest in st.routes6:
                    net = ipaddress.ip_network(dest, strict=False)
                    hexa = net.network_address.packed.hex()
                    lines.append(
                        f"{hexa} {net.prefixlen:02x} {'0' * 32} 00 {'0' * 32} "
                        f"00000100 00000001 00000000 00000001 {name:>8}"
                    )
            return "".join(line + "\n" for line in lines)

        return Attr(route6)
    return None


__all__ = ["lookup_below", "lookup_block", "lookup_class", "lookup_proc"]
