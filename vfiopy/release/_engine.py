"""Run blocking per-domain work in worker threads: domains in parallel, one thread each.

Devices of one reset domain share the kernel's device-set mutex, so giving
them separate threads buys nothing but lock waits; one thread per domain
walks its devices in order, and domains run side by side.  The limiter is
sized to the number of domains (capped), because the default of 40 tokens
would make 2048 single-VF domains crawl.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import structlog

from vfiopy.release._report import DeviceResult, DomainResult, Report, Status, describe

log = structlog.get_logger("vfiopy.release")

DEFAULT_MAX_PARALLEL = 4096
"""Worker threads at most (one per reset domain below it).  Each one sleeps in the kernel
for a reset, so threads are cheap; a cap below the domain count turns one reset of time
into several rounds (2048 VFs behind a cap of 256 take 8 FLRs)."""

ProgressFn = Callable[[str, DomainResult, Sequence[DeviceResult]], None]
"""Called on the event loop as ``(phase, domain, devices)``, phase ``start`` or ``end``."""


@dataclass(slots=True)
class Step:
    """One blocking call covering some devices (one close, or one hot reset for a bus)."""

    results: list[DeviceResult]
    fn: Callable[[], object]
    reset: str | None = None


@dataclass(slots=True)
class DomainJob:
    domain: DomainResult
    steps: list[Step]
    # Called in the worker after the steps, even after a timeout abandoned the
    # job (argument True): work that must happen whatever the steps did, such
    # as closing a device that finished opening after we gave up on it.
    finally_fn: Callable[[bool], object] | None = None
    ok_status: Status = Status.RELEASED
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _abandoned: bool = False
    _finished: bool = False


def _work(job: DomainJob, t0: float, event: str) -> None:
    domain = job.domain.id
    try:
        for step in job.steps:
            start = time.monotonic()
            with job._lock:
                if not job._abandoned:
                    for r in step.results:
                        r.start_s = start - t0
            exc: BaseException | None = None
            try:
                step.fn()
            except Exception as e:
                exc = e
            end = time.monotonic()
            with job._lock:
                if job._abandoned:
                    # Reported already as timed out; keep going so the fds close.
                    continue
                for r in step.results:
                    r.end_s = end - t0
                    if exc is None:
                        r.status = job.ok_status
                    else:
                        r.status = Status.FAILED
                        r.error, r.errno = describe(exc)
            for r in step.results:
                if exc is None:
                    log.info(
                        event,
                        bdf=r.address,
                        domain=domain,
                        reset=step.reset,
                        elapsed_s=round(end - start, 6),
                    )
                else:
                    log.error(
                        event + "_failed",
                        bdf=r.address,
                        domain=domain,
                        reset=step.reset,
                        elapsed_s=round(end - start, 6),
                        errno=r.errno,
                        error=r.error,
                    )
    finally:
        with job._lock:
            job._finished = True
            abandoned = job._abandoned
        if job.finally_fn is not None:
            job.finally_fn(abandoned)


async def run_domains(
    action: str,
    jobs: Sequence[DomainJob],
    *,
    event: str,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
    shield: bool = True,
) -> Report:
    """Run every job's steps; each device ends released, failed or timed out.

    With ``shield`` the run cannot be cancelled from outside: a release that
    stopped half-way would leave device fds open and resets unrun, so a
    cancellation (or the signal that caused it) takes effect when it ends.
    The per-domain ``timeout`` still applies: a domain whose worker hangs
    (a reset that never finishes) is abandoned, its unfinished devices
    reported failed, and the others complete.
    """
    report = Report(
        action, [j.domain for j in jobs], [r for j in jobs for s in j.steps for r in s.results]
    )
    t0 = time.monotonic()
    n = max(1, min(len(jobs), max_parallel))
    tokens = anyio.CapacityLimiter(n)
    # run_sync holds a token of its own limiter only while the async side
    # waits; ours is taken first, so the per-domain timeout starts when the
    # domain's worker does, not while it queues behind other domains.
    threads = anyio.CapacityLimiter(n)
    deadline = math.inf if timeout is None else timeout

    async def one(job: DomainJob) -> None:
        async with tokens:
            if progress is not None:
                progress("start", job.domain, [r for s in job.steps for r in s.results])
            with anyio.move_on_after(deadline) as scope:
                await anyio.to_thread.run_sync(
                    _work, job, t0, event, abandon_on_cancel=True, limiter=threads
                )
            if scope.cancelled_caught:
                _abandon(job, t0, deadline)
            if progress is not None:
                progress("end", job.domain, [r for s in job.steps for r in s.results])

    with anyio.CancelScope(shield=shield):
        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(one, job)
    report.elapsed_s = time.monotonic() - t0
    return report


def _abandon(job: DomainJob, t0: float, timeout: float) -> None:
    now = time.monotonic() - t0
    hung: str | None = None
    with job._lock:
        if job._finished:
            return  # the worker completed just as the deadline passed
        job._abandoned = True
        for step in job.steps:
            if all(r.status is not Status.SKIPPED for r in step.results):
                continue
            for r in step.results:
                r.status = Status.FAILED
                r.errno = errno.ETIMEDOUT
                if hung is None:
                    r.error = f"timed out after {timeout:g} s; its worker thread is abandoned"
                else:
                    r.error = f"timed out: queued behind {hung}, whose step hung"
                    r.start_s = now
                r.end_s = now
            hung = hung or step.results[0].address
        job.domain.timed_out = True
    log.error(
        "release.domain_timeout",
        domain=job.domain.id,
        bdf=hung,
        elapsed_s=timeout,
        errno=errno.ETIMEDOUT,
    )
