"""Faults mid-release: every device accounted for once, no fd left open in the simulator."""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import anyio
import pytest
from mock_vfio.pci_driver import remove_device
from release_helpers import MachineFactory, vfio_devices, wait_until

from vfiopy.release import Status, acquire, release
from vfiopy.session import Session

pytestmark = pytest.mark.anyio

TIMEOUT = 1.0
"""The per-domain timeout where one domain hangs: 50 times a domain's release (20 ms at the
tests' time scale), so a busy machine never times out a domain that is only slow."""


async def opened(m: Any, name: str = "vmm") -> tuple[Session, list[str]]:
    proc = m.spawn(name=name)
    session = Session(proc)
    addrs = vfio_devices(proc)
    await acquire(session, addrs)
    return session, addrs


def accounted(report: Any, addrs: list[str]) -> None:
    assert sorted(r.address for r in report.devices) == sorted(addrs)
    assert len(report.devices) == len(addrs)


async def test_eio_on_one_release(machine: MachineFactory) -> None:
    m = machine("gpus:4")
    session, addrs = await opened(m)
    bad = addrs[2]
    m.faults.fail("close", errno.EIO, device=bad)
    report = await release(session)
    accounted(report, addrs)
    failed = report.failed()
    assert [r.address for r in failed] == [bad]
    assert failed[0].errno == errno.EIO and bad in (failed[0].error or "")
    assert not report.ok
    assert m.open_fds() == 0


async def test_hung_reset_past_the_timeout(machine: MachineFactory) -> None:
    m = machine("gpus:4")
    session, addrs = await opened(m)
    stuck = addrs[0]  # the first GPU: its set's bus reset hangs
    ev = m.faults.hang_reset(stuck)
    report = await release(session, timeout=TIMEOUT)
    # The hung domain did not hold up the run: it returned with that reset still hanging.
    assert not m.resets(device=stuck, cause="devset")
    accounted(report, addrs)
    failed = {r.address: r for r in report.failed()}
    domain = report.devices[[r.address for r in report.devices].index(stuck)].domain
    in_domain = [r.address for r in report.devices if r.domain == domain]
    assert set(failed) <= set(in_domain) and failed
    assert all(
        r.errno == errno.ETIMEDOUT and "timed out" in (r.error or "") for r in failed.values()
    )
    assert [d.id for d in report.domains if d.timed_out] == [domain]
    others = [r for r in report.devices if r.domain != domain]
    assert all(r.status is Status.RELEASED for r in others)
    # The abandoned worker finishes once the reset returns; then nothing is left open.
    ev.set()
    assert wait_until(lambda: m.open_fds() == 0)


async def test_hung_domain_does_not_stall_the_queue(machine: MachineFactory) -> None:
    """With one worker, a hung domain is abandoned and a new worker takes the rest."""
    m = machine("gpus:4")
    session, addrs = await opened(m)
    own_fds = len(os.listdir("/proc/self/fd"))
    ev = m.faults.hang_reset(addrs[0])
    report = await release(session, timeout=TIMEOUT, max_parallel=1)
    accounted(report, addrs)
    hung = report.devices[[r.address for r in report.devices].index(addrs[0])].domain
    assert [d.id for d in report.domains if d.timed_out] == [hung]
    assert all(r.status is Status.RELEASED for r in report.devices if r.domain != hung)
    ev.set()
    assert wait_until(lambda: m.open_fds() == 0)
    # The abandoned worker was the last user of the run's wake-up fd: it closed it.
    assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= own_fds)


async def test_progress_once_per_domain_even_when_one_hangs(machine: MachineFactory) -> None:
    """Each domain gets one start and one end, the hung one's end from its timeout; when the
    hung reset returns while another domain still runs, its worker's late end is ignored."""
    m = machine("gpus:4")
    session, addrs = await opened(m)
    seen: list[tuple[str, str]] = []
    ev = m.faults.hang_reset(addrs[0])
    m.faults.slow_reset(addrs[-1], 10.0)  # 0.2 s at the tests' time scale
    hung: list[str] = []

    def progress(phase: str, d: Any, _devs: Any) -> None:
        seen.append((phase, d.id))
        if phase == "end" and d.timed_out:
            hung.append(d.id)
            ev.set()  # the hung reset returns now, while the slow domain still runs

    # One worker: the hung domain goes first; its replacement runs the rest.
    report = await release(session, timeout=TIMEOUT, max_parallel=1, progress=progress)
    assert len(hung) == 1 and [d.id for d in report.domains if d.timed_out] == hung
    assert wait_until(lambda: m.open_fds() == 0)
    domains = [d.id for d in report.domains]
    assert sorted(seen) == sorted([("start", d) for d in domains] + [("end", d) for d in domains])
    assert all(seen.index(("start", d)) < seen.index(("end", d)) for d in domains)


async def test_out_of_threads_runs_with_the_workers_it_got(
    machine: MachineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pids.max or RLIMIT_NPROC refusing threads: fewer workers, every device still released."""
    m = machine("gpus:4")
    session, addrs = await opened(m)
    real_start = threading.Thread.start
    started: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("vfiopy-release-"):
            if len(started) == 2:
                raise RuntimeError("can't start new thread")
            started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    report = await release(session)
    accounted(report, addrs)
    assert report.ok and len(started) == 2
    assert m.open_fds() == 0


async def test_device_removed_mid_release(machine: MachineFactory) -> None:
    m = machine("gpus:4")
    session, addrs = await opened(m)
    gone = addrs[3]
    for a in addrs[:2]:
        m.faults.slow_reset(a, 1.0)

    async def remove_soon() -> None:
        await anyio.sleep(0.005)
        remove_device(m, gone)

    async with anyio.create_task_group() as tg:
        tg.start_soon(remove_soon)
        report = await release(session)
    accounted(report, addrs)
    assert all(r.status in (Status.RELEASED, Status.FAILED) for r in report.devices)
    assert m.open_fds() == 0


async def test_cancelled_mid_release_still_releases_everything(
    machine: MachineFactory,
) -> None:
    m = machine("gpus:8")
    session, addrs = await opened(m)
    report = None
    with anyio.move_on_after(0.002) as scope:
        report = await release(session)
        await anyio.sleep(1)  # the cancellation lands here, after the shielded release
    assert scope.cancelled_caught
    assert report is not None
    accounted(report, addrs)
    assert report.ok
    assert len(m.unique_resets(cause="devset")) == 8
    assert m.open_fds() == 0
