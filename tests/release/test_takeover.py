"""Taking over a VMM's VFIO files: every file taken, identified or not, and released at once.

The VMM here behaves like QEMU (mock_vfio.spawn_qemu): it holds the container, its groups
and its device fds, and has written 0 to every BAR through the device fds, so BARs read
back through an fd say nothing.  On kernels before 6.18 fdinfo names no device.
"""

from __future__ import annotations

import errno
import signal
import threading
from functools import partial
from typing import Any

import anyio
import pytest
from mock_vfio import spawn_qemu, unplug_qemu
from release_helpers import MachineFactory, concurrent, slow_resets, vfio_devices, wait_until

from vfiopy._uapi import Ioctl
from vfiopy.release import Status, release_process, take_over
from vfiopy.release._takeover import guard, planned_report

NICS = [f"0000:0{n}:00.0" for n in range(1, 7)]
PAIR = ["0000:07:00.0", "0000:07:00.1"]


def kinds(t: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in t.files:
        out[f.kind] = out.get(f.kind, 0) + 1
    return out


def test_fdinfo_names_every_device_from_6_18(machine: MachineFactory) -> None:
    m = machine("gpus:2", kernel_version=(6, 18))
    vmm = spawn_qemu(m, vfio_devices(m.spawn(name="probe")))
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    try:
        assert sorted(f.address for f in t.devices) == vfio_devices(vmm)  # type: ignore[type-var]
        assert {f.how for f in t.devices} == {"fdinfo"}
        assert [len(d.devices) for d in t.plan.domains] == [2, 2]
    finally:
        t.close()
    assert vmm.alive and not vmm.signals


def test_qemu_on_6_1_every_device_identified_without_bars(machine: MachineFactory) -> None:
    # GPU and audio function share each bus: the hot-reset set names the bus, the class
    # tells the two functions apart; nothing here reads a BAR.
    m = machine("gpus:8", kernel_version=(6, 1))
    addrs = vfio_devices(m.spawn(name="probe"))
    vmm = spawn_qemu(m, addrs)
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    try:
        assert not t.unidentified
        for f in t.devices:
            assert "hot-reset-info" in f.how and "fdinfo" not in f.how
            assert vmm.file_of(f.fds[0]).device().addr == f.address
        assert kinds(t) == {"device": 16, "group": 8, "container": 1}  # GPU and audio: one group
    finally:
        t.close()


def test_qemu_on_6_1_releases_all_at_once(machine: MachineFactory) -> None:
    m = machine("gpus:4", kernel_version=(6, 1))
    addrs = vfio_devices(m.spawn(name="probe"))
    vmm = spawn_qemu(m, addrs)
    slow_resets(m, addrs)
    cli = m.spawn(name="cli")
    report = anyio.run(release_process, take_over(cli, vmm.getpid()))
    assert report.ok and not vmm.alive
    assert sorted(r.address for r in report.devices) == addrs
    assert {(f.kind, str(f.status)) for f in report.files} == {
        ("group", "released"),
        ("container", "released"),
    }
    resets = m.unique_resets(cause="devset")
    assert len(resets) == 4 and len({e.devset for e in resets}) == 4
    assert concurrent(resets), resets  # never seen in a process's own exit
    assert m.open_fds() == 0


def test_identical_pair_is_reported_as_its_set(machine: MachineFactory) -> None:
    # The two e1000e functions of one multifunction slot are indistinguishable without
    # fdinfo: both are released by their set's worker, and the set is reset once.
    m = machine("qemu-vmtest", kernel_version=(6, 1))
    vmm = spawn_qemu(m, NICS + PAIR)
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    assert sorted(f.address for f in t.devices if f.address) == NICS
    pair = [f for f in t.devices if f.address is None]
    assert len(pair) == 2 and all(f.candidates == PAIR for f in pair)
    doc = planned_report(t).to_json()
    (dom,) = [d for d in doc["domains"] if len(d["devices"]) == 2]
    assert dom["id"] == "0000:07" and dom["resets"] == 1
    report = anyio.run(release_process, t)
    assert report.ok and len(report.devices) == 8
    for r in report.devices:
        if r.address.startswith("pid "):
            assert r.domain == "0000:07" and r.candidates == PAIR
    assert len(m.unique_resets(cause="devset", devset="bus:0000:07")) == 1
    assert m.open_fds() == 0


def test_one_file_under_several_fds_is_one_device(machine: MachineFactory) -> None:
    m = machine("gpus:2", kernel_version=(6, 1))
    addrs = vfio_devices(m.spawn(name="probe"))
    vmm = spawn_qemu(m, addrs, dup_device_fds=[addrs[0]])
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    (two,) = [f for f in t.devices if len(f.fds) == 2]
    assert two.address == addrs[0] and len(t.devices) == len(addrs)
    report = anyio.run(release_process, t)
    assert report.ok and report.counts()["released"] == len(addrs)
    assert m.open_fds() == 0


def test_unidentifiable_file_still_released_with_the_rest(
    machine: MachineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With every clue gone (no groups, no hot-reset set, no config region) a file is still
    # taken and closed by a worker of its own, never left to the process's serial exit.
    from vfiopy.release import _process

    m = machine("gpus:2", kernel_version=(6, 1))
    addrs = vfio_devices(m.spawn(name="probe"))
    vmm = spawn_qemu(m, addrs)
    monkeypatch.setattr(_process, "_reset_set", lambda _k, _f: None)
    monkeypatch.setattr(_process, "_identity_from_fd", lambda _k, _fd: None)
    monkeypatch.setattr(_process, "_vfio_devices", lambda _k: [])
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    assert len(t.unidentified) == len(addrs)
    report = anyio.run(release_process, t)
    assert report.ok and len(report.devices) == len(addrs) == len(report.domains)
    assert all(r.address.startswith(f"pid {vmm.getpid()} fd ") for r in report.devices)
    assert len(m.unique_resets(cause="devset")) == 2
    assert m.open_fds() == 0


def test_idle_vfio_neighbour_is_named_not_refused(machine: MachineFactory) -> None:
    # The VMM holds a GPU but not its audio function, idle on vfio-pci: its exit would
    # bus-reset both; so does --pid, and it says so.
    m = machine("gpus:2", kernel_version=(6, 18))
    gpus = vfio_devices(m.spawn(name="probe"))
    vmm = spawn_qemu(m, [gpus[0], gpus[2], gpus[3]])
    t = take_over(m.spawn(name="cli"), vmm.getpid())
    assert t.also_reset() == {gpus[0][:7]: [gpus[1]]}
    report = anyio.run(release_process, t)
    assert report.ok and not vmm.alive
    (d,) = [d for d in report.domains if d.also_reset]
    assert d.also_reset == [gpus[1]]
    assert m.open_fds() == 0


def test_process_exiting_during_the_takeover(
    machine: MachineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = machine("gpus:2", kernel_version=(6, 1))
    addrs = vfio_devices(m.spawn(name="probe"))
    vmm = spawn_qemu(m, addrs)
    cli = m.spawn(name="cli")
    real = cli.pidfd_getfd
    calls = 0

    def getfd(pidfd: int, fd: int, flags: int = 0) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            vmm.exit()  # gone after two files were taken
        return int(real(pidfd, fd, flags))

    monkeypatch.setattr(cli, "pidfd_getfd", getfd)
    t = take_over(cli, vmm.getpid())
    assert t.exited_early and len(t.files) == 2
    report = anyio.run(release_process, t)
    assert report.ok and not vmm.signals
    assert any("exited during the takeover" in n for n in report.notes)
    assert m.open_fds() == 0


def test_no_ptrace_permission_signals_nothing(machine: MachineFactory) -> None:
    m = machine("gpus:2")
    vmm = m.spawn(name="vmm", ptraceable=False)
    spawn_qemu(m, vfio_devices(vmm), process=vmm)
    cli = m.spawn(name="cli")
    with pytest.raises(OSError) as info:
        take_over(cli, vmm.getpid())
    assert info.value.errno == errno.EPERM
    assert vmm.alive and not vmm.signals and len(cli.fd_table()) == 0


# --- the guardian ---------------------------------------------------------------------------


def test_guardian_follows_unplug_and_plug_then_releases_after_kill(
    machine: MachineFactory, anyio_backend: str
) -> None:
    m = machine("qemu-vmtest", kernel_version=(6, 1))
    vmm = spawn_qemu(m, NICS[:4])
    cli = m.spawn(name="cli")
    t = take_over(cli, vmm.getpid())
    slow_resets(m, NICS[1:5])
    events: list[tuple[str, str]] = []
    unplugged = m.device(NICS[0])

    async def scenario() -> Any:
        box: list[Any] = []

        async def run_guard() -> None:
            box.append(
                await guard(t, interval=0.01, on_change=lambda w, f: events.append((w, f.link)))
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_guard)
            # Hot-unplug: the VMM closes the device and its group; the guardian lets go,
            # so the kernel releases (and resets) the device while the VMM lives on.
            unplug_qemu(vmm, NICS[0])
            group = m.groups[unplugged.group_id]
            ok = await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: unplugged.open_count == 0 and group.opened_file is None)
            )
            assert ok, "the guardian kept the unplugged device"
            assert vmm.alive
            # Hot-plug: a new device appears in the VMM and is taken.
            spawn_qemu(m, [NICS[4]], process=vmm)
            ok = await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: any(f.address == NICS[4] for f in t.devices))
            )
            assert ok, "the guardian did not take the hot-plugged device"
            vmm.pidfd_send_signal(vmm.pidfd_open(vmm.getpid()), signal.SIGKILL)
        return box[0]

    report = anyio.run(scenario, backend=anyio_backend)
    assert ("let go", "anon_inode:[vfio-device]") in events
    assert report.ok and not vmm.alive
    assert sorted(r.address for r in report.devices) == sorted(NICS[1:5])
    resets = [e for e in m.unique_resets() if e.cause != "open" and e.device in NICS[1:5]]
    assert len(resets) == 4 and concurrent(resets), resets
    assert m.open_fds() == 0


