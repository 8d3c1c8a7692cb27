"""What the kernel does with vfio-pci devices, for one Linux version and the topology in sysfs.

This module is the only place in vfiopy that states vfio-pci's reset and
locking rules; the planner, ``--dry-run``, the release report and the bench's
lower bound all ask it.  It predicts, from sysfs and a kernel version:

* the **device set** of each vfio-pci function (``vfio_pci_core_register_device``):
  the function alone on a root bus; the slot when the slot can be reset
  (a hotplug slot); else the whole bus.  SR-IOV VFs get a set of their own
  from Linux 6.17 (e908f58b6beb); before, they share their bus's set, and its
  mutex, with the PF's other VFs;
* the **reset at open** (``vfio_pci_core_enable``): one function reset when
  the function has one (``pci_try_reset_function``; its success is
  ``reset_works``): the first of its ``reset_method`` list that applies, or,
  before Linux 5.15 (no such attribute, d88f521da3ef), the first of the
  kernel's fixed order (FLR, AF FLR, PM, bus) its config space offers;
* the **resets at each close** (``vfio_pci_core_disable``): the function reset
  again when ``reset_works``, which clears the device's ``needs_reset``; then,
  at the set's last close, one bus or slot reset when some device of the set
  still needs one and every function that reset would hit is in the set
  (``vfio_pci_dev_set_try_reset``).  A multifunction device whose functions
  all have FLR thus gets one FLR per close and no bus reset;
* their **modelled costs**: FLR 100 ms, PM 20 ms, a bus or slot reset 1 s
  before Linux 6.3 and, from 6.3 (ac91e6980563), 100 ms after a PCIe link of
  5 GT/s or less, 200 ms above (link training, then 100 ms), 1.1 s on
  conventional PCI;
* **viability** of an IOMMU group and which drivers are vfio-pci drivers:
  ``vfio-pci`` and its variant drivers (``mlx5_vfio_pci``,
  ``nvgrace_gpu_vfio_pci``, ...), recognised by their module depending on
  ``vfio_pci_core`` (listed in ``/sys/module/vfio_pci_core/holders``), or, for
  a kernel built with them in, by the ``vfio_pci`` suffix every in-tree
  variant driver's name has;
* the **global lock** before Linux 5.0 (e309df5b0c9e gave each bus or slot
  its own): then every open and release in the system runs in turn.

The version defaults to the running kernel's, read through the
:class:`~vfiopy.kernel.Kernel` seam (``/proc/sys/kernel/osrelease``, so a
simulated machine answers with its own), else ``os.uname``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vfiopy.errors import SysfsError
from vfiopy.pci import CapId, walk_capabilities
from vfiopy.sysfs import VFIO_DRIVER, PciAddress, Sysfs

KernelVersion = tuple[int, int]

# Facts by the release that brought them (docs/design.md lists their sources).
DEVSET_LOCKING: KernelVersion = (5, 0)  # e309df5b0c9e: a lock per bus/slot, not driver_lock
RESET_DELAY_BY_LINK: KernelVersion = (6, 3)  # ac91e6980563: no fixed 1 s after a bus reset
VF_OWN_DEVSET: KernelVersion = (6, 17)  # e908f58b6beb: a VF is a device set of its own
FDINFO_SYSPATH: KernelVersion = (6, 18)  # 1e736f148956: vfio-device-syspath in fdinfo
# d88f521da3ef: the reset_method attribute.  Before it the order is fixed (device-specific,
# FLR, AF FLR, PM, slot/bus) and the model reads what the function has from config space.
RESET_METHOD_ATTR: KernelVersion = (5, 15)
# Driver-facing VFIO interfaces: before each, the kernel answers ENOTTY.
IOEVENTFD: KernelVersion = (4, 17)  # 30656177c408: VFIO_DEVICE_IOEVENTFD
LOW_POWER: KernelVersion = (6, 1)  # cc2742fe3660, 453e6c98fd2b: LOW_POWER_ENTRY/_EXIT/_WITH_WAKEUP
MSIX_DYNAMIC: KernelVersion = (6, 5)  # e4163438e015, 6c8017c6a58d: MSI-X grows, NORESIZE clear

# Modelled costs, seconds.  PCIe r6.0 sec 6.6.2: 100 ms after an FLR; pci_pm_reset
# sleeps d3hot_delay (10 ms) on the way to D3hot and again back to D0.
METHOD_S = {"flr": 0.1, "af_flr": 0.1, "pm": 0.02, "device_specific": 0.1, "acpi": 0.1}
BUS_PRE_6_3_S = 1.0  # ssleep(1) after the secondary bus reset
BUS_FAST_LINK_S = 0.1  # <= 5 GT/s: msleep(100)
BUS_SLOW_LINK_S = 0.2  # > 5 GT/s: wait for the link (nominally 100 ms), then 100 ms
BUS_CONVENTIONAL_S = 1.1  # conventional PCI: 1 s plus the device's 100 ms

# reset_method names that reset the bus (or slot) above the function.
_BUS_METHODS = frozenset({"bus", "cxl_bus"})
# Drivers that leave an IOMMU group usable beside vfio-pci drivers: none bound,
# pci-stub, and the PCIe port driver of bridges (they do not do DMA for the host).
_GROUP_SAFE_DRIVERS = frozenset({"pci-stub", "pcieport"})
_RELEASE = re.compile(r"(\d+)\.(\d+)")
_SPEED = re.compile(r"([0-9.]+) GT/s")


def parse_release(text: str) -> KernelVersion | None:
    """``"6.1.0-18-amd64"`` -> ``(6, 1)``; None when it does not start with MAJOR.MINOR."""
    m = _RELEASE.match(text.strip())
    return (int(m[1]), int(m[2])) if m else None


def running_version(sysfs: Sysfs | None = None) -> KernelVersion:
    """The kernel's version: its ``osrelease`` through the Kernel seam, else ``os.uname``."""
    if sysfs is not None:
        try:
            found = parse_release(sysfs.kernel.read_text("/proc/sys/kernel/osrelease"))
        except OSError:
            found = None
        if found is not None:
            return found
    return parse_release(os.uname().release) or DEVSET_LOCKING


