"""Find a process's VFIO device fds and take references to them with pidfd_getfd.

A VMM's exit releases its files one after another on the exiting task, so N
devices cost N resets in series.  Holding a duplicate of each device fd while
the process exits turns its exit into mere reference drops; the releases
(and their resets) then run when we close the duplicates, domains in parallel.

How an fd is identified, best first:

1. ``vfio-device-syspath:`` in /proc/PID/fdinfo/FD (Linux 6.8+), for both
   ``anon_inode:[vfio-device]`` (group API) and cdev fds;
2. a cdev fd's path ``/dev/vfio/devices/vfioN``, through
   ``/sys/class/vfio-dev/vfioN/device``;
3. for an ``anon_inode:[vfio-device]`` fd on an older kernel: the config
   space identity read through the fd (vendor, device, subsystem ids, and the
   BARs) matched against the vfio-pci devices in sysfs.  Limits: the BARs
   read through VFIO are virtualised, so a guest that reprogrammed them no
   longer matches the host's addresses; identical functions are then told
   apart only by elimination, and an fd still ambiguous is left alone
   (reported skipped; the process's own exit releases it).
"""

from __future__ import annotations

import contextlib
import errno
import signal
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from vfiopy._uapi import PciRegion, Struct, lib
from vfiopy.errors import ProcessError
from vfiopy.kernel import Kernel

ANON_DEVICE = "anon_inode:[vfio-device]"
CDEV_PREFIX = "/dev/vfio/devices/"
SYSPATH_KEY = "vfio-device-syspath:"
VFIO_PCI_DRIVER = "/sys/bus/pci/drivers/vfio-pci"

PTRACE_ADVICE = (
    "pidfd_getfd needs ptrace-attach permission on the process: run as its user with "
    "kernel.yama.ptrace_scope <= 1 (and not as a child-only tracer), or as root "
    "(CAP_SYS_PTRACE); nothing was signalled"
)


@dataclass(slots=True)
class ProcessFd:
    """One VFIO device fd of the target process, and how it was identified."""

    fd: int
    link: str
    address: str | None = None
    how: str = ""
    dup: int | None = None


@dataclass(slots=True)
class HeldDevice:
    """Our duplicates of every fd the process holds for one device."""

    address: str
    fds: list[int] = field(default_factory=list)


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


def device_fds(kernel: Kernel, pid: int) -> list[ProcessFd]:
    """The VFIO device fds in /proc/PID/fd, identified where the kernel says which device."""
    base = f"/proc/{pid}"
    try:
        names = kernel.listdir(f"{base}/fd")
    except OSError as exc:
        # /proc/PID/fd is readable under the same ptrace-read check as pidfd_getfd.
        advice = PTRACE_ADVICE if exc.errno in (errno.EACCES, errno.EPERM) else None
        raise ProcessError.from_oserror(
            exc, f"pid {pid}", f"list {base}/fd", advice=advice
        ) from exc
    out: list[ProcessFd] = []
    for name in sorted(names, key=lambda n: int(n) if n.isdigit() else -1):
        if not name.isdigit():
            continue
        try:
            link = kernel.readlink(f"{base}/fd/{name}")
        except OSError:
            continue  # closed since the listing
        if link != ANON_DEVICE and not link.startswith(CDEV_PREFIX):
            continue
        pfd = ProcessFd(int(name), link)
        try:
            info = kernel.read_text(f"{base}/fdinfo/{name}")
        except OSError:
            info = ""
        for line in info.splitlines():
            if line.startswith(SYSPATH_KEY):
                pfd.address = line[len(SYSPATH_KEY) :].strip().rstrip("/").rsplit("/", 1)[-1]
                pfd.how = "fdinfo"
                break
        out.append(pfd)
    cdevs = [f for f in out if f.address is None and f.link.startswith(CDEV_PREFIX)]
    if cdevs:
        nodes = cdev_nodes(kernel)
        for f in cdevs:
            f.address = nodes.get(f.link)
            f.how = "cdev" if f.address else ""
    return out


def cdev_nodes(kernel: Kernel) -> dict[str, str]:
    """/dev/vfio/devices/vfioN -> PCI address, from each vfio-pci device's vfio-dev dir."""
    from vfiopy.sysfs import Sysfs

    sysfs = Sysfs(kernel)
    out: dict[str, str] = {}
    try:
        names = kernel.listdir(VFIO_PCI_DRIVER)
    except OSError:
        return out
    for name in names:
        if name.count(":") != 2:
            continue  # bind, unbind, new_id, module...
        try:
            node = sysfs.cdev(name)
        except (OSError, ValueError):
            continue  # unbound or removed since the listing
        if node:
            out[node] = name
    return out


