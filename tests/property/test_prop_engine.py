"""The release engine (run_domains) under random faults, hangs, timeouts and cancellation:
every device reported exactly once and as its step ended, every step of the request run once
and nothing else, one start and one end per domain, no fd left open."""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from hypothesis import event, given
from hypothesis import strategies as st
from prop_helpers import budget, wait_until

from vfiopy.release._engine import DomainJob, Step, run_domains
from vfiopy.release._report import DeviceResult, DomainResult, Report, Status

OUTCOMES = ["ok", "ok", "sleep", "oserror", "runtime", "keyboard", "systemexit", "hang"]
RAISES = {
    "oserror": lambda: OSError(errno.EIO, "injected"),
    "runtime": lambda: RuntimeError("injected"),
    "keyboard": KeyboardInterrupt,
    "systemexit": lambda: SystemExit(3),
}


@dataclass
class Case:
    domains: list[list[tuple[str, int, float]]]  # per domain, per step: outcome, devices, sleep
    finally_raises: list[bool | None]  # per domain: no finally_fn, one that returns, or raises
    timeout: float | None
    max_parallel: int
    cancel_after: float | None
    backend: str


@st.composite
def cases(draw: st.DrawFn) -> Case:
    timeout = draw(st.sampled_from([None, None, 0.05, 0.15, 0.5]))
    # A step that hangs until the run is over needs a timeout to end the run.
    outcomes = OUTCOMES if timeout is not None else [o for o in OUTCOMES if o != "hang"]
    step = st.tuples(
        st.sampled_from(outcomes), st.integers(1, 2), st.sampled_from([0, 0.002, 0.02])
    )
    domains = draw(st.lists(st.lists(step, min_size=1, max_size=3), min_size=1, max_size=6))
    return Case(
        domains,
        draw(
            st.lists(
                st.sampled_from([None, False, True]), min_size=len(domains), max_size=len(domains)
            )
        ),
        timeout,
        draw(st.integers(1, len(domains) + 1)),
        draw(st.sampled_from([None, 0.0, 0.001, 0.01])),
        draw(st.sampled_from(["asyncio", "trio"])),
    )


@dataclass
class Run:
    """The jobs of a case and what their steps did."""

    case: Case
    jobs: list[DomainJob] = field(default_factory=list)
    expected: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # address: outcome
    ran: list[tuple[int, int]] = field(default_factory=list)  # (domain, step), as they ran
    finals: list[tuple[int, bool]] = field(default_factory=list)  # (domain, abandoned)
    progress: list[tuple[str, str]] = field(default_factory=list)
    release_hangs: threading.Event = field(default_factory=threading.Event)

    def build(self) -> None:
        for d, steps in enumerate(self.case.domains):
            domain = f"0000:{d:02x}"
            results_by_step: list[list[DeviceResult]] = []
            for s, (outcome, n, _sleep) in enumerate(steps):
                results = [DeviceResult(f"{domain}:{s:02x}.{i}", domain) for i in range(n)]
                results_by_step.append(results)
                for r in results:
                    self.expected[r.address] = (
                        outcome,
                        errno.EIO if outcome == "oserror" else None,
                    )
            addrs = [r.address for rs in results_by_step for r in rs]
            job = DomainJob(
                DomainResult(domain, addrs, 1),
                [
                    Step(rs, self.step_fn(d, s), reset="bus" if s == len(steps) - 1 else None)
                    for s, rs in enumerate(results_by_step)
                ],
                finally_fn=self.finally_fn(d),
            )
            self.jobs.append(job)

    def step_fn(self, d: int, s: int) -> Any:
        outcome, _n, sleep = self.case.domains[d][s]

        def fn() -> None:
            self.ran.append((d, s))
            if sleep:
                time.sleep(sleep)
            if outcome == "hang":
                self.release_hangs.wait()
            elif outcome in RAISES:
                raise RAISES[outcome]()

        return fn

    def finally_fn(self, d: int) -> Any:
        raises = self.case.finally_raises[d]
        if raises is None:
            return None

        def fn(abandoned: bool) -> None:
            self.finals.append((d, abandoned))
            if raises:
                raise OSError(errno.EBADF, "injected cleanup failure")

        return fn

    async def main(self) -> Report | None:
        box: list[Report] = []

        def progress(phase: str, domain: DomainResult, _devices: Any) -> None:
            self.progress.append((phase, domain.id))

        async def run() -> None:
            box.append(
                await run_domains(
                    "release",
                    self.jobs,
                    event="release.device",
                    max_parallel=self.case.max_parallel,
                    timeout=self.case.timeout,
                    progress=progress,
                )
            )
            await anyio.sleep(0)  # where a cancellation that arrived meanwhile lands

        if self.case.cancel_after is None:
            await run()
        else:
            with anyio.move_on_after(self.case.cancel_after):
                await run()
        return box[0] if box else None


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@given(cases())
@budget(1.0)
def test_every_device_reported_once_every_step_run_once_no_fd_left(case: Case) -> None:
    run = Run(case)
    run.build()
    before = fds()
    try:
        report = anyio.run(run.main, backend=case.backend)
        # The run cannot be cancelled half-way: it always returns its report.
        assert report is not None
        addresses = [r.address for j in run.jobs for r in j.results()]
        assert [r.address for r in report.devices] == addresses  # each once, in order
        assert [d.id for d in report.domains] == [j.domain.id for j in run.jobs]
        timed_out = {d.id for d in report.domains if d.timed_out}
        event(f"{len(timed_out)} domains timed out")
        for r in report.devices:
            outcome, err = run.expected[r.address]
            if outcome == "hang":  # still hanging: it must have been reported timed out
                assert r.domain in timed_out
            if r.status is Status.FAILED and r.errno == errno.ETIMEDOUT:
                assert r.domain in timed_out and "timed out" in (r.error or "")
            elif outcome in ("ok", "sleep"):
                assert r.status is Status.RELEASED and r.error is None, r
            else:
                assert r.status is Status.FAILED and r.errno == err and r.error, r
            assert 0 <= r.start_s <= r.end_s
        # One start and one end per domain, the start first.
        for job in run.jobs:
            d = job.domain.id
            assert run.progress.count(("start", d)) == 1 and run.progress.count(("end", d)) == 1
            assert run.progress.index(("start", d)) < run.progress.index(("end", d))
        # Only steps of the request ran, each at most once; after a hang, none of its domain.
        assert len(set(run.ran)) == len(run.ran)
        for d, s in run.ran:
            hung = [i for i, st_ in enumerate(case.domains[d]) if st_[0] == "hang"]
            assert not hung or s <= hung[0]
    finally:
        run.release_hangs.set()
    # Once the hung steps return, their workers finish the domains: every step has run once,
    # every cleanup once (told whether its domain was abandoned), and no fd is left.
    every_step = sorted((d, s) for d, steps in enumerate(case.domains) for s in range(len(steps)))
    assert wait_until(lambda: len(run.ran) == len(every_step)), (run.ran, every_step)
    assert sorted(run.ran) == every_step
    with_finally = [d for d, f in enumerate(case.finally_raises) if f is not None]
    assert wait_until(lambda: len(run.finals) == len(with_finally))
    assert sorted(d for d, _ in run.finals) == with_finally
    assert all(abandoned == report.domains[d].timed_out for d, abandoned in run.finals)
    assert wait_until(lambda: fds() <= before), fds() - before
