"""Take references to a process's VFIO files with pidfd_getfd and tell which device each is.

A VMM's exit releases its files one after another on the exiting task, so N
devices cost N resets in series.  Holding a reference to each of its VFIO
files while it exits turns its exit into mere reference drops; the releases
(and their resets) then run when we close our references, domains in
parallel.  Every VFIO file is taken, identified or not: device files
(``anon_inode:[vfio-device]`` from a group, ``/dev/vfio/devices/vfioN``
cdevs), groups (``/dev/vfio/N``), the container (``/dev/vfio/vfio``) and
iommufd (``/dev/iommu``), so nothing is left to the VMM's serial exit.
Several fds for one open file (dup'd, or kept by an mmap) are one file:
``kcmp(KCMP_FILE)`` tells.

A device file is identified through our own duplicate (the target's fd
number may be reused in between), by what the running kernel offers:

1. ``vfio-device-syspath:`` in fdinfo (Linux 6.18+);
2. a cdev's path, through ``/sys/class/vfio-dev/vfioN/device``;
3. VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: the devices a bus or slot reset of it
   would hit (its reset set), a single device when it is alone on its bus;
4. the IOMMU groups the process holds open: a group-opened device is in one;
5. the config-space identity QEMU never rewrites (vendor, device, subsystem,
   class, revision, the PCIe device serial number where present).  Not the
   BARs: QEMU writes 0 to every BAR through the device fd at start-up;
6. elimination: a device identified for one file is no candidate for another.

Two identical functions of one reset set stay ambiguous; they are released by
that set's worker either way and reported as the set.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from vfiopy._uapi import PciRegion, Struct, lib
from vfiopy.errors import ProcessError, VfioError
from vfiopy.kernel import O_RDONLY, Kernel
from vfiopy.sysfs import Sysfs

ANON_DEVICE = "anon_inode:[vfio-device]"
CDEV_PREFIX = "/dev/vfio/devices/"
CONTAINER = "/dev/vfio/vfio"
GROUP_PREFIX = "/dev/vfio/"
IOMMUFD = "/dev/iommu"
SYSPATH_KEY = "vfio-device-syspath:"
VFIO_PCI_DRIVER = "/sys/bus/pci/drivers/vfio-pci"

PTRACE_ADVICE = (
    "pidfd_getfd needs ptrace-attach permission on the process: run as its user with "
    "kernel.yama.ptrace_scope <= 1 (and not as a child-only tracer), or as root "
    "(CAP_SYS_PTRACE); nothing was signalled"
)


def file_kind(link: str) -> str | None:
    """``device``, ``group``, ``container`` or ``iommufd`` for a VFIO fd's link, else None."""
    if link == ANON_DEVICE or link.startswith(CDEV_PREFIX):
        return "device"
    if link == CONTAINER:
        return "container"
    if link == IOMMUFD:
        return "iommufd"
    if link.startswith(GROUP_PREFIX) and link[len(GROUP_PREFIX) :].isdigit():
        return "group"
    return None


@dataclass(slots=True)
class VfioFile:
    """One open VFIO file of the target process, our reference to it, and what it is.

    ``fds`` are the target's fd numbers for it (one file may have several);
    ``address`` is set once a device file is identified, ``candidates`` lists
    the devices it may be while it is not; ``group`` is a group file's number.
    """

    kind: str
    link: str
    fds: list[int]
    dup: int | None = None
    address: str | None = None
    how: str = ""
    candidates: list[str] = field(default_factory=list)
    group: int | None = None

    @property
    def label(self) -> str:
        """How reports name it: its address, else the target's fds."""
        if self.address is not None:
            return self.address
        return "fd " + ",".join(map(str, self.fds))


def open_process(kernel: Kernel, pid: int) -> int:
    """A pidfd for ``pid``; ESRCH names the pid."""
    try:
        return kernel.pidfd_open(pid)
    except OSError as exc:
        advice = (
            "check the pid (the process may have exited already)"
            if (exc.errno == errno.ESRCH)
            else None
        )
        raise ProcessError.from_oserror(exc, f"pid {pid}", "pidfd_open", advice=advice) from exc


def vfio_fds(kernel: Kernel, pid: int) -> list[tuple[int, str]]:
    """``(fd, link)`` of every VFIO file in /proc/PID/fd, by fd number."""
    base = f"/proc/{pid}"
    try:
        names = kernel.listdir(f"{base}/fd")
    except OSError as exc:
        # /proc/PID/fd is readable under the same ptrace-read check as pidfd_getfd.
        advice = PTRACE_ADVICE if exc.errno in (errno.EACCES, errno.EPERM) else None
        raise ProcessError.from_oserror(
            exc, f"pid {pid}", f"list {base}/fd", advice=advice
        ) from exc
    out: list[tuple[int, str]] = []
    for name in sorted((n for n in names if n.isdigit()), key=int):
        try:
            link = kernel.readlink(f"{base}/fd/{name}")
        except OSError:
            continue  # closed since the listing
        if file_kind(link) is not None:
            out.append((int(name), link))
    return out


