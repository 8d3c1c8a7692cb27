"""Tear down a VMM's devices: take its VFIO files, make it exit, release them in parallel.

Two ways in.  :func:`release_process` signals the VMM and, once it has exited
(which now only drops references), closes our references domain by domain
in parallel.  :func:`guard` sends nothing: it follows a running VMM, lets go
of what the VMM lets go (a hot-unplugged device must reach the host
promptly), takes what it hot-plugs, and when the VMM exits for any reason
releases everything the same way.  Both close only the VMM's own files, so
they never cause a reset its own exit would not cause.
"""

from __future__ import annotations

import contextlib
import errno
import signal as _signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from vfiopy._log import get_logger
from vfiopy.errors import ProcessError
from vfiopy.kernel import POLLIN, Kernel
from vfiopy.kmodel import label as reset_label
from vfiopy.release._constants import DEFAULT_MAX_PARALLEL
from vfiopy.release._engine import DomainJob, ProgressFn, Step, run_domains
from vfiopy.release._plan import Plan, UsageError, make_plan
from vfiopy.release._process import (
    ProcessGone,
    VfioFile,
    drop,
    identify,
    open_process,
    still_held,
    take,
    vfio_fds,
)
from vfiopy.release._report import DeviceResult, DomainResult, FileResult, Report, Status

log = get_logger("vfiopy.release")

PF_EXITING = 0x4  # task flag (include/linux/sched.h): set before exit_files() closes the fds


@dataclass(slots=True)
class Takeover:
    """Our references to every VFIO file of one process, and the plan for releasing them."""

    kernel: Kernel
    pid: int
    pidfd: int
    files: list[VfioFile]
    plan: Plan = field(default_factory=lambda: Plan([]))
    exited_early: bool = False  # the process exited while its files were being taken

    @property
    def devices(self) -> list[VfioFile]:
        return [f for f in self.files if f.kind == "device"]

    @property
    def unidentified(self) -> list[VfioFile]:
        return [f for f in self.devices if f.address is None]

    def label(self, f: VfioFile) -> str:
        return f.address or f"pid {self.pid} fd {','.join(map(str, f.fds))}"

    def replan(self) -> None:
        """Plan the release of the files held now (blocking: reads sysfs)."""
        self.plan = plan_files(self.kernel, self.files)

    def also_reset(self) -> dict[str, list[str]]:
        """Domain -> idle vfio-pci functions the process does not hold that its reset hits."""
        return {d.id: d.also_reset for d in self.plan.domains if d.also_reset}

    def drop(self) -> None:
        """Give back our references (the process keeps its own); idempotent."""
        for f in self.files:
            drop(self.kernel, f)

    def close(self) -> None:
        self.drop()
        if self.pidfd >= 0:
            fd, self.pidfd = self.pidfd, -1
            with contextlib.suppress(OSError):
                self.kernel.close(fd)


def plan_files(kernel: Kernel, files: list[VfioFile]) -> Plan:
    """Reset domains of the devices held (identified, and every candidate of the rest).

    Not strict: the files close whatever the plan says.  A vfio-pci function of
    a domain that the process does not hold lands in ``Domain.foreign``, and in
    ``Domain.also_reset`` when the predicted resets hit it, as the process's own
    exit would.
    """
    addresses: list[str] = []
    for f in files:
        if f.kind == "device" and f.dup is not None:
            addresses += [f.address] if f.address else f.candidates
    addresses = list(dict.fromkeys(addresses))
    if not addresses:
        return Plan([])
    return make_plan(kernel, addresses, check_driver=False, strict=False)


