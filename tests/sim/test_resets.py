"""The kernel facts of docs/design.md, asserted on the simulator's trace."""

from __future__ import annotations

import errno
import threading

import pytest
from mock_vfio import Machine, load_topology
from mock_vfio.pci_reset import bus_reset_cost

from vfiopy._uapi import PAGE_SIZE, Ioctl, Struct, lib

from .conftest import (
    NICS,
    PAIR,
    SCALE,
    get_device,
    open_container_group,
    open_device,
    overlapping,
    serial,
)


def _open_nics(m: Machine) -> tuple[object, list[int]]:
    p = m.spawn(name="vmm")
    devs = [open_device(p, a)[2] for a in NICS]
    return p, devs


def test_opening_resets(qemu: Machine) -> None:
    p = qemu.spawn()
    open_device(p, NICS[0])
    opens = qemu.resets(cause="open")
    assert [(e.device, e.method) for e in opens] == [(NICS[0], "bus")]


def test_threaded_close_runs_resets_of_different_sets_in_parallel(qemu: Machine) -> None:
    p, devs = _open_nics(qemu)
    for a in NICS:
        qemu.faults.slow_reset(a, 5.0)  # 0.1 s more: far beyond a thread's start-up
    threads = [threading.Thread(target=p.close, args=(fd,)) for fd in devs]  # type: ignore[attr-defined]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    resets = qemu.resets(cause="release")
    assert sorted(e.device for e in resets) == NICS
    assert len({e.devset for e in resets}) == 6
    assert not qemu.events("lock_wait")  # no set waited on another's lock
    assert overlapping(resets)


def test_close_loop_runs_resets_one_after_another(qemu: Machine) -> None:
    p, devs = _open_nics(qemu)
    for fd in devs:
        p.close(fd)  # type: ignore[attr-defined]
    resets = qemu.resets(cause="release")
    assert len(resets) == 6
    assert serial(resets)


def test_process_exit_releases_in_series(qemu: Machine) -> None:
    p, _ = _open_nics(qemu)
    p.exit()  # type: ignore[attr-defined]
    assert not p.alive  # type: ignore[attr-defined]
    resets = qemu.resets(cause="release")
    assert len(resets) == 6
    assert serial(resets)
    assert len({e.thread for e in resets}) == 1
    assert qemu.open_fds() == 0


def test_legacy_driver_lock_serialises_threaded_close(legacy: Machine) -> None:
    p, devs = _open_nics(legacy)
    threads = [threading.Thread(target=p.close, args=(fd,)) for fd in devs]  # type: ignore[attr-defined]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    resets = legacy.resets(cause="release")
    assert len(resets) == 6
    assert serial(resets)
    assert legacy.events("lock_wait")


def test_multifunction_pair_is_bus_reset_once_at_its_last_close(qemu: Machine) -> None:
    p = qemu.spawn()
    _, g = open_container_group(p, PAIR[0])
    d0, d1 = get_device(p, g, PAIR[0]), get_device(p, g, PAIR[1])
    assert qemu.resets() == []  # no function reset: reset_method is empty
    p.close(d0)
    assert qemu.resets() == []  # the other function is still open
    p.close(d1)
    resets = qemu.unique_resets()
    assert len(resets) == 1
    assert resets[0].method == "bus" and resets[0].cause == "devset"
    assert sorted(e.device for e in qemu.resets()) == PAIR


def test_bus_reset_delay_models() -> None:
    old = Machine(load_topology("qemu-vmtest"), reset_model="pre-6.3", time_scale=0)
    new = Machine(load_topology("qemu-vmtest"), reset_model="current", time_scale=0)
    nic, edu = old.device(NICS[0]), old.device("0000:08:01.0")
    assert bus_reset_cost(old, nic.bridge) == 1.0
    assert bus_reset_cost(new, new.device(NICS[0]).bridge) < 0.5
    assert bus_reset_cost(new, new.device(edu.addr).bridge) > 1.0  # conventional PCI


def test_mmap_defers_the_release(qemu: Machine) -> None:
    p = qemu.spawn()
    _, _, d = open_device(p, NICS[0])
    addr = p.mmap(d, PAGE_SIZE, 0, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED)
    lib.vfiopy_write32(addr, 0x12345678)
    assert lib.vfiopy_read32(addr) == 0x12345678
    p.close(d)
    assert qemu.events("release") == []
    assert qemu.open_fds() == 3  # container, group, and the device held by the mapping
    p.munmap(addr, PAGE_SIZE)
    assert [e.device for e in qemu.events("release")] == [NICS[0]]
    assert len(qemu.resets(cause="release")) == 1


def test_command_memory_toggles_are_traced(qemu: Machine) -> None:
    p = qemu.spawn()
    dev = qemu.device(NICS[0])
    dev.set_command(0, "test")  # decoding off (the guest's firmware leaves it on)
    open_device(p, NICS[0])
    values = [e.value for e in qemu.events("command_memory") if e.cause != "test"]
    assert values[:3] == [True, False, True]  # enable, reset, restore


def _two_groups_one_bus() -> Machine:
    text = """
[[bridge]]
addr = "0000:00:01.0"
secondary = 1
[[device]]
addr = "0000:01:00.0"
iommu_group = 1
multifunction = true
flr = true
bars = [{ index = 0, size = 0x1000 }]
[[device]]
addr = "0000:01:00.1"
iommu_group = 2
flr = true
bars = [{ index = 0, size = 0x1000 }]
"""
    from mock_vfio import parse_toml

    return Machine(parse_toml(text), time_scale=SCALE)


def _hot_reset(p: object, d: int, groups: list[int]) -> None:
    s = Struct("struct vfio_pci_hot_reset", 12 + 4 * len(groups))
    s.p.count = len(groups)
    for i, g in enumerate(groups):
        s.p.group_fds[i] = g
    p.ioctl(d, Ioctl.DEVICE_PCI_HOT_RESET, s.p)  # type: ignore[attr-defined]


def test_hot_reset_needs_every_group_of_the_set() -> None:
    m = _two_groups_one_bus()
    a, b = m.spawn(name="a"), m.spawn(name="b")
    _, ga, da = open_device(a, "0000:01:00.0")
    open_device(b, "0000:01:00.1")
    info = Struct("struct vfio_pci_hot_reset_info")
    with pytest.raises(OSError) as e:
        a.ioctl(da, Ioctl.DEVICE_GET_PCI_HOT_RESET_INFO, info.p)
    assert e.value.errno == errno.ENOSPC and info.p.count == 2
    with pytest.raises(OSError) as e:
        _hot_reset(a, da, [ga])  # the other function belongs to process b
    assert e.value.errno == errno.EINVAL
    assert m.events("hot_reset") == []
    b.exit()
    before = len(m.unique_resets())
    _, gb = open_container_group(a, "0000:01:00.1")
    _hot_reset(a, da, [ga, gb])
    hot = m.unique_resets(cause="hot_reset")
    assert len(hot) == 1 and hot[0].method == "bus"
    assert len(m.unique_resets()) == before + 1
    m.close()
