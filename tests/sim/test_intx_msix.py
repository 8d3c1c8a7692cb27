"""INTx as a level-triggered, automasked line with its resample eventfd, and MSI-X vectors
added while others are live, on the simulator.

The simulated edu drives INTx the way QEMU's does: asserted from a write to 0x60 until
0x64 acknowledges every bit.  MSI-X grows in place from Linux 6.5 (NORESIZE clear) and by
a disable and re-enable before; a teardown of an index is counted (``irq_disable_<index>``).
"""

from __future__ import annotations

import errno
import struct

import anyio
import pytest
from mock_vfio import Machine, load_topology
from structlog.testing import capture_logs

import vfiopy
from vfiopy import PciIrq, PciRegion
from vfiopy._uapi import IrqInfoFlag
from vfiopy.errors import IrqError

from .conftest import EDU, NICS, SCALE

RAISE, ACK, STATUS = 0x60, 0x64, 0x24
HANG = 60.0  # only a bound on a wait that would otherwise never end


def w32(region: vfiopy.Region, off: int, value: int) -> None:
    region.write(off, struct.pack("<I", value))


def r32(region: vfiopy.Region, off: int) -> int:
    return int(struct.unpack("<I", region.read(off, 4))[0])


@pytest.mark.parametrize("resample", [True, False], ids=["resample-eventfd", "unmask-ioctl"])
def test_intx_fires_automasks_and_refires_while_asserted(qemu: Machine, resample: bool) -> None:
    sim = qemu.devices[EDU]
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(EDU)
        bar = dev.region(PciRegion.BAR0)
        irq = dev.irq(PciIrq.INTX)
        assert irq.flags & IrqInfoFlag.AUTOMASKED and irq.flags & IrqInfoFlag.MASKABLE
        irq.enable(resample=resample)
        assert (irq.resample_fd is not None) == resample
        seen: list[int] = []

        async def run() -> None:
            with anyio.fail_after(HANG):  # a missing interrupt fails instead of hanging
                w32(bar, RAISE, 0x1)
                # Serviced without an ack: the line stays up, so the unmask fires it again.
                seen.append(await irq.handle_level(lambda n: None))
                seen.append(await irq.wait())
                # Masked now: another raise (exact through the fd) signals nothing.
                w32(bar, RAISE, 0x2)
                assert irq.read() == 0
                assert r32(bar, STATUS) == 0x3
                # Acked, then unmasked: the line is down and stays quiet until the next raise.
                w32(bar, ACK, 0x3)
                irq.resample()
                w32(bar, RAISE, 0x4)
                seen.append(await irq.handle_level(lambda n: w32(bar, ACK, 0x4)))

        anyio.run(run)
        assert seen == [1, 1, 1]
        assert qemu.counters["irqs"] == 3  # the first, the re-fire, the last raise
        assert r32(bar, STATUS) == 0
        irq.disable()
        assert irq.resample_fd is None and sim.intx_unmask_fd is None


@pytest.mark.parametrize("resample", [True, False], ids=["resample-eventfd", "unmask-ioctl"])
def test_unmask_of_a_line_still_asserted_fires_again(qemu: Machine, resample: bool) -> None:
    """A NIC's line driven once: only the unmask itself can fire it a second time
    (vfio_pci_intx_unmask_handler re-sends an interrupt still pending)."""
    sim = qemu.devices[NICS[0]]
    with vfiopy.Session(qemu.spawn()) as session:
        irq = session.open_device(NICS[0]).irq(PciIrq.INTX)
        irq.enable(resample=resample)

        async def run() -> list[int]:
            with anyio.fail_after(HANG):
                sim.set_intx(True)
                counts = [await irq.handle_level(lambda n: None)]
                counts.append(await irq.wait())  # re-sent: the line is still up
                sim.set_intx(False)
                irq.resample()
                sim.set_intx(True)  # unmasked by now or at the resample: fires once
                counts.append(await irq.handle_level(lambda n: sim.set_intx(False)))
                return counts

        assert anyio.run(run) == [1, 1, 1]
        assert qemu.counters["irqs"] == 3


