"""Finding a VMM's device fds: fdinfo, cdev path, and config-space identity on old kernels."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from release_helpers import MachineFactory, vfio_devices

from vfiopy.release import PlanError, Status, acquire, release_process, take_over
from vfiopy.session import Session


def start_vmm(m: Any, backend: str = "container", addrs: list[str] | None = None) -> Any:
    vmm = m.spawn(name="vmm")
    session = Session(vmm, backend=backend)  # type: ignore[arg-type]
    if addrs is None:
        anyio.run(acquire, session, vfio_devices(vmm))
    else:  # exactly these, even where acquire would refuse a partial domain
        for a in addrs:
            session.open_device(a)
    return vmm


@pytest.fixture
def old_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel before vfio-device-syspath appeared in fdinfo (< 6.8)."""
    from mock_vfio import files

    monkeypatch.setattr(files.DeviceFile, "fdinfo", lambda self: "")


def test_fdinfo_identifies_every_device(machine: MachineFactory) -> None:
    m = machine("gpus:2")
    vmm = start_vmm(m)
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    try:
        assert sorted(t.by_address()) == vfio_devices(vmm)
        assert {f.how for f in t.fds} == {"fdinfo"}
        assert [len(d.devices) for d in t.plan.domains] == [2, 2]
    finally:
        t.close()
    assert vmm.alive


def test_cdev_path_without_fdinfo(machine: MachineFactory, old_kernel: None) -> None:
    m = machine("gpus:2")
    vmm = start_vmm(m, backend="iommufd")
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    try:
        assert sorted(t.by_address()) == vfio_devices(vmm)
        assert {f.how for f in t.fds} == {"cdev"}
    finally:
        t.close()


def test_config_identity_for_anon_inode_without_fdinfo(
    machine: MachineFactory, old_kernel: None
) -> None:
    # Eight identical GPUs: told apart by their BAR addresses.
    m = machine("gpus:8")
    vmm = start_vmm(m)
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    try:
        assert {f.how for f in t.fds} == {"config"}
        assert not t.unknown
        assert sorted(t.by_address()) == vfio_devices(vmm)
        # Each fd really is the device it was matched to.
        for f in t.fds:
            assert vmm.file_of(f.fd).device().addr == f.address
    finally:
        t.close()


def test_release_process_with_config_identity(machine: MachineFactory, old_kernel: None) -> None:
    m = machine("gpus:4")
    vmm = start_vmm(m)
    cli = m.spawn(name="cli")
    t = take_over(cli, vmm.getpid())
    report = anyio.run(release_process, t)
    assert report.ok and len(report.devices) == 8
    assert all(r.status is Status.RELEASED for r in report.devices)
    assert len(m.unique_resets(cause="devset")) == 4
    assert m.open_fds() == 0


def test_refuses_a_domain_the_vmm_holds_only_part_of(machine: MachineFactory) -> None:
    m = machine("gpus:2")
    gpus = vfio_devices(m.spawn(name="probe"))
    vmm = start_vmm(m, addrs=[gpus[0], gpus[2], gpus[3]])  # not gpus[1], the first audio
    cli = m.spawn(name="cli")
    with pytest.raises(PlanError) as info:
        take_over(cli, vmm.getpid())
    assert gpus[1] in str(info.value)
    assert vmm.alive and not vmm.signals
    assert len(cli.fd_table()) == 0  # every duplicate given back
