"""Typed device features on the simulator: low power, ioeventfds, bus mastering, DMA-BUF and
migration, probed, and the errors of kernels that predate each.

The simulated vfio-pci (like Linux 6.1's) knows neither DMA_BUF nor a migration driver
(ENOTTY), and offers VFIO_DEVICE_FEATURE_BUS_MASTER only when built with it.  Low power
needs 6.1, VFIO_DEVICE_FEATURE 5.7, VFIO_DEVICE_IOEVENTFD 4.17: before, ENOTTY.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import anyio
import pytest
from mock_vfio import Machine, load_topology

import vfiopy
from vfiopy import PciIrq, PciRegion
from vfiopy.errors import FeatureError
from vfiopy.features import (
    FeatureNotSupportedError,
    FeatureSupport,
    enter_low_power,
    enter_low_power_with_wakeup,
    exit_low_power,
    migration_flags,
    probe_features,
    register_ioeventfd,
    require_dma_buf,
    set_bus_master,
)
from vfiopy.pci import Command

from .conftest import EDU, NICS, SCALE

HANG = 60.0  # only a bound on a wait that would otherwise never end


@pytest.fixture
def machine_at(request: pytest.FixtureRequest) -> Iterator[Machine]:
    m = Machine(load_topology("qemu-vmtest"), time_scale=SCALE, kernel_version=request.param)
    yield m
    m.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_older_kernel_answers_are_not_supported_errors(qemu: Machine) -> None:
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(NICS[0])
        assert probe_features(dev) == FeatureSupport(False, False, False, low_power=True)
        with pytest.raises(FeatureNotSupportedError) as bm:
            set_bus_master(dev, True)
        assert bm.value.errno == errno.ENOTTY
        assert "not supported by this kernel" in str(bm.value)
        assert "enable_bus_master" in str(bm.value)  # the config-space way instead
        with pytest.raises(FeatureNotSupportedError) as mig:
            migration_flags(dev)
        assert mig.value.errno == errno.ENOTTY and "variant driver" in str(mig.value)
        with pytest.raises(FeatureNotSupportedError) as dmabuf:
            require_dma_buf(dev)
        assert "6.19" in str(dmabuf.value)
        assert isinstance(dmabuf.value, vfiopy.VfioError)


def test_bus_master_through_the_feature() -> None:
    m = Machine(load_topology("qemu-vmtest"), time_scale=SCALE, bus_master_feature=True)
    try:
        with vfiopy.Session(m.spawn()) as session:
            dev = session.open_device(NICS[1])
            assert probe_features(dev).bus_master
            set_bus_master(dev, True)
            assert dev.config.command & Command.MASTER
            assert dev.config.command & Command.MEMORY  # the other bits stay
            set_bus_master(dev, False)
            assert not dev.config.command & Command.MASTER
    finally:
        m.close()


def test_low_power_entry_and_exit(qemu: Machine) -> None:
    sim = qemu.devices[NICS[0]]
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(NICS[0])
        assert probe_features(dev).low_power
        enter_low_power(dev)
        assert sim.low_power and sim.config.power_state() == 3
        with pytest.raises(FeatureError) as twice:
            enter_low_power(dev)  # vfio_pci_runtime_pm_entry: already engaged
        assert twice.value.errno == errno.EINVAL
        assert not isinstance(twice.value, FeatureNotSupportedError)
        exit_low_power(dev)
        assert not sim.low_power and sim.config.power_state() == 0


def test_low_power_wakeup_is_signalled_when_the_device_resumes(qemu: Machine) -> None:
    sim = qemu.devices[NICS[0]]
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(NICS[0])
        with enter_low_power_with_wakeup(dev) as wake:
            assert sim.low_power and sim.pm_wake_fd is not None and not wake.fired()
            sim.runtime_resume()  # a host access or a PME wakes it

            async def woken() -> None:
                with anyio.fail_after(HANG):
                    await wake.wait()

            anyio.run(woken)
            assert not sim.low_power and sim.pm_wake_fd is None
        with enter_low_power_with_wakeup(dev) as wake:
            # vfio resumes the device for each ioctl, the exit's too: the eventfd says so
            exit_low_power(dev)
            assert wake.fired() and not sim.low_power
        before = open_fds()
        with enter_low_power_with_wakeup(dev) as wake:
            enter_low_power(dev)  # its ioctl woke the device first: a plain entry now
            assert wake.fired() and sim.low_power and sim.pm_wake_fd is None
        exit_low_power(dev)
        assert open_fds() == before  # the wakeup eventfd closed, the kernel's dup dropped
        with enter_low_power_with_wakeup(dev):
            pass
    assert sim.pm_wake_fd is None  # dropped with the device


def test_ioeventfd_write_raises_edu_interrupt(qemu: Machine) -> None:
    """The kernel performs the registered write (0x60 = raise) when the eventfd is signalled."""
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(EDU)
        bar = dev.region(PciRegion.BAR0)
        irq = dev.irq(PciIrq.INTX)
        irq.enable()
        with register_ioeventfd(dev, PciRegion.BAR0, 0x60, 4, 0x20) as raise_bit5:
            assert qemu.devices[EDU].ioeventfds.keys() == {(0, 0x60, 0x20, 4)}

            async def run() -> int:
                with anyio.fail_after(HANG):
                    raise_bit5.trigger()
                    return await irq.wait()

            assert anyio.run(run) == 1
            assert struct.unpack("<I", bar.read(0x24, 4))[0] == 0x20  # irq_status
            assert qemu.counters["ioeventfd_writes"] == 1
        assert qemu.devices[EDU].ioeventfds == {}


def test_ioeventfd_registrations_and_refusals(qemu: Machine) -> None:
    sim = qemu.devices[NICS[0]]
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(NICS[0])
        # One register, an eventfd per value (the value is part of the key), every width.
        fds = [register_ioeventfd(dev, PciRegion.BAR0, 0x100, 4, v) for v in (1, 2)]
        fds += [register_ioeventfd(dev, PciRegion.BAR0, 0x200, w, 7) for w in (1, 2, 8)]
        assert len(sim.ioeventfds) == 5
        before = open_fds()
        with pytest.raises(FeatureError) as dup:
            register_ioeventfd(dev, PciRegion.BAR0, 0x100, 4, 1)
        assert dup.value.errno == errno.EEXIST and "unregister" in str(dup.value)
        with pytest.raises(FeatureError) as table:
            register_ioeventfd(dev, PciRegion.BAR3, 0x0, 4, 1)  # the MSI-X table
        assert table.value.errno == errno.EINVAL and "MSI-X table" in str(table.value)
        with pytest.raises(FeatureError) as past:
            register_ioeventfd(dev, PciRegion.BAR0, dev.region(PciRegion.BAR0).size, 4, 1)
        assert past.value.errno == errno.EINVAL
        for width, value, region in ((3, 1, PciRegion.BAR0), (1, 0x100, PciRegion.BAR0)):
            with pytest.raises(FeatureError) as bad:
                register_ioeventfd(dev, region, 0, width, value)
            assert bad.value.errno == errno.EINVAL and NICS[0] in str(bad.value)
        with pytest.raises(FeatureError, match="BAR registers only"):
            register_ioeventfd(dev, PciRegion.CONFIG, 0, 4, 1)
        assert open_fds() == before  # no eventfd left by a refusal
        fds[0].close()
        assert (0, 0x100, 1, 4) not in sim.ioeventfds and len(sim.ioeventfds) == 4
        fds[0].close()  # idempotent
    assert sim.ioeventfds == {}  # dropped at the device's release
    for f in fds[1:]:
        f.close()  # the device is closed: only the eventfd is left to close


@pytest.mark.parametrize("machine_at", [(4, 16)], indirect=True)
def test_ioeventfd_before_4_17_is_not_supported(machine_at: Machine) -> None:
    with vfiopy.Session(machine_at.spawn()) as session:
        dev = session.open_device(NICS[0])
        before = open_fds()
        with pytest.raises(FeatureNotSupportedError) as e:
            register_ioeventfd(dev, PciRegion.BAR0, 0x100, 4, 1)
        assert e.value.errno == errno.ENOTTY
        assert "not supported by this kernel" in str(e.value) and "4.17" in str(e.value)
        assert open_fds() == before


@pytest.mark.parametrize("machine_at", [(6, 0), (5, 4)], indirect=True, ids=["6.0", "5.4"])
def test_low_power_before_6_1_is_not_supported(machine_at: Machine) -> None:
    with vfiopy.Session(machine_at.spawn()) as session:
        dev = session.open_device(NICS[0])
        assert not probe_features(dev).low_power
        before = open_fds()
        for call in (enter_low_power, exit_low_power, enter_low_power_with_wakeup):
            with pytest.raises(FeatureNotSupportedError) as e:
                call(dev)
            assert e.value.errno == errno.ENOTTY, call
            assert "not supported by this kernel" in str(e.value) and "6.1" in str(e.value)
        assert open_fds() == before  # the wakeup eventfd was closed
        assert not machine_at.devices[NICS[0]].low_power
