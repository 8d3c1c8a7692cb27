"""vfiopy.sriov on the simulator: VFs on demand, autoprobe, errors, VF tokens."""

from __future__ import annotations

import errno
import uuid

import pytest
from mock_vfio import Machine, SimProcess
from mock_vfio.pci_driver import unbind
from sriov_helpers import NIC, PF

from vfiopy.bind import BindRefused, BindState, BindUsageError, restore_devices
from vfiopy.errors import OpenDeviceError
from vfiopy.session import Session
from vfiopy.sriov import disable_vfs, enable_vfs

pytestmark = pytest.mark.anyio


def vfs_of(m: Machine) -> list[str]:
    return [vf.addr for vf in m.devices[PF].vfs]


async def test_enable_binds_only_the_vfs_asked_for(
    host: Machine, proc: SimProcess, tmp_path: object
) -> None:
    state = BindState(f"{tmp_path}/bind.json")
    report = await enable_vfs(PF, 32, bind=[0, 3, 5], kernel=proc, state=state)
    assert report.ok, [d.error for d in report.devices]
    assert report.numvfs_before == 0 and report.numvfs_after == 32
    assert report.autoprobe_before is True and report.autoprobe_after is True
    vfs = vfs_of(host)
    assert len(vfs) == 32
    asked = {vfs[0], vfs[3], vfs[5]}
    assert [d.address for d in report.devices] == [vfs[0], vfs[3], vfs[5]]
    assert {a for a in vfs if host.devices[a].driver == "vfio-pci"} == asked
    assert all(host.devices[a].driver is None for a in vfs if a not in asked)
    # no host driver probed any VF; one vfio-pci probe per VF asked for
    probes = [(e.device, e.value) for e in host.events("probe")]
    assert sorted(probes) == sorted((a, "vfio-pci") for a in asked)
    assert host.host.sriov_autoprobe(host.devices[PF]) is True
    # the bound VFs are in the bind state: restore unbinds them
    assert set(state.load()) == asked
    again = await restore_devices(kernel=proc, state=state)
    assert again.ok and all(host.devices[a].driver is None for a in asked)


async def test_autoprobe_off_stays_off(host: Machine, proc: SimProcess) -> None:
    host.host.autoprobe[PF] = False
    report = await enable_vfs(PF, 4, bind=[1], kernel=proc)
    assert report.autoprobe_before is False and report.autoprobe_after is False


async def test_autoprobe_on_probes_every_vf(host: Machine, proc: SimProcess) -> None:
    """The baseline the module avoids: each VF probed by iavf."""
    proc.write_text(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "16")
    assert [host.devices[a].driver for a in vfs_of(host)] == ["iavf"] * 16
    assert sum(e.value == "iavf" for e in host.events("probe")) == 16


async def test_vfs_to_a_host_driver(host: Machine, proc: SimProcess) -> None:
    report = await enable_vfs(PF, 8, bind=range(2), driver="iavf", kernel=proc)
    assert report.ok
    assert [host.devices[a].driver for a in vfs_of(host)[:3]] == ["iavf", "iavf", None]


async def test_same_count_reuses_the_vfs(host: Machine, proc: SimProcess) -> None:
    await enable_vfs(PF, 8, kernel=proc)
    report = await enable_vfs(PF, 8, bind=[7], kernel=proc)
    assert report.ok and report.numvfs_before == 8 and report.enable_s == 0.0


async def test_errors_touch_nothing(host: Machine, proc: SimProcess) -> None:
    await enable_vfs(PF, 8, kernel=proc)
    with pytest.raises(BindRefused) as info:  # another non-zero count
        await enable_vfs(PF, 16, bind=[0], kernel=proc)
    assert info.value.errno == errno.EBUSY and "8 VFs exist" in str(info.value)
    with pytest.raises(BindUsageError) as info2:  # above sriov_totalvfs
        await enable_vfs(PF, 257, kernel=proc)
    assert info2.value.errno == errno.ERANGE and "256" in str(info2.value)
    with pytest.raises(BindRefused) as info3:  # a PF without SR-IOV
        await enable_vfs(NIC, 2, kernel=proc)
    assert "no SR-IOV capability" in str(info3.value)
    with pytest.raises(BindUsageError):  # a VF number past the count
        await enable_vfs(PF, 8, bind=[8], kernel=proc)
    with pytest.raises(BindUsageError):  # a driver that does not exist
        await enable_vfs(PF, 8, bind=[0], driver="no_such_driver", kernel=proc)
    assert len(vfs_of(host)) == 8
    assert all(host.devices[a].driver is None for a in vfs_of(host))
    assert host.host.sriov_autoprobe(host.devices[PF]) is True


async def test_pf_without_driver(host: Machine, proc: SimProcess) -> None:
    unbind(host, host.devices[PF])
    with pytest.raises(BindRefused) as info:
        await enable_vfs(PF, 2, kernel=proc)
    assert info.value.errno == errno.ENOENT and "no driver" in str(info.value)