def duplicate(kernel: Kernel, pidfd: int, pid: int, fds: Iterable[ProcessFd]) -> None:
    """Take a reference to each fd; on any failure drop those taken and raise.

    Dropping a duplicate while the process still holds the file releases
    nothing, so a failure here leaves the devices exactly as they were.
    """
    taken: list[ProcessFd] = []
    try:
        for pfd in fds:
            try:
                pfd.dup = kernel.pidfd_getfd(pidfd, pfd.fd)
            except OSError as exc:
                advice = PTRACE_ADVICE if exc.errno == errno.EPERM else None
                raise ProcessError.from_oserror(
                    exc, pfd.address or f"pid {pid} fd {pfd.fd}", "pidfd_getfd", advice=advice
                ) from exc
            taken.append(pfd)
    except BaseException:
        for pfd in taken:
            drop(kernel, pfd)
        raise


def drop(kernel: Kernel, pfd: ProcessFd) -> None:
    if pfd.dup is not None:
        fd, pfd.dup = pfd.dup, None
        # The reference is gone either way: close(2) frees the fd even on error.
        with contextlib.suppress(OSError):
            kernel.close(fd)


# --- config-space identity (fallback 3) ------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    ids: tuple[int, int, int, int]  # vendor, device, subsystem vendor, subsystem device
    bars: tuple[int, ...]  # base addresses, 0 where unassigned


def identity_from_fd(kernel: Kernel, fd: int) -> Identity:
    """Read the identity through a VFIO device fd's config region."""
    info = Struct("struct vfio_region_info")
    info.p.index = int(PciRegion.CONFIG)
    kernel.ioctl(fd, lib.VFIO_DEVICE_GET_REGION_INFO, info.p)
    cfg = kernel.pread(fd, 0x30, int(info.p.offset))
    return _identity(cfg)


def _identity(cfg: bytes) -> Identity:
    vendor, device = struct.unpack_from("<HH", cfg, 0)
    svendor, sdevice = struct.unpack_from("<HH", cfg, 0x2C)
    raw = struct.unpack_from("<6I", cfg, 0x10)
    bars: list[int] = []
    i = 0
    while i < 6:
        v = raw[i]
        if v & 1:  # I/O space
            bars.append(v & ~0x3)
        elif (v >> 1) & 3 == 2 and i < 5:  # 64-bit memory BAR spans two slots
            bars += [(raw[i + 1] << 32) | (v & ~0xF), 0]
            i += 1
        else:
            bars.append(v & ~0xF)
        i += 1
    return Identity((vendor, device, svendor, sdevice), tuple(bars[:6]))


def identity_from_sysfs(kernel: Kernel, address: str) -> Identity:
    base = f"/sys/bus/pci/devices/{address}"
    ids = tuple(
        int(kernel.read_text(f"{base}/{n}").strip(), 16)
        for n in ("vendor", "device", "subsystem_vendor", "subsystem_device")
    )
    bars: list[int] = []
    try:
        lines = kernel.read_text(f"{base}/resource").splitlines()
    except OSError:
        lines = []
    for line in lines[:6]:
        bars.append(int(line.split()[0], 16))
    bars += [0] * (6 - len(bars))
    return Identity((ids[0], ids[1], ids[2], ids[3]), tuple(bars))


def identify_by_config(
    kernel: Kernel, unknown: list[ProcessFd], known: set[str]
) -> list[ProcessFd]:
    """Fill in ``address`` for ``unknown`` (duplicated) fds; returns those still unknown."""
    try:
        candidates = [a for a in kernel.listdir(VFIO_PCI_DRIVER) if a.count(":") == 2]
    except OSError:
        return unknown
    ident: dict[str, Identity] = {}
    for a in candidates:
        if a in known:
            continue
        try:
            ident[a] = identity_from_sysfs(kernel, a)
        except (OSError, ValueError):
            continue  # vanished or odd entry; it cannot be matched
    pending: list[tuple[ProcessFd, list[str]]] = []
    for pfd in unknown:
        if pfd.dup is None:
            pending.append((pfd, []))
            continue
        try:
            mine = identity_from_fd(kernel, pfd.dup)
        except (OSError, struct.error):
            pending.append((pfd, []))
            continue
        same = [a for a, i in ident.items() if i.ids == mine.ids]
        exact = [a for a in same if ident[a].bars == mine.bars and any(mine.bars)]
        pending.append((pfd, exact if len(exact) == 1 else same))
    # Elimination: an fd with one candidate claims it; repeat until stable.
    taken: set[str] = set()
    changed = True
    while changed:
        changed = False
        for pfd, cands in pending:
            if pfd.address is not None:
                continue
            left = [a for a in cands if a not in taken]
            if len(left) == 1:
                pfd.address, pfd.how = left[0], "config"
                taken.add(left[0])
                changed = True
    return [p for p, _ in pending if p.address is None]


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
    if t.isdigit() and 0 < int(t) < 65:
        return int(t)
    if t in SIGNALS:
        return int(SIGNALS[t])
    raise ValueError(f"unknown signal {text!r} (use TERM, INT, HUP, QUIT, KILL or a number)")
