"""kcmp(2) with KCMP_FILE in the simulator: same open file description or not."""

from __future__ import annotations

import errno

import pytest
from mock_vfio import Machine

from vfiopy.kernel import O_RDWR, LinuxKernel

from .conftest import NICS, open_device


def _errno(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.errno or 0


def test_dup_and_pidfd_getfd_are_the_same_file(qemu: Machine) -> None:
    vmm, mgr = qemu.spawn("vmm"), qemu.spawn("mgr")
    _, _, d = open_device(vmm, NICS[0])
    d2 = vmm.dup(d)
    assert d2 != d
    assert vmm.kcmp_file(vmm.pid, vmm.pid, d, d2) == 0
    got = mgr.pidfd_getfd(mgr.pidfd_open(vmm.pid), d)
    assert mgr.kcmp_file(vmm.pid, mgr.pid, d, got) == 0
    assert mgr.kcmp_file(mgr.pid, vmm.pid, got, d2) == 0


def test_different_files_are_ordered(qemu: Machine) -> None:
    p = qemu.spawn()
    c, g, d = open_device(p, NICS[0])
    _, _, e = open_device(p, NICS[1])
    # two opens of the container node are two open file descriptions
    c2 = p.open("/dev/vfio/vfio", O_RDWR)
    for a, b in ((c, g), (g, d), (d, e), (c, c2)):
        ab, ba = p.kcmp_file(p.pid, p.pid, a, b), p.kcmp_file(p.pid, p.pid, b, a)
        assert {ab, ba} == {1, 2}


def test_errors(qemu: Machine) -> None:
    p, q = qemu.spawn(), qemu.spawn(ptraceable=False)
    _, _, d = open_device(p, NICS[0])
    d2 = p.dup(d)
    p.close(d2)
    assert _errno(p.kcmp_file, p.pid, p.pid, d, d2) == errno.EBADF
    assert _errno(p.kcmp_file, p.pid, p.pid, d2, d) == errno.EBADF
    assert _errno(p.kcmp_file, p.pid, 999_999, d, d) == errno.ESRCH
    # ptrace-read access is checked before the fds are looked at
    assert _errno(p.kcmp_file, p.pid, q.pid, d, d2) == errno.EPERM
    # a process may always compare its own files
    qd = q.dup(q.open("/dev/vfio/vfio", O_RDWR))
    assert q.kcmp_file(q.pid, q.pid, qd, qd) == 0
    q.exit()
    assert _errno(p.kcmp_file, q.pid, p.pid, qd, d) == errno.ESRCH


def test_injected_enosys(qemu: Machine) -> None:
    p = qemu.spawn()
    _, _, d = open_device(p, NICS[0])
    qemu.faults.fail("kcmp", errno.ENOSYS)
    assert _errno(p.kcmp_file, p.pid, p.pid, d, d) == errno.ENOSYS


def test_real_fds_go_to_the_host(qemu: Machine) -> None:
    p = qemu.spawn()
    host = LinuxKernel()
    efd = p.eventfd()
    try:
        try:
            host.kcmp_file(host.getpid(), host.getpid(), efd, efd)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM):
                pytest.skip(f"kcmp unavailable here: {e}")
            raise
        other = p.dup(efd)
        try:
            assert p.kcmp_file(p.pid, p.pid, efd, other) == 0
        finally:
            p.close(other)
        _, _, d = open_device(p, NICS[0])
        assert p.kcmp_file(p.pid, p.pid, efd, d) in (1, 2)
    finally:
        p.close(efd)