async def test_disable_refused_while_a_vf_is_open(host: Machine, proc: SimProcess) -> None:
    from mock_vfio import spawn_qemu

    await enable_vfs(PF, 4, bind=[0], kernel=proc)
    vmm = spawn_qemu(host, [vfs_of(host)[0]])
    try:
        with pytest.raises(BindRefused) as info:
            await disable_vfs(PF, kernel=proc)
        assert info.value.errno == errno.EBUSY and f"pid {vmm.pid}" in str(info.value)
    finally:
        vmm.exit()
    report = await disable_vfs(PF, kernel=proc)
    assert report.numvfs_before == 4 and report.numvfs_after == 0 and vfs_of(host) == []


# --- VF tokens (vfio-pci PF) --------------------------------------------------------------


def _vfio_pf(host: Machine, proc: SimProcess, n: int) -> list[str]:
    """The PF on vfio-pci with enable_sriov, n VFs on vfio-pci too."""
    from vfiopy.sysfs import Sysfs

    host.host.vfio_enable_sriov = True
    Sysfs(proc).bind_vfio(PF)
    return vfs_of(host)


async def test_vf_token(host: Machine, proc: SimProcess) -> None:
    _vfio_pf(host, proc, 0)
    report = await enable_vfs(PF, 2, bind=[0, 1], kernel=proc)
    assert report.ok
    vf = vfs_of(host)[0]
    token = uuid.uuid4()
    with Session(kernel=proc) as pf_user:
        pf_user.open_device(PF).set_vf_token(token)
        with Session(kernel=proc) as s:
            with pytest.raises(OpenDeviceError) as missing:
                s.open_device(vf)
            assert missing.value.errno == errno.EACCES and "vf_token=" in str(missing.value)
            with pytest.raises(OpenDeviceError) as wrong:
                s.open_device(vf, vf_token=uuid.uuid4())
            assert wrong.value.errno == errno.EACCES
            dev = s.open_device(vf, vf_token=token)
            assert str(dev.address) == vf and host.devices[vf].open_count == 1


async def test_vf_token_needs_a_vfio_pf(host: Machine, proc: SimProcess) -> None:
    await enable_vfs(PF, 2, bind=[0], kernel=proc)  # the PF stays on ice
    with Session(kernel=proc) as s:
        with pytest.raises(OpenDeviceError) as info:
            s.open_device(vfs_of(host)[0], vf_token=uuid.uuid4())
        assert info.value.errno == errno.EINVAL
        assert str(s.open_device(vfs_of(host)[0]).address) == vfs_of(host)[0]  # no token needed


async def test_vfio_pf_needs_enable_sriov(host: Machine, proc: SimProcess) -> None:
    from vfiopy.sysfs import Sysfs

    Sysfs(proc).bind_vfio(PF)
    with pytest.raises(BindRefused) as info:
        await enable_vfs(PF, 2, kernel=proc)
    assert "enable_sriov" in str(info.value)


@pytest.mark.parametrize("version", [(6, 1), (6, 17)])
async def test_vf_token_on_the_cdev_path(version: tuple[int, int]) -> None:
    from mock_vfio import load_topology
    from sriov_helpers import PF as pf

    from vfiopy.errors import BindIommufdError
    from vfiopy.sysfs import Sysfs

    m = Machine(load_topology("vm-host"), time_scale=0.01, kernel_version=version)
    try:
        p = m.spawn(name="vfiopy")
        m.host.vfio_enable_sriov = True
        Sysfs(p).bind_vfio(pf)
        assert (await enable_vfs(pf, 2, bind=[0, 1], kernel=p)).ok
        vf = m.devices[pf].vfs[0].addr
        token = uuid.uuid4()
        with Session(kernel=p) as pf_user:
            pf_user.open_device(pf).set_vf_token(token)
        with Session(kernel=p, backend="iommufd") as s:
            if version < (6, 17):
                # VFIO_DEVICE_BIND_FLAG_TOKEN is unknown there: EINVAL, and the cdev
                # path checks no token at all
                with pytest.raises(BindIommufdError) as old:
                    s.open_device(vf, vf_token=token)
                assert old.value.errno == errno.EINVAL and "6.17" in str(old.value)
                assert str(s.open_device(vf).address) == vf
                return
            with pytest.raises(BindIommufdError) as missing:
                s.open_device(vf)
            assert missing.value.errno == errno.EACCES
            with pytest.raises(BindIommufdError) as wrong:
                s.open_device(vf, vf_token=uuid.uuid4())
            assert wrong.value.errno == errno.EACCES
            assert str(s.open_device(vf, vf_token=token).address) == vf
    finally:
        m.close()


async def test_dry_run_names_the_vfs_to_come(host: Machine, proc: SimProcess) -> None:
    report = await enable_vfs(PF, 16, bind=[0, 9], kernel=proc, dry_run=True)
    assert report.ok and report.numvfs_before == 0 and host.devices[PF].numvfs == 0
    planned = [d.address for d in report.devices]
    await enable_vfs(PF, 16, kernel=proc)
    assert planned == [vfs_of(host)[0], vfs_of(host)[9]]
