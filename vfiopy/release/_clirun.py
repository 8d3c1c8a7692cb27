"""``python -m vfiopy.release`` once its arguments are read: the run, its output and signals.

:mod:`vfiopy.release.cli` parses the arguments and imports this module only then:
it brings in anyio, structlog and dataclasses, and its functions the kernel's
door and the release machinery, none of which ``--help`` needs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import anyio.abc

from vfiopy._cliargs import JsonOut
from vfiopy._log import forget_deferred_configuration, get_logger
from vfiopy.errors import AddressError
from vfiopy.release._engine import ProgressFn
from vfiopy.release._report import (
    DeviceResult,
    DomainResult,
    ObservedReset,
    Report,
    Status,
    max_overlap,
)
from vfiopy.release.cli import (
    DEFAULT_TIMEOUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    configure_logging,
)

# The kernel's door (the cffi extension), sysfs and the release machinery are imported by the
# functions that run a release: a usage error found here starts without them.
if TYPE_CHECKING:
    from vfiopy.kernel import Kernel
    from vfiopy.release._plan import Plan
    from vfiopy.release._process import VfioFile
    from vfiopy.release._takeover import Takeover
    from vfiopy.session import Backend

log = get_logger("vfiopy.release")


@dataclass
class _Progress:
    """One status line per run on a TTY: domains done, running, failed."""

    stream: TextIO
    total: int
    done: int = 0
    running: set[str] = field(default_factory=set)
    failed: int = 0
    LINES_UP_TO = 64  # a line per finished domain; beyond, only failures get one

    def __call__(self, phase: str, domain: DomainResult, devices: Sequence[DeviceResult]) -> None:
        if phase == "start":
            self.running.add(domain.id)
        else:
            self.running.discard(domain.id)
            self.done += 1
            bad = [d for d in devices if d.status is Status.FAILED]
            self.failed += bool(bad)
            state = "FAILED" if bad else "ok"
            span = max((d.end_s for d in devices), default=0.0)
            if bad or self.total <= self.LINES_UP_TO:
                self.stream.write(
                    f"\r\x1b[K  domain {domain.id}: {state} "
                    f"({_n(len(devices), 'device')}, done at {span:.3f} s)\n"
                )
        shown = ", ".join(sorted(self.running)[:4]) + (" ..." if len(self.running) > 4 else "")
        self.stream.write(f"\r\x1b[K[{self.done}/{self.total} domains] running: {shown}")
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


def plan_report(plan: Plan, action: str) -> Report:
    """The plan as a report of skipped devices, for ``--dry-run --json``."""
    report = Report(action)
    for d in plan.domains:
        report.domains.append(
            d.release_result() if action == "release" else DomainResult(d.id, list(d.devices), 1)
        )
        report.devices += [DeviceResult(a, d.id) for a in d.devices]
    return report


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary(report: Report) -> list[str]:
    c = report.counts()
    lines = [
        f"{c['released'] + c['reset']}/{_n(len(report.devices), 'device')} released in "
        f"{_n(len(report.domains), 'reset domain')} in {report.elapsed_s:.3f} s"
        + (f"; {c['failed']} failed" if c["failed"] else "")
        + (f"; {c['skipped']} skipped" if c["skipped"] else "")
    ]
    lines += [f"  {d.address}: {d.status}: {d.error}" for d in report.failed()]
    if report.interrupted:
        lines.append("interrupted: every device fd taken was still released or given back")
    return lines + _compare(report)


def _methods(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{n} {m}" for m, n in (counts or {}).items()) or "none"


def _compare(report: Report) -> list[str]:
    """Predicted against observed resets, where a trace saw the run: the total and each
    domain where they differ."""
    if report.observed_by is None:
        return []
    known = [d for d in report.domains if d.resets is not None]
    predicted = sum(d.resets or 0 for d in known)
    observed = sum(d.observed_resets or 0 for d in known)
    lines = [
        f"resets predicted {predicted}, observed {observed} by the {report.observed_by}"
        + ("" if all(d.matches is not False for d in known) else "; they differ in:")
    ]
    for d in known:
        if d.matches is False:
            want = _methods(d.predicted) if d.predicted is not None else str(d.resets)
            lines.append(f"  {d.id}: predicted {want}, observed {_methods(d.observed)}")
    return lines


# --- simulator ----------------------------------------------------------------------------


@dataclass
class _Sim:
    machine: Any
    kernel: Kernel
    vmm: Any = None

    def observed(self, since: float) -> list[ObservedReset]:
        """The resets the simulator traced from ``since`` on, each with every device it hit;
        not those of opening (the address flow opens each device to close it), since the
        report predicts the closes' resets."""
        out = []
        for e in self.machine.unique_resets():
            if e.start < since or e.cause == "open":
                continue
            if e.method in ("bus", "slot"):  # one trace event per device hit, same start
                hit = self.machine.resets(kind=e.method, devset=e.devset)
                targets = tuple(x.device for x in hit if x.start == e.start)
            else:
                targets = (e.device,)
            out.append(ObservedReset(e.method or "?", targets))
        return out