def same_file(kernel: Kernel, pid1: int, fd1: int, pid2: int, fd2: int) -> bool | None:
    """Whether two fds are one open file (kcmp); None when kcmp cannot tell."""
    try:
        return kernel.kcmp_file(pid1, pid2, fd1, fd2) == 0
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return False  # one of them is closed: not the same file any more
        return None  # ENOSYS (no CONFIG_KCMP), EPERM: compare nothing


class ProcessGone(Exception):
    """The target exited while we were taking references; ``taken``: the new ones, kept."""

    def __init__(self, taken: list[VfioFile]) -> None:
        super().__init__("the process exited")
        self.taken = taken


def take(kernel: Kernel, pidfd: int, pid: int, held: list[VfioFile]) -> list[VfioFile]:
    """Take a reference to each VFIO file of ``pid`` not already in ``held``; returns the new.

    A file with several fds is taken once (kcmp); each reference is checked
    through our own fd (the target may have reused the number in between).
    On a failure other than the process's exit the references taken here are
    dropped and the error raised; on its exit, :class:`ProcessGone` says which
    were taken (they are in ``held`` already: the caller keeps them).
    """
    me = kernel.getpid()
    new: list[VfioFile] = []
    try:
        for fd, link in vfio_fds(kernel, pid):
            if _known(kernel, pid, fd, held):
                continue
            try:
                dup = kernel.pidfd_getfd(pidfd, fd)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise ProcessGone(new) from exc
                if exc.errno == errno.EBADF:
                    continue  # closed since the listing
                advice = PTRACE_ADVICE if exc.errno == errno.EPERM else None
                raise ProcessError.from_oserror(
                    exc, f"pid {pid} fd {fd}", "pidfd_getfd", advice=advice
                ) from exc
            try:
                mine = kernel.readlink(f"/proc/{me}/fd/{dup}")
            except OSError:
                mine = link
            kind = file_kind(mine)
            twin = (
                None
                if kind is None
                else next(
                    (
                        f
                        for f in held
                        if f.kind == kind
                        and f.dup is not None
                        and same_file(kernel, me, f.dup, me, dup)
                    ),
                    None,
                )
            )
            if kind is None or twin is not None:
                # Not VFIO any more (the number was reused), or one more fd for a file held.
                with contextlib.suppress(OSError):
                    kernel.close(dup)
                if twin is not None and fd not in twin.fds:
                    twin.fds.append(fd)
                continue
            f = VfioFile(kind, mine, [fd], dup)
            if kind == "group":
                f.group = int(mine[len(GROUP_PREFIX) :])
            held.append(f)
            new.append(f)
    except ProcessGone:
        raise
    except BaseException:
        for f in new:
            held.remove(f)
            drop(kernel, f)
        raise
    return new


def _known(kernel: Kernel, pid: int, fd: int, held: list[VfioFile]) -> bool:
    """Whether target ``fd`` is already one of ``held`` (checked, not assumed, by kcmp)."""
    me = kernel.getpid()
    for f in held:
        if fd in f.fds and f.dup is not None:
            same = same_file(kernel, me, f.dup, pid, fd)
            if same or same is None:
                return True
            f.fds.remove(fd)  # the number now names another file
    return False


def still_held(kernel: Kernel, pid: int, f: VfioFile, current: list[tuple[int, str]]) -> bool:
    """Whether the process still holds ``f`` under any of its ``current`` VFIO fds."""
    me = kernel.getpid()
    if f.dup is None:
        return False
    for fd, link in current:
        if file_kind(link) != f.kind:
            continue
        same = same_file(kernel, me, f.dup, pid, fd)
        if same is None:
            # No kcmp: trust the fd number and the link.
            same = fd in f.fds and link == f.link
        if same:
            if fd not in f.fds:
                f.fds.append(fd)
            return True
    return False


def drop(kernel: Kernel, f: VfioFile) -> None:
    """Close our reference (idempotent); the release runs here if it was the last one."""
    if f.dup is not None:
        fd, f.dup = f.dup, None
        # The reference is gone either way: close(2) frees the fd even on error.
        with contextlib.suppress(OSError):
            kernel.close(fd)


