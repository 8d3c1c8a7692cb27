"""Tear down a VMM's devices: take its fds, make it exit, release them in parallel."""

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
from vfiopy.release._engine import DEFAULT_MAX_PARALLEL, ProgressFn
from vfiopy.release._manager import release_fds
from vfiopy.release._plan import Plan, UsageError, make_plan
from vfiopy.release._process import (
    ProcessFd,
    device_fds,
    drop,
    duplicate,
    identify_by_config,
    open_process,
)
from vfiopy.release._report import DeviceResult, DomainResult, Report, Status

log = get_logger("vfiopy.release")


@dataclass(slots=True)
class Takeover:
    """References to every VFIO device fd of one process, grouped by reset domain."""

    kernel: Kernel
    pid: int
    pidfd: int
    plan: Plan
    fds: list[ProcessFd]
    unknown: list[ProcessFd] = field(default_factory=list)

    def by_address(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for f in self.fds:
            if f.address is not None and f.dup is not None:
                out.setdefault(f.address, []).append(f.dup)
        return out

    def drop(self, which: list[ProcessFd] | None = None) -> None:
        """Give back our references (the process keeps its own); idempotent."""
        for f in self.fds if which is None else which:
            drop(self.kernel, f)

    def close(self) -> None:
        self.drop()
        with contextlib.suppress(OSError):
            self.kernel.close(self.pidfd)


def take_over(kernel: Kernel, pid: int) -> Takeover:
    """Find, duplicate and identify ``pid``'s device fds; plan their release (blocking).

    Nothing is signalled or released here: on any error every reference
    taken is dropped again, which leaves the devices exactly as they were.
    Raises :class:`UsageError` when there is no such process,
    :class:`~vfiopy.errors.ProcessError` (EPERM) without ptrace-attach
    permission, and :class:`~vfiopy.release.PlanError` when a domain holds a
    vfio-pci device the process does not hold.
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
    fds: list[ProcessFd] = []
    try:
        fds = device_fds(kernel, pid)
        duplicate(kernel, pidfd, pid, fds)
        known = {f.address for f in fds if f.address}
        unknown = identify_by_config(
            kernel, [f for f in fds if f.address is None], {a for a in known if a}
        )
        for f in unknown:
            log.warning(
                "release.fd_unidentified",
                reason="the process's own exit will release it",
                pid=pid,
                fd=f.fd,
                link=f.link,
            )
            drop(kernel, f)
        addresses = list(dict.fromkeys(f.address for f in fds if f.address))
        plan = make_plan(kernel, addresses, check_driver=False) if addresses else Plan([])
    except BaseException:
        for f in fds:
            drop(kernel, f)
        kernel.close(pidfd)
        raise
    return Takeover(kernel, pid, pidfd, plan, fds, unknown)


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


def _skip_all(t: Takeover, why: str, start: float) -> Report:
    report = Report("release")
    for d in t.plan.domains:
        report.domains.append(DomainResult(d.id, list(d.devices), 0))
        for a in d.devices:
            report.devices.append(
                DeviceResult(
                    a,
                    d.id,
                    Status.SKIPPED,
                    why,
                    None,
                    time.monotonic() - start,
                    time.monotonic() - start,
                )
            )
    return report


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
    """Signal the process, wait for its exit, then release its devices concurrently.

    ``sig`` first; SIGKILL if it is still alive after ``grace`` seconds.
    Its exit only drops references (we hold one to each device file), so
    it is fast; then the releases, and the resets they trigger, run here,
    domains in parallel.  If the process does not exit, or the wait is
    cancelled before it does, our references are dropped and the devices
    reported skipped: the process's own exit will release them.  A
    cancellation then returns the report marked ``interrupted``; it takes
    effect at the caller's next checkpoint.
    """
    t = takeover
    start = time.monotonic()
    kernel = t.kernel
    phase = on_phase or (lambda _p: None)
    try:
        try:
            phase("signal")
            log.info("release.signal", pid=t.pid, signal=_signal.Signals(sig).name)
            try:
                kernel.pidfd_send_signal(t.pidfd, sig)
            except ProcessLookupError:
                pass  # exited already: what we wanted
            except OSError as exc:
                raise ProcessError.from_oserror(exc, f"pid {t.pid}", "pidfd_send_signal") from exc
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
                exited = await anyio.to_thread.run_sync(_exited, kernel, t.pidfd, 0.0)
                if not exited:
                    t.drop()
                    report = _skip_all(
                        t,
                        "interrupted before the process exited; its own exit releases the device",
                        start,
                    )
                    report.interrupted = True
                    return report
                phase("release")
                report = await _release(t, max_parallel, timeout, progress)
                report.interrupted = True
                return report
        if not exited:
            t.drop()
            log.error("release.process_alive", pid=t.pid, errno=errno.ETIMEDOUT)
            return _skip_all(
                t,
                f"pid {t.pid} did not exit (even after SIGKILL); its exit will release the device",
                start,
            )
        log.info("release.process_exited", pid=t.pid, elapsed_s=round(time.monotonic() - start, 6))
        phase("release")
        return await _release(t, max_parallel, timeout, progress)
    finally:
        t.close()


async def _release(
    t: Takeover, max_parallel: int, timeout: float | None, progress: ProgressFn | None
) -> Report:
    fds = t.by_address()
    # The workers own the fds now (an abandoned one closes its fds late):
    # forget them here so that Takeover.close never closes a number twice.
    for f in t.fds:
        f.dup = None
    return await release_fds(
        t.kernel, t.plan, fds, max_parallel=max_parallel, timeout=timeout, progress=progress
    )
