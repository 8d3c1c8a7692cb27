"""Acquire, release and reset on the simulator: counted resets, run concurrently.

Concurrency is asserted as an invariant (release_helpers.concurrent: resets lengthened far
beyond thread start-up ran on more than one thread, two at once), never as "all N at once",
which depends on how fast the machine starts threads."""

from __future__ import annotations

from typing import Any

import pytest
from release_helpers import MachineFactory, concurrent, overlap, slow_resets, vfio_devices
from structlog.testing import capture_logs

from vfiopy.release import Status, acquire, make_plan, release, reset
from vfiopy.session import Session

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("backend", ["container", "iommufd"])
async def test_release_one_bus_reset_per_set_concurrently(
    machine: MachineFactory, backend: str
) -> None:
    m = machine("gpus:8")
    proc = m.spawn(name="vmm")
    addrs = vfio_devices(proc)
    assert len(addrs) == 16
    slow_resets(m, addrs)
    session = Session(proc, backend=backend)  # type: ignore[arg-type]
    devices = await acquire(session, addrs)
    assert [str(d.address) for d in devices] == addrs
    since = len(m.trace)

    with capture_logs() as logs:
        report = await release(session)

    assert report.ok, report.failed()
    assert sorted(r.address for r in report.devices) == addrs
    assert all(r.status is Status.RELEASED for r in report.devices)
    assert len(report.domains) == 8 and all(d.resets == 1 for d in report.domains)
    resets = [e for e in m.unique_resets(cause="devset") if e in m.trace[since:]]
    assert len(resets) == 8
    assert len({e.devset for e in resets}) == 8
    assert concurrent(resets), resets
    assert m.open_fds() == 0
    events = [e for e in logs if e["event"] == "release.device"]
    assert len(events) == 16
    assert {"bdf", "domain", "reset", "elapsed_s"} <= set(events[0])
    assert sorted(e["reset"] for e in events if e["reset"]) == ["bus"] * 8


async def test_acquire_overlaps_the_open_resets(machine: MachineFactory) -> None:
    m = machine("nvme:8")
    proc = m.spawn(name="vmm")
    addrs = vfio_devices(proc)
    slow_resets(m, addrs, 4.0)
    session = Session(proc)
    try:
        await acquire(session, addrs)
        opens = m.unique_resets(cause="open")
        assert len(opens) == 8
        assert concurrent(opens), opens
    finally:
        await release(session)
    assert m.open_fds() == 0


async def test_acquire_groups_one_devset_in_one_worker(machine: MachineFactory) -> None:
    # GPU and audio function share a device set: opened in turn by one worker,
    # never waiting on each other's lock.
    m = machine("gpus:4")
    proc = m.spawn(name="vmm")
    session = Session(proc)
    await acquire(session, vfio_devices(proc))
    assert not m.events("lock_wait")
    by_set: dict[str, list[Any]] = {}
    for e in m.events("open"):
        by_set.setdefault(e.devset, []).append(e)
    assert len(by_set) == 4
    assert all(len(opens) == 2 and overlap(opens) == 1 for opens in by_set.values())
    await release(session)


@pytest.mark.parametrize("backend", ["container", "iommufd"])
async def test_reset_without_close_one_hot_reset_per_bus(
    machine: MachineFactory, backend: str
) -> None:
    m = machine("gpus:8")
    proc = m.spawn(name="vmm")
    session = Session(proc, backend=backend)  # type: ignore[arg-type]
    await acquire(session, vfio_devices(proc))
    slow_resets(m, vfio_devices(proc))
    since = len(m.trace)
    report = await reset(session)
    assert report.ok, report.failed()
    assert all(r.status is Status.RESET for r in report.devices)
    hot = [e for e in m.unique_resets() if e in m.trace[since:]]
    assert len(hot) == 8
    assert {e.method for e in hot} == {"bus"}
    assert len({e.devset for e in hot}) == 8
    assert concurrent(hot), hot
    assert len(session.devices) == 16  # still open and ours
    await release(session)
    assert m.open_fds() == 0


async def test_reset_uses_flr_for_a_device_alone(machine: MachineFactory) -> None:
    m = machine("nvme:4")
    proc = m.spawn(name="vmm")
    session = Session(proc)
    await acquire(session, vfio_devices(proc))
    since = len(m.trace)
    report = await reset(session)
    assert report.ok
    resets = [e for e in m.unique_resets() if e in m.trace[since:]]
    assert [e.method for e in resets] == ["flr"] * 4
    await release(session)


async def test_plan_refuses_a_domain_with_a_device_not_asked_for(
    machine: MachineFactory,
) -> None:
    from vfiopy.release import PlanError

    m = machine("gpus:2")
    proc = m.spawn(name="vmm")
    gpu = vfio_devices(proc)[0]
    with pytest.raises(PlanError) as info:
        make_plan(proc, [gpu])
    msg = str(info.value)
    assert gpu in msg and "also holds" in msg and "EPERM" in msg
    assert not m.events("open")


async def test_reset_refuses_a_domain_with_a_device_not_ours(machine: MachineFactory) -> None:
    from vfiopy.release import PlanError

    m = machine("gpus:2")
    proc = m.spawn(name="vmm")
    addrs = vfio_devices(proc)
    session = Session(proc)
    for a in addrs[:3]:  # the second GPU's audio function stays out
        session.open_device(a)
    since = len(m.trace)
    with pytest.raises(PlanError) as info:
        await reset(session)
    assert addrs[3] in str(info.value) and "does not own" in str(info.value)
    assert not [e for e in m.trace[since:] if e.kind == "reset"]
    await release(session)
    assert m.open_fds() == 0


async def test_acquire_failure_closes_what_opened(machine: MachineFactory) -> None:
    import errno

    from vfiopy.release import AcquireError

    m = machine("gpus:4")
    proc = m.spawn(name="vmm")
    addrs = vfio_devices(proc)
    m.faults.fail("VFIO_GROUP_GET_DEVICE_FD", errno.EIO, device=addrs[4])
    session = Session(proc)
    with pytest.raises(AcquireError) as info:
        await acquire(session, addrs)
    assert info.value.device == addrs[4] and info.value.errno == errno.EIO
    assert [r.address for r in info.value.report.failed()] == [addrs[4]]
    assert session.devices == []
    session.close()
    assert m.open_fds() == 0


async def test_legacy_kernel_releases_in_series_but_completely(machine: MachineFactory) -> None:
    # Before Linux 5.0 one driver lock serialised every release: nothing to gain,
    # nothing lost.
    m = machine("gpus:4", kernel_model="legacy")
    proc = m.spawn(name="vmm")
    session = Session(proc)
    await acquire(session, vfio_devices(proc))
    report = await release(session)
    assert report.ok
    resets = m.unique_resets(cause="devset")
    assert len(resets) == 4 and overlap(resets) == 1
    assert m.open_fds() == 0


async def test_domain_with_most_devices_starts_first(machine: MachineFactory) -> None:
    # One worker: the multifunction pair's set (two closes under one lock) must not wait
    # behind the single NICs.
    m = machine("qemu-vmtest")
    proc = m.spawn(name="vmm")
    addrs = [a for a in vfio_devices(proc) if not a.startswith("0000:08")]
    session = Session(proc)
    await acquire(session, addrs)
    report = await release(session, max_parallel=1)
    assert report.ok
    assert report.domains[0].devices == ["0000:07:00.0", "0000:07:00.1"]
    first = min(report.devices, key=lambda r: r.start_s)
    assert first.domain == report.domains[0].id