def test_intx_unmask_eventfd_needs_intx_enabled(qemu: Machine) -> None:
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(EDU)
        intx = dev.irq(PciIrq.INTX)
        with pytest.raises(IrqError) as e:
            intx.unmask_eventfd()
        assert e.value.errno == errno.EINVAL and "enable" in str(e.value)
        with pytest.raises(IrqError, match="only INTx"):
            dev.irq(PciIrq.MSI).unmask_eventfd()


def test_intx_resample_registered_on_the_simulator(qemu: Machine) -> None:
    sim = qemu.devices[EDU]
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(EDU)
        irq = dev.irq(PciIrq.INTX)
        irq.enable(resample=True)
        assert sim.intx_unmask_fd is not None
        irq.enable(resample=True)  # re-enabled: the kernel dropped it, vfiopy registers anew
        assert sim.intx_unmask_fd is not None and irq.resample_fd is not None
    assert sim.intx_unmask_fd is None  # closed with the device


def nic_machine(kernel: tuple[int, int]) -> Machine:
    return Machine(load_topology("qemu-vmtest"), time_scale=SCALE, kernel_version=kernel)


@pytest.mark.parametrize(
    ("kernel", "in_place"), [((6, 5), True), ((6, 1), False)], ids=["6.5", "6.1"]
)
def test_msix_vectors_added_keep_the_live_eventfds(kernel: tuple[int, int], in_place: bool) -> None:
    m = nic_machine(kernel)
    try:
        with vfiopy.Session(m.spawn()) as session:
            dev = session.open_device(NICS[0])
            irq = dev.irq(PciIrq.MSIX)
            assert irq.count == 5 and irq.resizable == in_place
            live = irq.enable(2)
            with capture_logs() as logs:
                new = irq.add_vectors(3)
            assert irq.eventfds == live + new and len(set(irq.eventfds)) == 5
            assert m.devices[NICS[0]].irq_nvec == 5
            # The kernel's teardown of the index happened only on the fallback.
            assert m.counters["irq_disable_2"] == (0 if in_place else 1)
            (event,) = [e for e in logs if e["event"] == "irq.vectors_added"]
            assert event["in_place"] is in_place and event["vectors"] == 5
            assert (event["reason"] is None) == in_place

            async def each_vector_fires() -> list[int]:
                with anyio.fail_after(HANG):
                    counts = []
                    for vector in range(5):
                        irq.trigger(vector)
                        counts.append(await irq.wait(vector))
                    return counts

            assert anyio.run(each_vector_fires) == [1] * 5
            with pytest.raises(IrqError) as e:
                irq.add_vectors(1)  # the table has 5
            assert e.value.errno == errno.EINVAL
    finally:
        m.close()


def test_msix_growth_in_place_is_refused_before_6_5() -> None:
    """The kernel's own refusal, reached by ignoring NORESIZE: a vector past those enabled."""
    m = nic_machine((6, 1))
    try:
        with vfiopy.Session(m.spawn()) as session:
            dev = session.open_device(NICS[0])
            irq = dev.irq(PciIrq.MSIX)
            live = irq.enable(2)
            irq.flags &= ~IrqInfoFlag.NORESIZE
            with pytest.raises(IrqError) as e:
                irq.add_vectors(1)
            assert e.value.errno == errno.EINVAL
            assert irq.eventfds == live  # nothing half-done; the new eventfd closed
            assert m.counters["irq_disable_2"] == 0
    finally:
        m.close()


def test_msix_noresize_by_version_and_msi_always() -> None:
    for kernel, cleared in (((6, 4), False), ((6, 5), True), ((6, 12), True)):
        m = nic_machine(kernel)
        try:
            with vfiopy.Session(m.spawn()) as session:
                dev = session.open_device(NICS[0])
                assert dev.irq(PciIrq.MSIX).resizable == cleared, kernel
                assert not dev.irq(PciIrq.MSI).resizable
        finally:
            m.close()


def test_an_msix_index_without_msix_keeps_noresize() -> None:
    """has_dyn_msix needs an MSI-X capability: edu (MSI only) keeps NORESIZE on the MSI-X
    index on 6.12 as the real kernel does (tests/vm conformance, irq_info)."""
    m = nic_machine((6, 12))
    try:
        with vfiopy.Session(m.spawn()) as session:
            edu = session.open_device("0000:08:01.0")
            assert edu.irq(PciIrq.MSIX).count == 0
            assert not edu.irq(PciIrq.MSIX).resizable
    finally:
        m.close()