# --- identification ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """What QEMU cannot rewrite: vendor, device, subsystem ids, class, revision, serial."""

    ids: tuple[int, int, int, int]
    class_rev: int  # class code << 8 | revision, as at config offset 8
    serial: int | None = None


def identify(kernel: Kernel, files: list[VfioFile], taken: Iterable[str] = ()) -> None:
    """Fill in ``address`` (or ``candidates``) of each unidentified device file.

    ``taken``: addresses identified earlier (a guardian's files), no candidates now.
    """
    devices = [f for f in files if f.kind == "device" and f.address is None and f.dup is not None]
    if not devices:
        return
    sysfs = Sysfs(kernel)
    me = kernel.getpid()
    cdevs: dict[str, str] | None = None
    for f in devices:
        f.address, f.how = _from_fdinfo(kernel, me, f), "fdinfo"
        if f.address is None and f.link.startswith(CDEV_PREFIX):
            cdevs = cdev_nodes(kernel) if cdevs is None else cdevs
            f.address, f.how = cdevs.get(f.link), "cdev"
        if f.address is None:
            f.how = ""
    pending = [f for f in devices if f.address is None]
    if not pending:
        return
    vfio = _vfio_devices(kernel)
    groups = {f.group for f in files if f.kind == "group" and f.group is not None}
    in_groups = {a for a in vfio if _group_of(sysfs, a) in groups} if groups else set(vfio)
    ident: dict[str, Identity | None] = {}
    for f in pending:
        how: list[str] = []
        cands = sorted(in_groups)
        if groups:
            how.append("groups")
        rs = _reset_set(kernel, f)
        if rs is not None:
            cands = [a for a in cands if a in rs]
            how.append("hot-reset-info")
        if len(cands) > 1:
            mine = _identity_from_fd(kernel, f.dup)
            if mine is not None:
                for a in cands:
                    if a not in ident:
                        ident[a] = _identity_from_sysfs(kernel, sysfs, a)
                narrowed = [a for a in cands if _matches(mine, ident[a])]
                if narrowed != cands:
                    how.append("config")
                cands = narrowed
        f.candidates, f.how = cands, "+".join(how)
    _eliminate(pending, set(taken) | {f.address for f in files if f.address is not None})


def _eliminate(pending: list[VfioFile], taken: set[str]) -> None:
    # A device identified for one file is not another file's: repeat until stable.
    changed = True
    while changed:
        changed = False
        for f in pending:
            if f.address is not None:
                continue
            left = [a for a in f.candidates if a not in taken]
            if len(left) < len(f.candidates):
                f.candidates = left
                f.how += "+elimination"
            if len(left) == 1:
                f.address = left[0]
                f.candidates = []
                taken.add(left[0])
                changed = True


def _from_fdinfo(kernel: Kernel, me: int, f: VfioFile) -> str | None:
    return fdinfo_address(kernel, me, f.dup) if f.dup is not None else None


def fdinfo_address(kernel: Kernel, pid: int, fd: int) -> str | None:
    """The device ``vfio-device-syspath:`` in /proc/PID/fdinfo/FD names (Linux 6.18+), or None."""
    try:
        info = kernel.read_text(f"/proc/{pid}/fdinfo/{fd}")
    except OSError:
        return None
    for line in info.splitlines():
        if line.startswith(SYSPATH_KEY):
            return line[len(SYSPATH_KEY) :].strip().rstrip("/").rsplit("/", 1)[-1] or None
    return None


def _vfio_devices(kernel: Kernel) -> list[str]:
    try:
        return sorted(a for a in kernel.listdir(VFIO_PCI_DRIVER) if a.count(":") == 2)
    except OSError:
        return []


def _group_of(sysfs: Sysfs, address: str) -> int | None:
    try:
        return sysfs.iommu_group(address)
    except (VfioError, ValueError):
        return None


def _reset_set(kernel: Kernel, f: VfioFile) -> set[str] | None:
    """The addresses a bus or slot reset of the device would hit; None when it has none."""
    from vfiopy.hotreset import hot_reset_info

    assert f.dup is not None
    try:
        return {str(d.address) for d in hot_reset_info(kernel, f.dup, f.label)}
    except VfioError:
        return None  # ENODEV: no slot or bus reset (root bus, VF); other errors: no help


def _identity_from_fd(kernel: Kernel, fd: int | None) -> Identity | None:
    if fd is None:
        return None
    try:
        info = Struct("struct vfio_region_info")
        info.p.index = int(PciRegion.CONFIG)
        kernel.ioctl(fd, lib.VFIO_DEVICE_GET_REGION_INFO, info.p)
        base = int(info.p.offset)
        cfg = kernel.pread(fd, 0x30, base)
        ext = kernel.pread(fd, 0x100, base + 0x100) if int(info.p.size) >= 0x200 else b""
        return _identity(cfg, ext)
    except (OSError, struct.error):
        return None