def fixed_reset_order(config: bytes) -> tuple[str, ...]:
    """The reset methods a kernel before 5.15 tries, in its order, from a config-space image.

    ``pcie_has_flr`` (PCIe Device Capabilities FLR), ``pci_af_flr`` (Advanced Features with
    TP and FLR), ``pci_pm_reset`` (a PM capability whose PMCSR has No_Soft_Reset clear), then
    the slot or bus reset, which ``function_reset`` allows only for a function alone on its
    bus.  Device-specific quirks are not modelled.  A short image (64 bytes, what a non-root
    user reads) shows no capability: only the bus reset is left.
    """
    methods: list[str] = []
    caps = {c.id: c.offset for c in reversed(walk_capabilities(config)) if not c.extended}

    def word(off: int, n: int) -> int:
        return int.from_bytes(config[off : off + n], "little")

    exp = caps.get(CapId.EXP)
    if exp is not None and word(exp + 4, 4) & (1 << 28):  # PCI_EXP_DEVCAP_FLR
        methods.append("flr")
    af = caps.get(CapId.AF)
    if af is not None and word(af + 3, 1) & 0x3 == 0x3:  # PCI_AF_CAP_TP | PCI_AF_CAP_FLR
        methods.append("af_flr")
    pm = caps.get(CapId.PM)
    if pm is not None and not word(pm + 4, 2) & 0x8:  # PCI_PM_CTRL_NO_SOFT_RESET
        methods.append("pm")
    methods.append("bus")
    return tuple(methods)


def format_version(version: KernelVersion) -> str:
    return f"{version[0]}.{version[1]}"


@dataclass(frozen=True, slots=True)
class Function:
    """One PCI function as the model reads it from sysfs."""

    address: PciAddress
    parent: PciAddress | None  # the bridge above; None on a root bus
    driver: str | None
    vfio: bool  # bound to vfio-pci or a variant driver
    is_vf: bool
    is_bridge: bool
    methods: tuple[str, ...]  # enabled reset methods, in the kernel's order


@dataclass(frozen=True, slots=True)
class Reset:
    """One reset the kernel runs: ``method`` over ``targets``, costing ``seconds``."""

    method: str  # flr, pm, ..., or bus / slot
    targets: tuple[PciAddress, ...]
    seconds: float

    @property
    def whole_set(self) -> bool:
        return self.method in ("bus", "slot")


