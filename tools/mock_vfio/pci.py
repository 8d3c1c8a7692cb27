"""PCI functions and bridges: ``struct pci_dev`` with its vfio-pci state, BAR memory, the
command register and interrupt delivery (drivers/pci/)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mock_vfio.config import (
    CAP_MSI,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    ConfigSpace,
)
from mock_vfio.pci_reset import default_reset_methods, function_reset
from mock_vfio.topology import Bar, BridgeSpec, FunctionSpec, split_addr
from mock_vfio.uapi import PAGE, page_align
from mock_vfio.version import RESET_METHOD_ATTR, VFIO_PCI_CORE, KernelVersion
from mock_vfio.vfio_pci_mmap import BarMaps, RwSem, fault_in_bars, zap_bars

if TYPE_CHECKING:
    from mock_vfio.devices import DeviceModel
    from mock_vfio.iova import DmaSpace
    from mock_vfio.machine import Machine
    from mock_vfio.vfio_pci_devset import DevSet

_MAP_NORESERVE = 0x4000


def is_vfio_pci_driver(driver: str | None, version: KernelVersion) -> bool:
    """vfio-pci, or a variant driver built on vfio_pci_core (5.15+), which registers its
    devices the same way; the simulator knows a variant by its name, which every one of
    them ends in ``_vfio_pci``."""
    if driver == "vfio-pci":
        return True
    return driver is not None and driver.endswith("_vfio_pci") and version >= VFIO_PCI_CORE


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
        # What an admin wrote to reset_method; before 5.15 there is no such attribute and the
        # kernel's own order applies.
        admin_set = machine.kernel_version >= RESET_METHOD_ATTR
        self.reset_methods: list[str] = list(
            spec.reset_method_set
            if spec.reset_method_set is not None and admin_set
            else default_reset_methods(self)
        )
        self.devset: DevSet | None = None
        self.removed = False
        self.open_count: int = 0
        self.unbinding = False  # an unbind waits for the last release (vfio_pci_core_request)
        self.needs_reset = False
        self.reset_works = False
        self.low_power: bool = False
        self.minor = -1  # vfio cdev minor, /dev/vfio/devices/vfio<minor>
        self._config: ConfigSpace | None = None
        self._bar_mem: dict[int, mmap.mmap] = {}
        self._bar_ptr: dict[int, Any] = {}
        self.host_bars: dict[int, int] = {}
        self.reset_lock = threading.Lock()  # pci_dev_lock, taken with trylock by resets
        self.memory_lock = RwSem()  # vfio_pci_core_device.memory_lock
        self.maps = BarMaps()  # the user's BAR mappings (the device file's address space)
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
        # BARs vfio-pci has claimed (vfio_pci_core_setup_barmap: the first mmap, read or
        # write of the BAR through VFIO; given back at the last release), and the open
        # resourceN_wc files of this device (pci_sysfs.SysfsResourceFile).
        self.claimed_bars: set[int] = set()
        self.wc_files: list[Any] = []

    # --- static facts ------------------------------------------------------

    @property
    def vfio_pci(self) -> bool:
        """Bound to vfio-pci or a variant driver: a vfio_pci_core device."""
        return is_vfio_pci_driver(self.driver, self.machine.kernel_version)

    @property
    def is_vf(self) -> bool:
        return self.spec.physfn is not None

    @property
    def bus(self) -> int:
        return split_addr(self.addr)[1]

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
        if self.driver is None or self.vfio_pci:
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
                size = page_align(max(bar.size if bar else 0, PAGE))
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
        self.maps.clear()
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
            with self.memory_lock.write():  # vfio_exp_config_write, as VFIO_DEVICE_RESET
                zap_bars(self, "reset")
                function_reset(self.machine, self, "config", method="flr")

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
        with self.memory_lock.write():
            self.low_power = False
            self.config.set_power_state(0)
            fault_in_bars(self)

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