def take_over(kernel: Kernel, pid: int) -> Takeover:
    """Take a reference to every VFIO file of ``pid``, identify and plan (blocking).

    Nothing is signalled or released here: on an error every reference taken
    is dropped again, which leaves the devices exactly as they were.  A
    process that exits meanwhile is no error: the files taken stay ours
    (``exited_early``).  Raises :class:`UsageError` when there is no such
    process and :class:`~vfiopy.errors.ProcessError` (EPERM) without
    ptrace-attach permission.
    """
    try:
        pidfd = open_process(kernel, pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise UsageError(
                errno.ESRCH,
                f"pid {pid}",
                "pidfd_open",
                detail="no such process",
                advice="check the pid (the process may have exited already)",
            ) from exc
        raise
    t = Takeover(kernel, pid, pidfd, [])
    try:
        try:
            take(kernel, pidfd, pid, t.files)
        except ProcessGone:
            t.exited_early = True
        except ProcessError:
            if not _exited(kernel, pidfd, 0):
                raise
            t.exited_early = True  # /proc/PID/fd vanished with the process
        identify(kernel, t.files)
        t.replan()
    except BaseException:
        t.close()
        raise
    if t.exited_early:
        log.warning(
            "release.exited_during_takeover",
            pid=pid,
            files=len(t.files),
            reason="its exit released only what was not taken yet",
        )
    return t


def _exited(kernel: Kernel, pidfd: int, timeout_s: float) -> bool:
    # A pidfd polls readable once the process has exited.
    return bool(kernel.poll([(pidfd, POLLIN)], max(0, int(timeout_s * 1000))))


async def wait_exit(kernel: Kernel, pidfd: int, timeout_s: float) -> bool:
    """Whether the process exited within ``timeout_s``; polls in short slices to stay cancellable."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if await anyio.to_thread.run_sync(_exited, kernel, pidfd, min(max(left, 0), 0.1)):
            return True
        if left <= 0:
            return False


def given_back(t: Takeover, why: str, status: Status = Status.SKIPPED) -> Report:
    """The report when our references went back to a live process: nothing was released."""
    t.drop()
    report = Report("release", pid=t.pid)
    for f in t.devices:
        report.devices.append(_result(t, f, "?", status, why))
    report.files = [FileResult(f.kind, f.link, list(f.fds), status, why) for f in _others(t)]
    return report


def _result(
    t: Takeover, f: VfioFile, domain: str, status: Status = Status.SKIPPED, error: str | None = None
) -> DeviceResult:
    return DeviceResult(
        t.label(f),
        domain,
        status,
        error,
        fds=list(f.fds),
        identified_by=f.how or None,
        candidates=list(f.candidates),
    )


def _others(t: Takeover) -> list[VfioFile]:
    # Groups before the container or iommufd they are attached to.
    order = {"group": 0, "container": 1, "iommufd": 1}
    return sorted((f for f in t.files if f.kind != "device"), key=lambda f: order[f.kind])


async def release_process(
    takeover: Takeover,
    *,
    sig: int = _signal.SIGTERM,
    grace: float = 10.0,
    kill_wait: float = 10.0,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Report:
    """Signal the process, wait for its exit, then release its files concurrently.

    ``sig`` first; SIGKILL if it is still alive after ``grace`` seconds.
    Its exit only drops references (we hold one to each VFIO file), so it is
    fast; then the releases, and the resets they trigger, run here, domains
    in parallel.  If the process does not exit, or the wait is cancelled
    before it does, our references are given back and the devices reported
    skipped: the process's own exit will release them.  A cancellation then
    returns the report marked ``interrupted``.
    """
    t = takeover
    kernel = t.kernel
    phase = on_phase or (lambda _p: None)
    try:
        try:
            if t.exited_early:
                exited = True
            else:
                phase("signal")
                log.info("release.signal", pid=t.pid, signal=_signal.Signals(sig).name)
                try:
                    kernel.pidfd_send_signal(t.pidfd, sig)
                except ProcessLookupError:
                    pass  # exited already: what we wanted
                except OSError as exc:
                    err = ProcessError.from_oserror(exc, f"pid {t.pid}", "pidfd_send_signal")
                    log.error("release.signal_failed", pid=t.pid, errno=exc.errno)
                    return given_back(t, f"{err}; nothing was signalled", Status.FAILED)
                phase("wait")
                exited = await wait_exit(kernel, t.pidfd, grace)
                if not exited and sig != _signal.SIGKILL:
                    log.warning(
                        "release.kill",
                        reason="still alive after --grace",
                        pid=t.pid,
                        elapsed_s=round(grace, 3),
                    )
                    with contextlib.suppress(ProcessLookupError):
                        kernel.pidfd_send_signal(t.pidfd, _signal.SIGKILL)
                    exited = await wait_exit(kernel, t.pidfd, kill_wait)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                if not await anyio.to_thread.run_sync(_exited, kernel, t.pidfd, 0.0):
                    report = given_back(
                        t, "interrupted before the process exited; its own exit releases it"
                    )
                    report.interrupted = True
                    return report
                phase("release")
                report = await release_files(t, max_parallel, timeout, progress)
                report.interrupted = True
                return report
        if not exited:
            why = await anyio.to_thread.run_sync(_not_exited, kernel, t.pid)
            log.error("release.process_alive", pid=t.pid, errno=errno.ETIMEDOUT, reason=why)
            return given_back(t, why)
        log.info("release.process_exited", pid=t.pid)
        phase("release")
        return await release_files(t, max_parallel, timeout, progress)
    finally:
        t.close()


async def release_files(
    t: Takeover,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> Report:
    """Close every reference of a process that has exited: groups, container and iommufd
    first, then device files by domain, in parallel (the last close of a set runs its reset).

    The group, container and iommufd references go first because they are no last
    references while a device file is open: a device file holds its group file (and a
    cdev its iommufd), so each group is released, and the container with the last of
    them, right after its devices, in the worker that closed them - never after all
    domains are done.
    """
    jobs = _jobs(t)
    files, close_others = _close_others(t)
    box: list[Report] = []

    async def devices() -> None:
        box.append(
            await run_domains(
                "release",
                jobs,
                event="release.device",
                max_parallel=max_parallel,
                timeout=timeout,
                progress=progress,
            )
        )

    # Side by side: a last group or container reference (a group with no device open)
    # may unpin a whole guest's memory, which must not hold up the device releases.
    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, close_others)
            tg.start_soon(devices)
    report = box[0]
    report.pid = t.pid
    report.files = files
    if t.exited_early:
        report.notes.append(
            f"pid {t.pid} exited during the takeover: what was not taken yet was released "
            "by its exit"
        )
    return report


def planned_report(t: Takeover) -> Report:
    """What :func:`release_files` would do, every file reported skipped (``--dry-run``)."""
    jobs = _jobs(t, lambda _k, _f: lambda: None)  # closes nothing
    report = Report("release", [j.domain for j in jobs], [r for j in jobs for r in j.results()])
    report.pid = t.pid
    report.files = [FileResult(f.kind, f.link, list(f.fds)) for f in _others(t)]
    return report


def _jobs(
    t: Takeover, closer: Callable[[Kernel, VfioFile], Callable[[], None]] | None = None
) -> list[DomainJob]:
    """One job per domain (an unplaceable file alone), the most serial work first.

    A file identified only up to a set of candidates joins their domain when
    they all share one: that set's worker releases it either way.
    """
    closer = closer or _closer
    domain_of = {a: d for d in t.plan.domains for a in d.devices}
    placed: dict[str, list[VfioFile]] = {}
    alone: list[VfioFile] = []
    for f in t.devices:
        if f.dup is None:
            continue
        addrs = [f.address] if f.address else f.candidates
        ids = {domain_of[a].id for a in addrs if a in domain_of}
        if addrs and len(ids) == 1 and all(a in domain_of for a in addrs):
            placed.setdefault(ids.pop(), []).append(f)
        else:
            alone.append(f)
    jobs: list[DomainJob] = []
    for d in t.plan.domains:
        fs = placed.get(d.id)
        if not fs:
            continue
        steps = [Step([_result(t, f, d.id)], closer(t.kernel, f)) for f in fs]
        # The model predicted the closes of d.devices in order; the files close in
        # that order when each names its device, else the set's resets come last.
        if [f.address for f in fs] == d.devices:
            for i, step in enumerate(steps):
                step.reset = d.reset_kind(i)
        else:
            steps[-1].reset = reset_label([r for c in d.closes for r in c])
        jobs.append(
            DomainJob(
                d.release_result([t.label(f) for f in fs]),
                steps,
            )
        )
    for f in alone:
        label = t.label(f)
        jobs.append(
            DomainJob(
                DomainResult(label, [label], None),
                [Step([_result(t, f, label)], closer(t.kernel, f))],
            )
        )
    jobs.sort(key=lambda j: -len(j.steps))  # stable: plan order among equals
    return jobs


def _closer(kernel: Kernel, f: VfioFile) -> Callable[[], None]:
    # The worker owns the fd from now on (one abandoned on timeout closes it late):
    # forget it here so that Takeover.close never closes the number twice.
    fd, f.dup = f.dup, None

    def fn() -> None:
        if fd is not None:
            kernel.close(fd)  # frees the fd even when the release reports an error

    return fn


def _close_others(t: Takeover) -> tuple[list[FileResult], Callable[[], None]]:
    """The group, container and iommufd references (groups first), and a blocking call
    that closes them in turn; each close is a reference drop while device files are open."""
    batch = [f for f in _others(t) if f.dup is not None]
    results = [FileResult(f.kind, f.link, list(f.fds)) for f in batch]
    closers = [_closer(t.kernel, f) for f in batch]

    def close_all() -> None:
        for fn, r in zip(closers, results, strict=True):
            _close_file(t.kernel, fn, r)

    return results, close_all


def _close_file(kernel: Kernel, fn: Callable[[], None], r: FileResult) -> None:
    try:
        fn()
        r.status = Status.RELEASED
    except OSError as exc:
        r.status, r.error = Status.FAILED, str(exc)
        log.error("release.file_close_failed", link=r.link, errno=exc.errno)


# --- the guardian ---------------------------------------------------------------------------


def task_state(kernel: Kernel, pid: int) -> tuple[str, int] | None:
    """The state letter and flags of /proc/PID/stat, None when it cannot be read (gone)."""
    try:
        fields = kernel.read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
        return fields[0], int(fields[6])
    except (OSError, ValueError, IndexError):
        return None


def _exiting(kernel: Kernel, pid: int, pidfd: int) -> bool:
    """Whether the process is exiting: its fds are being closed, not let go one by one."""
    state = task_state(kernel, pid)
    if state is not None and state[1] & PF_EXITING:
        return True
    return _exited(kernel, pidfd, 0)  # no stat (gone): the pidfd tells


def _not_exited(kernel: Kernel, pid: int) -> str:
    """Why a process outlived SIGKILL, from its state: an uninterruptible wait (D) in the
    kernel, such as a device reset that has not returned, ends only when that wait does."""
    state = task_state(kernel, pid)
    why = f"pid {pid} did not exit (even after SIGKILL)"
    if state is not None and state[0] == "D":
        doing = "exiting, " if state[1] & PF_EXITING else ""
        why += (
            f": it is {doing}in an uninterruptible wait in the kernel (state D), such as a "
            "device reset that has not returned; it exits when that wait ends"
        )
    return why + "; its exit will release its devices"


def follow(t: Takeover) -> tuple[list[VfioFile], list[VfioFile]]:
    """One look at the process (blocking): the files it let go (ours to drop) and new ones taken."""
    kernel, pid = t.kernel, t.pid
    try:
        current = vfio_fds(kernel, pid)
    except ProcessError:
        return [], []  # exiting: the caller sees the exit next
    gone = [f for f in t.files if f.dup is not None and not still_held(kernel, pid, f, current)]
    # Asked after the comparison: PF_EXITING only ever gets set, so a process not exiting now
    # was not exiting while its fds were compared, and what it no longer holds it let go of.
    # An exit closes everything: that is released as a whole, not as let-go files.
    if _exiting(kernel, pid, t.pidfd):
        return [], []
    for f in gone:
        t.files.remove(f)
    taken = [f.address for f in t.files if f.address]
    try:
        new = take(kernel, t.pidfd, pid, t.files)
    except ProcessGone as gone_now:
        new = gone_now.taken
    except ProcessError as exc:
        log.warning("release.watch_take_failed", pid=pid, errno=exc.errno, error=str(exc))
        new = []
    identify(kernel, new + [f for f in t.files if f.kind == "group"], taken)
    return gone, new


async def guard(
    t: Takeover,
    *,
    interval: float = 0.25,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
    on_change: Callable[[str, VfioFile], None] | None = None,
) -> Report:
    """Follow a running VMM without signalling it; release everything once it exits.

    Every ``interval`` seconds: a file the VMM closed (a hot-unplug) is let go
    at once, on a thread of its own, so the unplug and the host's reattach
    are never blocked; a file it opened (a hot-plug) is taken.  When the VMM
    exits, for whatever reason, its files are released as by
    :func:`release_process`.  Cancelled (the guardian is stopped) while the VMM
    runs, our references go back and nothing is released: the report is
    empty and marked ``interrupted``.  Killed outright, the guardian's
    references die with it and the kernel releases the devices as before.
    """
    kernel = t.kernel
    changed = on_change or (lambda _what, _f: None)
    try:
        async with anyio.create_task_group() as tg:
            try:
                while not await anyio.to_thread.run_sync(_exited, kernel, t.pidfd, interval):
                    gone, new = await anyio.to_thread.run_sync(follow, t)
                    for f in gone:
                        changed("let go", f)
                        tg.start_soon(_let_go, t, f)
                    for f in new:
                        changed("taken", f)
                        log.info("release.watch_taken", pid=t.pid, link=f.link, bdf=f.address)
                    if gone or new:
                        # Planned now, while the VMM runs, so that its exit is followed by
                        # the releases at once, not by a walk of sysfs.
                        await anyio.to_thread.run_sync(t.replan)
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    if not await anyio.to_thread.run_sync(_exited, kernel, t.pidfd, 0.0):
                        t.drop()
                        report = Report("release", pid=t.pid, interrupted=True)
                        report.notes.append(
                            f"stopped while pid {t.pid} runs: references given back, "
                            "nothing released"
                        )
                        return report
                    report = await release_files(t, max_parallel, timeout, progress)
                    report.interrupted = True
                    return report
        log.info("release.process_exited", pid=t.pid)
        return await release_files(t, max_parallel, timeout, progress)
    finally:
        t.close()


async def _let_go(t: Takeover, f: VfioFile) -> None:
    start = time.monotonic()
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(drop, t.kernel, f)
    log.info(
        "release.watch_let_go",
        pid=t.pid,
        link=f.link,
        bdf=f.address,
        elapsed_s=round(time.monotonic() - start, 6),
    )