@dataclass
class _Watch:
    """The simulator whose trace the report compares its predictions with (None: no trace)."""

    sim: _Sim | None = None
    since: float = 0.0


_watch = _Watch()


def _simulator(args: argparse.Namespace) -> _Sim:
    from vfiopy.simulate import machine_of, simulated_kernel

    # Options given here win over those in the spec (and its VFIOPY_SIM_* defaults).
    spec = args.simulate
    for key, value in (
        ("kernel", args.kernel_model),
        ("reset", args.reset_model),
        ("scale", args.time_scale),
    ):
        if value is not None:
            spec += f",{key}={value}"
    kernel = simulated_kernel(spec)
    return _Sim(machine_of(kernel), kernel)


def _spawn_vmm(sim: _Sim, addresses: list[str], backend: str) -> int:
    """A simulated QEMU that opened ``addresses`` (all vfio-pci devices when empty)."""
    from mock_vfio import spawn_qemu

    from vfiopy.sysfs import VFIO_DRIVER, Sysfs

    if not addresses:
        sysfs = Sysfs(sim.kernel)
        addresses = [str(a) for a in sysfs.devices() if sysfs.driver(a) == VFIO_DRIVER]
    vmm = spawn_qemu(sim.machine, addresses, backend=_backend(backend))
    sim.vmm = (vmm, addresses)
    return int(vmm.getpid())


def _sim_summary(sim: _Sim, since: float) -> list[str]:
    """How the simulated resets overlapped (the point of --pid)."""
    resets = [e for e in sim.machine.unique_resets() if e.start >= since]
    if not resets:
        return ["simulator: no resets"]
    spans = sorted((e.start, e.end) for e in resets)
    peak = max_overlap(spans)
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    serial = sum(e - s for s, e in spans)
    kinds: dict[str, int] = {}
    for e in resets:
        kinds[e.method or "?"] = kinds.get(e.method or "?", 0) + 1
    what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return [
        f"simulator: {_n(len(resets), 'reset')} ({what}), up to {peak} at once, {wall:.3f} s from "
        f"first to last; run one by one, as the process's own exit would, their durations add up to {serial:.3f} s"
    ]


