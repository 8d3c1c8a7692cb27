"""vfiopy.bind on the simulator: bind to vfio-pci, restore in parallel, refusals, roll-back."""

from __future__ import annotations

import errno
import itertools
import json

import pytest
from bind_helpers import AUDIO, GPU, HOST_DRIVERS, NIC0, NIC1, NVME, SERIAL, drivers, statuses
from mock_vfio import Machine, SimProcess, spawn_qemu
from mock_vfio.pci_driver import unbind

from vfiopy.bind import (
    BindState,
    BindUsageError,
    StateError,
    bind_devices,
    restore_devices,
)
from vfiopy.errors import AddressError

pytestmark = pytest.mark.anyio
ALL = [NIC0, NIC1, NVME, GPU, AUDIO, SERIAL]


async def test_bind_then_restore_every_device_once(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    report = await bind_devices(ALL, kernel=proc, state=state)
    assert report.ok, [d.error for d in report.failed()]
    assert statuses(report) == dict.fromkeys(ALL, "bound")
    assert drivers(host, ALL) == dict.fromkeys(ALL, "vfio-pci")
    # per-device driver_override, never new_id
    assert all(host.devices[a].driver_override == "vfio-pci" for a in ALL)
    assert host.vfio_pci_ids == set()
    recorded = state.load()
    assert {a: e.driver for a, e in recorded.items()} == HOST_DRIVERS

    report = await restore_devices(kernel=proc, state=state)
    assert report.ok, [d.error for d in report.failed()]
    assert sorted(d.address for d in report.devices) == sorted(ALL)
    assert statuses(report) == dict.fromkeys(ALL, "restored")
    assert drivers(host, ALL) == HOST_DRIVERS
    assert all(host.devices[a].driver_override is None for a in ALL)
    assert not state.exists()  # nothing left to restore
    # one probe per device and way: vfio-pci's at bind, the host driver's at restore
    probes = [(e.device, e.value) for e in host.events("probe")]
    assert sorted(probes) == sorted([(a, "vfio-pci") for a in ALL] + list(HOST_DRIVERS.items()))


async def test_restore_probes_run_concurrently(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    await bind_devices(ALL, kernel=proc, state=state)
    since = len(host.trace)
    host.time_scale = 0.3  # probes of 30 ms and more: far beyond a thread's start-up
    await restore_devices(kernel=proc, state=state)
    probes = [e for e in host.trace[since:] if e.kind == "probe"]
    assert len(probes) == len(ALL)
    first_end = min(e.end for e in probes)
    assert sum(e.start < first_end for e in probes) >= 2  # two at once at least


async def test_restore_one_at_a_time(host: Machine, proc: SimProcess, state: BindState) -> None:
    await bind_devices(ALL, kernel=proc, state=state)
    since = len(host.trace)
    report = await restore_devices(kernel=proc, state=state, max_parallel=1)
    assert report.ok
    probes = sorted((e.start, e.end) for e in host.trace[since:] if e.kind == "probe")
    assert len(probes) == len(ALL)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(probes))


async def test_restore_some_keeps_the_others(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    await bind_devices([NIC1, NVME], kernel=proc, state=state)
    report = await restore_devices([NVME], kernel=proc, state=state)
    assert statuses(report) == {NVME: "restored"}
    assert list(state.load()) == [NIC1]
    assert drivers(host, [NIC1, NVME]) == {NIC1: "vfio-pci", NVME: "nvme"}


async def test_group_must_be_whole(host: Machine, proc: SimProcess, state: BindState) -> None:
    report = await bind_devices([GPU], kernel=proc, state=state)
    assert statuses(report) == {GPU: "refused"}
    err = report.devices[0].error or ""
    assert AUDIO in err and "snd_hda_intel" in err and "IOMMU group" in err
    assert drivers(host, [GPU, AUDIO]) == {GPU: "nvidia", AUDIO: "snd_hda_intel"}
    assert not state.exists()


async def test_group_member_unbound_is_fine(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    unbind(host, host.devices[AUDIO])
    report = await bind_devices([GPU], kernel=proc, state=state)
    assert statuses(report) == {GPU: "bound"}


async def test_interface_up_refuses_the_whole_request(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    name = host.host.set_link(NIC0, up=True)
    report = await bind_devices([NIC0, NIC1, NVME], kernel=proc, state=state)
    assert statuses(report) == {NIC0: "refused", NIC1: "skipped", NVME: "skipped"}
    assert f"network interface {name} is up" in (report.devices[0].error or "")
    assert report.devices[0].errno == errno.EBUSY
    assert drivers(host, [NIC0, NIC1, NVME]) == {NIC0: "e1000e", NIC1: "e1000e", NVME: "nvme"}
    assert host.events("probe") == [] and host.events("remove_driver") == []
    assert not state.exists()


async def test_interface_admin_up_without_carrier(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    host.host.set_link(NIC0, up=True, carrier=False)  # operstate down, IFF_UP set
    report = await bind_devices([NIC0], kernel=proc, state=state)
    assert "IFF_UP set" in (report.devices[0].error or "")


async def test_interface_with_routes(host: Machine, proc: SimProcess, state: BindState) -> None:
    host.host.set_link(NIC1, up=False, routes=["192.168.7.0/24"])
    host.host.net_state(NIC1).routes6 = ["fd00:7::/64"]
    report = await bind_devices([NIC1], kernel=proc, state=state)
    err = report.devices[0].error or ""
    assert "carries routes (192.168.7.0/24, fd00:7::/64)" in err
    assert " is up" not in err


@pytest.mark.parametrize("how", ["mount", "hold", "swap"])
async def test_disk_in_use(host: Machine, proc: SimProcess, state: BindState, how: str) -> None:
    if how == "mount":
        host.host.mount(NVME, "/srv")
        want = "nvme0n1p1 is mounted on /srv"
    elif how == "hold":
        host.host.hold(NVME, "dm-3")
        want = "nvme0n1p1 is held by dm-3"
    else:
        host.host.disk_state(NVME).partitions = 2
        host.host.disk_state(NVME).swap.append("nvme0n1p2")
        want = "nvme0n1p2 is in use as swap"
    report = await bind_devices([NVME], kernel=proc, state=state)
    assert statuses(report) == {NVME: "refused"}
    assert want in (report.devices[0].error or "")
    assert host.devices[NVME].driver == "nvme"


async def test_serial_console(host: Machine, proc: SimProcess, state: BindState) -> None:
    tty = host.host.serial_console(SERIAL)
    report = await bind_devices([SERIAL], kernel=proc, state=state)
    assert f"it serves the console ({tty})" in (report.devices[0].error or "")


async def test_vt_console_on_a_gpu(host: Machine, proc: SimProcess, state: BindState) -> None:
    host.host.console = ["tty0"]
    report = await bind_devices([GPU, AUDIO], kernel=proc, state=state)
    assert statuses(report) == {GPU: "refused", AUDIO: "skipped"}
    assert "framebuffer fb0 shows the console (tty0)" in (report.devices[0].error or "")


async def test_dry_run_touches_nothing(host: Machine, proc: SimProcess, state: BindState) -> None:
    report = await bind_devices(ALL, kernel=proc, state=state, dry_run=True)
    assert report.ok and statuses(report) == dict.fromkeys(ALL, "planned")
    assert drivers(host, ALL) == HOST_DRIVERS
    assert not state.exists()


async def test_already_bound(host: Machine, proc: SimProcess, state: BindState) -> None:
    await bind_devices([NIC1], kernel=proc, state=state)
    report = await bind_devices([NIC1], kernel=proc, state=state)
    assert statuses(report) == {NIC1: "already"}
    assert state.load()[NIC1].driver == "e1000e"  # the first driver stays recorded


async def test_a_failed_bind_rolls_back_the_others(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    host.faults.fail("write_text", errno.EIO, device=NVME)
    report = await bind_devices([NIC1, NVME, SERIAL], kernel=proc, state=state)
    assert not report.ok
    assert statuses(report) == {NIC1: "rolled-back", NVME: "failed", SERIAL: "rolled-back"}
    assert drivers(host, [NIC1, NVME, SERIAL]) == {NIC1: "e1000e", NVME: "nvme", SERIAL: "serial"}
    assert all(host.devices[a].driver_override is None for a in (NIC1, NVME, SERIAL))
    assert not state.exists()


async def test_restore_refuses_a_device_open_through_vfio(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    await bind_devices([NIC1, NVME], kernel=proc, state=state)
    vmm = spawn_qemu(host, [NIC1])
    try:
        report = await restore_devices(kernel=proc, state=state)
        assert statuses(report) == {NIC1: "refused", NVME: "restored"}
        assert f"pid {vmm.pid}" in (report.devices[0].error or "")
        assert host.devices[NIC1].driver == "vfio-pci"
        assert list(state.load()) == [NIC1]
    finally:
        vmm.exit()


async def test_restore_driver_not_loaded(host: Machine, proc: SimProcess, state: BindState) -> None:
    await bind_devices([NIC1], kernel=proc, state=state)
    with state.locked() as entries:
        entries[NIC1].driver = "igb"  # a driver this host does not have
        state.save(entries)
    report = await restore_devices(kernel=proc, state=state)
    assert statuses(report) == {NIC1: "refused"}
    assert "modprobe igb" in (report.devices[0].error or "")
    assert host.devices[NIC1].driver == "vfio-pci"


async def test_restore_without_state_file(proc: SimProcess, state: BindState) -> None:
    with pytest.raises(StateError) as info:
        await restore_devices(kernel=proc, state=state)
    assert info.value.errno == errno.ENOENT and "--driver" in str(info.value)


async def test_restore_with_driver_needs_no_state(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    await bind_devices([NIC1], kernel=proc, state=state)
    state.save({})  # lost
    report = await restore_devices([NIC1], kernel=proc, state=state, driver="e1000e")
    assert statuses(report) == {NIC1: "restored"}
    assert host.devices[NIC1].driver == "e1000e"


async def test_restore_an_address_not_recorded(
    host: Machine, proc: SimProcess, state: BindState
) -> None:
    await bind_devices([NIC1], kernel=proc, state=state)
    report = await restore_devices([NIC1, NVME], kernel=proc, state=state)
    assert statuses(report) == {NIC1: "restored", NVME: "refused"}


async def test_bad_input(proc: SimProcess, state: BindState) -> None:
    with pytest.raises(AddressError):
        await bind_devices(["3b:00"], kernel=proc, state=state)
    with pytest.raises(BindUsageError) as info:
        await bind_devices(["0000:3b:00.0"], kernel=proc, state=state)
    assert info.value.errno == errno.ENODEV
    with pytest.raises(BindUsageError):
        await restore_devices([NIC1], kernel=proc, state=state, driver="no_such_driver")
    assert not state.exists()


def test_corrupt_state_file_is_named(state: BindState) -> None:
    import os

    os.makedirs(os.path.dirname(state.path))
    with open(state.path, "w") as f:
        json.dump({"schema": 99}, f)
    with pytest.raises(StateError) as info:
        state.load()
    assert state.path in str(info.value)
