"""Host drivers in the simulator: probe and remove costs, and what a bound driver makes.

A PCI driver's probe and remove run on the thread that writes ``bind``, ``unbind``,
``drivers_probe`` or ``sriov_numvfs`` (``device_driver_attach`` and
``device_release_driver`` under the device's lock, ``drivers/base/dd.c``), so they are
real sleeps here, scaled by the machine's ``time_scale`` like its resets: binding or
restoring devices one after another costs the sum, concurrently about the longest.

What a host driver makes while bound, and what the tools read to see a device in use:

* a network driver (class 0x02): an interface, ``/sys/class/net/IF`` linking below the
  device, with ``operstate`` and ``flags`` (IFF_UP 0x1), and its routes in
  ``/proc/net/route`` (IPv4) and ``/proc/net/ipv6_route``;
* an NVMe driver (class 0x0108): a disk ``nvmeNn1``, ``/sys/block/nvmeNn1`` linking below
  the device, its partitions, their ``holders`` (device-mapper, md), and the mounts in
  ``/proc/mounts`` and swap in ``/proc/swaps``;
* a display driver (class 0x03): a framebuffer ``/sys/class/graphics/fbN``; the VT
  console (``tty0`` in ``/sys/class/tty/console/active``) runs on it;
* a serial console: ``machine.host.serial_console(addr)`` puts a ``ttySN`` below the
  device and makes it the active console.

The state a test sets (an interface up, a route, a mount) is kept by address and
survives unbind and rebind, as an administrator's configuration would.

SR-IOV: the PF's ``sriov_drivers_autoprobe`` (default 1) decides whether the VFs that
``sriov_numvfs`` creates are probed by their drivers; with it off, a VF is probed only
when it has a ``driver_override`` (``pci_device_can_probe`` in
``drivers/pci/pci-driver.c``).  Each VF costs :data:`VF_ADD_COST` to add
(``pci_iov_add_virtfn``) plus its driver's probe, serially on the writer's thread.
"""

from __future__ import annotations

import errno
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mock_vfio.iov import set_numvfs
from mock_vfio.pci_driver import probe
from mock_vfio.topology import split_addr
from mock_vfio.trace import Event, now, oserror, thread_name

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Device

# Model seconds per probe and per remove, by driver.  The VF drivers' probes follow the
# times reported for enabling SR-IOV with autoprobe on: i40e's 64 VFs probed by iavf in
# about 22 s (0.35 s each), ixgbe's by ixgbevf in over 60 s (about 1 s each).
PROBE_COST: dict[str, float] = {
    "vfio-pci": 0.002,
    "pci-stub": 0.001,
    "iavf": 0.35,
    "ixgbevf": 1.0,
    "mlx5_core": 0.8,
    "e1000e": 0.3,
    "igb": 0.3,
    "ice": 2.0,
    "i40e": 1.5,
    "nvme": 0.4,
    "nvidia": 1.5,
    "amdgpu": 2.0,
    "snd_hda_intel": 0.1,
}
REMOVE_COST: dict[str, float] = {
    "vfio-pci": 0.001,
    "pci-stub": 0.001,
    "iavf": 0.05,
    "ixgbevf": 0.1,
    "e1000e": 0.1,
    "nvme": 0.15,
    "nvidia": 0.5,
    "snd_hda_intel": 0.05,
}
DEFAULT_PROBE_COST = 0.2
DEFAULT_REMOVE_COST = 0.05
# pci_iov_add_virtfn per VF: 10 PFs x 250 VFs take 200-250 ms in sriov_add_vfs.
VF_ADD_COST = 0.0001

IFF_UP = 0x1
CDEV_VF_TOKEN = (6, 17)  # VFIO_DEVICE_BIND_FLAG_TOKEN, 86624ba3b522


def probe_cost(driver: str) -> float:
    return PROBE_COST.get(driver, DEFAULT_PROBE_COST)


def remove_cost(driver: str) -> float:
    return REMOVE_COST.get(driver, DEFAULT_REMOVE_COST)