def _identity(cfg: bytes, ext: bytes) -> Identity:
    vendor, device = struct.unpack_from("<HH", cfg, 0)
    (class_rev,) = struct.unpack_from("<I", cfg, 8)
    svendor, sdevice = struct.unpack_from("<HH", cfg, 0x2C)
    return Identity((vendor, device, svendor, sdevice), class_rev, _serial(ext, 0x100))


def _serial(ext: bytes, base: int) -> int | None:
    """The PCIe Device Serial Number extended capability (id 3), from ``ext`` at ``base``."""
    off, seen = base, 0
    while base <= off < base + len(ext) - 3 and seen < 64:
        (hdr,) = struct.unpack_from("<I", ext, off - base)
        if hdr in (0, 0xFFFFFFFF):
            return None
        if hdr & 0xFFFF == 3 and off - base + 12 <= len(ext):
            lo, hi = struct.unpack_from("<II", ext, off - base + 4)
            return int(hi) << 32 | int(lo)
        off, seen = hdr >> 20, seen + 1
    return None


def _identity_from_sysfs(kernel: Kernel, sysfs: Sysfs, address: str) -> Identity | None:
    try:
        ids = tuple(
            int(sysfs.read(address, n), 16)
            for n in ("vendor", "device", "subsystem_vendor", "subsystem_device")
        )
        class_rev = int(sysfs.read(address, "class"), 16) << 8 | int(
            sysfs.read(address, "revision"), 16
        )
    except (VfioError, ValueError):
        return None  # vanished or odd: it cannot be matched
    return Identity(
        (ids[0], ids[1], ids[2], ids[3]), class_rev, _sysfs_serial(kernel, sysfs, address)
    )


def _sysfs_serial(kernel: Kernel, sysfs: Sysfs, address: str) -> int | None:
    # The config file shows the extended space to root only; else there is no serial to compare.
    try:
        fd = kernel.open(sysfs.path(address, "config"), O_RDONLY)
    except OSError:
        return None
    try:
        return _serial(kernel.pread(fd, 0x100, 0x100), 0x100)
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            kernel.close(fd)


def _matches(mine: Identity, theirs: Identity | None) -> bool:
    if theirs is None:
        return False
    if mine.ids != theirs.ids or mine.class_rev != theirs.class_rev:
        return False
    return mine.serial is None or theirs.serial is None or mine.serial == theirs.serial


def cdev_nodes(kernel: Kernel) -> dict[str, str]:
    """/dev/vfio/devices/vfioN -> PCI address, from each vfio-pci device's vfio-dev dir."""
    sysfs = Sysfs(kernel)
    out: dict[str, str] = {}
    for name in _vfio_devices(kernel):
        try:
            node = sysfs.cdev(name)
        except (OSError, ValueError):
            continue  # unbound or removed since the listing
        if node:
            out[node] = name
    return out


# --- other processes' device fds, without taking them (who holds what) -------------------


@dataclass(slots=True)
class ProcessFd:
    """One VFIO device fd of some process, identified where the kernel says which device."""

    fd: int
    link: str
    address: str | None = None


def device_fds(kernel: Kernel, pid: int) -> list[ProcessFd]:
    """The device fds of ``pid`` that fdinfo (6.18+) or a cdev path name; others unnamed."""
    out: list[ProcessFd] = []
    cdevs: dict[str, str] | None = None
    for fd, link in vfio_fds(kernel, pid):
        if file_kind(link) != "device":
            continue
        pfd = ProcessFd(fd, link, fdinfo_address(kernel, pid, fd))
        if pfd.address is None and link.startswith(CDEV_PREFIX):
            cdevs = cdev_nodes(kernel) if cdevs is None else cdevs
            pfd.address = cdevs.get(link)
        out.append(pfd)
    return out


SIGNALS = {
    "TERM": signal.SIGTERM,
    "KILL": signal.SIGKILL,
    "INT": signal.SIGINT,
    "HUP": signal.SIGHUP,
    "QUIT": signal.SIGQUIT,
}


def parse_signal(text: str) -> int:
    """``TERM``, ``SIGTERM`` or ``15``."""
    t = text.strip().upper().removeprefix("SIG")
    if t.isascii() and t.isdigit() and 0 < int(t) < 32:
        return int(t)
    if t in SIGNALS:
        return int(SIGNALS[t])
    raise ValueError(
        f"unknown signal {text!r}: use TERM, INT, HUP, QUIT, KILL or a number 1 to 31 "
        "(a standard signal; the real-time ones are no request to exit)"
    )
