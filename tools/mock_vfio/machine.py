"""The simulated machine: PCI devices, device sets, IOMMU groups, reset logic.

Resets follow vfio-pci (drivers/vfio/pci/vfio_pci_core.c):

* first open of a device (``vfio_pci_core_enable``): ``pci_enable_device``
  then ``pci_try_reset_function``; the reset's success is ``reset_works``;
* last release (``vfio_pci_core_disable``): ``needs_reset = true``, a function
  reset when ``reset_works`` clears it, then ``vfio_pci_dev_set_try_reset``:
  when no other device of the device set is open and some device still needs
  a reset, one bus (or slot) reset for the whole set;
* a function reset picks the first available method of ``reset_method``:
  ``flr``, ``pm`` (D3hot->D0 without No_Soft_Reset) or ``bus``/``slot``, which
  only works for a device alone on a non-root bus (``pci_parent_bus_reset``).

Open and release run under the device set's mutex (``devset`` model, Linux
5.15+, per-set locks since 5.0) or one global ``driver_lock`` (``legacy``,
before 5.0).  Reset delays are real sleeps scaled by ``time_scale``.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mock_vfio.config import (
    CAP_MSI,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    ConfigSpace,
)
from mock_vfio.hostdrv import HostDrivers
from mock_vfio.topology import (
    Bar,
    BridgeSpec,
    FunctionSpec,
    Topology,
    load_topology,
    make_addr,
    split_addr,
)
from mock_vfio.trace import Counters, Event, Faults, now, oserror, thread_name
from mock_vfio.version import (
    DEFAULT_KERNEL_VERSION,
    MSIX_DYNAMIC,
    VF_OWN_DEVSET,
    KernelVersion,
    check_version,
    default_kernel_model,
    default_reset_model,
)
from mock_vfio.virqfd import Virqfds

if TYPE_CHECKING:
    from mock_vfio.devices import DeviceModel
    from mock_vfio.files import File
    from mock_vfio.process import SimProcess

PAGE = 4096
_MAP_NORESERVE = 0x4000

# vfio_unregister_group_dev repeats the device request every 10 s while it waits.
REQUEST_INTERVAL = 10.0
# Reset costs in model seconds (scaled by time_scale).
FLR_COST = 0.100  # pcie_flr: msleep(100) before the readiness poll
PM_COST = 0.020  # pci_pm_reset: D3hot and back, 10 ms each
SBR_PRE_63 = 1.0  # pci_reset_secondary_bus + ssleep(1) before Linux 6.3
SBR_FAST_LINK = 0.100  # 6.3+: PCIe <= 5 GT/s waits 100 ms after the reset
SBR_SLOW_LINK = 0.200  # 6.3+: > 5 GT/s waits for Data Link Layer Link Active, then 100 ms
SBR_CONVENTIONAL = 1.100  # 6.3+: conventional PCI waits 1 s + the device delay


@dataclass(slots=True)
class DevSet:
    """``struct vfio_device_set``: devices reset together, one mutex."""

    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    devices: list[Device] = field(default_factory=list)
    bridge: Bridge | None = None  # the bridge whose secondary bus is reset


@dataclass(slots=True)
class Bridge:
    spec: BridgeSpec
    addr: str
    group: int
    children: list[Device] = field(default_factory=list)


class Device:
    """A PCI function: ``struct pci_dev`` plus its ``vfio_pci_core_device`` state."""

    def __init__(self, machine: Machine, spec: FunctionSpec, bridge: Bridge | None) -> None:
        self.machine = machine
        self.spec = spec
        self.addr = spec.addr
        self.bridge = bridge
        self.group_id = spec.iommu_group
        self.driver: str | None = spec.driver
        self.driver_override: str | None = None
        self.reset_methods: list[str] = list(
            spec.reset_method_set
            if spec.reset_method_set is not None
            else self.default_reset_methods()
        )
        self.devset: DevSet | None = None
        self.removed = False
        self.open_count = 0
        self.unbinding = False  # an unbind waits for the last release (vfio_pci_core_request)
        self.needs_reset = False
        self.reset_works = False
        self.low_power = False
        self.minor = -1  # vfio cdev minor, /dev/vfio/devices/vfio<minor>
        self._config: ConfigSpace | None = None
        self._bar_mem: dict[int, mmap.mmap] = {}
        self._bar_ptr: dict[int, Any] = {}
        self.host_bars: dict[int, int] = {}
        self.reset_lock = threading.Lock()  # pci_dev_lock, taken with trylock by resets
        self.irq_type: int | None = None  # VFIO_PCI_*_IRQ_INDEX in use, None when disabled
        self.irq_fds: dict[tuple[int, int], int] = {}  # (index, vector) -> our dup of the eventfd
        self.intx_masked = False
        self.intx_level = False  # the INTx line as the device drives it
        self.intx_unmask_fd: int | None = None  # the resample eventfd (our dup), on virqfds
        self.irq_nvec = 0  # MSI/MSI-X vectors allocated (the kernel's contexts)
        # VFIO_DEVICE_IOEVENTFD: (bar, offset, data, size) -> our dup of the eventfd
        self.ioeventfds: dict[tuple[int, int, int, int], int] = {}
        self.pm_wake_fd: int | None = None  # LOW_POWER_ENTRY_WITH_WAKEUP's eventfd (our dup)
        self.dma: DmaSpace | None = None
        self.ictx: Any = None  # IommufdCtx bound by a cdev open
        self.devid = 0
        self.cdev_open = False
        self.model: DeviceModel | None = None
        self.vfs: list[Device] = []
        self.numvfs = 0
        self.lock = threading.Lock()  # protects irq state

    # --- static facts ------------------------------------------------------

    @property
    def is_vf(self) -> bool:
        return self.spec.physfn is not None

    @property
    def bus(self) -> int:
        return split_addr(self.addr)[1]

    def default_reset_methods(self) -> tuple[str, ...]:
        if self.spec.reset_methods is not None:
            return self.spec.reset_methods
        methods: list[str] = []
        if self.spec.flr:
            methods.append("flr")
        if self.spec.pm and not self.spec.pm_no_soft_reset:
            methods.append("pm")
        if not self.is_vf:
            methods.append("bus")
        return tuple(methods)

    def alone_on_bus(self) -> bool:
        # pci_parent_bus_reset: no other function on the bus, bridges included.
        if self.bridge is None or self.is_vf:
            return False
        if self.machine.bridges_on(self.bridge):
            return False
        return all(d is self or d.removed for d in self.bridge.children)

    def method_works(self, method: str) -> bool:
        """What the kernel's reset method probe would answer now."""
        if method == "flr":
            return self.spec.flr
        if method == "pm":
            return self.spec.pm and not self.spec.pm_no_soft_reset
        if method in ("bus", "slot"):
            if method == "slot" and (self.bridge is None or not self.bridge.spec.hotplug_slot):
                return False
            return self.alone_on_bus()
        return False

    def function_reset_method(self) -> str | None:
        for m in self.reset_methods:
            if self.method_works(m):
                return "slot" if m == "bus" and self._slot_reset() else m
        return None

    def _slot_reset(self) -> bool:
        return self.bridge is not None and self.bridge.spec.hotplug_slot

    # --- lazily built state ---------------------------------------------------

    @property
    def config(self) -> ConfigSpace:
        if self._config is None:
            cfg = ConfigSpace(self.spec, self.host_bars)
            cfg.on_command = self._command_changed
            cfg.on_flr = self._config_flr
            cfg.set_command(self._initial_command())
            self._config = cfg
        return self._config

    def _initial_command(self) -> int:
        if self.spec.command is not None:
            return self.spec.command
        if self.driver == "vfio-pci" or self.driver is None:
            return 0
        return PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER

    def bar(self, index: int) -> Bar | None:
        for b in self.spec.bars:
            if b.index == index:
                return b
        return None

    def bar_memory(self, index: int) -> mmap.mmap:
        """Backing memory of a BAR (allocated on first use, never freed before close)."""
        with self.lock:
            mem = self._bar_mem.get(index)
            if mem is None:
                bar = self.bar(index)
                size = max(bar.size if bar else PAGE, PAGE)
                size = (size + PAGE - 1) & ~(PAGE - 1)
                flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
                mem = mmap.mmap(-1, size, flags=flags)
                self._bar_mem[index] = mem
                self._bar_ptr[index] = ctypes.c_char.from_buffer(mem)
                if self.model is not None:
                    self.model.init_bar(index, mem)
            return mem

    def bar_address(self, index: int) -> int:
        self.bar_memory(index)
        return ctypes.addressof(self._bar_ptr[index])

    def free_memory(self) -> None:
        with self.lock:
            self._bar_ptr.clear()
            for mem in self._bar_mem.values():
                with contextlib.suppress(BufferError):
                    mem.close()
            self._bar_mem.clear()

    # --- command register ------------------------------------------------------

    def _command_changed(self, old: int, new: int) -> None:
        if (old ^ new) & PCI_COMMAND_MEMORY:
            self.machine.trace_command(self, bool(new & PCI_COMMAND_MEMORY), "user")

    def set_command(self, value: int, cause: str) -> None:
        cfg = self.config
        old = cfg.command()
        cfg.set_command(value)
        if (old ^ value) & PCI_COMMAND_MEMORY:
            self.machine.trace_command(self, bool(value & PCI_COMMAND_MEMORY), cause)

    def memory_enabled(self) -> bool:
        return bool(self.config.command() & PCI_COMMAND_MEMORY)

    def _config_flr(self) -> None:
        if self.spec.flr:
            self.machine.function_reset(self, "config", method="flr")

    # --- interrupts --------------------------------------------------------------

    def raise_irq(self, vector: int = 0) -> bool:
        """Signal an interrupt the way the device's current mode delivers it (INTx: a pulse)."""
        with self.lock:
            kind = self.irq_type
            if kind is None:
                return False
            if kind == 0:  # INTx: automasked until the user unmasks
                if self.intx_masked:
                    return False
                self.intx_masked = True
                vector = 0
            fd = self.irq_fds.get((kind, vector))
            if fd is None:
                return False
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)
        self.machine.counters.add("irqs")
        return True

    def _intx_fire(self) -> None:
        """Signal the INTx trigger eventfd (self.lock held)."""
        fd = self.irq_fds.get((0, 0))
        if fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)
            self.machine.counters.add("irqs")

    def set_intx(self, level: bool) -> None:
        """Drive the INTx line.  vfio_intx_handler: an assertion while unmasked signals the
        trigger eventfd and masks the line (AUTOMASKED) until the user unmasks it."""
        with self.lock:
            self.intx_level = level
            if level and self.irq_type == 0 and not self.intx_masked:
                self.intx_masked = True
                self._intx_fire()

    def intx_unmask(self) -> None:
        """vfio_pci_intx_unmask_handler: unmask; a line still asserted fires again at once
        (pci_check_and_unmask_intx fails, the interrupt is re-sent and stays masked)."""
        with self.lock:
            if self.irq_type != 0 or not self.intx_masked:
                return
            if self.intx_level:
                self._intx_fire()
            else:
                self.intx_masked = False

    def set_intx_unmask_fd(self, fd: int | None) -> None:
        """Install (or with None remove) the INTx unmask eventfd's listener."""
        with self.lock:
            old, self.intx_unmask_fd = self.intx_unmask_fd, fd
        if old is not None:
            self.machine.virqfds.remove(old)
        if fd is not None:
            self.machine.virqfds.add(fd, self.intx_unmask)

    def runtime_resume(self) -> None:
        """Out of low power (an ioctl or any host access to a suspended device): with a
        wakeup eventfd the user is told and low power is over (vfio_pci_runtime_pm_exit)."""
        with self.lock:
            fd, self.pm_wake_fd = self.pm_wake_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)
            os.close(fd)
        self.low_power = False
        self.config.set_power_state(0)

    def msi_enabled_in_config(self) -> bool:
        pos = self.config.caps.get(CAP_MSI)
        return pos is not None and bool(self.config.data[pos + 2] & 1)

    def disable_irqs(self) -> None:
        """Every interrupt and eventfd listener gone (vfio_pci_core_disable, close_device)."""
        self.set_intx_unmask_fd(None)
        with self.lock:
            fds = list(self.irq_fds.values())
            self.irq_fds.clear()
            self.irq_type = None
            self.intx_masked = False
            self.irq_nvec = 0
            ioeventfds = list(self.ioeventfds.values())
            self.ioeventfds.clear()
            wake, self.pm_wake_fd = self.pm_wake_fd, None
        for fd in ioeventfds:
            self.machine.virqfds.remove(fd)
        for fd in [*fds, *([wake] if wake is not None else [])]:
            with contextlib.suppress(OSError):
                os.close(fd)

    def fire_req(self) -> bool:
        with self.lock:
            fd = self.irq_fds.get((4, 0))
            if fd is None:
                return False
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)
        return True

    def __repr__(self) -> str:
        return f"<Device {self.addr} {self.driver}>"