def test_guardian_stopped_gives_everything_back(machine: MachineFactory) -> None:
    m = machine("gpus:2", kernel_version=(6, 1))
    vmm = spawn_qemu(m, vfio_devices(m.spawn(name="probe")))
    cli = m.spawn(name="cli")
    t = take_over(cli, vmm.getpid())

    async def scenario() -> Any:
        with anyio.move_on_after(0.2):
            return await guard(t, interval=0.01)
        return None

    report = anyio.run(scenario)
    assert report is not None and report.interrupted and report.ok
    assert not report.devices and report.notes
    assert vmm.alive and not vmm.signals and len(cli.fd_table()) == 0
    assert not m.unique_resets(cause="devset")


def test_vmm_in_d_state_is_never_taken_for_exited(machine: MachineFactory) -> None:
    """A VMM whose VFIO_DEVICE_RESET hangs sleeps uninterruptibly (state D): SIGKILL does not
    end it and its files stay open, so nothing may be released under it.  Our references go
    back with that reason, and its own exit releases the devices once the reset returns."""
    m = machine("qemu-vmtest", kernel_version=(6, 1))
    addrs = NICS[:2]  # alone on their buses: a bus reset is their function reset
    vmm = spawn_qemu(m, addrs)
    stuck = addrs[0]
    (fd,) = [
        fd
        for fd, f in vmm.fd_table().items()
        if type(f).__name__ == "DeviceFile" and f.device().addr == stuck
    ]
    hang = m.faults.hang_reset(stuck)
    reset = threading.Thread(target=lambda: vmm.ioctl(fd, Ioctl.DEVICE_RESET, 0), daemon=True)
    reset.start()
    try:
        assert m.faults.wait_hung(stuck, timeout=30)
        t = take_over(m.spawn(name="cli"), vmm.getpid())
        report = anyio.run(partial(release_process, t, grace=0.05, kill_wait=0.2))
        assert vmm.signals == [signal.SIGTERM, signal.SIGKILL] and vmm.alive
        assert sorted(r.address for r in report.devices) == addrs  # type: ignore[type-var]
        assert {r.status for r in report.devices} == {Status.SKIPPED}
        assert all("state D" in (r.error or "") for r in report.devices)
        assert all(m.device(a).open_count == 1 for a in addrs)  # nothing released under it
    finally:
        hang.set()
        reset.join()
    assert vmm.wait(30)
    assert wait_until(lambda: m.open_fds() == 0)
    assert all(m.device(a).open_count == 0 for a in addrs), [
        (m.device(a).open_count, m.device(a).driver) for a in addrs
    ]
