"""The simulated machine: topology, device state, groups, processes, trace and faults.

The kernel's rules live in the modules named after the kernel files they mirror:
:mod:`pci`, :mod:`pci_reset`, :mod:`pci_driver`, :mod:`iov` (drivers/pci/),
:mod:`vfio_pci_devset`, :mod:`vfio_pci_core` and its parts (drivers/vfio/pci/),
:mod:`vfio_group`, :mod:`vfio_container`, :mod:`vfio_device`, :mod:`iommufd` (drivers/vfio/,
drivers/iommu/iommufd/).
"""

from __future__ import annotations

import errno
import threading
import time
from typing import TYPE_CHECKING, Any

from mock_vfio.hostdrv import HostDrivers
from mock_vfio.hugetlb import HugetlbPool
from mock_vfio.iov import set_numvfs
from mock_vfio.iova import IOVA_PGSIZES, IOVA_PGSIZES_OLD
from mock_vfio.pci import Bridge, Device
from mock_vfio.pci_driver import add_function
from mock_vfio.topology import Topology
from mock_vfio.topology_load import load_topology
from mock_vfio.trace import Counters, Event, Faults, now, oserror, thread_name
from mock_vfio.version import (
    DEFAULT_KERNEL_VERSION,
    IOMMU_REAL_PGSIZES,
    MSIX_DYNAMIC,
    VF_OWN_DEVSET,
    KernelVersion,
    check_version,
    default_kernel_model,
    default_reset_model,
)
from mock_vfio.virqfd import Virqfds

if TYPE_CHECKING:
    from mock_vfio.file import File
    from mock_vfio.process import SimProcess
    from mock_vfio.vfio_group import Group
    from mock_vfio.vfio_pci_devset import DevSet


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
        iova_pgsizes: int | None = None,
        hugepages: dict[int, int] | None = None,
        io_strict_devmem: bool = True,
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
        # CONFIG_IO_STRICT_DEVMEM (Debian and Ubuntu kernels set it): a BAR claimed by a
        # driver cannot be mmapped through sysfs (EINVAL) and a claim revokes the sysfs
        # mappings already made (a later access is SIGBUS; counted here as wc_revoked).
        self.io_strict_devmem = io_strict_devmem
        # From 6.5 (e4163438e015, 6c8017c6a58d) MSI-X vectors can be added while others are
        # live where the platform allocates them dynamically (pci_msix_can_alloc_dyn; x86
        # does); NORESIZE is then clear.  False models a platform that cannot.
        self.msix_dynamic = kernel_version >= MSIX_DYNAMIC if msix_dynamic is None else msix_dynamic
        self.virqfds = Virqfds()  # the kernel's eventfd listeners (INTx unmask, ioeventfds)
        # The IOMMU's page sizes (VFIO_IOMMU_GET_INFO's iova_pgsizes): the smallest one is
        # the alignment type1 and an attached IOAS require.
        if iova_pgsizes is None:
            old = kernel_version < IOMMU_REAL_PGSIZES
            iova_pgsizes = IOVA_PGSIZES_OLD if old else IOVA_PGSIZES
        if iova_pgsizes <= 0:
            raise ValueError(f"iova_pgsizes must be a non-empty bitmap, not {iova_pgsizes:#x}")
        self.iova_pgsizes = iova_pgsizes
        # Free hugetlb pages by size (bytes): a MAP_HUGETLB mmap takes them from here
        # (ENOMEM when short) and is backed by ordinary memory, so hugepage code runs
        # on a host without any reserved.  None: such mmaps go to the host's own pool.
        self.hugepages = hugepages
        self.hugetlb = HugetlbPool(hugepages) if hugepages is not None else None
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
            add_function(self, spec)
            if spec.sriov_initial:
                set_numvfs(self, self.devices[spec.addr], spec.sriov_initial)

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

    def sleep(self, seconds: float) -> None:
        if seconds > 0 and self.time_scale > 0:
            time.sleep(seconds * self.time_scale)

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
            if d.minor == minor and d.vfio_pci and not d.removed:
                return d
        return None

    # --- groups ----------------------------------------------------------------------------

    def group_has_vfio(self, gid: int) -> bool:
        g = self.groups.get(gid)
        return g is not None and any(d.vfio_pci for d in g.devices)

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