class DmaSpace:
    """IOVA -> process virtual address bookkeeping shared by type1 and IOAS."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: list[int] = []
        self.maps: dict[int, tuple[int, int, int]] = {}  # iova -> (size, vaddr, prot)

    def find_overlap(self, iova: int, size: int) -> list[int]:
        with self.lock:
            i = bisect.bisect_left(self.starts, iova)
            out: list[int] = []
            if i > 0:
                s = self.starts[i - 1]
                if s + self.maps[s][0] > iova:
                    out.append(s)
            while i < len(self.starts) and self.starts[i] < iova + size:
                out.append(self.starts[i])
                i += 1
            return out

    def add(self, iova: int, size: int, vaddr: int, prot: int) -> None:
        with self.lock:
            bisect.insort(self.starts, iova)
            self.maps[iova] = (size, vaddr, prot)

    def remove(self, iova: int) -> int:
        with self.lock:
            size = self.maps.pop(iova)[0]
            self.starts.remove(iova)
            return size

    def clear(self) -> None:
        with self.lock:
            self.starts.clear()
            self.maps.clear()

    def count(self) -> int:
        with self.lock:
            return len(self.starts)

    def translate(self, iova: int, length: int, write: bool) -> int:
        """The process address for a device access, or EFAULT (an IOMMU fault)."""
        with self.lock:
            i = bisect.bisect_right(self.starts, iova) - 1
            if i >= 0:
                s = self.starts[i]
                size, vaddr, prot = self.maps[s]
                if iova + length <= s + size and prot & (2 if write else 1):
                    return vaddr + (iova - s)
        raise oserror(errno.EFAULT, f"IOMMU fault at iova {iova:#x}")


class Group:
    """``struct vfio_group``."""

    def __init__(self, gid: int) -> None:
        self.id = gid
        self.devices: list[Device] = []
        self.opened_file: File | None = None
        self.container: Any = None  # Container
        self.cdev_binds = 0
        self.lock = threading.Lock()

    def viable(self) -> bool:
        # iommu_group_dma_owner_claimed(): a device bound to a kernel driver that
        # uses the DMA API claims the group; vfio-pci and pci-stub do not.
        return all(
            d.driver in (None, "vfio-pci", "pci-stub") for d in self.devices if not d.removed
        )


class Machine:
    """A simulated host: topology, device state, processes, trace and faults."""

    def __init__(
        self,
        topology: Topology | str,
        kernel_model: str | None = None,
        reset_model: str | None = None,
        time_scale: float = 1.0,
        *,
        kernel_version: KernelVersion = DEFAULT_KERNEL_VERSION,
        cdev: bool = True,
        iommufd: bool = True,
        vf_own_devset: bool | None = None,
        bus_master_feature: bool = False,
        msix_sparse: bool = False,
        msix_dynamic: bool | None = None,
    ) -> None:
        # The models not chosen explicitly follow the modelled kernel version.
        self.kernel_version = check_version(kernel_version)
        if kernel_model is None:
            kernel_model = default_kernel_model(kernel_version)
        if reset_model is None:
            reset_model = default_reset_model(kernel_version)
        if kernel_model not in ("devset", "legacy"):
            raise ValueError(f"kernel_model must be 'devset' or 'legacy', not {kernel_model!r}")
        if reset_model not in ("pre-6.3", "current"):
            raise ValueError(f"reset_model must be 'pre-6.3' or 'current', not {reset_model!r}")
        self.topology = load_topology(topology) if isinstance(topology, str) else topology
        self.kernel_model = kernel_model
        self.reset_model = reset_model
        self.time_scale = time_scale
        self.cdev = cdev
        self.iommufd = iommufd
        # From 6.17 each VF has a device set of its own; before, VFs on the PF's bus
        # shared the bus's set and its mutex.
        self.vf_own_devset = (
            kernel_version >= VF_OWN_DEVSET if vf_own_devset is None else vf_own_devset
        )
        self.bus_master_feature = bus_master_feature
        # Before Linux 4.16 the MSI-X table page was cut out of the BAR's mmap with a
        # sparse-mmap capability; since then the BAR maps whole and says MSIX_MAPPABLE.
        self.msix_sparse = msix_sparse
        # From 6.5 (e4163438e015, 6c8017c6a58d) MSI-X vectors can be added while others are
        # live where the platform allocates them dynamically (pci_msix_can_alloc_dyn; x86
        # does); NORESIZE is then clear.  False models a platform that cannot.
        self.msix_dynamic = kernel_version >= MSIX_DYNAMIC if msix_dynamic is None else msix_dynamic
        self.virqfds = Virqfds()  # the kernel's eventfd listeners (INTx unmask, ioeventfds)
        self.trace: list[Event] = []
        self.counters = Counters()
        self.faults = Faults()
        self.driver_lock = threading.Lock()  # legacy model: vfio-pci's global driver_lock
        self.files_lock = threading.RLock()
        self.devices: dict[str, Device] = {}
        self.bridges: dict[str, Bridge] = {}
        self.groups: dict[int, Group] = {}
        self.devsets: dict[str, DevSet] = {}
        self._bus_bridge: dict[int, Bridge] = {}
        self._minor = 0
        self._next_pid = 1000
        self._procs: dict[int, SimProcess] = {}
        self.vfio_pci_ids: set[tuple[int, int]] = set()
        self._mmio_next = 0xC000_0000
        self._mmio64_next = 0x40_0000_0000
        self._io_next = 0x1000
        self.closed = False
        self.host = HostDrivers(self)  # host drivers: probe/remove costs, netdevs, disks
        self._build()

    # --- construction --------------------------------------------------------------

    def _build(self) -> None:
        for bs in self.topology.bridges:
            br = Bridge(bs, bs.addr, bs.iommu_group)
            self.bridges[bs.addr] = br
            for bus in range(bs.secondary, bs.subordinate + 1):
                # the nearest bridge wins: later (deeper) bridges override
                self._bus_bridge.setdefault(bus, br)
            self._bus_bridge[bs.secondary] = br
        for spec in self.topology.functions:
            self._add_function(spec)
            if spec.sriov_initial:
                self.set_numvfs(self.devices[spec.addr], spec.sriov_initial)

    def _alloc_bars(self, dev: Device) -> None:
        for b in dev.spec.bars:
            size = max(b.size, 16)
            if b.is_io:
                base = (self._io_next + size - 1) & ~(size - 1)
                self._io_next = base + size
            elif b.is_64 and b.prefetch:
                base = (self._mmio64_next + size - 1) & ~(size - 1)
                self._mmio64_next = base + size
            else:
                base = (self._mmio_next + size - 1) & ~(size - 1)
                self._mmio_next = base + size
            dev.host_bars[b.index] = base
        if dev.spec.rom_size:
            size = dev.spec.rom_size
            base = (self._mmio_next + size - 1) & ~(size - 1)
            self._mmio_next = base + size
            dev.host_bars[6] = base

    def _add_function(self, spec: FunctionSpec) -> Device:
        bridge = self._bus_bridge.get(split_addr(spec.addr)[1])
        dev = Device(self, spec, bridge)
        self._alloc_bars(dev)
        if bridge is not None and not dev.is_vf:
            bridge.children.append(dev)
        self.devices[dev.addr] = dev
        self.groups.setdefault(dev.group_id, Group(dev.group_id)).devices.append(dev)
        if spec.model != "generic":
            from mock_vfio.devices import make_model

            dev.model = make_model(spec.model, dev)
        if dev.driver == "vfio-pci":
            self._vfio_register(dev)
        return dev

    def _devset_for(self, dev: Device) -> DevSet:
        # vfio_pci_core_register_device: root bus (and VFs) -> own set; a slot with
        # reset support -> the slot; else the whole bus, for bus-wide resets.
        br = dev.bridge
        if br is None or (dev.is_vf and self.vf_own_devset):
            name, bridge = dev.addr, None
        elif dev.is_vf:
            name, bridge = f"bus:{dev.addr[:7]}", None
        elif br.spec.hotplug_slot:
            name, bridge = f"slot:{br.addr}", br
        else:
            name, bridge = f"bus:{dev.addr[:7]}", br
        ds = self.devsets.get(name)
        if ds is None:
            ds = self.devsets[name] = DevSet(name, bridge=bridge)
        return ds

    def _vfio_register(self, dev: Device) -> None:
        ds = self._devset_for(dev)
        dev.devset = ds
        ds.devices.append(dev)
        if dev.minor < 0:
            dev.minor = self._minor
            self._minor += 1

    def _vfio_unregister(self, dev: Device) -> None:
        if dev.devset is not None:
            dev.devset.devices.remove(dev)
            if not dev.devset.devices:
                self.devsets.pop(dev.devset.name, None)
            dev.devset = None

    # --- SR-IOV ------------------------------------------------------------------

    def set_numvfs(self, pf: Device, n: int, *, probe: bool = False) -> None:
        """``sriov_numvfs``: ``probe`` (a write at run time, not the topology's boot
        state) creates the VFs unbound and lets the host probe each (``HostDrivers``)."""
        s = pf.spec
        if n > s.sriov_total:  # sriov_numvfs_store checks the range first
            raise oserror(errno.ERANGE, f"{n} > sriov_totalvfs {s.sriov_total}")
        if n == pf.numvfs:
            return
        if n and pf.numvfs:
            raise oserror(errno.EBUSY, "disable VFs first")
        if n == 0:
            for vf in pf.vfs:
                if vf.open_count:
                    raise oserror(errno.EBUSY, f"{vf.addr} is in use")
            for vf in pf.vfs:
                self._remove(vf)
            pf.vfs = []
            pf.numvfs = 0
            return
        dom, bus, slot, fn = split_addr(pf.addr)
        rid = (bus << 8) | (slot << 3) | fn
        gid = self.topology.next_group()
        gid = max([gid, *self.groups]) + 1
        for i in range(n):
            r = rid + s.vf_offset + i * s.vf_stride
            spec = FunctionSpec(
                addr=make_addr(r >> 8, (r >> 3) & 0x1F, r & 7, dom),
                vendor=s.vendor,
                device=s.vf_device,
                class_code=s.class_code,
                subsystem_vendor=s.subsystem_vendor,
                subsystem_device=s.subsystem_device,
                bars=s.vf_bars,
                msix=None,
                pm=False,
                link_speed=s.link_speed,
                link_width=s.link_width,
                flr=True,
                iommu_group=gid + i,
                driver=None if probe else s.vf_driver,
                native_driver=s.vf_native_driver,
                interrupt_pin=0,
                physfn=pf.addr,
                vf_index=i,
            )
            if s.vf_msix:
                from mock_vfio.topology import Msix

                spec.msix = Msix(
                    s.vf_msix,
                    3 if any(b.index == 3 for b in s.vf_bars) else 0,
                    0,
                    3 if any(b.index == 3 for b in s.vf_bars) else 0,
                    0x2000,
                )
            pf.vfs.append(self._add_function(spec))
            if probe:
                self.host.vf_added(pf.vfs[-1])
        pf.numvfs = n

    # --- trace helpers ----------------------------------------------------------------

    def record(self, ev: Event) -> None:
        self.trace.append(ev)

    def trace_command(self, dev: Device, on: bool, cause: str) -> None:
        # Each flip of memory decoding costs what the platform charges (a hypervisor
        # remapping the BARs), on the thread that made it.
        self.sleep(dev.spec.memory_toggle_cost)
        t = now()
        self.record(
            Event(
                "command_memory",
                t,
                t,
                thread_name(),
                dev.addr,
                dev.devset.name if dev.devset else None,
                cause=cause,
                value=on,
            )
        )
        self.counters.add("command_memory")

    @contextlib.contextmanager
    def locked(self, dev: Device, what: str) -> Iterator[None]:
        """The lock vfio-pci holds around open/release/hot reset of ``dev``."""
        if self.kernel_model == "legacy" or dev.devset is None:
            lock, name = self.driver_lock, "driver_lock"
        else:
            lock, name = dev.devset.lock, dev.devset.name
        if not lock.acquire(blocking=False):
            t0 = now()
            lock.acquire()
            self.record(Event("lock_wait", t0, now(), thread_name(), dev.addr, name, cause=what))
            self.counters.add("lock_waits")
        try:
            yield
        finally:
            lock.release()

    def sleep(self, seconds: float) -> None:
        if seconds > 0 and self.time_scale > 0:
            time.sleep(seconds * self.time_scale)

    # --- resets ----------------------------------------------------------------------

    def bus_reset_cost(self, bridge: Bridge | None) -> float:
        if self.reset_model == "pre-6.3":
            return SBR_PRE_63
        speed = bridge.spec.link_speed if bridge is not None else 0.0
        if speed <= 0:
            return SBR_CONVENTIONAL
        return SBR_FAST_LINK if speed <= 5.0 else SBR_SLOW_LINK

    def _do_reset(self, devs: list[Device], method: str, cause: str, devset: str | None) -> None:
        """Run one reset: memory decoding off, the delay, config restored."""
        cost = {"flr": FLR_COST, "pm": PM_COST}.get(method)
        if cost is None:
            cost = self.bus_reset_cost(devs[0].bridge if devs else None)
        targets = tuple(d.addr for d in devs) + ((devset,) if devset else ())
        extra, hang = self.faults.reset_delay(targets)
        saved = [(d, d.config.command()) for d in devs]
        t0 = now()
        for d in devs:
            if d.memory_enabled():
                d.set_command(d.config.command() & ~PCI_COMMAND_MEMORY, "reset")
        self.sleep(cost + extra)
        if hang is not None:
            hang.wait()
        for d, cmd in saved:
            if d.model is not None:
                d.model.reset()
            d.set_command(cmd, "restore")
        t1 = now()
        for d in devs:
            self.record(Event("reset", t0, t1, thread_name(), d.addr, devset, method, cause))
        self.counters.add("resets")
        self.counters.add(f"resets.{method}")
        self.counters.add(f"resets.cause.{cause}")

    def function_reset(self, dev: Device, cause: str, method: str | None = None) -> bool:
        """``pci_try_reset_function``: False when no method works (-ENOTTY)."""
        m = method or dev.function_reset_method()
        if m is None or dev.removed:
            return False
        if not dev.reset_lock.acquire(blocking=False):
            raise oserror(errno.EAGAIN, f"{dev.addr}: reset in progress")
        try:
            self._do_reset([dev], m, cause, dev.devset.name if dev.devset else None)
        finally:
            dev.reset_lock.release()
        return True

    def bridges_on(self, bridge: Bridge) -> list[Bridge]:
        """The bridges on ``bridge``'s secondary bus."""
        return [b for b in self.bridges.values() if split_addr(b.addr)[1] == bridge.spec.secondary]

    def bus_devices(self, dev: Device) -> list[Device]:
        """Devices a bus/slot reset of ``dev``'s parent bridge would hit.

        pci_bus_reset resets the secondary bus and, through the bridges on it,
        everything below them (their subordinate bus range).
        """
        if dev.bridge is None or dev.is_vf:
            return [dev]
        below = [
            range(b.spec.secondary, b.spec.subordinate + 1) for b in self.bridges_on(dev.bridge)
        ]
        return [
            d
            for d in self.devices.values()
            if not d.removed
            and (
                d.bridge is dev.bridge or (d.bridge is not None and any(d.bus in r for r in below))
            )
        ]

    def can_bus_reset(self, dev: Device) -> bool:
        # pci_probe_reset_bus(): needs a parent bridge (not a root bus), not a VF
        return dev.bridge is not None and not dev.is_vf

    def devset_resettable(self, ds: DevSet) -> Device | None:
        """``vfio_pci_dev_set_resettable``: every device the reset hits is in the set."""
        if not ds.devices:
            return None
        first = ds.devices[0]
        if not self.can_bus_reset(first):
            return None
        # vfio_pci_for_each_slot_or_bus walks every function below the bridge,
        # bridges included; a bridge is never in a vfio device set.
        if first.bridge is not None and self.bridges_on(first.bridge):
            return None
        members = set(ds.devices)
        for d in self.bus_devices(first):
            if d not in members:
                return None
        return first

    def bus_reset(self, ds: DevSet, cause: str) -> bool:
        first = self.devset_resettable(ds)
        if first is None:
            return False
        devs = [d for d in self.bus_devices(first) if not d.removed]
        if not devs:
            return False
        method = "slot" if first.bridge is not None and first.bridge.spec.hotplug_slot else "bus"
        self._do_reset(devs, method, cause, ds.name)
        return True

    # --- open and release ---------------------------------------------------------------

    def device_open(self, dev: Device, pid: int) -> None:
        """``vfio_df_open``: open_count and, on the first open, ``vfio_pci_core_enable``."""
        with self.locked(dev, "open"):
            if dev.removed or dev.driver != "vfio-pci" or dev.unbinding:
                raise oserror(errno.ENODEV, dev.addr)
            dev.open_count += 1
            if dev.open_count > 1:
                return
            t0 = now()
            dev.low_power = False
            dev.config.set_power_state(0)
            # pci_enable_device sets memory/IO decoding for the BARs present
            cmd = dev.config.command()
            if any(not b.is_io for b in dev.spec.bars):
                cmd |= PCI_COMMAND_MEMORY
            if any(b.is_io for b in dev.spec.bars):
                cmd |= PCI_COMMAND_IO
            dev.set_command(cmd, "enable")
            try:
                dev.reset_works = self.function_reset(dev, "open")
            except OSError:
                dev.open_count -= 1
                raise
            if dev.model is not None:
                dev.model.start()
            self.record(
                Event(
                    "open",
                    t0,
                    now(),
                    thread_name(),
                    dev.addr,
                    dev.devset.name if dev.devset else None,
                    pid=pid,
                )
            )
            self.counters.add("opens")

    def device_close(self, dev: Device, pid: int) -> None:
        """Last file reference gone: ``vfio_pci_core_disable`` and the set's bus reset."""
        with self.locked(dev, "release"):
            if dev.open_count > 1:
                dev.open_count -= 1
                return
            t0 = now()
            if dev.model is not None:
                dev.model.stop()
            dev.disable_irqs()
            dev.set_command(dev.config.command() & ~PCI_COMMAND_MASTER, "disable")
            dev.needs_reset = True
            if dev.reset_works and not dev.removed:
                try:
                    if self.function_reset(dev, "release"):
                        dev.needs_reset = False
                except OSError:
                    pass
            ds = dev.devset
            if ds is not None and not dev.removed:
                others_open = any(d.open_count for d in ds.devices if d is not dev)
                needed = not others_open and any(d.needs_reset for d in ds.devices)
                if needed and self.bus_reset(ds, "devset"):
                    for d in ds.devices:
                        d.needs_reset = False
            dev.open_count -= 1
            dev.dma = None
            self.record(
                Event(
                    "release", t0, now(), thread_name(), dev.addr, ds.name if ds else None, pid=pid
                )
            )
            self.counters.add("releases")
            if dev.removed:
                self._finish_remove(dev)

    # --- file references ---------------------------------------------------------------

    def get_file(self, f: File) -> None:
        with self.files_lock:
            f.refs += 1

    def put_file(self, f: File, pid: int) -> None:
        """Drop one reference; the last one runs the release on this thread (fput)."""
        with self.files_lock:
            f.refs -= 1
            last = f.refs == 0 and not f.released
            if last:
                f.released = True
        if last:
            f.release(pid)

    # --- processes -------------------------------------------------------------------

    def spawn(self, name: str = "proc", *, ptraceable: bool = True) -> SimProcess:
        from mock_vfio.process import SimProcess

        with self.files_lock:
            pid = self._next_pid
            self._next_pid += 1
            proc = SimProcess(self, pid, name, ptraceable)
            self._procs[pid] = proc
        return proc

    @property
    def processes(self) -> list[SimProcess]:
        with self.files_lock:
            return [p for p in self._procs.values() if p.alive]

    def process(self, pid: int) -> SimProcess:
        with self.files_lock:
            p = self._procs.get(pid)
        if p is None:
            raise oserror(errno.ESRCH, f"pid {pid}")
        return p

    def all_processes(self) -> list[SimProcess]:
        with self.files_lock:
            return list(self._procs.values())

    # --- queries -----------------------------------------------------------------------

    def device(self, addr: str) -> Device:
        from mock_vfio.topology import norm_addr

        dev = self.devices.get(norm_addr(addr))
        if dev is None:
            raise oserror(errno.ENODEV, addr)
        return dev

    def resets(
        self,
        kind: str | None = None,
        devset: str | None = None,
        device: str | None = None,
        cause: str | None = None,
    ) -> list[Event]:
        """Reset events; ``kind`` filters on the method (flr, pm, bus, slot).

        A bus reset records one event per device it hit; use ``unique_resets``
        to count resets rather than device hits.
        """
        return [
            e
            for e in self.trace
            if e.kind == "reset"
            and (kind is None or e.method == kind)
            and (devset is None or e.devset == devset)
            and (device is None or e.device == device)
            and (cause is None or e.cause == cause)
        ]

    def unique_resets(self, **kw: Any) -> list[Event]:
        """One event per reset operation (bus resets hit several devices at once)."""
        seen: set[tuple[float, str | None, str | None]] = set()
        out = []
        for e in self.resets(**kw):
            key = (e.start, e.devset if e.method in ("bus", "slot") else e.device, e.method)
            if key not in seen:
                seen.add(key)
                out.append(e)
        return out

    def events(self, kind: str) -> list[Event]:
        return [e for e in self.trace if e.kind == kind]

    def open_fds(self) -> int:
        """Simulated files still referenced by any fd or mapping."""
        with self.files_lock:
            files: set[int] = set()
            for p in self._procs.values():
                files.update(id(f) for f in p.files())
            return len(files)

    def device_for_minor(self, minor: int) -> Device | None:
        for d in self.devices.values():
            if d.minor == minor and d.driver == "vfio-pci" and not d.removed:
                return d
        return None

    # --- driver binding and removal ---------------------------------------------------------

    def bind(self, dev: Device, driver: str) -> None:
        if dev.driver is not None:
            raise oserror(errno.EBUSY, f"{dev.addr} is bound to {dev.driver}")
        if driver == "vfio-pci" and dev.numvfs:
            # vfio_pci_core_register_device refuses a PF with VFs enabled
            raise oserror(errno.EBUSY, f"{dev.addr} has SR-IOV enabled")
        self.host.probing(dev, driver)  # the driver's probe, on the writer's thread
        dev.driver = driver
        if driver == "vfio-pci":
            self._vfio_register(dev)
            dev.set_command(0, "bind")
        else:
            dev.set_command(PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER, "bind")
        t = now()
        self.record(Event("bind", t, t, thread_name(), dev.addr, value=driver))

    def unbind(self, dev: Device) -> None:
        if dev.driver is None:
            raise oserror(errno.ENODEV, f"{dev.addr} has no driver")
        if dev.driver == "vfio-pci" and dev.open_count:
            self._request_release(dev)
        if dev.driver == "vfio-pci":
            self._vfio_unregister(dev)
        old = dev.driver
        self.host.removing(dev, old)  # the driver's remove, on the writer's thread
        dev.driver = None
        t = now()
        self.record(Event("unbind", t, t, thread_name(), dev.addr, value=old))

    def _request_release(self, dev: Device) -> None:
        """``vfio_unregister_group_dev`` with the device open: the writer waits, for ever.

        No new open gets the device from here on; ``vfio_pci_core_request`` signals the
        request eventfd (when one is wired) at once and again every 10 s (model time) until
        the last file reference is gone (drivers/vfio/vfio_main.c, Linux 6.1;
        ``vfio_del_group_dev`` in vfio.c before 5.13).
        """
        dev.unbinding = True
        try:
            interval = max(REQUEST_INTERVAL * self.time_scale, 0.01)
            count = 0
            while dev.open_count:
                t = now()
                dev.fire_req()
                self.record(Event("request", t, t, thread_name(), dev.addr, value=str(count)))
                count += 1
                deadline = time.monotonic() + interval
                while dev.open_count and time.monotonic() < deadline:
                    time.sleep(0.001)
        finally:
            dev.unbinding = False

    def probe(self, dev: Device) -> None:
        """``drivers_probe``: bind the override driver, else a matching one."""
        if dev.driver is not None or dev.removed or not self.host.can_probe(dev):
            return
        want = dev.driver_override
        if want is None:
            if (dev.spec.vendor, dev.spec.device) in self.vfio_pci_ids:
                want = "vfio-pci"
            else:
                want = dev.spec.native_driver
        if want is None or want not in self.known_drivers():
            return
        with contextlib.suppress(OSError):
            self.bind(dev, want)

    def known_drivers(self) -> list[str]:
        names = {"vfio-pci", "pcieport", "pci-stub"}
        for d in self.devices.values():
            if d.spec.native_driver:
                names.add(d.spec.native_driver)
            if d.spec.vf_native_driver:  # the VF driver's module is loaded with the PF's
                names.add(d.spec.vf_native_driver)
            if d.driver:
                names.add(d.driver)
        return sorted(names)

    def remove_device(self, addr: str) -> None:
        """Surprise removal: later calls get ENODEV; an open device's release still runs."""
        dev = self.device(addr)
        for vf in list(dev.vfs):
            self.remove_device(vf.addr)
        with dev.lock:
            dev.removed = True
        t = now()
        self.record(Event("remove", t, t, thread_name(), dev.addr))
        dev.fire_req()
        if dev.open_count == 0:
            self._finish_remove(dev)

    def _remove(self, dev: Device) -> None:
        dev.removed = True
        self._finish_remove(dev)

    def _finish_remove(self, dev: Device) -> None:
        if dev.model is not None:
            dev.model.stop()
        if self.devices.get(dev.addr) is dev:
            del self.devices[dev.addr]
        if dev.driver == "vfio-pci":
            self._vfio_unregister(dev)
        grp = self.groups.get(dev.group_id)
        if grp is not None and dev in grp.devices:
            grp.devices.remove(dev)
            if not grp.devices:
                del self.groups[dev.group_id]
        if dev.bridge is not None and dev in dev.bridge.children:
            dev.bridge.children.remove(dev)

    def group_has_vfio(self, gid: int) -> bool:
        g = self.groups.get(gid)
        return g is not None and any(d.driver == "vfio-pci" for d in g.devices)

    # --- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop device threads and drop IRQ eventfds; BAR memory stays mapped (addresses
        handed out may still be touched), processes are not exited."""
        self.closed = True
        self.faults.clear()
        for d in list(self.devices.values()):
            if d.model is not None:
                d.model.stop()
            d.disable_irqs()
        self.virqfds.close()
        for p in self.all_processes():
            p.drop_mappings()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
