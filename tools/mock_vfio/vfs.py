"""Path lookup over the simulated sysfs, devfs and procfs (what fs/namei.c does: components,
``..`` and symlinks), and the system calls on a path: read, write, list, readlink, open."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from mock_vfio import devfs, procfs, sysfs
from mock_vfio.file import File
from mock_vfio.kernfs import Attr, DevNode, Dir, Link, Node
from mock_vfio.trace import oserror

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.process import SimProcess


def _lookup(proc: SimProcess, parts: list[str]) -> Node | None:
    m = proc.machine
    n = len(parts)
    if n == 0:
        return Dir(["dev", "proc", "sys"])
    top = parts[0]
    if top == "sys":
        return sysfs.lookup(m, parts[1:])
    if top == "dev":
        return devfs.lookup(m, parts[1:])
    if top == "proc":
        return procfs.lookup(proc, parts[1:])
    return None


def _split(path: str) -> list[str]:
    out: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if out:
                out.pop()
            continue
        out.append(comp)
    return out


def resolve(proc: SimProcess, path: str, follow_last: bool = True) -> Node:
    if not path.startswith("/"):
        raise oserror(errno.ENOENT, path)
    parts = _split(path)
    for _ in range(40):
        # The lookups serve no path through a symlink, so a whole path they answer
        # needs no walk: most paths asked for are canonical, and the walk below
        # looks up every prefix from the root.
        node = _lookup(proc, parts)
        if node is None:
            parts = _through_link(proc, parts, path)
            continue
        if isinstance(node, Link) and follow_last:
            parts = _follow(parts, len(parts), node)
            continue
        return node
    raise oserror(errno.ELOOP, path)


def _follow(parts: list[str], i: int, link: Link) -> list[str]:
    """``parts`` with its first ``i`` components replaced by where ``link`` (the i-th) points."""
    base = [] if link.target.startswith("/") else parts[: i - 1]
    return _split("/" + "/".join(base) + "/" + link.target) + parts[i:]


def _through_link(proc: SimProcess, parts: list[str], path: str) -> list[str]:
    """The path with its first symlink followed; ENOENT/ENOTDIR when there is none."""
    # The lookups serve no path through a symlink, so the longest prefix they answer is the
    # first symlink when there is one; most paths asked for have it near their end
    # (/sys/bus/pci/devices/ADDR/ATTR), so look from there, not from the root.
    for i in range(len(parts) - 1, 0, -1):
        node = _lookup(proc, parts[:i])
        if isinstance(node, Link):
            return _follow(parts, i, node)
        if node is not None:
            break
    # No symlink: which component is missing or not a directory.
    for i in range(1, len(parts)):
        node = _lookup(proc, parts[:i])
        if node is None:
            break
        if isinstance(node, Link):
            return _follow(parts, i, node)
        if not isinstance(node, Dir):
            raise oserror(errno.ENOTDIR, path)
    raise oserror(errno.ENOENT, path)


def read_text(proc: SimProcess, path: str) -> str:
    node = resolve(proc, path)
    if isinstance(node, Dir):
        raise oserror(errno.EISDIR, path)
    if isinstance(node, DevNode):
        raise oserror(errno.EINVAL, f"{path} is a device node")
    if not isinstance(node, Attr) or node.read is None:
        raise oserror(errno.EACCES, path)
    text = node.read()
    if node.binary:
        # what LinuxKernel.read_text (ascii, errors=replace) makes of binary bytes
        return text.encode("latin-1").decode("ascii", errors="replace")
    return text


def write_text(proc: SimProcess, path: str, data: str) -> None:
    node = resolve(proc, path)
    if isinstance(node, Dir):
        raise oserror(errno.EISDIR, path)
    if not isinstance(node, Attr) or node.write is None:
        raise oserror(errno.EACCES, path)
    node.write(data)


def listdir(proc: SimProcess, path: str) -> list[str]:
    node = resolve(proc, path)
    if not isinstance(node, Dir):
        raise oserror(errno.ENOTDIR, path)
    return list(node.entries)


def readlink(proc: SimProcess, path: str) -> str:
    node = resolve(proc, path, follow_last=False)
    if not isinstance(node, Link):
        raise oserror(errno.EINVAL, f"{path} is not a symlink")
    return node.target


def exists(proc: SimProcess, path: str) -> bool:
    try:
        resolve(proc, path)
    except OSError:
        return False
    return True


def access(proc: SimProcess, path: str, mode: int) -> bool:
    try:
        node = resolve(proc, path)
    except OSError:
        return False
    if isinstance(node, Attr):
        if mode & os.R_OK and node.read is None:
            return False
        if mode & os.W_OK and node.write is None:
            return False
        if mode & os.X_OK:
            return False
    return True


class _TextFile(File):
    kind = "sysfs"

    def __init__(self, machine: Machine, path: str, attr: Attr) -> None:
        super().__init__(machine)
        self.path = path
        self.attr = attr

    def link(self) -> str:
        return self.path

    def pread(self, proc: SimProcess, size: int, offset: int) -> bytes:
        if self.attr.read is None:
            raise oserror(errno.EACCES, self.path)
        return self.attr.read().encode("latin-1")[offset : offset + size]

    def pwrite(self, proc: SimProcess, data: bytes, offset: int) -> int:
        if self.attr.write is None:
            raise oserror(errno.EACCES, self.path)
        self.attr.write(data.decode("latin-1"))
        return len(data)


def open_node(proc: SimProcess, path: str, flags: int) -> File:
    node = resolve(proc, path)
    if isinstance(node, DevNode):
        return node.opener(proc)
    if isinstance(node, Dir):
        raise oserror(errno.EISDIR, path)
    if isinstance(node, Attr):
        if path.endswith("/config"):
            parts = _split(path)
            for comp in reversed(parts):
                if comp in proc.machine.devices:
                    return proc.open_config(proc.machine.devices[comp], path)
        return _TextFile(proc.machine, path, node)
    raise oserror(errno.ENOENT, path)