@dataclass(frozen=True, slots=True)
class DeviceSet:
    """``struct vfio_device_set``: the vfio-pci functions sharing one mutex and one reset."""

    id: str
    kind: str  # "device", "slot" or "bus"
    members: tuple[PciAddress, ...]  # vfio-pci functions in the set
    reach: tuple[PciAddress, ...]  # what its bus or slot reset hits; () when it has none

    @property
    def resettable(self) -> bool:
        """``vfio_pci_dev_set_resettable``: the reset exists and hits only the set."""
        return bool(self.reach) and set(self.reach) <= set(self.members)

    @property
    def touched(self) -> list[PciAddress]:
        """Every function the set's work can reach: its members and its reset's reach."""
        return sorted(set(self.members) | set(self.reach))


@dataclass(slots=True)
class Prediction:
    """Resets of one device set for a sequence of opens or closes, one list per step."""

    set: DeviceSet
    steps: list[list[Reset]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.steps)

    @property
    def seconds(self) -> float:
        """Serial under the set's mutex: the costs add up."""
        return sum(r.seconds for s in self.steps for r in s)


def label(resets: Sequence[Reset]) -> str | None:
    """``flr``, ``flr+bus``, ...: the resets of one step, for logs; None for none."""
    return "+".join(r.method for r in resets) or None


