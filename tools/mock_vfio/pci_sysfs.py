"""A PCI function's and a bridge's sysfs attributes (drivers/pci/pci-sysfs.c, iov.c's
``sriov_*``), the ``vfio_pci`` module parameters a write can change, the ``config``
attribute opened for ``pread`` and ``resourceN_wc`` opened for ``mmap``."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from mock_vfio.file import File
from mock_vfio.kernfs import Attr, DevNode, Dir, Link, Node, up
from mock_vfio.pci_driver import remove_device
from mock_vfio.pci_reset import default_reset_methods, function_reset, method_works
from mock_vfio.trace import oserror
from mock_vfio.uapi import PAGE
from mock_vfio.version import RESET_METHOD_ATTR

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Bridge, Device
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
        dev.reset_methods = list(default_reset_methods(dev))
        return
    names = val.split()
    for n in names:
        if n not in _ALL_METHODS:
            raise oserror(errno.EINVAL, f"unknown reset method {n!r}")
        if not method_works(dev, n) and n not in default_reset_methods(dev):
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


def write_enable_sriov(m: Machine, data: str) -> None:
    val = data.strip()
    if val not in ("Y", "N", "1", "0", "y", "n"):
        raise oserror(errno.EINVAL, "enable_sriov")
    m.host.vfio_enable_sriov = val in ("Y", "1", "y")


def _write_reset(m: Machine, dev: Device, data: str) -> None:
    if data.strip() != "1":
        raise oserror(errno.EINVAL, "reset")
    if not function_reset(m, dev, "sysfs", wait=True):  # reset_store: pci_reset_function
        raise oserror(errno.ENOTTY, f"{dev.addr} has no reset method")


def _write_remove(m: Machine, dev: Device, data: str) -> None:
    if data.strip() == "1":
        remove_device(m, dev.addr)


# Read-only attributes of a function, by name: a table, not closures made at every lookup
# (a path walk looks an attribute up far more often than it reads it).
_SIMPLE: dict[str, Callable[[Device], str]] = {
    "vendor": lambda d: _hex(d.spec.vendor, 4),
    "device": lambda d: _hex(d.spec.device, 4),
    "class": lambda d: _hex(d.spec.class_code, 6),
    "subsystem_vendor": lambda d: _hex(d.spec.subsystem_vendor, 4),
    "subsystem_device": lambda d: _hex(d.spec.subsystem_device, 4),
    "revision": lambda d: _hex(d.spec.revision, 2),
    "resource": _resource,
    "numa_node": lambda d: "-1\n",
    "enable": lambda d: "1\n" if d.open_count or not (d.driver is None or d.vfio_pci) else "0\n",
    "irq": lambda d: "16\n" if d.spec.interrupt_pin and not d.is_vf else "0\n",
    "local_cpulist": lambda d: "0-3\n",
    "power_state": lambda d: "D3hot\n" if d.low_power else "D0\n",
    "current_link_speed": lambda d: _SPEED_NAMES.get(d.spec.link_speed, "Unknown") + "\n",
    "max_link_speed": lambda d: _SPEED_NAMES.get(d.spec.link_speed, "Unknown") + "\n",
    "current_link_width": lambda d: f"{d.spec.link_width}\n",
    "max_link_width": lambda d: f"{d.spec.link_width}\n",
}


def device_entry(m: Machine, dev: Device, name: str, depth: int) -> Node | None:
    s = dev.spec
    read = _SIMPLE.get(name)
    if read is not None:
        if not s.pcie and "link" in name:
            return None
        return Attr(functools.partial(read, dev))
    if name == "config":
        return Attr(lambda: dev.config.read(0, s.cfg_size).decode("latin-1"), binary=True)
    if name.startswith("resource") and name.endswith("_wc"):
        # pci_create_resource_files: resourceN_wc only for prefetchable memory BARs
        num = name[len("resource") : -len("_wc")]
        bar = dev.bar(int(num)) if num in ("0", "1", "2", "3", "4", "5") else None
        if bar is None or bar.is_io or not bar.prefetch:
            return None
        from mock_vfio.sysfs import device_syspath

        path = f"{device_syspath(m, dev)}/{name}"
        return DevNode(lambda proc: SysfsResourceFile(m, dev, bar.index, path))
    if name == "driver_override":
        return Attr(
            lambda: (dev.driver_override or "(null)") + "\n", lambda v: _write_override(dev, v)
        )
    if name == "reset_method":
        if not dev.reset_methods or m.kernel_version < RESET_METHOD_ATTR:
            # hidden when no reset method is enabled; absent before 5.15 (fixed order)
            return None
        return Attr(
            lambda: " ".join(dev.reset_methods) + "\n", lambda v: _write_reset_method(dev, v)
        )
    if name == "reset":
        return Attr(None, lambda v: _write_reset(m, dev, v))
    if name == "remove":
        return Attr(None, lambda v: _write_remove(m, dev, v))
    if name == "iommu_group":
        return Link(up(depth) + f"kernel/iommu_groups/{dev.group_id}")
    if name == "subsystem":
        return Link(up(depth) + "bus/pci")
    if name == "driver":
        return Link(up(depth) + f"bus/pci/drivers/{dev.driver}") if dev.driver else None
    if name == "vfio-dev":
        if dev.vfio_pci and m.cdev:
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


def device_listing(m: Machine, dev: Device) -> list[str]:
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
    names += [f"resource{i}_wc" for i in range(6)]
    names += [f"virtfn{i}" for i in range(len(dev.vfs))]
    return [n for n in names if device_entry(m, dev, n, 4) is not None]


def bridge_entry(m: Machine, br: Bridge, name: str, depth: int) -> Node | None:
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
    if name == "reset_method" and m.kernel_version < RESET_METHOD_ATTR:
        return None
    if name in attrs:
        return Attr(attrs[name])
    if name == "iommu_group":
        return Link(up(depth) + f"kernel/iommu_groups/{br.group}")
    if name == "driver":
        return Link(up(depth) + "bus/pci/drivers/pcieport")
    return None


class SysfsConfigFile(File):
    """``/sys/bus/pci/devices/<addr>/config`` opened for pread."""

    kind = "sysfs"

    def __init__(self, machine: Machine, dev: Device, path: str) -> None:
        super().__init__(machine)
        self.dev = dev
        self.path = path

    def link(self) -> str:
        return self.path

    def device(self) -> Device | None:
        return self.dev

    def pread(self, proc: SimProcess, size: int, offset: int) -> bytes:
        if self.dev.removed:
            raise oserror(errno.ENODEV, self.dev.addr)
        cs = self.dev.spec.cfg_size
        if offset >= cs:
            return b""
        return self.dev.config.read(offset, min(size, cs - offset))


class SysfsResourceFile(File):
    """``resourceN_wc``: the BAR mmapped write-combining, file offset = BAR offset."""

    kind = "sysfs"

    def __init__(self, machine: Machine, dev: Device, index: int, path: str) -> None:
        super().__init__(machine)
        self.dev = dev
        self.index = index
        self.path = path
        self.maps = 0  # live mappings of this file, in every process
        dev.wc_files.append(self)

    def link(self) -> str:
        return self.path

    def device(self) -> Device | None:
        return self.dev

    def mmap(self, proc: SimProcess, length: int, offset: int, prot: int, flags: int) -> int:
        dev = self.dev
        if dev.removed:
            raise oserror(errno.ENODEV, dev.addr)
        if self.index in dev.claimed_bars and self.machine.io_strict_devmem:
            # pci_mmap_resource: iomem_is_exclusive() of a region a driver holds
            raise oserror(errno.EINVAL, f"BAR {self.index} is claimed by a driver")
        bar = dev.bar(self.index)
        pages = (bar.size + PAGE - 1) // PAGE if bar is not None else 0
        if length <= 0 or offset % PAGE or offset // PAGE + (length + PAGE - 1) // PAGE > pages:
            raise oserror(errno.EINVAL, "pci_mmap_fits")  # the kernel WARNs too
        self.maps += 1
        return dev.bar_address(self.index) + offset

    def unmap(self, addr: int, length: int) -> None:
        self.maps -= 1

    def release(self, pid: int) -> None:
        self.dev.wc_files.remove(self)
