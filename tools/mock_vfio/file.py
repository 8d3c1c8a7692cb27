"""``struct file`` as the simulator's files share it, and the pidfd (``pidfd_open``)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from mock_vfio.trace import oserror

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Device
    from mock_vfio.process import SimProcess


class File:
    """``struct file``: reference counted by fds, dups and mappings."""

    kind = "file"

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.refs = 0
        self.released = False

    def link(self) -> str:
        return "anon_inode:[file]"

    def fdinfo(self) -> str:
        return ""

    def device(self) -> Device | None:
        return None

    def ioctl(self, proc: SimProcess, request: int, arg: Any) -> int:
        raise oserror(errno.ENOTTY, f"ioctl {request:#x} on {self.link()}")

    def ioctl_names(self, request: int) -> tuple[str, ...]:
        return ()

    def pread(self, proc: SimProcess, size: int, offset: int) -> bytes:
        raise oserror(errno.EINVAL, "pread")

    def pwrite(self, proc: SimProcess, data: bytes, offset: int) -> int:
        raise oserror(errno.EINVAL, "pwrite")

    def mmap(self, proc: SimProcess, length: int, offset: int, prot: int, flags: int) -> int:
        raise oserror(errno.ENODEV, "mmap")

    def unmap(self, addr: int, length: int) -> None:
        """A mapping of this file goes (munmap, or the process's exit)."""

    def poll_events(self) -> int:
        return 0

    def release(self, pid: int) -> None:
        pass


class PidFile(File):
    kind = "pidfd"

    def __init__(self, machine: Machine, target: SimProcess) -> None:
        super().__init__(machine)
        self.target = target

    def link(self) -> str:
        return "anon_inode:[pidfd]"

    def fdinfo(self) -> str:
        return f"Pid:\t{self.target.pid if self.target.alive else -1}\n"

    def poll_events(self) -> int:
        import select

        return select.POLLIN if not self.target.alive else 0