@dataclass
class NetState:
    up: bool = False  # IFF_UP (ip link set up)
    carrier: bool = True  # operstate is "up" when up with a carrier, else "down"
    routes: list[str] = field(default_factory=list)  # IPv4 destinations, dotted
    routes6: list[str] = field(default_factory=list)


@dataclass
class DiskState:
    partitions: int = 0
    mounts: dict[str, str] = field(default_factory=dict)  # block name -> mount point
    holders: dict[str, list[str]] = field(default_factory=dict)  # block name -> dm-N, md0
    swap: list[str] = field(default_factory=list)


class HostDrivers:
    """What the host's own drivers do and show on one simulated machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.lock = threading.Lock()
        self.autoprobe: dict[str, bool] = {}  # PF address -> sriov_drivers_autoprobe
        self.net: dict[str, NetState] = {}
        self.disks: dict[str, DiskState] = {}
        self.console: list[str] = ["ttyS0"]  # /sys/class/tty/console/active
        self.serial: dict[str, str] = {}  # ttySN -> PCI address
        self._disk_index: dict[str, int] = {}
        self._fb_index: dict[str, int] = {}
        self.probes = 0
        self.removes = 0
        self.vfio_enable_sriov = False  # vfio-pci's enable_sriov module parameter
        self.vf_tokens: dict[str, str] = {}  # PF address -> its VF token, a UUID's text

    # --- costs -------------------------------------------------------------------------

    def probing(self, dev: Device, driver: str) -> None:
        """A driver's probe of ``dev``: its cost, on this thread (a ``probe`` event)."""
        self._timed("probe", dev, driver, probe_cost(driver))
        with self.lock:
            self.probes += 1

    def removing(self, dev: Device, driver: str) -> None:
        """A driver's remove of ``dev`` (a ``remove_driver`` event)."""
        self._timed("remove_driver", dev, driver, remove_cost(driver))
        with self.lock:
            self.removes += 1

    def _timed(self, kind: str, dev: Device, driver: str, cost: float) -> None:
        t0 = now()
        self.machine.sleep(cost)
        self.machine.record(Event(kind, t0, now(), thread_name(), dev.addr, value=driver))

    def sriov_autoprobe(self, pf: Device) -> bool:
        return self.autoprobe.get(pf.addr, True)

    def can_probe(self, dev: Device) -> bool:
        """``pci_device_can_probe``: a VF is probed only with its PF's autoprobe on or an
        override of its own."""
        if not dev.is_vf or dev.driver_override is not None or dev.spec.physfn is None:
            return True
        return self.autoprobe.get(dev.spec.physfn, True)

    # --- SR-IOV ----------------------------------------------------------------------------

    def sriov_configure(self, pf: Device, n: int) -> None:
        """A write of ``n`` to the PF's ``sriov_numvfs`` (``sriov_numvfs_store``, Linux 6.1:
        ERANGE above sriov_totalvfs, nothing for the same count, ENOENT without a PF driver
        that configures SR-IOV, EBUSY for another non-zero count)."""
        m = self.machine
        if n > pf.spec.sriov_total:
            raise oserror(errno.ERANGE, f"{n} > sriov_totalvfs {pf.spec.sriov_total}")
        if n == pf.numvfs:
            return
        if pf.driver is None:
            raise oserror(errno.ENOENT, f"{pf.addr}: no driver bound; cannot configure SR-IOV")
        if pf.driver == "vfio-pci" and not self.vfio_enable_sriov:
            # vfio_pci_sriov_configure without the enable_sriov module parameter
            raise oserror(errno.ENOENT, f"{pf.addr}: vfio-pci's enable_sriov is off")
        if n == 0:
            if any(vf.open_count for vf in pf.vfs):
                raise oserror(errno.EBUSY, f"{pf.addr}: a VF is in use")
            for vf in pf.vfs:  # pci_iov_remove_virtfn: each VF's driver is removed
                if vf.driver is not None:
                    self.removing(vf, vf.driver)
        set_numvfs(m, pf, n, probe=True)

    def vf_added(self, vf: Device) -> None:
        """``pci_iov_add_virtfn``: the VF appears, then the bus probes it when it may."""
        self.machine.sleep(VF_ADD_COST)
        probe(self.machine, vf)

    def _token(self, pf: Device) -> str:
        # vfio_pci_vf_init: a random token until the user sets one
        with self.lock:
            return self.vf_tokens.setdefault(pf.addr, str(uuid.uuid4()))

    def set_vf_token(self, pf: Device, raw: bytes) -> None:
        with self.lock:
            self.vf_tokens[pf.addr] = str(uuid.UUID(bytes=raw))

    def match_device_name(self, dev: Device, name: str) -> None:
        """``vfio_pci_core_match``: ``ADDR [vf_token=UUID]``, then the token's check."""
        rest = name[len(dev.addr) :]
        token: str | None = None
        for opt in rest.split():
            if token is None and opt.startswith("vf_token="):
                try:
                    token = str(uuid.UUID(opt[len("vf_token=") :]))
                except ValueError as exc:
                    raise oserror(errno.EINVAL, f"bad VF token in {name!r}") from exc
            else:
                raise oserror(errno.EINVAL, f"unknown or repeated option in {name!r}")
        self.check_vf_token(dev, token)

    def bind_token(self, addr: int, flags: int) -> str | None:
        """The token of a VFIO_DEVICE_BIND_IOMMUFD at ``addr`` (``flags`` read): from Linux
        6.17 (86624ba3b522) ``VFIO_DEVICE_BIND_FLAG_TOKEN`` says ``token_uuid_ptr`` follows;
        any flag before then, or another one, is EINVAL."""
        if not flags:
            return None
        if flags != 1 or self.machine.kernel_version < CDEV_VF_TOKEN:
            raise oserror(errno.EINVAL, "BIND_IOMMUFD flags")
        from vfiopy._uapi import ffi

        ct = "struct vfiopy_bind_iommufd_token"
        p = ffi.cast(f"{ct} *", addr)
        if p.argsz < ffi.sizeof(ct):
            raise oserror(errno.EINVAL, "BIND_IOMMUFD argsz too small for the token")
        raw = bytes(ffi.buffer(ffi.cast("uint8_t *", p.token_uuid_ptr), 16))
        return str(uuid.UUID(bytes=raw))

    def check_cdev_token(self, dev: Device, token: str | None) -> None:
        """The cdev path checks the VF token from 6.17; before, it did not check at all."""
        if self.machine.kernel_version >= CDEV_VF_TOKEN:
            self.check_vf_token(dev, token)

    def check_vf_token(self, dev: Device, token: str | None) -> None:
        """``vfio_pci_validate_vf_token`` (drivers/vfio/pci/vfio_pci_core.c, Linux 5.7+)."""
        m = self.machine
        if dev.is_vf:
            pf = m.devices.get(dev.spec.physfn or "")
            if pf is None or pf.driver != "vfio-pci":
                if token is not None:
                    raise oserror(errno.EINVAL, "VF token incorrectly provided, PF not vfio-pci")
                return
            if token is None:
                raise oserror(errno.EACCES, f"{dev.addr}: VF token required to access device")
            if token != self._token(pf):
                raise oserror(errno.EACCES, f"{dev.addr}: incorrect VF token provided")
        elif dev.spec.sriov_total and dev.driver == "vfio-pci":
            if any(vf.open_count for vf in dev.vfs):  # the token has users
                if token is None:
                    raise oserror(errno.EACCES, f"{dev.addr}: VF token required to access device")
                if token != self._token(dev):
                    raise oserror(errno.EACCES, f"{dev.addr}: incorrect VF token provided")
            elif token is not None:
                with self.lock:
                    self.vf_tokens[dev.addr] = token
        elif token is not None:
            raise oserror(errno.EINVAL, "VF token incorrectly provided, not a PF or VF")

    # --- what bound drivers make ----------------------------------------------------------

    def _host_bound(self, dev: Device) -> bool:
        return not (dev.driver in (None, "pci-stub") or dev.vfio_pci or dev.removed)

    def netdevs(self) -> dict[str, Device]:
        """Interface name -> device, for network functions bound to a host driver."""
        out: dict[str, Device] = {}
        for d in list(self.machine.devices.values()):
            if d.spec.class_code >> 16 == 0x02 and self._host_bound(d):
                out[ifname(d)] = d
        return out

    def disk_devices(self) -> dict[str, Device]:
        """Disk name (nvmeNn1) -> device, for NVMe functions bound to a host driver."""
        return self._numbered(0x0108, 8, self._disk_index, "nvme{}n1")

    def framebuffers(self) -> dict[str, Device]:
        """Framebuffer (fbN) -> device, for display functions bound to a host driver."""
        return self._numbered(0x03, 16, self._fb_index, "fb{}")

    def _numbered(
        self, cls: int, shift: int, index: dict[str, int], name: str
    ) -> dict[str, Device]:
        """Objects numbered in the order their devices were first seen (the kernel's ida)."""
        out: dict[str, Device] = {}
        for d in list(self.machine.devices.values()):
            if d.spec.class_code >> shift == cls and self._host_bound(d):
                with self.lock:
                    n = index.setdefault(d.addr, len(index))
                out[name.format(n)] = d
        return out

    def net_state(self, addr: str) -> NetState:
        return self.net.setdefault(addr, NetState())

    def disk_state(self, addr: str) -> DiskState:
        return self.disks.setdefault(addr, DiskState())

    # --- test helpers ------------------------------------------------------------------------

    def set_link(
        self, addr: str, up: bool = True, routes: list[str] | None = None, carrier: bool = True
    ) -> str:
        """Bring ``addr``'s interface up (or down) with ``routes``; returns its name."""
        st = self.net_state(addr)
        st.up = up
        st.carrier = carrier
        if routes is not None:
            st.routes = list(routes)
        return ifname(self.machine.device(addr))

    def mount(self, addr: str, where: str, partition: int = 1) -> str:
        """Mount partition ``partition`` (0: the whole disk) of ``addr``'s disk at ``where``."""
        st = self.disk_state(addr)
        st.partitions = max(st.partitions, partition)
        disk = self.disk_name(addr)
        name = f"{disk}p{partition}" if partition else disk
        st.mounts[name] = where
        return name

    def hold(self, addr: str, holder: str = "dm-0", partition: int = 1) -> str:
        st = self.disk_state(addr)
        st.partitions = max(st.partitions, partition)
        disk = self.disk_name(addr)
        name = f"{disk}p{partition}" if partition else disk
        st.holders.setdefault(name, []).append(holder)
        return name

    def disk_name(self, addr: str) -> str:
        with self.lock:
            n = self._disk_index.setdefault(addr, len(self._disk_index))
        return f"nvme{n}n1"

    def serial_console(self, addr: str) -> str:
        """Put a serial port on ``addr`` and make it the active console; returns its tty."""
        tty = f"ttyS{4 + len(self.serial)}"
        self.serial[tty] = addr
        self.console = [tty]
        return tty


def ifname(dev: Device) -> str:
    """The predictable interface name udev gives a PCI NIC: enp<bus>s<slot>[f<fn>][v<vf>]."""
    _, bus, slot, fn = split_addr(dev.addr)
    name = f"enp{bus}s{slot}"
    if dev.is_vf and dev.spec.physfn is not None:
        _, pbus, pslot, pfn = split_addr(dev.spec.physfn)
        base = f"enp{pbus}s{pslot}" + (f"f{pfn}" if pfn else "")
        return f"{base}v{dev.spec.vf_index}"
    if fn or dev.spec.multifunction:
        name += f"f{fn}"
    return name


__all__ = [
    "DEFAULT_PROBE_COST",
    "DEFAULT_REMOVE_COST",
    "IFF_UP",
    "PROBE_COST",
    "REMOVE_COST",
    "VF_ADD_COST",
    "DiskState",
    "HostDrivers",
    "NetState",
    "ifname",
    "probe_cost",
    "remove_cost",
]
