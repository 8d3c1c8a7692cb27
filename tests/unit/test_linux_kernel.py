"""LinuxKernel against the running kernel: the syscalls that need no VFIO device."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from vfiopy._uapi import MAP_ANONYMOUS, MAP_SHARED, PROT_READ, PROT_WRITE, Ioctl, lib
from vfiopy.kernel import POLLIN, LinuxKernel

k = LinuxKernel()


def test_eventfd_counts_and_polls() -> None:
    fd = k.eventfd(0)
    try:
        assert k.poll([(fd, POLLIN)], 0) == []
        k.write(fd, (3).to_bytes(8, "little"))
        assert k.poll([(fd, POLLIN)], 0) == [(fd, POLLIN)]
        assert int.from_bytes(k.read(fd, 8), "little") == 3
    finally:
        k.close(fd)


def test_anonymous_mmap_exact_width_accessors() -> None:
    addr = k.mmap(-1, 4096, 0, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS)
    try:
        lib.vfiopy_write32(addr + 8, 0xDEADBEEF)
        assert lib.vfiopy_read32(addr + 8) == 0xDEADBEEF
        assert lib.vfiopy_read16(addr + 8) == 0xBEEF
        assert lib.vfiopy_read8(addr + 11) == 0xDE
        lib.vfiopy_write64(addr + 16, 0x0123456789ABCDEF)
        assert lib.vfiopy_read64(addr + 16) == 0x0123456789ABCDEF
    finally:
        k.munmap(addr, 4096)


def test_errors_keep_errno() -> None:
    with pytest.raises(OSError) as e:
        k.ioctl(-1, Ioctl.GET_API_VERSION)
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e2:
        k.open("/dev/vfio/does-not-exist", os.O_RDWR)
    assert e2.value.errno == errno.ENOENT


def test_pidfd_getfd_and_signal_a_child() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os,time; r,w=os.pipe(); print(w, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        target = int(child.stdout.readline())
        pidfd = k.pidfd_open(child.pid)
        try:
            try:
                dup = k.pidfd_getfd(pidfd, target)
            except OSError as e:
                # Needs ptrace-attach rights (root or same user with ptrace_scope 0).
                pytest.skip(f"pidfd_getfd not permitted here: {e}")
            assert k.readlink(f"/proc/self/fd/{dup}").startswith("pipe:")
            k.close(dup)
            k.pidfd_send_signal(pidfd, signal.SIGTERM)
            assert k.poll([(pidfd, POLLIN)], 10_000) == [(pidfd, POLLIN)]
        finally:
            k.close(pidfd)
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
