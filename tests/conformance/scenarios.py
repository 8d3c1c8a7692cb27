"""Conformance scenarios: the same VFIO operations on the simulator and on the real kernel.

Each scenario takes a :class:`vfiopy.Kernel` and a :class:`ResetProbe` and returns a JSON-able
dict of observations (errnos, flags, sizes, states, reset counts).  The simulator runs them on
the ``qemu-vmtest`` topology (:func:`simulate`); the QEMU guest of tools/vmtest runs them on the
real vfio-pci driver (``python3 scenarios.py --json``, resets counted with guest_trace's kprobes).
:func:`compare` sets the two side by side, key by key; a difference fails unless it is listed,
with its reason, in :data:`KNOWN_DIFFERENCES`.

Only the standard library and vfiopy (with its structlog) are imported at module level, so the guest can run this
file; the simulator (mock_vfio) and guest_trace are imported where they are used.  Every
scenario closes what it opened, so they run one after another in one process, in order.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

import structlog

from vfiopy import Container, Device, Group, Session, Sysfs
from vfiopy._uapi import (
    MAP_SHARED,
    PROT_READ,
    DeviceFlag,
    Extension,
    Ioctl,
    IommuType,
    IrqSetFlag,
    PciIrq,
    PciRegion,
    Struct,
    ffi,
    lib,
)
from vfiopy.kernel import EFD_NONBLOCK, O_RDWR, POLLIN, Kernel
from vfiopy.pci import CapId, ExtCapId
from vfiopy.region import Mapping, Region

# The devices of tools/vmtest's guest (vmtest.layout() with 6 NICs) and of the simulator's
# qemu-vmtest topology.
NIC = "0000:01:00.0"
NIC2 = "0000:02:00.0"
PAIR = ("0000:07:00.0", "0000:07:00.1")
EDU = "0000:08:01.0"
IVSHMEM = "0000:09:00.0"  # ivshmem-plain: BAR0 its 256 bytes of registers, BAR2 1 MiB of RAM
# ivshmem's registers (QEMU hw/misc/ivshmem.c)
IVSHMEM_INTRMASK, IVSHMEM_INTRSTATUS, IVSHMEM_IVPOSITION = 0x0, 0x4, 0x8
PF_EXITING = 0x4  # task flag in /proc/PID/stat (include/linux/sched.h)
EDU_ID = 0x010000ED  # edu's identification register (BAR0 0x00): version 1.0
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2

Json = dict[str, Any]


class ResetProbe(Protocol):
    """Counts the resets the kernel performed since the last :meth:`start`."""

    def start(self) -> None: ...
    def bus_resets(self, bdf: str) -> int:
        """Secondary bus (or slot) resets that hit ``bdf``."""
        ...

    def function_resets(self, bdf: str) -> int:
        """Function resets of ``bdf`` (``__pci_reset_function_locked``, whatever method)."""
        ...


Scenario = Callable[[Kernel, ResetProbe], Json]
SimScenario = Callable[[Kernel, ResetProbe, Any], Json]
"""A scenario the guest cannot show: it also gets the simulated Machine (fault injection)."""

# (scenario, dotted key) -> why the simulator and the real kernel legitimately differ there.
# Keep this table short and every reason concrete; never add an entry to make a bug pass.
_NESTING = (
    "VFIO_TYPE1_NESTING_IOMMU: type1 answers 1 up to Linux 6.12 (the guest runs 6.1); the "
    "extension was removed in 6.13 and the simulator models current kernels"
)
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    ("open_close", "extensions.TYPE1_NESTING_IOMMU"): _NESTING,
    ("open_close", "extensions_iommu_set.TYPE1_NESTING_IOMMU"): _NESTING,
}


# --- helpers ------------------------------------------------------------------------------------


def errno_of(fn: Callable[[], object]) -> int:
    """0 when ``fn`` succeeds, else the errno of the OSError it raised."""
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


def resets(probe: ResetProbe, *bdfs: str) -> Json:
    return {
        bdf: {"bus": probe.bus_resets(bdf), "function": probe.function_resets(bdf)} for bdf in bdfs
    }


@contextmanager
def opened(
    kernel: Kernel, *bdfs: str
) -> Iterator[tuple[Container, dict[int, Group], list[Device]]]:
    """A container with the IOMMU set, the groups of ``bdfs`` attached and the devices open.

    Closed in the kernel's order on exit: devices, groups, container.
    """
    sysfs = Sysfs(kernel)
    with ExitStack() as stack:
        container = stack.enter_context(Container(kernel))
        groups: dict[int, Group] = {}
        devices: list[Device] = []
        for bdf in bdfs:
            number = sysfs.iommu_group(bdf)
            if number not in groups:
                group = Group(number, kernel, sysfs)
                stack.callback(group.close)
                group.set_container(container)
                container.set_iommu()
                groups[number] = group
        for bdf in bdfs:
            dev = Device.from_group(groups[sysfs.iommu_group(bdf)], bdf)
            stack.callback(dev.close)
            devices.append(dev)
        yield container, groups, devices


def capability_offsets(dev: Device) -> Json:
    out: Json = {}
    for cap in dev.config.capabilities():
        try:
            name = (ExtCapId(cap.id) if cap.extended else CapId(cap.id)).name
        except ValueError:
            name = f"{'ext_' if cap.extended else ''}{cap.id:#04x}"
        out[("ext_" if cap.extended else "") + name] = cap.offset
    return out


def config_command(kernel: Kernel, dev: Device) -> int:
    """The command register through the config region (the user's, virtualised, view)."""
    off = dev.region(PciRegion.CONFIG).offset + PCI_COMMAND
    return int.from_bytes(kernel.pread(dev.fd, 2, off), "little")


def write_command(kernel: Kernel, dev: Device, value: int) -> None:
    """A raw write of the command register: vfiopy's own config writes refuse clearing
    MEMORY under live mappings, the kernel does not."""
    off = dev.region(PciRegion.CONFIG).offset + PCI_COMMAND
    kernel.pwrite(dev.fd, value.to_bytes(2, "little"), off)


def touch(bar: Mapping, off: int) -> str:
    """One 32-bit load through ``bar`` in a forked child: "ok" or the signal that ended it.

    A BAR the kernel zapped answers the load with SIGBUS, which would end this process;
    the child takes it instead.  It does nothing but the load and _exit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            faulthandler.disable()  # the signal ends it quietly; the parent reports it
            bar.read32(off)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return "ok" if os.waitstatus_to_exitcode(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


def group_status(kernel: Kernel, fd: int) -> int:
    s = Struct("struct vfio_group_status")
    kernel.ioctl(fd, Ioctl.GROUP_GET_STATUS, s.p)
    return int(s.p.flags)


# --- scenarios ----------------------------------------------------------------------------------


def open_close(kernel: Kernel, probe: ResetProbe) -> Json:
    """Container, group and device lifecycle: API version, extensions, status flags, info."""
    sysfs = Sysfs(kernel)
    out: Json = {"groups": {bdf: sysfs.iommu_group(bdf) for bdf in (NIC, NIC2, *PAIR, EDU)}}
    with Container(kernel) as container:
        out["api_version"] = kernel.ioctl(container.fd, Ioctl.GET_API_VERSION, 0)
        out["extensions"] = {e.name: container.check_extension(e) for e in Extension}
        out["set_iommu_without_group"] = errno_of(
            lambda: kernel.ioctl(container.fd, Ioctl.SET_IOMMU, int(IommuType.TYPE1v2))
        )
        with Group(sysfs.iommu_group(NIC), kernel, sysfs) as group:
            out["status_before"] = group_status(kernel, group.fd)
            out["get_device_fd_without_container"] = errno_of(lambda: group.get_device_fd(NIC))
            group.set_container(container)
            out["status_attached"] = group_status(kernel, group.fd)
            out["get_device_fd_without_iommu"] = errno_of(lambda: group.get_device_fd(NIC))
            out["iommu_type"] = container.set_iommu().name
            out["extensions_iommu_set"] = {e.name: container.check_extension(e) for e in Extension}
            out["set_iommu_twice"] = errno_of(
                lambda: kernel.ioctl(container.fd, Ioctl.SET_IOMMU, int(IommuType.TYPE1v2))
            )
            info = container.info()
            out["iommu_info"] = {
                "pgsizes": info.pgsizes,
                "iova_ranges": [[r.start, r.last] for r in info.iova_ranges],
                "dma_avail": info.dma_avail,
            }
            out["status_iommu_set"] = group_status(kernel, group.fd)
            with Device.from_group(group, NIC) as dev:
                out["unset_container_with_device_open"] = errno_of(
                    lambda: kernel.ioctl(group.fd, Ioctl.GROUP_UNSET_CONTAINER, 0)
                )
                out["device"] = {
                    "flags": int(dev.info.flags),
                    "num_regions": dev.info.num_regions,
                    "num_irqs": dev.info.num_irqs,
                }
    devices: Json = {}
    for bdf in (PAIR[0], EDU):
        with opened(kernel, bdf) as (_, _, (dev,)):
            devices[bdf] = {
                "flags": int(dev.info.flags),
                "num_regions": dev.info.num_regions,
                "num_irqs": dev.info.num_irqs,
            }
    out["devices"] = devices
    return out


def errnos(kernel: Kernel, probe: ResetProbe) -> Json:
    """The errnos of common mistakes."""
    sysfs = Sysfs(kernel)
    out: Json = {}
    path = f"/dev/vfio/{sysfs.iommu_group(NIC)}"
    with opened(kernel, NIC) as (container, groups, _):
        (group,) = groups.values()
        out["second_group_open"] = errno_of(lambda: kernel.close(kernel.open(path, O_RDWR)))
        out["get_device_fd_unknown_name"] = errno_of(lambda: group.get_device_fd("0000:7f:1f.7"))
        out["get_device_fd_other_group"] = errno_of(lambda: group.get_device_fd(NIC2))
        out["get_device_fd_twice"] = errno_of(lambda: kernel.close(group.get_device_fd(NIC)))
        short = Struct("struct vfio_group_status")
        short.p.argsz = 4
        out["group_status_short_argsz"] = errno_of(
            lambda: kernel.ioctl(group.fd, Ioctl.GROUP_GET_STATUS, short.p)
        )
        out["set_container_twice"] = errno_of(lambda: group.set_container(container))
        out["unknown_extension"] = kernel.ioctl(container.fd, Ioctl.CHECK_EXTENSION, 0x7FFF)
    with opened(kernel, NIC) as (_, _, (dev,)):
        info = Struct("struct vfio_device_info")
        info.p.argsz = 8
        out["device_info_short_argsz"] = errno_of(
            lambda: kernel.ioctl(dev.fd, Ioctl.DEVICE_GET_INFO, info.p)
        )
        region = Struct("struct vfio_region_info")
        region.p.index = 42
        out["region_info_bad_index"] = errno_of(
            lambda: kernel.ioctl(dev.fd, Ioctl.DEVICE_GET_REGION_INFO, region.p)
        )
        irq = Struct("struct vfio_irq_info")
        irq.p.index = 42
        out["irq_info_bad_index"] = errno_of(
            lambda: kernel.ioctl(dev.fd, Ioctl.DEVICE_GET_IRQ_INFO, irq.p)
        )
        out["unknown_device_ioctl"] = errno_of(lambda: kernel.ioctl(dev.fd, Ioctl.SET_IOMMU, 0))
    return out


def region_json(r: Region) -> Json:
    return {
        "size": r.size,
        "offset": r.offset,
        "flags": int(r.flags),
        "sparse": None if r.sparse is None else [[a.offset, a.size] for a in r.sparse],
        "msix_mappable": r.msix_mappable,
        "type": None if r.type is None else list(r.type),
    }


def region_info(kernel: Kernel, probe: ResetProbe) -> Json:
    """Every region of an e1000e and of edu: size, offset, flags, caps, mmap areas."""
    out: Json = {}
    for bdf in (NIC, EDU):
        regions: Json = {}
        with opened(kernel, bdf) as (_, _, (dev,)):
            for index in range(dev.info.num_regions):
                try:
                    regions[str(index)] = region_json(dev.region(index))
                except OSError as exc:
                    regions[str(index)] = {"errno": exc.errno}
        out[bdf] = regions
    return out


def subpage_bar(kernel: Kernel, probe: ResetProbe) -> Json:
    """ivshmem's 256-byte BAR0, which starts a page: mappable from Linux 4.7, as its whole
    page; BAR2 (1 MiB) for comparison.  The registers read through the mapping, IntrMask
    written and read back; vfiopy's accessors stop at the BAR's end, the kernel's pread and a
    second page refuse, and a raw load past the BAR within the page reads the reserved rest.
    """
    out: Json = {}
    with opened(kernel, IVSHMEM) as (_, _, (dev,)):
        bar0, bar2 = dev.region(PciRegion.BAR0), dev.region(PciRegion.BAR2)
        out["bar0"], out["bar2"] = region_json(bar0), region_json(bar2)
        out["bar0_areas"] = [[a.offset, a.size] for a in bar0.areas]
        m = bar0.mmap()
        try:
            out["map_size"], out["map_length"] = m.size, m.length
            out["intrmask"] = m.read32(IVSHMEM_INTRMASK)
            out["intrstatus"] = m.read32(IVSHMEM_INTRSTATUS)
            out["ivposition"] = m.read32(IVSHMEM_IVPOSITION)
            m.write32(IVSHMEM_INTRMASK, 0x5A5A_A5A5)
            out["intrmask_written"] = m.read32(IVSHMEM_INTRMASK)
            m.write32(IVSHMEM_INTRMASK, 0)
            out["read_at_end"] = errno_of(lambda: m.read32(bar0.size))
            out["read_last"] = errno_of(lambda: m.read32(bar0.size - 4))
            out["past_bar"] = [lib.vfiopy_read32(m.addr + off) for off in (bar0.size, 0xFFC)]
        finally:
            m.close()
        out["pread_past_bar"] = errno_of(lambda: kernel.pread(dev.fd, 4, bar0.offset + bar0.size))

        def map_second_page() -> None:
            kernel.munmap(
                kernel.mmap(dev.fd, 4096, bar0.offset + 4096, PROT_READ, MAP_SHARED), 4096
            )

        out["mmap_second_page"] = errno_of(map_second_page)
    return out


def irq_info(kernel: Kernel, probe: ResetProbe) -> Json:
    """IRQ indexes (count, flags or errno); MSI loopback to an eventfd; MSI-X while MSI is on."""
    out: Json = {}
    for bdf in (NIC, EDU):
        irqs: Json = {}
        with opened(kernel, bdf) as (_, _, (dev,)):
            for index in range(dev.info.num_irqs):
                try:
                    i = dev.irq(index)
                except OSError as exc:
                    irqs[str(index)] = {"errno": exc.errno}
                    continue
                irqs[str(index)] = {"count": i.count, "flags": int(i.flags)}
        out[bdf] = irqs
    with opened(kernel, NIC) as (_, _, (dev,)):
        msi = dev.irq(PciIrq.MSI)
        msi.enable(1)
        out["msi_read_before"] = msi.read(0)
        msi.trigger(0)
        out["msi_read_after_trigger"] = msi.read(0)
        out["msix_while_msi"] = errno_of(lambda: dev.irq(PciIrq.MSIX).enable(1))
        out["msi_vector_out_of_range"] = errno_of(
            lambda: _set_irqs(kernel, dev.fd, PciIrq.MSI, 1, 1)
        )
        msi.disable()
        out["msix_after_msi_off"] = errno_of(lambda: dev.irq(PciIrq.MSIX).enable(5))
        dev.irq(PciIrq.MSIX).disable()
    return out


def _set_irqs(kernel: Kernel, fd: int, index: int, start: int, count: int) -> None:
    s = Struct("struct vfio_irq_set")
    s.p.flags = IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER
    s.p.index, s.p.start, s.p.count = index, start, count
    kernel.ioctl(fd, Ioctl.DEVICE_SET_IRQS, s.p)


def config_space(kernel: Kernel, probe: ResetProbe) -> Json:
    """Identity, capability offsets and the command register, read through VFIO after open."""
    out: Json = {}
    for bdf in (NIC, PAIR[0], PAIR[1], EDU):
        with opened(kernel, bdf) as (_, _, (dev,)):
            cfg = dev.config
            out[bdf] = {
                "vendor": cfg.vendor_id,
                "device": cfg.device_id,
                "class": cfg.class_code,
                "revision": cfg.revision_id,
                "subsystem": [cfg.subsystem_vendor_id, cfg.subsystem_id],
                "multifunction": cfg.multifunction,
                "interrupt_pin": cfg.interrupt_pin,
                "command": int(cfg.command),
                "config_size": dev.region(PciRegion.CONFIG).size,
                "capabilities": capability_offsets(dev),
            }
    return out


def bar_mmio(kernel: Kernel, probe: ResetProbe) -> Json:
    """edu's BAR0: the identification register with one 32-bit load, liveness inverted.

    The ID register is read again through the fd (pread) after the store to the liveness
    register: a load after a store, which flushes the posted write on real hardware and makes
    the simulated device see a store made through the mapping.
    """
    with opened(kernel, EDU) as (_, _, (dev,)):
        region = dev.region(PciRegion.BAR0)
        bar = region.mmap()
        ident = bar.read32(0x00)
        bar.write32(0x04, 0x12345678)
        ident_pread = int.from_bytes(region.read(0x00, 4), "little")
        liveness = bar.read32(0x04)
        bar.close()
    return {
        "id": ident,
        "id_matches": ident == EDU_ID,
        "id_pread": ident_pread,
        "liveness": liveness,
    }


def bar_memory_off(kernel: Kernel, probe: ResetProbe) -> Json:
    """edu's BAR0 with PCI_COMMAND_MEMORY cleared by the user, then set again.

    Clearing it zaps the BAR's mappings (Linux 5.8+): the next load through one faults with
    SIGBUS, and pread/pwrite of the BAR fail with EIO; with MEMORY set again the mapping
    faults back in and both work.
    """
    out: Json = {}
    with opened(kernel, EDU) as (_, _, (dev,)):
        region = dev.region(PciRegion.BAR0)
        bar = region.mmap()
        cmd = config_command(kernel, dev)
        out["memory_at_open"] = bool(cmd & PCI_COMMAND_MEMORY)
        out["load_on"] = touch(bar, 0x00)
        write_command(kernel, dev, cmd & ~PCI_COMMAND_MEMORY)
        out["memory_cleared"] = not config_command(kernel, dev) & PCI_COMMAND_MEMORY
        out["load_off"] = touch(bar, 0x00)
        out["pread_off"] = errno_of(lambda: region.read(0x00, 4))
        out["pwrite_off"] = errno_of(lambda: region.write(0x04, b"\x00" * 4))
        out["mapping_still_listed"] = len(region.mappings)
        write_command(kernel, dev, cmd)
        out["load_on_again"] = touch(bar, 0x00)
        out["id_on_again"] = bar.read32(0x00)
        out["pread_on_again"] = int.from_bytes(region.read(0x00, 4), "little")
        bar.close()
    return out


def bar_reset_mapped(kernel: Kernel, probe: ResetProbe) -> Json:
    """VFIO_DEVICE_RESET of edu with BAR0 mapped: the kernel zaps the mapping around the
    reset, and the next load faults it back in (MEMORY is still set in the user's view)."""
    out: Json = {}
    with opened(kernel, EDU) as (_, _, (dev,)):
        region = dev.region(PciRegion.BAR0)
        bar = region.mmap()
        out["id_before"] = bar.read32(0x00)
        probe.start()
        out["reset"] = errno_of(lambda: kernel.ioctl(dev.fd, Ioctl.DEVICE_RESET, 0))
        out["resets"] = resets(probe, EDU)
        out["memory_after"] = bool(config_command(kernel, dev) & PCI_COMMAND_MEMORY)
        out["load_after"] = touch(bar, 0x00)
        out["id_after"] = bar.read32(0x00)
        bar.close()
    return out


def function_reset(kernel: Kernel, probe: ResetProbe) -> Json:
    """VFIO_DEVICE_RESET on devices with a function reset (NIC, edu: `bus`) and without (pair)."""
    out: Json = {}
    for bdf in (NIC, EDU, PAIR[0]):
        with opened(kernel, bdf) as (_, _, (dev,)):
            fd = dev.fd
            probe.start()
            err = errno_of(lambda: kernel.ioctl(fd, Ioctl.DEVICE_RESET, 0))  # noqa: B023
            out[bdf] = {
                "reset_flag": bool(dev.info.flags & DeviceFlag.RESET),
                "errno": err,
                "resets": resets(probe, bdf),
            }
    return out


def hot_reset_owned(kernel: Kernel, probe: ResetProbe) -> Json:
    """VFIO_DEVICE_PCI_HOT_RESET with the device's own group fd: one bus reset."""
    out: Json = {}
    for bdfs in ((NIC,), PAIR):
        with opened(kernel, *bdfs) as (_, _, devices):
            dev = devices[0]
            out[f"{bdfs[0]}_info"] = [[str(d.address), d.group_id] for d in dev.hot_reset_info()]
            probe.start()
            out[f"{bdfs[0]}_errno"] = errno_of(dev.hot_reset)
            out[f"{bdfs[0]}_resets"] = resets(probe, *bdfs)
    # The pair's group covers both functions: a hot reset with only one of them open.
    with opened(kernel, PAIR[0]) as (_, _, (dev,)):
        probe.start()
        out["pair_one_open_errno"] = errno_of(dev.hot_reset)
        out["pair_one_open_resets"] = resets(probe, *PAIR)
    return out


def hot_reset_not_owned(kernel: Kernel, probe: ResetProbe) -> Json:
    """HOT_RESET whose group fds do not cover the affected devices: refused, nothing reset."""
    out: Json = {}
    with opened(kernel, NIC, NIC2) as (container, _, (dev, dev2)):
        assert dev2.group is not None
        other = dev2.group
        probe.start()
        out["other_group"] = errno_of(lambda: dev.hot_reset(groups=[other]))
        out["no_groups"] = errno_of(lambda: _hot_reset_fds(kernel, dev.fd, []))
        out["container_fd"] = errno_of(lambda: _hot_reset_fds(kernel, dev.fd, [container.fd]))
        out["eventfd"] = errno_of(lambda: _hot_reset_with_eventfd(kernel, dev.fd))
        out["resets"] = resets(probe, NIC, NIC2)
    return out


def _hot_reset_fds(kernel: Kernel, fd: int, fds: list[int]) -> None:
    s = Struct("struct vfio_pci_hot_reset", ffi.sizeof("struct vfio_pci_hot_reset") + 4 * len(fds))
    s.p.count = len(fds)
    for i, f in enumerate(fds):
        s.p.group_fds[i] = f
    kernel.ioctl(fd, Ioctl.DEVICE_PCI_HOT_RESET, s.p)


def _hot_reset_with_eventfd(kernel: Kernel, fd: int) -> None:
    efd = kernel.eventfd(0, EFD_NONBLOCK)
    try:
        _hot_reset_fds(kernel, fd, [efd])
    finally:
        kernel.close(efd)


def release_single(kernel: Kernel, probe: ResetProbe) -> Json:
    """One NIC (reset_method `bus`): reset at open and again at close."""
    out: Json = {}
    with Session(kernel) as session:
        probe.start()
        dev = session.open_device(NIC)
        out["open"] = resets(probe, NIC)
        probe.start()
        session.close_device(dev)
        out["close"] = resets(probe, NIC)
    return out


def release_pair(kernel: Kernel, probe: ResetProbe) -> Json:
    """The multifunction pair: no reset at open or first close, one bus reset at the last."""
    out: Json = {}
    with Session(kernel) as session:
        probe.start()
        first = session.open_device(PAIR[0])
        last = session.open_device(PAIR[1])
        out["open"] = resets(probe, *PAIR)
        probe.start()
        session.close_device(first)
        out["first_close"] = resets(probe, *PAIR)
        probe.start()
        session.close_device(last)
        out["last_close"] = resets(probe, *PAIR)
    return out


def dma_map(kernel: Kernel, probe: ResetProbe) -> Json:
    """DMA mappings through the type1 IOMMU: accounting, overlap, alignment, unmap sizes."""
    out: Json = {}
    with Session(kernel) as session:
        session.open_device(EDU)
        container = session.container
        assert container is not None
        before = container.dma_avail()
        buf = session.alloc_dma_buffer(0x4000, limit=1 << 28)
        after = container.dma_avail()
        out["dma_avail_used"] = None if before is None or after is None else before - after
        out["overlap"] = errno_of(lambda: container.map_dma(buf.vaddr, buf.iova, 0x1000))
        out["unaligned_iova"] = errno_of(
            lambda: container.map_dma(buf.vaddr, buf.iova + 0x10_0001, 0x1000)
        )
        iova = buf.iova + 0x10_0000
        out["map_second"] = errno_of(lambda: container.map_dma(buf.vaddr, iova, 0x2000))
        out["unmap_split"] = errno_of(lambda: container.unmap_dma(iova, 0x1000))
        out["unmapped_bytes"] = container.unmap_dma(iova, 0x2000)
        out["unmap_again_bytes"] = container.unmap_dma(iova, 0x2000)
        session.free_dma_buffer(buf)
    return out


SCENARIOS: dict[str, Scenario] = {
    "open_close": open_close,
    "errnos": errnos,
    "region_info": region_info,
    "subpage_bar": subpage_bar,
    "irq_info": irq_info,
    "config_space": config_space,
    "bar_mmio": bar_mmio,
    "bar_memory_off": bar_memory_off,
    "bar_reset_mapped": bar_reset_mapped,
    "function_reset": function_reset,
    "hot_reset_owned": hot_reset_owned,
    "hot_reset_not_owned": hot_reset_not_owned,
    "release_single": release_single,
    "release_pair": release_pair,
    "dma_map": dma_map,
}


# --- scenarios only the simulator can show ------------------------------------------------------
# They need a reset that hangs, which the guest cannot arrange: the Machine's fault injection
# makes one, and the scenario watches what the kernel does around it.


@contextmanager
def hung_reset(machine: Any, target: str, call: Callable[[], object]) -> Iterator[list[int]]:
    """``call`` on a thread of its own while resets of ``target`` hang; yields, once the
    call's reset hangs, a list that gets its errno (0 for success) when the hang ends."""
    release = machine.faults.hang_reset(target)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(errno_of(call)), daemon=True)
    thread.start()
    try:
        if not machine.faults.wait_hung(target, timeout=60.0):
            raise RuntimeError(f"the reset of {target} never started")
        yield result
    finally:
        release.set()
        thread.join()


def task_state(kernel: Kernel, pid: int) -> tuple[str, int]:
    """(state letter, flags) from /proc/PID/stat."""
    fields = kernel.read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    return fields[0], int(fields[6])


def hot_reset_memory_lock(kernel: Kernel, probe: ResetProbe, machine: Any) -> Json:
    """VFIO_DEVICE_PCI_HOT_RESET while a reset of the NIC hangs on another thread.

    VFIO_DEVICE_RESET holds the device's memory_lock (and its pci_dev_lock): the hot reset's
    down_write_trylock fails, EBUSY.  A sysfs reset holds only the pci_dev_lock: the memory
    locks are taken, and pci_reset_bus cannot lock the bus, EAGAIN.
    """
    out: Json = {}
    with opened(kernel, NIC) as (_, _, (dev,)):
        ioctl_reset = lambda: kernel.ioctl(dev.fd, Ioctl.DEVICE_RESET, 0)  # noqa: E731
        with hung_reset(machine, NIC, ioctl_reset) as device_reset:
            probe.start()
            out["during_device_reset"] = errno_of(dev.hot_reset)
            out["resets_during_device_reset"] = resets(probe, NIC)
        out["device_reset"] = device_reset[0]
        sysfs_reset = lambda: kernel.write_text(f"/sys/bus/pci/devices/{NIC}/reset", "1")  # noqa: E731
        with hung_reset(machine, NIC, sysfs_reset) as sysfs:
            probe.start()
            out["during_sysfs_reset"] = errno_of(dev.hot_reset)
            out["resets_during_sysfs_reset"] = resets(probe, NIC)
        out["sysfs_reset"] = sysfs[0]
        probe.start()
        out["after"] = errno_of(dev.hot_reset)
        out["resets_after"] = resets(probe, NIC)
    return out


def exit_during_hung_reset(kernel: Kernel, probe: ResetProbe, machine: Any) -> Json:
    """A VMM killed while its VFIO_DEVICE_RESET hangs: the task sleeps uninterruptibly (D),
    SIGKILL waits for the reset to return, and only then does its exit release its files."""
    out: Json = {}
    vmm = machine.spawn(name="vmm")
    session = Session(vmm)
    dev = session.open_device(NIC)
    pidfd = kernel.pidfd_open(vmm.pid)
    try:
        ioctl_reset = lambda: vmm.ioctl(dev.fd, Ioctl.DEVICE_RESET, 0)  # noqa: E731
        with hung_reset(machine, NIC, ioctl_reset):
            out["state_in_reset"] = task_state(kernel, vmm.pid)[0]
            kernel.pidfd_send_signal(pidfd, signal.SIGKILL)
            out["exited_after_kill"] = bool(kernel.poll([(pidfd, POLLIN)], 0))
            state, flags = task_state(kernel, vmm.pid)
            out["state_after_kill"] = state
            out["exiting_after_kill"] = bool(flags & PF_EXITING)
            out["fds_after_kill"] = len(kernel.listdir(f"/proc/{vmm.pid}/fd"))
            mark = len(machine.trace)
        out["exited"] = bool(kernel.poll([(pidfd, POLLIN)], 60_000))
        out["nic_open_after_exit"] = machine.device(NIC).open_count
        # The hung reset is recorded when it returns; the exit's release comes after it.
        out["resets_after_hang"] = [
            e.cause for e in machine.trace[mark:] if e.kind == "reset" and e.device == NIC
        ]
    finally:
        kernel.close(pidfd)
    return out


SIM_ONLY: dict[str, SimScenario] = {
    "hot_reset_memory_lock": hot_reset_memory_lock,
    "exit_during_hung_reset": exit_during_hung_reset,
}


# --- running and comparing --------------------------------------------------------------------


def run_all(
    kernel: Kernel, probe: ResetProbe, names: Sequence[str] | None = None, machine: Any = None
) -> Json:
    """{scenario: observations}; a scenario that raised gives {"error": ...} instead.

    With a simulated ``machine``, the simulator-only scenarios (:data:`SIM_ONLY`) run too.
    """
    out: Json = {}
    default = list(SCENARIOS) + (list(SIM_ONLY) if machine is not None else [])
    for name in names or default:
        try:
            if name in SIM_ONLY:
                out[name] = SIM_ONLY[name](kernel, probe, machine)
            else:
                out[name] = SCENARIOS[name](kernel, probe)
        except Exception as exc:
            out[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
    return out


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.key: leaf}; lists stay leaves (compared whole)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def compare(sim: Json, real: Json) -> list[str]:
    """Differences as `scenario: key: simulator X, kernel Y`, known differences left out."""
    problems: list[str] = []
    for name in sorted(set(sim) | set(real)):
        s = flatten(sim.get(name, {"missing": True}))
        r = flatten(real.get(name, {"missing": True}))
        s.pop("traceback", None)
        r.pop("traceback", None)
        for key in sorted(set(s) | set(r)):
            if (name, key) in KNOWN_DIFFERENCES:
                continue
            sv, rv = s.get(key, "<absent>"), r.get(key, "<absent>")
            if sv != rv:
                problems.append(f"{name}: {key}: simulator {sv!r}, kernel {rv!r}")
    return problems


class SimProbe:
    """Resets from a mock_vfio Machine's trace."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.mark = 0

    def start(self) -> None:
        self.mark = len(self.machine.trace)

    def _events(self, bdf: str) -> list[Any]:
        return [e for e in self.machine.trace[self.mark :] if e.kind == "reset" and e.device == bdf]

    def bus_resets(self, bdf: str) -> int:
        return sum(1 for e in self._events(bdf) if e.method in ("bus", "slot"))

    def function_resets(self, bdf: str) -> int:
        # vfio's open/release/VFIO_DEVICE_RESET/config FLR go through the function reset path;
        # the device set's bus reset and VFIO_DEVICE_PCI_HOT_RESET do not.
        return sum(
            1 for e in self._events(bdf) if e.cause in ("open", "release", "ioctl", "config")
        )


class GuestProbe:
    """Resets from the real kernel, with guest_trace's kprobes (tools/vmtest)."""

    def __init__(self) -> None:
        import guest_trace

        self.trace = guest_trace
        guest_trace.start()

    def start(self) -> None:
        self.trace.clear()

    def bus_resets(self, bdf: str) -> int:
        return int(self.trace.bus_resets_of(self.trace.read(), bdf, only_ok=False))

    def function_resets(self, bdf: str) -> int:
        return sum(1 for e in self.trace.read() if e.kind == "function" and e.dev == bdf)

    def stop(self) -> None:
        self.trace.stop()


def simulate(names: Sequence[str] | None = None, version: tuple[int, int] | None = None) -> Json:
    """All scenarios on a fresh simulated qemu-vmtest machine (modelled delays switched off),
    of the kernel ``version`` (the simulator's default when None)."""
    from mock_vfio import Machine, load_topology
    from mock_vfio.version import DEFAULT_KERNEL_VERSION

    machine = Machine(
        load_topology("qemu-vmtest"),
        time_scale=0.0,
        kernel_version=version or DEFAULT_KERNEL_VERSION,
    )
    try:
        return run_all(machine.spawn(name="conformance"), SimProbe(machine), names, machine)
    finally:
        machine.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--simulate", action="store_true", help="run on the simulator")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("scenario", nargs="*", help=f"default: all of {', '.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    names = args.scenario or None
    # stdout carries the document only: vfiopy's log events go to stderr, warnings and up.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    if args.simulate:
        results = simulate(names)
    else:
        from vfiopy.kernel import LinuxKernel

        probe = GuestProbe()
        try:
            results = run_all(LinuxKernel(), probe, names)
        finally:
            probe.stop()
    doc = {"schema": 1, "pid": os.getpid(), "results": results}
    if args.json:
        print(json.dumps(doc))
    else:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
