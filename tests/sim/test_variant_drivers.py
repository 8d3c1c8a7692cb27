"""vfio-pci variant drivers on the simulator: a function bound to one (``mlx5_vfio_pci``,
``hisi_acc_vfio_pci``, ...) is a vfio-pci device, as the kernel registers it through
vfio_pci_core (5.15+): its group is viable, it opens, and its device set resets as the model
predicts.  The QEMU guest has no device a variant driver would take, so this is simulator
only.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mock_vfio import Machine, load_topology
from mock_vfio.pci_driver import bind, unbind

from vfiopy import Session, Sysfs
from vfiopy.kmodel import KernelModel
from vfiopy.sysfs import PciAddress

from .conftest import NICS

VARIANT = "mlx5_vfio_pci"


def machine_with_variant(version: tuple[int, int]) -> Machine:
    m = Machine(load_topology("qemu-vmtest"), time_scale=0.0, kernel_version=version)
    dev = m.device(NICS[1])
    unbind(m, dev)
    bind(m, dev, VARIANT)
    return m


@pytest.fixture
def linux61() -> Iterator[Machine]:
    m = machine_with_variant((6, 1))
    yield m
    m.close()


def test_a_variant_bound_function_is_a_vfio_device(linux61: Machine) -> None:
    m, addr = linux61, NICS[1]
    proc = m.spawn()
    assert proc.listdir("/sys/module/vfio_pci_core/holders") == [VARIANT, "vfio_pci"]
    model = KernelModel(Sysfs(proc))
    assert model.is_vfio_driver(VARIANT) and model.keeps_group_viable(PciAddress.of(addr))
    with Session(proc) as s:
        dev = s.open_device(addr)
        opened = [e.method for e in m.resets(device=addr, cause="open")]
        s.close_device(dev)
    closed = [e.method for e in m.resets(device=addr, cause="release")]
    predicted_open = model.open_reset(addr)
    assert predicted_open is not None and opened == [predicted_open.method] == ["bus"]
    (close,) = model.closes([addr])
    assert closed == [r.method for step in close.steps for r in step]
    assert m.device(addr).open_count == 0


def test_before_5_15_no_driver_is_built_on_vfio_pci_core() -> None:
    m = machine_with_variant((5, 10))
    try:
        proc = m.spawn()
        assert "vfio_pci_core" not in proc.listdir("/sys/module")
        group = Sysfs(proc).iommu_group(NICS[1])
        assert not proc.exists(f"/dev/vfio/{group}")  # a host driver's group: no VFIO
    finally:
        m.close()
