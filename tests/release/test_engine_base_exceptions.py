"""The release engine ends, and reports every device, when a step raises a BaseException.

run_domains shields itself from cancellation, so a run that never ends cannot be
stopped from outside: each run here goes on a thread of its own, and a thread
still alive after HANG seconds fails the test instead of hanging the suite.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest

from vfiopy.release._engine import DomainJob, Step, run_domains
from vfiopy.release._report import DeviceResult, DomainResult, Report, Status

HANG = 30  # seconds before a run that never ends fails the test


def _job(name: str, *fns: Callable[[], object]) -> DomainJob:
    results = [DeviceResult(f"{name}.{i}", name) for i in range(len(fns))]
    steps = [Step([r], fn) for r, fn in zip(results, fns, strict=True)]
    return DomainJob(DomainResult(name, [r.address for r in results], 1), steps)


def _run(backend: str, jobs: list[DomainJob], max_parallel: int) -> tuple[Report, list[str]]:
    """Run ``jobs`` on a thread of their own; the report and the progress notes."""
    notes: list[str] = []
    out: list[Report] = []

    def progress(phase: str, domain: DomainResult, devices: object) -> None:
        notes.append(f"{phase} {domain.id}")

    async def main() -> None:
        out.append(
            await run_domains(
                "release", jobs, event="test", max_parallel=max_parallel, progress=progress
            )
        )

    t = threading.Thread(target=anyio.run, args=(main,), kwargs={"backend": backend}, daemon=True)
    t.start()
    t.join(HANG)
    assert not t.is_alive(), f"run_domains never ended; progress so far: {notes}"
    return out[0], notes


def _raise(exc: BaseException) -> Callable[[], object]:
    def fn() -> object:
        raise exc

    return fn


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("max_parallel", [1, 8], ids=["one-worker", "worker-each"])
def test_base_exceptions_in_steps_fail_their_devices_and_the_run_ends(
    backend: str, max_parallel: int
) -> None:
    ran: list[str] = []
    jobs = [
        _job("a", _raise(KeyboardInterrupt()), lambda: ran.append("a.1")),
        _job("b", _raise(SystemExit(3))),
        _job("c", lambda: ran.append("c.0")),
    ]
    report, notes = _run(backend, jobs, max_parallel)
    status = {d.address: (d.status, d.error) for d in report.devices}
    assert status == {
        "a.0": (Status.FAILED, "KeyboardInterrupt"),
        "a.1": (Status.RELEASED, None),
        "b.0": (Status.FAILED, "3"),
        "c.0": (Status.RELEASED, None),
    }
    assert sorted(ran) == ["a.1", "c.0"]  # the steps after the one that raised still ran
    assert sorted(n for n in notes if n.startswith("end")) == ["end a", "end b", "end c"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_base_exception_in_the_cleanup_still_ends_the_domain(backend: str) -> None:
    job = _job("a", lambda: None)
    job.finally_fn = _raise(KeyboardInterrupt())
    later = _job("b", lambda: None)
    report, notes = _run(backend, [job, later], 1)
    assert [d.status for d in report.devices] == [Status.RELEASED, Status.RELEASED]
    assert notes.count("end a") == 1 and notes.count("end b") == 1