def run(args: argparse.Namespace, kernel: Kernel | None) -> int:
    """Run what the parsed ``args`` ask for (``cli.main``); ``kernel`` (a simulated process,
    in tests) replaces the system's."""
    _out.reset()
    _watch.sim = None
    global _signals
    with _Signals(args.timeout) as _signals:
        try:
            return _main(args, kernel)
        except _Interrupted as exc:
            return _refuse(
                args,
                f"interrupted by {exc} before the release started; nothing was released",
                EXIT_FAILED,
            )
        except Exception as exc:  # a bug: its traceback, and still one JSON document
            import traceback

            traceback.print_exc()
            if args.json and not _out.written:
                json_error(f"internal error: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        finally:
            forget_deferred_configuration()  # a set-up no event asked for ends with the run


def _main(args: argparse.Namespace, kernel: Kernel | None) -> int:
    from vfiopy.kernel import default_kernel
    from vfiopy.release._plan import UsageError, parse_addresses
    from vfiopy.release._process import parse_signal

    err = sys.stderr
    configure_logging(args.verbose, args.quiet, err, defer=True)
    if args.simulate is not None and not args.simulate.strip():
        from vfiopy.simulate import NO_TOPOLOGY

        return _usage(args, NO_TOPOLOGY)
    if args.pid is not None and args.addresses and not args.simulate_vmm:
        return _usage(args, "give device addresses or --pid, not both")
    if args.simulate_vmm and not args.simulate:
        return _usage(args, "--simulate-vmm needs --simulate TOPOLOGY")
    if args.simulate_vmm and args.pid is not None:
        return _usage(args, "--simulate-vmm chooses the pid itself; leave out --pid")
    if args.watch and args.pid is None and not args.simulate_vmm:
        return _usage(args, "--watch needs --pid PID")
    if args.pid is None and not args.addresses and not args.simulate_vmm:
        return _usage(args, "give device addresses or --pid PID")
    if (
        args.max_parallel < 1
        or args.timeout <= 0
        or args.grace < 0
        or (args.time_scale is not None and args.time_scale < 0)
    ):
        return _usage(
            args, "--max-parallel must be >= 1, --timeout > 0, --grace and --time-scale >= 0"
        )
    try:
        sig = parse_signal(args.signal)
        addresses = [str(a) for a in parse_addresses(args.addresses)]
    except (ValueError, AddressError) as exc:
        return _usage(args, str(exc))
    sim: _Sim | None = None
    try:
        if kernel is not None:
            machine = getattr(kernel, "machine", None)
            sim = _Sim(machine, kernel) if machine is not None else None
        elif args.simulate:
            try:
                sim = _simulator(args)
            except ValueError as exc:  # a bad spec or topology (file): nothing was done
                return _refuse(args, f"--simulate: {exc}", EXIT_USAGE)
            kernel = sim.kernel
        else:
            kernel = default_kernel()
        pid = args.pid
        if args.simulate_vmm:
            assert sim is not None
            pid = _spawn_vmm(sim, addresses, args.backend)
            if not args.quiet:
                err.write(f"simulated VMM: pid {pid} holds {len(sim.vmm[1])} devices\n")
        since = time.monotonic()
        _watch.sim, _watch.since = sim, since
        if pid is not None:
            code = _run_pid(args, kernel, pid, sig)
        else:
            code = _run_addresses(args, kernel, addresses)
        if sim is not None and not args.dry_run and not args.quiet:
            for line in _sim_summary(sim, since):
                err.write(line + "\n")
        return code
    except UsageError as exc:
        return _refuse(args, exc, EXIT_USAGE)
    except OSError as exc:  # VfioError, or an unexpected OSError from the system
        return _refuse(args, exc, EXIT_FAILED)


def _refuse(args: argparse.Namespace, exc: OSError | str, code: int) -> int:
    """Nothing was done: say why on stderr and, with --json, in the document too."""
    sys.stderr.write(f"error: {exc}\n")
    if args.json:
        json_error(str(exc))
    return code


_out = JsonOut()


def json_error(message: str) -> None:
    """The document of a run that did nothing: no devices, ``ok`` false, the error."""
    doc = Report("release").to_json()
    doc["ok"] = False
    doc["error"] = message
    _out.write(doc)


def _backend(name: str) -> Backend:
    return "iommufd" if name == "iommufd" else "container"


def _usage(args: argparse.Namespace, message: str) -> int:
    """A usage error found after argparse: as argparse says its own (and, with --json, the
    document too)."""
    build_parser().print_usage(sys.stderr)
    sys.stderr.write(f"python -m vfiopy.release: error: {message}\n")
    if args.json:
        json_error(message)
    return EXIT_USAGE


def _emit(
    args: argparse.Namespace, report: Report, dry_run: bool = False, plan_ok: bool = True
) -> int:
    _signals.phase = "after"  # a signal from here on changes neither the output nor the status
    if _watch.sim is not None and not dry_run:
        report.observe("simulator", _watch.sim.observed(_watch.since))
    if args.json:
        doc = report.to_json()
        if dry_run:
            doc["ok"] = plan_ok
            doc["dry_run"] = True
        _out.write(doc)
    if dry_run:
        return EXIT_OK if plan_ok else EXIT_FAILED
    if not args.quiet:
        for line in summary(report):
            sys.stderr.write(line + "\n")
    return EXIT_OK if report.ok else EXIT_FAILED


def _print_plan(args: argparse.Namespace, plan: Plan, action: str) -> None:
    # The plan is what --dry-run was asked for: stdout, unless --json owns it.
    out = sys.stderr if args.json else sys.stdout
    for line in plan.describe(action):
        out.write(line + "\n")


def _progress(args: argparse.Namespace, plan: Plan) -> _Progress | None:
    if args.quiet or not sys.stderr.isatty():
        return None
    return _Progress(sys.stderr, len(plan.domains))


class _Interrupted(Exception):
    """SIGINT or SIGTERM before the release started: nothing was done."""


class _Signals:
    """The tool's signals, from its arguments read to its exit status.

    SIGHUP (a dropped SSH session) is ignored throughout: nothing stops half-way for it.
    SIGINT and SIGTERM before the release starts stop the tool (nothing was released);
    during it, the first stops waiting for the VMM but finishes, shielded, what holds device
    fds, and says how many domains are left; after it, they change neither the report nor the
    exit status.  A second one cannot stop the wait for a hung domain: its worker thread sits
    in the kernel's reset, and this process cannot exit before that call returns, so giving
    up would not end the tool sooner; --timeout bounds each domain instead.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.received: int | None = None
        self.phase = "before"  # "run", "after"
        self.running: set[str] = set()
        self._pipe: tuple[int, int] | None = None
        self._saved: list[tuple[int, Any]] = []
        self._wakeup = -1

    def __enter__(self) -> _Signals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (r, w)
        self._saved = [(signal.SIGHUP, signal.signal(signal.SIGHUP, signal.SIG_IGN))]
        self._saved += [
            (s, signal.signal(s, self._handler)) for s in (signal.SIGINT, signal.SIGTERM)
        ]
        # The loop wakes on the pipe for a signal that another thread received.
        self._wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._wakeup)
        for s, h in reversed(self._saved):
            signal.signal(s, h)
        for fd in self._pipe:
            os.close(fd)
        self._pipe = None

    def _handler(self, signum: int, _frame: object) -> None:
        if self.phase == "before":
            raise _Interrupted(signal.Signals(signum).name)
        # "run": the watcher reads the signal from the wakeup pipe; "after": too late to matter

    def track(self, progress: ProgressFn | None) -> ProgressFn:
        """``progress``, also counting the domains in progress for the interruption notice."""

        def track(phase: str, domain: DomainResult, devices: Sequence[DeviceResult]) -> None:
            (self.running.add if phase == "start" else self.running.discard)(domain.id)
            if progress is not None:
                progress(phase, domain, devices)

        return track

    async def watch(
        self, scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        task_status.started()
        if self._pipe is None:
            return
        while True:
            await anyio.wait_readable(self._pipe[0])
            try:
                data = os.read(self._pipe[0], 64)
            except BlockingIOError:
                continue
            for s in data:
                if s in (signal.SIGINT, signal.SIGTERM):
                    self._interrupted(s)
                    scope.cancel()

    def _interrupted(self, s: int) -> None:
        name = signal.Signals(s).name
        left = f"{_n(len(self.running), 'domain')}" if self.running else "the release"
        bound = f"each domain gives up after --timeout {self.timeout:g} s"
        if self.received is None:
            log.warning(
                "release.interrupted",
                reason="finishing the release so that no fd stays open",
                signal=name,
            )
            again = "Ctrl-C" if s == signal.SIGINT else name
            message = (
                f"{name}: finishing {left} so that no device fd stays open ({bound}); "
                f"{again} again says why it cannot stop sooner"
            )
        else:
            message = (
                f"{name}: still finishing {left}: a reset in progress cannot be stopped (its "
                "thread waits in the kernel, and this process cannot exit before it returns); "
                + bound
            )
        self.received = s
        with contextlib.suppress(OSError):  # a terminal gone with its SSH session
            sys.stderr.write(f"\r\x1b[K{message}\n" if sys.stderr.isatty() else message + "\n")
            sys.stderr.flush()

    def run(self, main: Callable[[], Awaitable[Report]]) -> Report:
        """Run ``main`` on a new event loop, watching for signals meanwhile; the report
        says whether one arrived."""
        box: list[Report] = []

        async def run() -> None:
            async with anyio.create_task_group() as tg:
                work = anyio.CancelScope()  # the watcher goes on for a second signal
                await tg.start(self.watch, work)
                with work:
                    box.append(await main())
                tg.cancel_scope.cancel()

        self.phase = "run"
        try:
            anyio.run(run)
        finally:
            self.phase = "after"
        report = box[0]
        report.interrupted = report.interrupted or self.received is not None
        return report


_signals = _Signals(DEFAULT_TIMEOUT)
"""The signals of the CLI run in progress (main sets it)."""


def _run_addresses(args: argparse.Namespace, kernel: Kernel, addresses: list[str]) -> int:
    from vfiopy.release._manager import plan_for, release_addresses

    plan = plan_for(kernel, addresses)
    if args.dry_run:
        _print_plan(args, plan, "release")
        return _emit(args, plan_report(plan, "release"), dry_run=True)
    from vfiopy.session import Session

    session = Session(kernel, backend=_backend(args.backend))
    progress = _progress(args, plan)
    track = _signals.track(progress)
    report = _signals.run(
        lambda: release_addresses(
            session, plan, max_parallel=args.max_parallel, timeout=args.timeout, progress=track
        )
    )
    if progress is not None:
        progress.finish()
    return _emit(args, report)


def _run_pid(args: argparse.Namespace, kernel: Kernel, pid: int, sig: int) -> int:
    from vfiopy.release._takeover import guard, planned_report, release_process, take_over

    takeover: Takeover = take_over(kernel, pid)
    if not takeover.devices:
        takeover.close()
        gone = " (it exited meanwhile)" if takeover.exited_early else ""
        return _refuse(
            args,
            f"pid {pid} holds no VFIO device fds{gone}; nothing was signalled "
            "(is it the VMM? its devices may be opened by another process)",
            EXIT_FAILED,
        )
    if not args.quiet:
        _describe_takeover(takeover)
    if args.dry_run:
        report = planned_report(takeover)
        takeover.close()
        _print_plan(args, takeover.plan, "release")
        return _emit(args, report, dry_run=True)
    progress = _progress(args, takeover.plan)

    def phase(p: str) -> None:
        if progress is not None and p != "release":
            sys.stderr.write(f"\r\x1b[K{p} pid {pid}...")
            sys.stderr.flush()

    def changed(what: str, f: VfioFile) -> None:
        if not args.quiet:
            sys.stderr.write(f"pid {pid}: {what} {takeover.label(f)} ({f.link})\n")

    try:
        if args.watch:
            report = _signals.run(
                lambda: guard(
                    takeover,
                    max_parallel=args.max_parallel,
                    timeout=args.timeout,
                    progress=_signals.track(progress),
                    on_change=changed,
                )
            )
        else:
            report = _signals.run(
                lambda: release_process(
                    takeover,
                    sig=sig,
                    grace=args.grace,
                    max_parallel=args.max_parallel,
                    timeout=args.timeout,
                    progress=_signals.track(progress),
                    on_phase=phase,
                )
            )
    finally:
        takeover.close()
    if progress is not None:
        progress.finish()
    return _emit(args, report)


def _describe_takeover(t: Takeover) -> None:
    """What --pid holds and what its release will touch, before anything is signalled."""
    err = sys.stderr
    n = len(t.devices)
    err.write(
        f"pid {t.pid}: {_n(n, 'VFIO device file')}, {_n(len(t.files) - n, 'other VFIO file')}"
        f" (groups, container, iommufd); {n - len(t.unidentified)} identified\n"
    )
    for f in t.unidentified:
        what = " or ".join(f.candidates) if f.candidates else "unknown device"
        err.write(
            f"  {t.label(f)}: {what} ({f.how or 'no clue'}); released with the rest all the same\n"
        )
    for domain, others in t.also_reset().items():
        err.write(
            f"  note: the reset of {domain} also resets {', '.join(others)} (bound to vfio-pci, "
            f"not held by pid {t.pid}), as the process's own exit would\n"
        )
