"""The library calls the modes time: sessions, sequential open, and the release manager.

Kept in one module so the modes read as what they measure, and so the one
place that knows the object model's and the release manager's entry points is
small.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from vfiopy import release as _release

if TYPE_CHECKING:
    from vfiopy.device import Device
    from vfiopy.kernel import Kernel
    from vfiopy.session import Session

# Setup threads: each sleeps in a simulated or real reset, so many are cheap.
_SETUP_THREADS = 256


def load() -> None:
    """Import the object model and the release manager; each run calls this before its timed
    window, so none times an import.  The benchmark's command line does not import them:
    ``--help`` and ``--startup`` start without."""
    for module in ("vfiopy.session", "vfiopy.release._manager"):
        importlib.import_module(module)


def _session(kernel: Kernel) -> Session:
    from vfiopy.session import Session

    return Session(kernel)


@dataclass(slots=True)
class Held:
    """Devices open in one session of the benchmark process (or of a simulated child)."""

    session: Session
    devices: list[Device] = field(default_factory=list)

    def close_device(self, dev: Device) -> None:
        self.session.close_device(dev)

    def close(self) -> None:
        """Close what the session still holds (groups, container or iommufd)."""
        self.session.close()


def open_sequential(kernel: Kernel, addresses: Sequence[str]) -> Held:
    """Open one device after another, as a plain VMM start-up does."""
    held = Held(_session(kernel))
    try:
        for a in addresses:
            held.devices.append(held.session.open_device(a))
    except BaseException:
        held.session.close()
        raise
    return held


# The timer is entered inside the event loop: a caller of the async API already
# runs one, so starting a loop is not part of what the release manager costs.


def plan(kernel: Kernel, addresses: Sequence[str]) -> _release.Plan:
    """The release manager's plan (reset domains, safety checks): sysfs and /proc reads."""
    return _release.plan_for(kernel, list(addresses))


def acquire(
    kernel: Kernel,
    addresses: Sequence[str],
    timer: AbstractContextManager[object] | None = None,
    planned: _release.Plan | None = None,
) -> Held:
    """The release manager's concurrent acquire (one worker per reset domain)."""
    session = _session(kernel)

    async def main() -> list[Device]:
        with timer or nullcontext():
            return await _release.acquire(session, list(addresses), plan=planned)

    try:
        devices = anyio.run(main)
    except BaseException:
        session.close()
        raise
    return Held(session, list(devices))


def release(
    held: Held,
    timer: AbstractContextManager[object] | None = None,
    planned: _release.Plan | None = None,
) -> None:
    """The release manager's concurrent release; raises when any device failed."""

    async def main() -> _release.Report:
        with timer or nullcontext():
            return await _release.release(held.session, list(held.devices), plan=planned)

    report = anyio.run(main)
    if not report.ok:
        first = report.failed()[0]
        raise RuntimeError(
            f"release failed for {len(report.failed())} devices, first {first.address}: "
            f"{first.error}"
        )


def open_all(kernel: Kernel, addresses: Sequence[str]) -> Held:
    """Untimed setup for a teardown mode: one thread per IOMMU group, all at once.

    Not the release manager's acquire, so a teardown baseline never depends on
    (or pays for) vfiopy's planning; the session is safe to open from many
    threads, and devices of one group open in turn on their group's thread.
    """
    from concurrent.futures import ThreadPoolExecutor  # here: it imports logging

    session = _session(kernel)
    by_group: dict[int, list[str]] = {}
    for a in addresses:
        by_group.setdefault(session.sysfs.iommu_group(a), []).append(a)
    opened: dict[str, Device] = {}

    def open_group(addrs: list[str]) -> None:
        for a in addrs:
            opened[a] = session.open_device(a)

    try:
        with ThreadPoolExecutor(max_workers=min(_SETUP_THREADS, len(by_group) or 1)) as pool:
            for f in [pool.submit(open_group, addrs) for addrs in by_group.values()]:
                f.result()
    except BaseException:
        session.close()
        raise
    return Held(session, [opened[a] for a in addresses])
