"""A small in-memory Kernel for unit tests of the object model.

Paths are a dict of files and symlinks; ioctls go to per-request handlers
that receive the open path and the cffi argument, so a test states exactly
what the kernel answers.  Every open fd is tracked, so tests can assert that
no error path leaks one.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import Any

from vfiopy._uapi import ffi, lib

Handler = Callable[[str, Any], int]


def oserror(err: int) -> OSError:
    return OSError(err, os.strerror(err))


class FakeKernel:
    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.links: dict[str, str] = {}
        self.nodes: set[str] = set()  # /dev paths that open() accepts
        self.open_errors: dict[str, int] = {}
        self.handlers: dict[int, Handler] = {}
        self.fds: dict[int, str] = {}
        self.maps: dict[int, Any] = {}
        self.writes: list[tuple[str, str]] = []
        self.pread_data: dict[str, tuple[int, bytes]] = {}  # path -> (file offset, bytes)
        self._next = 10000  # far above the real fds eventfd() hands out

    # --- setup helpers -------------------------------------------------------
    def on(self, name: str, handler: Handler) -> None:
        self.handlers[getattr(lib, name)] = handler

    def pci_device(
        self,
        addr: str,
        group: int,
        driver: str | None = "vfio-pci",
        parent: str = "pci0000:00",
        reset_method: str | None = "flr bus",
        class_code: int = 0x020000,
    ) -> None:
        base = f"/sys/bus/pci/devices/{addr}"
        self.links[base] = f"../../../devices/{parent}/{addr}"
        self.links[f"{base}/iommu_group"] = f"../../../../kernel/iommu_groups/{group}"
        if driver:
            self.links[f"{base}/driver"] = f"../../../../bus/pci/drivers/{driver}"
        if reset_method is not None:
            self.files[f"{base}/reset_method"] = reset_method + "\n"
        self.files[f"{base}/vendor"] = "0x8086\n"
        self.files[f"{base}/device"] = "0x10d3\n"
        self.files[f"{base}/class"] = f"{class_code:#08x}\n"
        self.links[f"/sys/kernel/iommu_groups/{group}/devices/{addr}"] = f"../../../{base}"
        self.nodes.add(f"/dev/vfio/{group}")

    def remove(self, prefix: str) -> None:
        for table in (self.files, self.links):
            for k in [k for k in table if k == prefix or k.startswith(prefix + "/")]:
                del table[k]

    # --- Kernel protocol -------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        if path in self.open_errors:
            raise oserror(self.open_errors[path])
        if path not in self.nodes:
            raise oserror(errno.ENOENT)
        fd = self._next
        self._next += 1
        self.fds[fd] = path
        return fd

    def close(self, fd: int) -> None:
        path = self.fds.pop(fd, None)
        if path is None:
            raise oserror(errno.EBADF)
        if path == "eventfd":
            os.close(fd)

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        path = self.fds.get(fd)
        if path is None:
            raise oserror(errno.EBADF)
        handler = self.handlers.get(request)
        if handler is None:
            raise oserror(errno.ENOTTY)
        return handler(path, arg)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        base, data = self.pread_data.get(self.fds[fd], (0, b""))
        return data[offset - base : offset - base + size]

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return len(data)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def mmap(self, fd: int, length: int, offset: int, prot: int, flags: int) -> int:
        if fd != -1 and fd not in self.fds:
            raise oserror(errno.EBADF)
        mem = ffi.new("char[]", length)
        addr = int(ffi.cast("uintptr_t", mem))
        self.maps[addr] = mem
        return addr

    def munmap(self, addr: int, length: int) -> None:
        if self.maps.pop(addr, None) is None:
            raise oserror(errno.EINVAL)

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        fd = os.eventfd(initval, flags | os.EFD_CLOEXEC)
        self.fds[fd] = "eventfd"
        return fd

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int) -> list[tuple[int, int]]:
        return []

    def getpid(self) -> int:
        return 1

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        raise oserror(errno.ENOSYS)

    def pidfd_getfd(self, pidfd: int, targetfd: int, flags: int = 0) -> int:
        raise oserror(errno.ENOSYS)

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        raise oserror(errno.ENOSYS)

    def kcmp_file(self, pid1: int, pid2: int, fd1: int, fd2: int) -> int:
        raise oserror(errno.ENOSYS)

    def read_text(self, path: str) -> str:
        if path in self.files:
            return self.files[path]
        raise oserror(errno.EISDIR if self._isdir(path) else errno.ENOENT)

    def write_text(self, path: str, data: str) -> None:
        if path not in self.files and not path.endswith(("/unbind", "/drivers_probe")):
            raise oserror(errno.ENOENT)
        self.writes.append((path, data))

    def _isdir(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return any(k.startswith(prefix) for k in (*self.files, *self.links))

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        names = {
            k[len(prefix) :].split("/", 1)[0]
            for k in (*self.files, *self.links)
            if k.startswith(prefix)
        }
        if not names:
            raise oserror(errno.ENOENT)
        return sorted(names)

    def readlink(self, path: str) -> str:
        if path in self.links:
            return self.links[path]
        raise oserror(errno.EINVAL if path in self.files else errno.ENOENT)

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.links or path in self.nodes or self._isdir(path)

    def access(self, path: str, mode: int) -> bool:
        return self.exists(path)
