"""Typed device features on the simulator: bus mastering, DMA-BUF and migration, probed.

The simulated vfio-pci (like Linux 6.1's) knows neither DMA_BUF nor a migration driver
(ENOTTY), and offers VFIO_DEVICE_FEATURE_BUS_MASTER only when built with it.
"""

from __future__ import annotations

import errno

import pytest
from mock_vfio import Machine, load_topology

import vfiopy
from vfiopy.features import (
    FeatureNotSupportedError,
    FeatureSupport,
    migration_flags,
    probe_features,
    require_dma_buf,
    set_bus_master,
)
from vfiopy.pci import Command

from .conftest import NICS, SCALE


def test_older_kernel_answers_are_not_supported_errors(qemu: Machine) -> None:
    with vfiopy.Session(qemu.spawn()) as session:
        dev = session.open_device(NICS[0])
        assert probe_features(dev) == FeatureSupport(False, False, False)
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
