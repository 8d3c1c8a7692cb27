"""Whether the host is using a PCI device: network interfaces, disks, the console.

Unbinding a device from its host driver tears down what the driver made: a network
interface (and the host's connection through it), a disk (and the file systems on it),
the console.  This module reads, through the :class:`~vfiopy.kernel.Kernel`, what the
kernel shows of each and says which requested device each belongs to:

* network: ``/sys/class/net/IF`` links below the PCI device that carries it
  (``../../devices/pci0000:00/0000:00:02.0/0000:01:00.0/net/enp1s0``); an interface is
  in use when it is up (``operstate`` ``up``, or ``IFF_UP`` in ``flags``: some drivers
  report ``unknown``) or when it carries routes (``/proc/net/route``,
  ``/proc/net/ipv6_route``);
* disks: ``/sys/block/DISK`` links below its controller's PCI device; a disk is in use
  when it or one of its partitions (the ``DISKpN`` directories) is mounted
  (``/proc/mounts``), is swap (``/proc/swaps``) or has holders (device-mapper, md, bcache:
  ``holders/``);
* the console: a tty in ``/sys/class/tty/console/active`` whose link passes through the
  device (a PCI serial port), or, when the VT console is active (``tty0``, ``ttyN``), a
  framebuffer of the device (``/sys/class/graphics/fbN``) it draws on.

The snapshot is read once per request (a few dozen small files), then asked per device.
Files a kernel lacks (no IPv6, no framebuffers) read as nothing there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from vfiopy.kernel import Kernel
from vfiopy.sysfs import PciAddress

IFF_UP = 0x1


def _components(kernel: Kernel, path: str) -> set[str]:
    """The components of the link at ``path`` (a class or block entry), empty when absent."""
    try:
        return {c for c in kernel.readlink(path).split("/") if c}
    except OSError:
        return set()


def _listdir(kernel: Kernel, path: str) -> list[str]:
    try:
        return kernel.listdir(path)
    except OSError:
        return []


def _read(kernel: Kernel, path: str) -> str:
    try:
        return kernel.read_text(path)
    except OSError:
        return ""


@dataclass
class _Iface:
    name: str
    owners: set[str]
    up: bool
    why_up: str
    routes: list[str] = field(default_factory=list)


@dataclass
class _Disk:
    name: str
    owners: set[str]
    uses: list[str]


@dataclass
class HostUse:
    """What the host uses, as read at one moment: ``reasons(addr)`` per device."""

    ifaces: list[_Iface]
    disks: list[_Disk]
    console: list[tuple[str, set[str]]]  # (what, link components)

    @classmethod
    def read(cls, kernel: Kernel, root: str = "/sys") -> HostUse:
        return cls(_ifaces(kernel, root), _disks(kernel, root), _console(kernel, root))

    def reasons(self, addr: PciAddress | str) -> list[str]:
        """Why unbinding ``addr`` from its host driver would hurt the host (empty: it would not)."""
        a = str(PciAddress.of(addr))
        out: list[str] = []
        for i in self.ifaces:
            if a not in i.owners:
                continue
            if i.up:
                out.append(f"network interface {i.name} is up ({i.why_up})")
            if i.routes:
                shown = ", ".join(i.routes[:3]) + (", ..." if len(i.routes) > 3 else "")
                out.append(f"network interface {i.name} carries routes ({shown})")
        for d in self.disks:
            if a in d.owners:
                out += [f"disk {d.name}: {u}" for u in d.uses]
        for what, owners in self.console:
            if a in owners:
                out.append(what)
        return out


def _ifaces(kernel: Kernel, root: str) -> list[_Iface]:
    names = _listdir(kernel, f"{root}/class/net")
    routes = _routes(kernel)
    out = []
    for name in sorted(names):
        owners = _components(kernel, f"{root}/class/net/{name}")
        if "virtual" in owners:
            continue
        state = _read(kernel, f"{root}/class/net/{name}/operstate").strip()
        try:
            flags = int(_read(kernel, f"{root}/class/net/{name}/flags").strip() or "0", 16)
        except ValueError:
            flags = 0
        why = []
        if state == "up":
            why.append("operstate up")
        if flags & IFF_UP:
            why.append("IFF_UP set")
        out.append(_Iface(name, owners, bool(why), ", ".join(why), routes.get(name, [])))
    return out


def _routes(kernel: Kernel) -> dict[str, list[str]]:
    """Interface -> its routes' destinations, IPv4 (/proc/net/route) then IPv6."""
    out: dict[str, list[str]] = {}
    for line in _read(kernel, "/proc/net/route").splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            dest = ipaddress.IPv4Address(int(f[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(f[7], 16).to_bytes(4, "little"))
            net = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        except ValueError:
            continue
        out.setdefault(f[0], []).append(str(net))
    for line in _read(kernel, "/proc/net/ipv6_route").splitlines():
        f = line.split()
        if len(f) < 10 or f[9] == "lo":
            continue
        try:
            net6 = ipaddress.IPv6Network(
                f"{ipaddress.IPv6Address(bytes.fromhex(f[0]))}/{int(f[1], 16)}", strict=False
            )
        except ValueError:
            continue
        out.setdefault(f[9], []).append(str(net6))
    return out


def _mounts(kernel: Kernel) -> dict[str, str]:
    """Block device name -> mount point, for /dev/NAME sources."""
    out: dict[str, str] = {}
    for line in _read(kernel, "/proc/mounts").splitlines():
        f = line.split()
        if len(f) >= 2 and f[0].startswith("/dev/"):
            out.setdefault(f[0].rsplit("/", 1)[-1], f[1])
    return out


def _swaps(kernel: Kernel) -> set[str]:
    names = set()
    for line in _read(kernel, "/proc/swaps").splitlines()[1:]:
        f = line.split()
        if f and f[0].startswith("/dev/"):
            names.add(f[0].rsplit("/", 1)[-1])
    return names


def _disks(kernel: Kernel, root: str) -> list[_Disk]:
    disks = _listdir(kernel, f"{root}/block")
    if not disks:
        return []
    mounts = _mounts(kernel)
    swaps = _swaps(kernel)
    out = []
    for disk in sorted(disks):
        owners = _components(kernel, f"{root}/block/{disk}")
        if "virtual" in owners:
            continue
        parts = [p for p in _listdir(kernel, f"{root}/block/{disk}") if p.startswith(disk)]
        uses = []
        for name in [disk, *sorted(parts)]:
            sub = f"{root}/block/{disk}" + ("" if name == disk else f"/{name}")
            if name in mounts:
                uses.append(f"{name} is mounted on {mounts[name]}")
            if name in swaps:
                uses.append(f"{name} is in use as swap")
            holders = _listdir(kernel, f"{sub}/holders")
            if holders:
                uses.append(f"{name} is held by {', '.join(sorted(holders))}")
        if uses:
            out.append(_Disk(disk, owners, uses))
    return out


def _is_vt(tty: str) -> bool:
    return tty.startswith("tty") and tty[3:].isdigit()


def _console(kernel: Kernel, root: str) -> list[tuple[str, set[str]]]:
    active = _read(kernel, f"{root}/class/tty/console/active").split()
    out: list[tuple[str, set[str]]] = []
    for tty in active:
        if _is_vt(tty):
            for fb in sorted(_listdir(kernel, f"{root}/class/graphics")):
                owners = _components(kernel, f"{root}/class/graphics/{fb}")
                out.append((f"its framebuffer {fb} shows the console ({tty})", owners))
        else:
            owners = _components(kernel, f"{root}/class/tty/{tty}")
            out.append((f"it serves the console ({tty})", owners))
    return out


def in_use(
    kernel: Kernel, addresses: Iterable[PciAddress | str], root: str = "/sys"
) -> dict[str, list[str]]:
    """Each address the host uses, with the reasons (addresses not in use are left out)."""
    use = HostUse.read(kernel, root)
    out: dict[str, list[str]] = {}
    for a in addresses:
        why = use.reasons(a)
        if why:
            out[str(PciAddress.of(a))] = why
    return out


__all__ = ["HostUse", "in_use"]
