"""Run blocking per-domain work in worker threads: domains in parallel, one thread each.

Devices of one reset domain share the kernel's device-set mutex, so giving
them separate threads buys nothing but lock waits; one thread per domain
walks its devices in order, and domains run side by side.  The threads are
our own, as many as there are domains (capped), not anyio's pool: its
default of 40 would make 2048 single-VF domains crawl, and a task plus a
thread hand-off per domain costs more Python than the release itself.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from vfiopy._log import get_logger
from vfiopy.release._constants import DEFAULT_MAX_PARALLEL
from vfiopy.release._report import DeviceResult, DomainResult, Report, Status, describe

log = get_logger("vfiopy.release")

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
    started: float = 0.0  # monotonic time a worker took the job
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _abandoned: bool = False
    _finished: bool = False

    def results(self) -> list[DeviceResult]:
        """Every device of the domain, in step order."""
        return [r for s in self.steps for r in s.results]


def _work(job: DomainJob, t0: float, event: str, logger: Any) -> None:
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
            except BaseException as e:
                # KeyboardInterrupt or SystemExit in a worker stops nothing but
                # this step: the device is reported failed and the domain's
                # other steps still run, so their fds close.
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
                    logger.info(
                        event,
                        bdf=r.address,
                        domain=domain,
                        reset=step.reset,
                        elapsed_s=round(end - start, 6),
                    )
                else:
                    logger.error(
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
            try:
                job.finally_fn(abandoned)
            except BaseException as e:
                text, err = describe(e)
                logger.error(event + "_cleanup_failed", domain=domain, error=text, errno=err)


class _Mailbox:
    """Worker threads tell the event loop that a job started or ended.

    One eventfd wakes the loop for any number of notes, so thousands of
    domains cost one wake-up per batch instead of an event-loop callback (and
    an async task and cancel scope) per domain.  The fd stays open until the
    loop and every worker have left: a worker abandoned on timeout may post
    long after the loop returned, and must never write to a reused fd number.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.notes: deque[tuple[str, DomainJob]] = deque()
        self._users = 1  # the loop
        self._lock = threading.Lock()

    def join(self) -> None:
        with self._lock:
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            os.close(self.fd)

    def post(self, phase: str, job: DomainJob) -> None:
        self.notes.append((phase, job))
        os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)


def _worker(queue: deque[DomainJob], mail: _Mailbox, t0: float, event: str, logger: Any) -> None:
    try:
        while True:
            try:
                job = queue.popleft()
            except IndexError:
                return
            job.started = time.monotonic()
            mail.post("start", job)
            try:
                _work(job, t0, event, logger)
            finally:
                # The loop counts domains down by their "end": one that never
                # comes leaves run_domains waiting for ever.
                mail.post("end", job)
    finally:
        mail.leave()


async def run_domains(
    action: str,
    jobs: Sequence[DomainJob],
    *,
    event: str,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> Report:
    """Run every job's steps; each device ends released, failed or timed out.

    Up to ``max_parallel`` worker threads take domains from one queue.  The
    run cannot be cancelled from outside: a release that stopped half-way
    would leave device fds open and resets unrun, so a cancellation (or the
    signal that caused it) takes effect when it ends.  The per-domain
    ``timeout`` counts from when a worker takes the domain: a domain whose
    worker hangs (a reset that never finishes) is abandoned, its unfinished
    devices reported failed, a new worker takes its place, and the other
    domains complete.
    """
    report = Report(action, [j.domain for j in jobs], [r for j in jobs for r in j.results()])
    t0 = time.monotonic()
    queue = deque(jobs)
    mail = _Mailbox()
    spawned = 0
    # Bound once per run: each call through the module's lazy proxy would bind anew.
    logger = log.bind()

    def spawn() -> bool:
        """Start one more worker; False when the system has no thread to give."""
        nonlocal spawned
        mail.join()
        try:
            threading.Thread(
                target=_worker,
                args=(queue, mail, t0, event, logger),
                name=f"vfiopy-{action}-{spawned + 1}",
                daemon=True,
            ).start()
        except BaseException as exc:
            mail.leave()
            # RLIMIT_NPROC or the cgroup's pids.max: run with the workers we have.
            if spawned and isinstance(exc, RuntimeError):
                log.warning(
                    f"{action}.fewer_workers", workers=spawned, domains=len(jobs), error=str(exc)
                )
                return False
            raise
        spawned += 1
        return True

    running: dict[int, DomainJob] = {}
    # Running jobs by start time, so the next deadline and the expired ones are found
    # without a scan of thousands of domains at every wake-up.
    by_start: list[tuple[float, int, DomainJob]] = []
    left = len(jobs)
    with anyio.CancelScope(shield=True):
        try:
            for _ in range(min(len(jobs), max(1, max_parallel))):
                if not spawn():
                    break
            while left:
                while by_start and id(by_start[0][2]) not in running:
                    heapq.heappop(by_start)  # finished or abandoned already
                wait = math.inf
                if timeout is not None and by_start:
                    wait = max(0.0, by_start[0][0] + timeout - time.monotonic())
                with anyio.move_on_after(wait):
                    await anyio.wait_readable(mail.fd)
                mail.clear()
                while mail.notes:
                    phase, job = mail.notes.popleft()
                    if phase == "start":
                        running[id(job)] = job
                        heapq.heappush(by_start, (job.started, id(job), job))
                    elif running.pop(id(job), None) is None:
                        continue  # ended after it was abandoned: reported already
                    else:
                        left -= 1
                    if progress is not None:
                        progress(phase, job.domain, job.results())
                if timeout is None:
                    continue
                now = time.monotonic()
                while by_start and by_start[0][0] + timeout <= now:
                    job = heapq.heappop(by_start)[2]
                    if id(job) not in running:
                        continue
                    if not _abandon(job, t0, timeout):
                        continue  # it finished just now: its "end" note is on its way
                    del running[id(job)]
                    left -= 1
                    if progress is not None:
                        progress("end", job.domain, job.results())
                    if queue:
                        spawn()  # the hung worker keeps its thread; the queue must go on
        finally:
            mail.leave()
    report.elapsed_s = time.monotonic() - t0
    return report


def _abandon(job: DomainJob, t0: float, timeout: float) -> bool:
    """Report the job's unfinished devices as timed out; False if it finished meanwhile."""
    now = time.monotonic() - t0
    hung: str | None = None
    with job._lock:
        if job._finished:
            return False  # the worker completed just as the deadline passed
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
    return True
