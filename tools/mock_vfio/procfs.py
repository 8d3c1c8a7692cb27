"""``/proc`` as a simulated process sees it: ``/proc/<pid>/fd`` and ``fdinfo`` read like the
kernel's (fs/proc/fd.c), ``comm``, ``stat`` (state and flags, fs/proc/array.c), ``status``
and ``/proc/sys/kernel/osrelease``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mock_vfio.kernfs import Attr, Dir, Link, Node, const

if TYPE_CHECKING:
    from mock_vfio.process import SimProcess


def lookup(proc: SimProcess, p: list[str]) -> Node | None:
    m = proc.machine
    n = len(p)
    if n == 0:
        return Dir(lambda: ["self", "sys", *(str(x.pid) for x in m.processes)])
    if p[0] == "sys":
        # uname -r of the modelled kernel, as distributions number theirs
        tree = {("sys",): ["kernel"], ("sys", "kernel"): ["osrelease"]}
        if tuple(p) in tree:
            return Dir(tree[tuple(p)])
        if p == ["sys", "kernel", "osrelease"]:
            major, minor = m.kernel_version
            return Attr(const(f"{major}.{minor}.0-mock\n"))
        return None
    if p[0] in ("mounts", "swaps", "net"):
        from mock_vfio.hostfs import lookup_proc

        return lookup_proc(m, p)
    if p[0] == "self":
        return Link(str(proc.pid)) if n == 1 else None
    if not p[0].isdigit():
        return None
    try:
        target = m.process(int(p[0]))
    except OSError:
        return None
    if not target.alive:
        return None
    if n == 1:
        return Dir(["comm", "fd", "fdinfo", "stat", "status"])
    if n == 2 and p[1] == "comm":
        return Attr(lambda: target.name + "\n")
    if n == 2 and p[1] == "stat":
        return Attr(lambda: _stat(target))
    if n == 2 and p[1] == "status":
        return Attr(lambda: f"Name:\t{target.name}\nPid:\t{target.pid}\n")
    table = target.fd_table()
    if p[1] in ("fd", "fdinfo"):
        if n == 2:
            return Dir(lambda: [str(fd) for fd in sorted(table)])
        if n == 3 and p[2].isdigit() and int(p[2]) in table:
            f = table[int(p[2])]
            if p[1] == "fd":
                return Link(f.link())
            return Attr(lambda: f"pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1\n{f.fdinfo()}")
    return None


PF_EXITING = 0x4  # include/linux/sched.h: set before exit_files


def _stat(task: SimProcess) -> str:
    """/proc/PID/stat (fs/proc/array.c): pid, (comm), state, ppid, pgrp, session, tty_nr,
    tpgid, flags, then zeros for the 43 fields the simulator does not keep."""
    flags = PF_EXITING if task.exiting else 0
    head = f"{task.pid} ({task.name}) {task.sched.state} 1 {task.pid} {task.pid} 0 -1 {flags}"
    return head + " 0" * 43 + "\n"
