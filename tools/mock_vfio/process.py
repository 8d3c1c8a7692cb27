"""A simulated process: its own fd table, mappings and pid; a ``Kernel``.

Simulated fds are numbered from :data:`SIM_FD_BASE` so they never collide with
real ones; real fds (the eventfds vfiopy asks for, anything else) go straight
to the operating system.  Files are reference counted: an fd, a dup and an
mmap each hold one reference, and the file's release (for a device: its
reset) runs on the thread that drops the last one, like ``fput`` + task_work.
"""

from __future__ import annotations

import errno
import heapq
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

from mock_vfio import vfs
from mock_vfio.file import File, PidFile
from mock_vfio.iommufd import IommufdFile
from mock_vfio.machine import Machine
from mock_vfio.pci import Device
from mock_vfio.pci_sysfs import SysfsConfigFile
from mock_vfio.sched import TaskSched, running
from mock_vfio.trace import oserror
from mock_vfio.uapi import page_align
from mock_vfio.vfio_container import ContainerFile
from mock_vfio.vfio_group import GroupFile
from mock_vfio.vfio_pci_core import DeviceFile
from vfiopy._uapi import MAP_HUGETLB, CData
from vfiopy.kernel import LinuxKernel

_HOST = LinuxKernel()

SIM_FD_BASE = 1_000_000


def _put(proc: SimProcess, f: File) -> None:
    with running(proc.sched):  # a release that resets runs in this task
        proc.machine.put_file(f, proc.pid)


def _get(machine: Machine, f: File) -> None:
    machine.get_file(f)


