"""Acquire, release and reset many devices in about the time of one reset.

The kernel resets a device when it is opened and again (for its whole device
set, once) when the last fd of the set is released.  Both costs are paid per
reset domain, so the work is cut by domain: one worker thread per domain
walks its devices, and the domains run side by side.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from vfiopy._log import get_logger
from vfiopy.errors import VfioError
from vfiopy.kernel import Kernel
from vfiopy.release._constants import DEFAULT_MAX_PARALLEL
from vfiopy.release._engine import DomainJob, ProgressFn, Step, run_domains
from vfiopy.release._plan import Domain, Plan, PlanError, find_holders, make_plan
from vfiopy.release._report import DeviceResult, DomainResult, Report, Status

if TYPE_CHECKING:
    from vfiopy.device import Device
    from vfiopy.session import Session

log = get_logger("vfiopy.release")


class AcquireError(VfioError):
    """Some devices failed to open; those that opened were released again."""

    step_name = "acquire"

    def __init__(self, report: Report) -> None:
        self.report = report
        failed = report.failed()
        first = failed[0] if failed else DeviceResult("?", "?")
        detail = first.error or "failed"
        if len(failed) > 1:
            detail += f" (and {len(failed) - 1} more devices failed)"
        super().__init__(first.errno or errno.EIO, first.address, "open device", detail, advice="")

    def __str__(self) -> str:
        return f"{self.device}: {self.detail}"


def reset_kind(d: Domain, i: int) -> str | None:
    """The resets the kernel runs as the i-th of a domain's devices is closed (the model's)."""
    return d.reset_kind(i)


def plan_for(kernel: Kernel, addresses: Sequence[str]) -> Plan:
    """The strict plan for taking ``addresses`` from the host (blocking: reads sysfs, /proc)."""
    return make_plan(kernel, addresses, holders=find_holders(kernel), me=kernel.getpid())


# --- acquire ---------------------------------------------------------------------


async def open_all(
    session: Session,
    plan: Plan,
    *,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Device], Report]:
    """Open every device of ``plan``; returns those opened and the per-device report."""
    opened: dict[str, Device] = {}
    lock = threading.Lock()
    jobs: list[DomainJob] = []
    for d in plan.domains:
        steps = [
            Step([DeviceResult(a, d.id)], _opener(session, a, opened, lock)) for a in d.devices
        ]
        jobs.append(
            DomainJob(
                DomainResult(d.id, list(d.devices), len(d.devices)),
                steps,
                finally_fn=_close_if_abandoned(session, d, opened, lock),
                ok_status=Status.RELEASED,
            )
        )
    jobs.sort(key=lambda j: -len(j.steps))  # the most serial work first, as in release
    report = await run_domains(
        "acquire",
        jobs,
        event="acquire.device",
        max_parallel=max_parallel,
        timeout=timeout,
        progress=progress,
    )
    with lock:
        return dict(opened), report


async def acquire(
    session: Session,
    addresses: Sequence[str],
    *,
    plan: Plan | None = None,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> list[Device]:
    """Open ``addresses`` in ``session`` concurrently, one worker per reset domain.

    Each open makes the kernel reset the device; devices of one device set
    would only queue on its lock, so they open in turn while the sets open
    side by side.  Raises :class:`PlanError` (nothing opened) when a device
    cannot be taken safely, and :class:`AcquireError` when an open failed,
    after closing again those that opened.  Returns the devices in request
    order.
    """
    if plan is None:
        plan = await anyio.to_thread.run_sync(plan_for, session.kernel, addresses)
    opened, report = await open_all(
        session, plan, max_parallel=max_parallel, timeout=timeout, progress=progress
    )
    if report.failed():
        await release(
            session,
            list(opened.values()),
            max_parallel=max_parallel,
            timeout=timeout,
            close_session=False,
        )
        raise AcquireError(report)
    return [opened[a] for a in plan.addresses]


def _opener(
    session: Session, address: str, opened: dict[str, Device], lock: threading.Lock
) -> Callable[[], None]:
    def fn() -> None:
        dev = session.open_device(address)
        with lock:
            opened[address] = dev

    return fn


def _close_if_abandoned(
    session: Session, d: Domain, opened: dict[str, Device], lock: threading.Lock
) -> Callable[[bool], None]:
    # A domain abandoned on timeout may still finish opening: close what it
    # opened, since no caller will ever see those devices.
    def fn(abandoned: bool) -> None:
        if not abandoned:
            return
        for a in d.devices:
            with lock:
                dev = opened.pop(a, None)
            if dev is not None:
                try:
                    session.close_device(dev)
                except OSError as exc:
                    log.error(
                        "acquire.close_after_timeout_failed", bdf=a, domain=d.id, errno=exc.errno
                    )

    return fn


# --- release ----------------------------------------------------------------------


class _Countdown:
    """Runs ``fn`` once every worker finished, on the thread that finished last.

    Groups and the container may close only after every device fd: when a
    domain timed out its abandoned worker still owns some device fds, so
    the session is closed by whichever worker ends last, not by us.
    """

    def __init__(self, n: int, fn: Callable[[], object]) -> None:
        self.left = n
        self.fn = fn
        self.deferred = False
        self.lock = threading.Lock()

    def done(self, abandoned: bool) -> None:
        with self.lock:
            self.left -= 1
            run = self.deferred and self.left == 0
        if run:
            _close_quietly(self.fn)

    def defer_or_now(self) -> bool:
        """True when all workers are done (the caller closes now), else defer it."""
        with self.lock:
            if self.left == 0:
                return True
            self.deferred = True
            return False


def _close_quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except OSError as exc:
        log.error("release.session_close_failed", errno=exc.errno, error=str(exc))


async def release(
    session: Session,
    devices: Sequence[Device] | None = None,
    *,
    plan: Plan | None = None,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
    close_session: bool | None = None,
) -> Report:
    """Release ``devices`` (default: all the session holds), domains in parallel.

    Per domain its worker closes each device in the kernel's order (unmap
    its mmaps, disable its IRQs, close its fd), so the last close of the set
    triggers the set's one bus reset; then, with ``close_session`` (default:
    when releasing everything), groups and the container or iommufd.
    Shielded from cancellation: every device is closed and reported exactly
    once.
    """
    if close_session is None:
        close_session = devices is None
    if devices is None:
        devices = list(session.devices)
    by_addr = {str(dev.address): dev for dev in devices}
    if plan is None:
        plan = await anyio.to_thread.run_sync(_loose_plan, session.kernel, list(by_addr))
    countdown = _Countdown(len(plan.domains), session.close if close_session else _nothing)
    jobs = _release_jobs(plan, lambda a: _closer(session, by_addr[a]), countdown.done)
    report = await run_domains(
        "release",
        jobs,
        event="release.device",
        max_parallel=max_parallel,
        timeout=timeout,
        progress=progress,
    )
    if countdown.defer_or_now():
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_close_quietly, countdown.fn)
    else:
        log.warning(
            "release.session_close_deferred", reason="abandoned workers still own device fds"
        )
    return report


def _nothing() -> None:
    pass


def _release_jobs(
    plan: Plan,
    closer: Callable[[str], Callable[[], None]],
    finally_fn: Callable[[bool], object] | None = None,
) -> list[DomainJob]:
    """One job per domain closing its devices in order; the last close runs the set's reset.

    The domains with the most devices (the most serial work under one set lock) come
    first, so that a capped pool of workers never starts them last.
    """
    jobs = [
        DomainJob(
            d.release_result(),
            [
                Step([DeviceResult(a, d.id)], closer(a), reset_kind(d, i))
                for i, a in enumerate(d.devices)
            ],
            finally_fn=finally_fn,
        )
        for d in plan.domains
    ]
    return sorted(jobs, key=lambda j: -len(j.steps))


def _loose_plan(kernel: Kernel, addresses: list[str]) -> Plan:
    return make_plan(kernel, addresses, check_driver=False, strict=False)


def _closer(session: Session, dev: Device) -> Callable[[], None]:
    return lambda: session.close_device(dev)


# --- reset without closing -----------------------------------------------------------


async def reset(
    session: Session,
    devices: Sequence[Device] | None = None,
    *,
    plan: Plan | None = None,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> Report:
    """Reset ``devices`` and keep them open (between two boots of a VM).

    One reset per domain, domains in parallel: a function reset
    (VFIO_DEVICE_RESET, FLR where the device has it) for a device alone in
    its domain, else one hot reset of the bus or slot naming every group of
    the domain (or the cdev zero-length form).  Refuses, before any reset,
    a domain that holds a device this session does not own.
    """
    if devices is None:
        devices = list(session.devices)
    by_addr = {str(dev.address): dev for dev in devices}
    if plan is None:
        plan = await anyio.to_thread.run_sync(_loose_plan, session.kernel, list(by_addr))
    for d in plan.domains:
        if not d.whole:
            other = (d.foreign or [a for a, _ in d.host_bound])[0]
            raise PlanError(
                errno.EPERM,
                d.devices[0],
                "plan hot reset",
                detail=f"its reset domain {d.id} also holds {other}, which this session "
                "does not own",
                advice=f"open {other} in this session too, or release and reopen instead",
            )
    jobs = []
    for d in plan.domains:
        devs = [by_addr[a] for a in d.devices]
        kind = "function" if d.function_reset else "bus"
        results = [DeviceResult(a, d.id) for a in d.devices]
        jobs.append(
            DomainJob(
                DomainResult(d.id, list(d.devices), 1),
                [Step(results, _resetter(session, devs, kind), kind)],
                ok_status=Status.RESET,
            )
        )
    return await run_domains(
        "reset",
        jobs,
        event="reset.device",
        max_parallel=max_parallel,
        timeout=timeout,
        progress=progress,
    )


def _resetter(session: Session, devs: list[Device], kind: str) -> Callable[[], None]:
    if kind == "function":
        return devs[0].reset
    return lambda: session.hot_reset(devs)


# --- fds taken from another process ------------------------------------------------


async def release_fds(
    kernel: Kernel,
    plan: Plan,
    fds: dict[str, list[int]],
    *,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> Report:
    """Close raw device fds (address -> fds) by domain; the last close runs the set's reset.

    For fds duplicated from a process that has exited: nothing else holds
    the devices, so closing our references runs their releases here, in
    parallel across domains instead of in series in the exiting task.
    """
    return await run_domains(
        "release",
        _release_jobs(plan, lambda a: _fd_closer(kernel, fds[a])),
        event="release.device",
        max_parallel=max_parallel,
        timeout=timeout,
        progress=progress,
    )


def _fd_closer(kernel: Kernel, fds: list[int]) -> Callable[[], None]:
    def fn() -> None:
        first: OSError | None = None
        for fd in fds:
            try:
                kernel.close(fd)
            except OSError as exc:
                # close(2) frees the fd even when the release reports an error.
                first = first or exc
        if first is not None:
            raise first

    return fn


# --- the address flow -------------------------------------------------------------------


async def release_addresses(
    session: Session,
    plan: Plan,
    *,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
) -> Report:
    """Open then release the devices of ``plan``: a reset on open and the set's reset on close.

    For devices a VMM left behind bound to vfio-pci: the kernel resets a
    device set only at its last release, so opening and releasing every
    member, domains in parallel, is how userspace asks for that reset.  The
    whole sequence is shielded: a cancellation never leaves a device open.
    The report has one entry per device: its release, or its failed open.
    """
    with anyio.CancelScope(shield=True):
        opened, opens = await open_all(
            session, plan, max_parallel=max_parallel, timeout=timeout, progress=progress
        )
        devices = [opened[a] for a in plan.addresses if a in opened]
        part = Plan([d for d in (_only(d, opened) for d in plan.domains) if d.devices])
        closes = await release(
            session,
            devices,
            plan=part,
            max_parallel=max_parallel,
            timeout=timeout,
            progress=progress,
            close_session=True,
        )
    done = {r.address: r for r in closes.devices}
    report = Report("release", elapsed_s=opens.elapsed_s + closes.elapsed_s)
    for d in plan.domains:
        report.domains.append(d.release_result())
    for r in opens.devices:
        if r.address in done:
            c = done[r.address]
            c.start_s += opens.elapsed_s
            c.end_s += opens.elapsed_s
            c.start_s = min(c.start_s, r.start_s)
            report.devices.append(c)
        else:
            report.devices.append(r)
    return report


def _only(d: Domain, opened: dict[str, Device]) -> Domain:
    keep = [a for a in d.devices if a in opened]
    if keep == d.devices:
        return d
    # Some opens failed: the predicted closes were for the whole list, so none are kept.
    return Domain(d.id, keep, d.members, d.host_bound, d.foreign)
