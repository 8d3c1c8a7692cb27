"""The only door to the operating system for device work.

Every syscall and every sysfs/devfs/procfs access of vfiopy goes through a
:class:`Kernel`.  :class:`LinuxKernel` talks to the running kernel; the
simulator in ``tools/mock_vfio`` implements the same protocol, so the library's
real code paths run (and can be fault-injected) without hardware.

All methods raise :class:`OSError` with ``errno`` set, as the kernel would
report it; callers turn that into a :class:`vfiopy.errors.VfioError` naming the
device and the step.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from vfiopy._uapi import CData, ffi, lib

O_RDWR = os.O_RDWR
O_RDONLY = os.O_RDONLY
O_CLOEXEC = os.O_CLOEXEC
O_NONBLOCK = os.O_NONBLOCK
POLLIN = select.POLLIN
EFD_CLOEXEC = getattr(os, "EFD_CLOEXEC", 0o2000000)
EFD_NONBLOCK = getattr(os, "EFD_NONBLOCK", 0o4000)
KCMP_FILE = 0  # enum kcmp_type in <linux/kcmp.h>


@runtime_checkable
class Kernel(Protocol):
    """What vfiopy asks of the operating system, as seen by one process."""

    # --- file descriptors -------------------------------------------------
    def open(self, path: str, flags: int) -> int: ...
    def close(self, fd: int) -> None: ...
    def ioctl(self, fd: int, request: int, arg: CData | int = 0) -> int:
        """Issue ``request`` on ``fd``; ``arg`` is a cffi struct pointer or an int.

        Returns the ioctl's non-negative result (a new fd for
        GROUP_GET_DEVICE_FD, a version or extension answer, else 0).
        """
        ...

    def pread(self, fd: int, size: int, offset: int) -> bytes: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...
    def read(self, fd: int, size: int) -> bytes: ...
    def write(self, fd: int, data: bytes) -> int: ...
    def mmap(self, fd: int, length: int, offset: int, prot: int, flags: int) -> int:
        """Map ``length`` bytes of ``fd`` at ``offset``; returns the address."""
        ...

    def munmap(self, addr: int, length: int) -> None: ...
    def eventfd(self, initval: int = 0, flags: int = 0) -> int: ...
    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int) -> list[tuple[int, int]]:
        """Wait for events; returns ``(fd, revents)`` for the ready ones."""
        ...

    # --- processes ----------------------------------------------------------
    def getpid(self) -> int: ...
    def pidfd_open(self, pid: int, flags: int = 0) -> int: ...
    def pidfd_getfd(self, pidfd: int, targetfd: int, flags: int = 0) -> int: ...
    def pidfd_send_signal(self, pidfd: int, sig: int) -> None: ...
    def kcmp_file(self, pid1: int, pid2: int, fd1: int, fd2: int) -> int:
        """kcmp(2) with KCMP_FILE: 0 when ``fd1`` of ``pid1`` and ``fd2`` of
        ``pid2`` are the same open file description.

        Otherwise 1 or 2 order the two files (3 when no order is available).
        Raises EBADF for an fd that is not open, ESRCH for no such pid, EPERM
        without ptrace-read access to either process, ENOSYS without
        CONFIG_KCMP.
        """
        ...

    # --- sysfs, devfs and procfs paths ---------------------------------------
    def read_text(self, path: str) -> str: ...
    def write_text(self, path: str, data: str) -> None: ...
    def listdir(self, path: str) -> list[str]: ...
    def readlink(self, path: str) -> str: ...
    def exists(self, path: str) -> bool: ...
    def access(self, path: str, mode: int) -> bool: ...


@runtime_checkable
class RemapKernel(Protocol):
    """A :class:`Kernel` that can retire a mapping without leaving a hole.

    Optional: a kernel whose mappings stay valid after munmap (the simulator's
    BARs are its own memory) need not offer it.
    """

    def remap_anonymous(self, addr: int, length: int) -> None:
        """Replace ``[addr, addr+length)`` atomically with private zero pages.

        The old mapping, and any file reference it held, is gone; the range
        stays mapped (until munmap), so a racing load or store cannot fault.
        """
        ...


def _check(ret: int) -> int:
    """Turn a helper's -errno return into OSError."""
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


def _retry(helper: Callable[..., int], *args: Any) -> int:
    """Call ``helper`` again while a signal interrupts it (EINTR), as os.* calls do (PEP 475).

    Python's signal handlers run between the attempts, so Ctrl-C still
    raises KeyboardInterrupt instead of being retried away.
    """
    while True:
        ret = helper(*args)
        if ret != -errno.EINTR:
            return _check(ret)


class LinuxKernel:
    """:class:`Kernel` backed by the running Linux kernel."""

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags | O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: CData | int = 0) -> int:
        if isinstance(arg, int):
            return _retry(lib.vfiopy_ioctl_int, fd, request, arg)
        return _retry(lib.vfiopy_ioctl_ptr, fd, request, arg)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def mmap(self, fd: int, length: int, offset: int, prot: int, flags: int) -> int:
        out = ffi.new("uintptr_t *")
        _retry(lib.vfiopy_mmap, fd, length, prot, flags, offset, out)
        return int(out[0])

    def munmap(self, addr: int, length: int) -> None:
        _retry(lib.vfiopy_munmap, addr, length)

    def remap_anonymous(self, addr: int, length: int) -> None:
        _retry(lib.vfiopy_remap_anonymous, addr, length)

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        return os.eventfd(initval, flags | EFD_CLOEXEC)

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int) -> list[tuple[int, int]]:
        p = select.poll()
        for fd, events in fds:
            p.register(fd, events)
        return p.poll(timeout_ms)

    def getpid(self) -> int:
        return os.getpid()

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        return _check(lib.vfiopy_pidfd_open(pid, flags))

    def pidfd_getfd(self, pidfd: int, targetfd: int, flags: int = 0) -> int:
        return _check(lib.vfiopy_pidfd_getfd(pidfd, targetfd, flags))

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        _check(lib.vfiopy_pidfd_send_signal(pidfd, sig, 0))

    def kcmp_file(self, pid1: int, pid2: int, fd1: int, fd2: int) -> int:
        return _check(lib.vfiopy_kcmp(pid1, pid2, KCMP_FILE, fd1, fd2))

    def read_text(self, path: str) -> str:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()

    def write_text(self, path: str, data: str) -> None:
        # sysfs attributes take one write(); a buffered writer might split it.
        fd = os.open(path, os.O_WRONLY | O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def readlink(self, path: str) -> str:
        return os.readlink(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def access(self, path: str, mode: int) -> bool:
        return os.access(path, mode)


_default: Kernel | None = None


def default_kernel() -> Kernel:
    """The process-wide kernel: the simulator when ``VFIOPY_SIMULATE`` is set."""
    global _default
    if _default is None:
        topo = os.environ.get("VFIOPY_SIMULATE")
        if topo:
            from vfiopy.simulate import simulated_kernel

            _default = simulated_kernel(topo)
        else:
            _default = LinuxKernel()
    return _default


def set_default_kernel(kernel: Kernel | None) -> None:
    """Replace (or with ``None`` reset) the process-wide kernel."""
    global _default
    _default = kernel


__all__ = [
    "EFD_CLOEXEC",
    "EFD_NONBLOCK",
    "KCMP_FILE",
    "O_CLOEXEC",
    "O_NONBLOCK",
    "O_RDONLY",
    "O_RDWR",
    "POLLIN",
    "Kernel",
    "LinuxKernel",
    "RemapKernel",
    "default_kernel",
    "set_default_kernel",
]