class KernelModel:
    """The kernel of ``version`` (default: the running one) over the devices ``sysfs`` shows.

    Reads sysfs lazily and caches what it read: make a new model to see a
    changed topology.  ``serialised`` and ``link_delays`` override what the
    version implies (the simulator's explicit locking and reset models).
    """

    def __init__(
        self,
        sysfs: Sysfs,
        version: KernelVersion | None = None,
        *,
        serialised: bool | None = None,
        link_delays: bool | None = None,
    ) -> None:
        self.sysfs = sysfs
        self.version = version if version is not None else running_version(sysfs)
        self.serialised = self.version < DEVSET_LOCKING if serialised is None else serialised
        self.link_delays = (
            self.version >= RESET_DELAY_BY_LINK if link_delays is None else link_delays
        )
        self._functions: dict[PciAddress, Function | None] = {}
        self._all: list[PciAddress] | None = None
        self._children: dict[PciAddress | None, list[PciAddress]] | None = None
        self._vfio_drivers: dict[str, bool] = {}
        self._slots: dict[tuple[int, int, int], bool] | None = None
        self._speed: dict[PciAddress, float] = {}
        self._sets: dict[PciAddress, DeviceSet] = {}
        self._buses: dict[tuple[int, int], list[PciAddress]] | None = None

    # --- drivers and viability ------------------------------------------------------------

    def is_vfio_driver(self, driver: str | None) -> bool:
        """Whether ``driver`` is vfio-pci or a variant driver built on vfio_pci_core."""
        if driver is None:
            return False
        if driver == VFIO_DRIVER:
            return True
        if driver not in self._vfio_drivers:
            self._vfio_drivers[driver] = self._variant(driver)
        return self._vfio_drivers[driver]

    def _variant(self, driver: str) -> bool:
        k = self.sysfs.kernel
        root = self.sysfs.root
        module = driver
        try:
            module = k.readlink(f"{root}/bus/pci/drivers/{driver}/module").rstrip("/")
            module = module.rsplit("/", 1)[-1]
        except OSError:
            pass  # built in: no module link
        try:
            holders = k.listdir(f"{root}/module/vfio_pci_core/holders")
        except OSError:
            holders = None  # vfio_pci_core built in, or older than 5.16 (no variants)
        if holders is not None and module in holders:
            return True
        return module.endswith("vfio_pci") or driver.endswith(("vfio_pci", "vfio-pci"))

    def keeps_group_viable(self, addr: PciAddress) -> bool:
        """Whether ``addr``'s binding lets its IOMMU group be used through VFIO."""
        f = self.function(addr)
        return (
            f is None
            or f.driver is None
            or f.vfio
            or f.driver in _GROUP_SAFE_DRIVERS
            or (f.is_bridge and f.driver == "pcieport")
        )

    # --- topology -----------------------------------------------------------------------------

    def devices(self) -> list[PciAddress]:
        if self._all is None:
            self._all = self.sysfs.devices()
        return self._all

    def function(self, addr: PciAddress | str) -> Function | None:
        """The function at ``addr``, or None when it is gone."""
        a = PciAddress.of(addr)
        if a not in self._functions:
            self._functions[a] = self._read(a)
        return self._functions[a]

    def _read(self, a: PciAddress) -> Function | None:
        s = self.sysfs
        try:
            driver = s.driver(a)
            cls = s.class_code(a) >> 8
            if self.version < RESET_METHOD_ATTR:
                methods = fixed_reset_order(self._config(a))
            else:
                methods = tuple(s.reset_methods(a))
            return Function(
                a,
                s.parent_bridge(a),
                driver,
                self.is_vfio_driver(driver),
                s.is_virtfn(a),
                cls in (0x0604, 0x0609),
                methods,
            )
        except SysfsError:
            return None

    def _config(self, a: PciAddress) -> bytes:
        """The config space sysfs shows, or nothing when it cannot be read: the fixed order
        then leaves only the bus reset."""
        try:
            return self.sysfs.config(a)
        except SysfsError:
            return b""

    def _tree(self) -> dict[PciAddress | None, list[PciAddress]]:
        if self._children is None:
            children: dict[PciAddress | None, list[PciAddress]] = {}
            for a in self.devices():
                f = self.function(a)
                if f is not None:
                    children.setdefault(f.parent, []).append(a)
            self._children = children
        return self._children

    def bus(self, addr: PciAddress) -> list[PciAddress]:
        """The functions on ``addr``'s bus (itself included)."""
        if self.function(addr) is None:
            return [addr]
        if self._buses is None:
            self._buses = {}
            for children in self._tree().values():
                for d in children:
                    self._buses.setdefault((d.domain, d.bus), []).append(d)
        return self._buses.get((addr.domain, addr.bus), [addr])

    def below(self, bridges: Iterable[PciAddress]) -> list[PciAddress]:
        """Every function under ``bridges``, at any depth."""
        tree = self._tree()
        out: list[PciAddress] = []
        todo = list(bridges)
        while todo:
            for c in tree.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    def slot_resettable(self, addr: PciAddress) -> bool:
        """``pci_probe_reset_slot``: a hotplug slot (a ``power`` file) holds the function."""
        if self._slots is None:
            self._slots = {}
            base = f"{self.sysfs.root}/bus/pci/slots"
            k = self.sysfs.kernel
            try:
                names = k.listdir(base)
            except OSError:
                names = []
            for n in names:
                try:
                    text = k.read_text(f"{base}/{n}/address").strip()
                    dom, bus, slot = (int(x, 16) for x in text.split(":"))
                except (OSError, ValueError):
                    continue
                self._slots[(dom, bus, slot)] = k.exists(f"{base}/{n}/power")
        return self._slots.get((addr.domain, addr.bus, addr.slot), False)

    def _link_speed(self, bridge: PciAddress | None) -> float:
        """GT/s of the link below ``bridge``; 0 for conventional PCI or unknown."""
        if bridge is None:
            return 0.0
        if bridge not in self._speed:
            speed = 0.0
            for attr in ("max_link_speed", "current_link_speed"):
                try:
                    m = _SPEED.match(self.sysfs.read(bridge, attr))
                except SysfsError:
                    continue
                if m:
                    speed = float(m[1])
                    break
            self._speed[bridge] = speed
        return self._speed[bridge]

    # --- device sets ----------------------------------------------------------------------------

    def _set_kind(self, f: Function) -> str:
        if f.parent is None or (f.is_vf and self.version >= VF_OWN_DEVSET):
            return "device"
        # A VF has no slot (pdev->slot is NULL): it goes with the bus.
        return "slot" if not f.is_vf and self.slot_resettable(f.address) else "bus"

    def device_set(self, addr: PciAddress | str) -> DeviceSet:
        """The device set ``addr`` is (or would be, once bound to vfio-pci) registered in."""
        a = PciAddress.of(addr)
        if a in self._sets:
            return self._sets[a]
        f = self.function(a)
        kind = "device" if f is None else self._set_kind(f)
        if kind == "device":
            return DeviceSet(str(a), "device", (a,), ())
        peers = self.bus(a)
        if kind == "slot":
            peers = [d for d in peers if d.slot == a.slot]
        members = {a}
        bridges = []
        for d in peers:
            g = self.function(d)
            if g is None:
                continue
            if g.is_bridge:
                bridges.append(d)
            elif g.vfio and self._set_kind(g) == kind:
                members.add(d)
        ident = f"{a.domain:04x}:{a.bus:02x}" + (f":{a.slot:02x}" if kind == "slot" else "")
        reach = sorted({*peers, *self.below(bridges)})
        ds = DeviceSet(ident, kind, tuple(sorted(members)), tuple(reach))
        for m in members:
            self._sets[m] = ds  # the same set for each of them
        return ds

    # --- resets -----------------------------------------------------------------------------------

    def function_reset(self, addr: PciAddress | str) -> str | None:
        """The method ``__pci_reset_function_locked`` would use, or None (-ENOTTY)."""
        f = self.function(addr)
        if f is None:
            return None
        for m in f.methods:
            if m not in _BUS_METHODS:
                return m
            # pci_reset_bus_function: only for a function alone on a non-root bus with
            # nothing below it (pci_parent_bus_reset), or alone in a hotplug slot.
            if f.is_vf or f.is_bridge or f.parent is None or self.bus(f.address) != [f.address]:
                continue
            return "slot" if self.slot_resettable(f.address) else "bus"
        return None

    def cost(self, method: str, addr: PciAddress) -> float:
        """Modelled seconds of one reset of ``method`` on (or above) ``addr``."""
        if method not in ("bus", "slot", "cxl_bus"):
            return METHOD_S.get(method, METHOD_S["flr"])
        if not self.link_delays:
            return BUS_PRE_6_3_S
        f = self.function(addr)
        speed = self._link_speed(f.parent if f is not None else None)
        if speed <= 0:
            return BUS_CONVENTIONAL_S
        return BUS_FAST_LINK_S if speed <= 5.0 else BUS_SLOW_LINK_S

    def open_reset(self, addr: PciAddress | str) -> Reset | None:
        """The reset the first open of ``addr`` runs (``vfio_pci_core_enable``)."""
        a = PciAddress.of(addr)
        m = self.function_reset(a)
        return None if m is None else Reset(m, (a,), self.cost(m, a))

    def opens(self, addresses: Sequence[PciAddress | str]) -> list[Prediction]:
        """The resets of opening ``addresses``, per device set (in first-seen order)."""
        out: dict[str, Prediction] = {}
        for addr in addresses:
            ds = self.device_set(addr)
            p = out.setdefault(ds.id, Prediction(ds))
            r = self.open_reset(addr)
            p.steps.append([r] if r else [])
        return list(out.values())

    def closes(self, addresses: Sequence[PciAddress | str]) -> list[Prediction]:
        """The resets of closing ``addresses`` in this order, per device set."""
        out: dict[str, Prediction] = {}
        for ds, step in self.close_steps(addresses):
            out.setdefault(ds.id, Prediction(ds)).steps.append(step)
        return list(out.values())

    def close_steps(
        self, addresses: Sequence[PciAddress | str]
    ) -> list[tuple[DeviceSet, list[Reset]]]:
        """The resets each close of ``addresses`` (in this order) runs, with its device set.

        Each is assumed open (so its open reset set ``reset_works``) and every
        other function of its set idle.  An idle member without a function reset
        may still carry ``needs_reset`` from an earlier close, so it counts as
        needing one; an idle member with one cleared it at its own close.
        """
        addrs = [PciAddress.of(a) for a in addresses]
        sets = [self.device_set(a) for a in addrs]
        left: dict[str, int] = {}
        for ds in sets:
            left[ds.id] = left.get(ds.id, 0) + 1
        ours = set(addrs)
        needs: dict[PciAddress, bool] = {}
        for ds in sets:
            for idle in ds.members:
                if idle not in ours:
                    needs[idle] = self.function_reset(idle) is None
        out: list[tuple[DeviceSet, list[Reset]]] = []
        for a, ds in zip(addrs, sets, strict=True):
            step: list[Reset] = []
            m = self.function_reset(a)
            if m is None:
                needs[a] = True
            else:
                step.append(Reset(m, (a,), self.cost(m, a)))
                needs[a] = False
            left[ds.id] -= 1
            if left[ds.id] == 0 and ds.resettable and any(needs.get(x) for x in ds.members):
                step.append(Reset(ds.kind, ds.reach, self.cost(ds.kind, ds.reach[0])))
                for x in ds.members:
                    needs[x] = False
            out.append((ds, step))
        return out