class SimProcess:
    """One simulated process; implements :class:`vfiopy.kernel.Kernel`."""

    def __init__(self, machine: Machine, pid: int, name: str, ptraceable: bool = True) -> None:
        self.machine = machine
        self.pid = pid
        self.name = name
        self.ptraceable = ptraceable
        self.alive = True
        self.exiting = False
        self.signals: list[int] = []
        self._fds: dict[int, File] = {}
        # The kernel hands out the lowest free fd: freed numbers wait in a heap, so
        # thousands of open devices do not make every open scan the table.
        self._free_fds: list[int] = []
        self._next_fd = SIM_FD_BASE
        self._maps: list[tuple[int, int, File]] = []
        self._host_maps: set[tuple[int, int]] = set()
        self._lock = threading.RLock()
        self._exited = threading.Event()
        self.sched = TaskSched()

    def __repr__(self) -> str:
        return f"<SimProcess {self.pid} {self.name}{'' if self.alive else ' (exited)'}>"

    # --- bookkeeping ---------------------------------------------------------------------

    @staticmethod
    def is_sim_fd(fd: int) -> bool:
        return fd >= SIM_FD_BASE

    def install(self, f: File) -> int:
        """Give ``f`` the lowest free simulated fd (it takes one reference)."""
        with self._lock:
            if not self.alive:
                raise oserror(errno.ESRCH, f"process {self.pid} has exited")
            if self._free_fds:
                fd = heapq.heappop(self._free_fds)
            else:
                fd = self._next_fd
                self._next_fd += 1
            _get(self.machine, f)
            self._fds[fd] = f
            return fd

    def file_of(self, fd: int) -> File:
        with self._lock:
            f = self._fds.get(fd)
        if f is None:
            raise oserror(errno.EBADF, f"fd {fd}")
        return f

    def files(self) -> list[File]:
        with self._lock:
            return list(self._fds.values()) + [m[2] for m in self._maps]

    def fd_table(self) -> dict[int, File]:
        with self._lock:
            return dict(self._fds)

    def _check(self, names: tuple[str, ...], dev: Device | None) -> None:
        self.machine.faults.check(names, dev.addr if dev is not None else None)

    def _dev_of_path(self, path: str) -> str | None:
        for part in path.split("/"):
            if len(part) == 12 and part[4] == ":" and part[7] == ":" and part[10] == ".":
                return part
        return None

    # --- files -------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        self.machine.faults.check(("open",), self._dev_of_path(path))
        if not self.alive:
            raise oserror(errno.ESRCH, "process has exited")
        f = vfs.open_node(self, path, flags)
        try:
            return self.install(f)
        except OSError:
            _get(self.machine, f)
            _put(self, f)
            raise

    def open_group(self, gid: int) -> GroupFile:
        m = self.machine
        grp = m.groups.get(gid)
        if grp is None or not m.group_has_vfio(gid):
            raise oserror(errno.ENOENT, f"/dev/vfio/{gid}")
        with grp.lock:
            # vfio_group_fops_open: one open file per group; cdev users block it
            if grp.opened_file is not None or grp.cdev_binds:
                raise oserror(errno.EBUSY, f"/dev/vfio/{gid} is already open")
            f = GroupFile(m, grp)
            grp.opened_file = f
        return f

    def open_container(self) -> ContainerFile:
        return ContainerFile(self.machine)

    def open_iommufd(self) -> IommufdFile:
        if not self.machine.iommufd:
            raise oserror(errno.ENOENT, "/dev/iommu")
        return IommufdFile(self.machine)

    def open_cdev(self, minor: int) -> DeviceFile:
        dev = self.machine.device_for_minor(minor)
        if dev is None or not self.machine.cdev:
            raise oserror(errno.ENOENT, f"/dev/vfio/devices/vfio{minor}")
        return DeviceFile(self.machine, dev, None, minor)

    def open_config(self, dev: Device, path: str) -> SysfsConfigFile:
        return SysfsConfigFile(self.machine, dev, path)

    def close(self, fd: int) -> None:
        if not self.is_sim_fd(fd):
            os.close(fd)
            return
        with self._lock:
            f = self._fds.pop(fd, None)
            if f is not None:
                heapq.heappush(self._free_fds, fd)
        if f is None:
            raise oserror(errno.EBADF, f"fd {fd}")
        try:
            # close(2) frees the fd even when it reports an error
            self.machine.faults.check(("close",), _addr(f))
        finally:
            _put(self, f)

    def dup(self, fd: int) -> int:
        if not self.is_sim_fd(fd):
            return os.dup(fd)
        return self.install(self.file_of(fd))

    def ioctl(self, fd: int, request: int, arg: CData | int = 0) -> int:
        f = self.file_of(fd) if self.is_sim_fd(fd) else None
        if f is None:
            raise oserror(errno.ENOTTY, f"ioctl on real fd {fd}")
        names = ("ioctl", *f.ioctl_names(request))
        self._check(names, f.device())
        self.machine.counters.add("ioctls")
        with running(self.sched):
            return f.ioctl(self, request, arg)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if not self.is_sim_fd(fd):
            return os.pread(fd, size, offset)
        f = self.file_of(fd)
        self._check(("pread",), f.device())
        return f.pread(self, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if not self.is_sim_fd(fd):
            return os.pwrite(fd, data, offset)
        f = self.file_of(fd)
        self._check(("pwrite",), f.device())
        return f.pwrite(self, bytes(data), offset)

    def read(self, fd: int, size: int) -> bytes:
        if not self.is_sim_fd(fd):
            return os.read(fd, size)
        self.file_of(fd)
        raise oserror(errno.EINVAL, "read on a simulated file")

    def write(self, fd: int, data: bytes) -> int:
        if not self.is_sim_fd(fd):
            return os.write(fd, data)
        self.file_of(fd)
        raise oserror(errno.EINVAL, "write on a simulated file")

    def mmap(self, fd: int, length: int, offset: int, prot: int, flags: int) -> int:
        if not self.is_sim_fd(fd):
            if flags & MAP_HUGETLB and fd == -1 and self.machine.hugetlb is not None:
                return self.machine.hugetlb.mmap(length, prot, flags)
            # Anonymous memory (DMA buffers) and real fds are the host's own.
            addr = _HOST.mmap(fd, length, offset, prot, flags)
            with self._lock:
                self._host_maps.add((addr, length))
            return addr
        f = self.file_of(fd)
        self._check(("mmap",), f.device())
        addr = f.mmap(self, length, offset, prot, flags)
        with self._lock:
            _get(self.machine, f)  # a mapping keeps the file (and the device) open
            self._maps.append((addr, page_align(length), f))  # the VMA: whole pages
        return addr

    def munmap(self, addr: int, length: int) -> None:
        if length <= 0 or addr & 4095:
            raise oserror(errno.EINVAL, "munmap")
        self.machine.faults.check(("munmap",), None)
        if self.machine.hugetlb is not None and self.machine.hugetlb.munmap(addr, length):
            return
        with self._lock:
            host = (addr, length) in self._host_maps
            self._host_maps.discard((addr, length))
        if host:
            _HOST.munmap(addr, length)
            return
        length = page_align(length)  # munmap(2) unmaps whole pages
        with self._lock:
            hit = None
            for i in range(len(self._maps) - 1, -1, -1):
                a, n, _ = self._maps[i]
                if a == addr and n == length:
                    hit = self._maps.pop(i)
                    break
        if hit is None:
            return  # like munmap(2): unmapping nothing is not an error
        hit[2].unmap(addr, length)
        _put(self, hit[2])

    def unmap_file(self, which: Callable[[File], bool]) -> None:
        """munmap every mapping of the files ``which`` selects (a VMM dropping a device)."""
        with self._lock:
            hits = [(a, n) for a, n, f in self._maps if which(f)]
        for a, n in hits:
            self.munmap(a, n)

    def drop_mappings(self) -> None:
        """Forget mappings without releasing (Machine.close)."""
        with self._lock:
            self._maps.clear()

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        return os.eventfd(initval, flags | os.EFD_CLOEXEC)

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int) -> list[tuple[int, int]]:
        real = [(fd, ev) for fd, ev in fds if not self.is_sim_fd(fd)]
        sim = [(fd, ev) for fd, ev in fds if self.is_sim_fd(fd)]
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        p = select.poll()
        for fd, ev in real:
            p.register(fd, ev)
        while True:
            ready: list[tuple[int, int]] = []
            for fd, ev in sim:
                f = self._fds.get(fd)
                rev = select.POLLNVAL if f is None else f.poll_events() & (ev | select.POLLHUP)
                if rev:
                    ready.append((fd, rev))
            step = 0 if ready else 5 if sim else timeout_ms
            if deadline is not None and not ready:
                left = int((deadline - time.monotonic()) * 1000)
                step = max(0, min(step, left)) if sim else max(0, left)
            ready += p.poll(step) if real else []
            if ready or (deadline is not None and time.monotonic() >= deadline):
                return ready
            if not real:
                time.sleep(step / 1000 if step else 0)

    # --- processes ---------------------------------------------------------------------------

    def getpid(self) -> int:
        return self.pid

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        self._check(("pidfd_open",), None)
        target = self.machine.process(pid)
        if not target.alive:
            raise oserror(errno.ESRCH, f"pid {pid} has exited")
        return self.install(PidFile(self.machine, target))

    def pidfd_getfd(self, pidfd: int, targetfd: int, flags: int = 0) -> int:
        self._check(("pidfd_getfd",), None)
        pf = self.file_of(pidfd)
        if not isinstance(pf, PidFile):
            raise oserror(errno.EBADF, f"fd {pidfd} is not a pidfd")
        if flags:
            raise oserror(errno.EINVAL, "pidfd_getfd flags")
        target = pf.target
        if not target.alive:
            raise oserror(errno.ESRCH, f"pid {target.pid} has exited")
        if not target.ptraceable:
            # ptrace_may_access(PTRACE_MODE_ATTACH_REALCREDS) failed
            raise oserror(errno.EPERM, f"pid {target.pid} may not be traced")
        return self.install(target.file_of(targetfd))

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        self._check(("pidfd_send_signal",), None)
        pf = self.file_of(pidfd)
        if not isinstance(pf, PidFile):
            raise oserror(errno.EBADF, f"fd {pidfd} is not a pidfd")
        target = pf.target
        if not target.alive:
            raise oserror(errno.ESRCH, f"pid {target.pid} has exited")
        target.signals.append(sig)
        target.sched.deliver(sig, target.exit, f"exit-{target.pid}")

    def kcmp_file(self, pid1: int, pid2: int, fd1: int, fd2: int) -> int:
        self._check(("kcmp",), None)
        # kcmp(2) looks both tasks up first, then checks ptrace-read access to
        # each (always granted for the caller's own process), then the fds.
        procs = [self.machine.process(pid) for pid in (pid1, pid2)]
        for p in procs:
            if not p.alive:
                raise oserror(errno.ESRCH, f"pid {p.pid} has exited")
        for p in procs:
            if p is not self and not p.ptraceable:
                raise oserror(errno.EPERM, f"pid {p.pid} may not be traced")
        if not (self.is_sim_fd(fd1) or self.is_sim_fd(fd2)):
            # real fds (eventfds) of every simulated process live in the host's one table
            return _HOST.kcmp_file(os.getpid(), os.getpid(), fd1, fd2)
        keys = [p._file_key(fd) for p, fd in zip(procs, (fd1, fd2), strict=True)]
        # Like kcmp_ptr: an order that is stable while both files stay open.
        return int(keys[0] < keys[1]) | (int(keys[0] > keys[1]) << 1)

    def _file_key(self, fd: int) -> tuple[int, int]:
        """A sortable identity of the file behind ``fd`` (EBADF when not open)."""
        if self.is_sim_fd(fd):
            return (1, id(self.file_of(fd)))
        # a real fd is never the same file as a simulated one
        try:
            os.fstat(fd)
        except OSError:
            raise oserror(errno.EBADF, f"fd {fd}") from None
        return (0, fd)

    def exit(self) -> None:
        """Release every remaining file one after another on this thread (task_work), once
        no thread of the process waits uninterruptibly; a second exit waits for the first."""
        if not self.sched.begin_exit():
            self._exited.wait()
            return
        with self._lock:
            self.exiting = True
            fds = sorted(self._fds.items())
            self._fds.clear()
            maps = list(self._maps)
            self._maps.clear()
        # exit_mm drops the mappings, then exit_files puts each fd in order
        for addr, length, f in maps:
            f.unmap(addr, length)
            _put(self, f)
        for _, f in fds:
            _put(self, f)
        self.alive = False
        self._exited.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._exited.wait(timeout)

    # --- sysfs, devfs and procfs ------------------------------------------------------------------

    def read_text(self, path: str) -> str:
        self.machine.faults.check(("read_text",), self._dev_of_path(path))
        return vfs.read_text(self, path)

    def write_text(self, path: str, data: str) -> None:
        self.machine.faults.check(("write_text",), self._dev_of_path(path))
        with running(self.sched):  # a sysfs reset runs in this task
            vfs.write_text(self, path, data)

    def listdir(self, path: str) -> list[str]:
        self.machine.faults.check(("listdir",), self._dev_of_path(path))
        return vfs.listdir(self, path)

    def readlink(self, path: str) -> str:
        self.machine.faults.check(("readlink",), self._dev_of_path(path))
        return vfs.readlink(self, path)

    def exists(self, path: str) -> bool:
        return vfs.exists(self, path)

    def access(self, path: str, mode: int) -> bool:
        return vfs.access(self, path, mode)


def _addr(f: File) -> str | None:
    d = f.device()
    return d.addr if d is not None else None
