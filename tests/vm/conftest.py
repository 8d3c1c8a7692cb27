"""The QEMU guest tier: one guest (tools/vmtest) booted per test session.

Every test here runs commands in the session's booted guest through the `guest` fixture,
`guest.run(...)` / `guest.run_python(...)` (a fresh guest only after a command hung or killed
the last; see Guests); each command starts only after everything the previous one left
running was killed, so device files are released between tests. Tests
skip, with the reason, where QEMU, the kernel image or busybox-static are missing (install
them with tools/vmtest/install-deps.sh).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "vmtest"))

import vmtest  # noqa: E402

from vfiopy import Sysfs  # noqa: E402
from vfiopy.kmodel import KernelModel, KernelVersion, Reset, parse_release  # noqa: E402


@pytest.fixture(scope="session")
def vm_available() -> None:
    """Skip with a clear reason where the guest cannot run."""
    missing = vmtest.missing_requirements()
    if missing:
        pytest.skip("QEMU guest tier unavailable: " + "; ".join(missing))


HUNG_GUESTS: list[str] = []
"""Every guest that hung or died under a command this session, with its console tail;
printed in pytest's summary, so a retried command is never silent."""


class Guests:
    """The session's guest, rebooted when a command hangs it or kills it.

    A command that hangs the guest (QEMU under TCG has done so, rarely and not reproducibly,
    with every vCPU silent) runs once more on a fresh guest, and the hang is reported in the
    test summary with the console; so is a boot that hangs or dies. Only the guest's death is
    retried: a command that fails, a guest whose devices are wrong, or a second hang of the
    same command fails the test. After MAX_BOOTS boots the tier stops booting.
    """

    MAX_BOOTS = 3

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._current: vmtest.Guest | None = None
        self.boots = 0

    @property
    def layout(self) -> vmtest.Layout:
        return self.get().layout

    def get(self) -> vmtest.Guest:
        """A booted, usable guest; its results_dir is shared with the host (same path)."""
        current = self._current
        if current is not None and current.usable:
            return current
        if current is not None:
            current.close(timeout=0)
            self._current = None
        while True:
            if self.boots >= self.MAX_BOOTS:
                raise vmtest.VmError(
                    f"not booting a guest again after {self.boots} boots; "
                    + "; ".join(h.splitlines()[0] for h in HUNG_GUESTS)
                )
            self.boots += 1
            booted = vmtest.Guest(results_dir=self._tmp.mktemp("vmtest"))
            try:
                booted.start()
            except vmtest.GuestSetupError:
                booted.close(timeout=0)
                raise  # the devices are not as the layout says: booting again will not help
            except vmtest.VmError as exc:
                booted.close(timeout=0)
                HUNG_GUESTS.append(f"{exc}\n(booting another guest)")
                continue  # a boot that hung or died, like a command that did
            except BaseException:
                booted.close(timeout=0)
                raise
            self._current = booted
            return booted

    def run(self, command: Sequence[str], **kwargs: Any) -> vmtest.CommandResult:
        return self._retrying(lambda g: g.run(command, **kwargs))

    def run_python(self, code: str, *args: str, **kwargs: Any) -> vmtest.CommandResult:
        return self._retrying(lambda g: g.run_python(code, *args, **kwargs))

    def _retrying(self, fn: Callable[[vmtest.Guest], vmtest.CommandResult]) -> vmtest.CommandResult:
        first = self.get()
        try:
            return fn(first)
        except vmtest.VmError as exc:
            if first.usable:
                raise  # the command failed; the guest is fine
            HUNG_GUESTS.append(f"{exc}\n(the command was run again on a fresh guest)")
        return fn(self.get())

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/vm is in the `vm` tier (it boots QEMU), whether or not its module
    says so; tryfirst, so that `-m "not vm"` (the quick tier) sees the marker."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(pytest.mark.vm)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for text in HUNG_GUESTS:
        terminalreporter.write_sep("=", "a QEMU guest hung or died", yellow=True)
        terminalreporter.write_line(text)


@pytest.fixture(scope="session")
def guests(vm_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guests]:
    pool = Guests(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def guest(guests: Guests) -> Guests:
    """The session's guests: run(), run_python() and layout, as on one vmtest.Guest."""
    return guests


@pytest.fixture(scope="session")
def layout(guests: Guests) -> vmtest.Layout:
    return guests.layout


def guest_env() -> dict[str, str]:
    """PYTHONPATH for /usr/bin/python3 in the guest: the source tree, tools/vmtest, site-packages."""
    return {"PYTHONPATH": vmtest.guest_pythonpath(REPO, REPO / "tools" / "vmtest")}


@pytest.fixture(scope="session")
def conformance_results(guests: Guests) -> dict[str, Any]:
    """Every conformance scenario on the real kernel: one guest command, one JSON document."""
    result = guests.run(
        [vmtest.GUEST_PYTHON, str(REPO / "tests" / "conformance" / "scenarios.py"), "--json"],
        cwd=REPO,
        env=guest_env(),
        timeout=300,
        check=True,
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return dict(doc["results"])


def booted_version() -> KernelVersion:
    """MAJOR.MINOR of the kernel the guest boots (the host's, or $VFIOPY_VMTEST_KERNEL)."""
    version = parse_release(vmtest.find_kernel().release)
    assert version is not None, vmtest.find_kernel()
    return version


@pytest.fixture(scope="session")
def model(vm_available: None) -> Iterator[KernelModel]:
    """vfiopy's kernel model of the booted kernel's version over the guest's simulated twin
    (the qemu-vmtest topology): what the tests expect of resets comes from it, so a kernel
    whose rules differ (no reset_method before 5.15, ...) is asserted against its own rules."""
    from mock_vfio import Machine, load_topology

    version = booted_version()
    machine = Machine(load_topology("qemu-vmtest"), time_scale=0.0, kernel_version=version)
    try:
        yield KernelModel(Sysfs(machine.spawn(name="model")), version)
    finally:
        machine.close()


def _counts(resets: Sequence[tuple[Reset, bool]], addr: str) -> dict[str, int]:
    """guest_trace's view of ``resets`` (each with whether it is a function reset) on ``addr``:
    ``function`` counts its function resets (``__pci_reset_function_locked``, any method),
    ``bus`` the bus or slot resets hitting it, run by a function reset or by its device set."""
    mine = [(r, fn) for r, fn in resets if addr in {str(t) for t in r.targets}]
    return {
        "bus": sum(r.method in ("bus", "slot") for r, _ in mine),
        "function": sum(fn for _, fn in mine),
    }


def open_counts(model: KernelModel, addr: str) -> dict[str, int]:
    """The resets the first open of ``addr`` runs."""
    reset = model.open_reset(addr)
    return _counts([(reset, True)] if reset else [], addr)


def close_counts(
    model: KernelModel, closing: Sequence[str], addr: str, steps: slice = slice(None)
) -> dict[str, int]:
    """The resets ``addr`` sees while ``closing`` (all open) are closed in this order; only
    those of the closes in ``steps`` when given (``slice(1, 2)``: the second close)."""
    resets: list[tuple[Reset, bool]] = []
    pairs = list(zip(closing, model.close_steps(closing), strict=True))
    for closed, (_, step) in pairs[steps]:
        has_function_reset = model.function_reset(closed) is not None
        resets += [(r, has_function_reset and i == 0) for i, r in enumerate(step)]
    return _counts(resets, addr)


def summed(*counts: dict[str, int]) -> dict[str, int]:
    return {k: sum(c[k] for c in counts) for k in ("bus", "function")}


def _secondary_bus(method: str) -> str:
    # A slot reset is the hotplug port's secondary bus reset: the guest's root ports have
    # hotplug slots (pciehp resets through them), the simulated twin's have none.
    return "bus" if method == "slot" else method


def predicted_resets(
    model: KernelModel, sets: Sequence[Sequence[str]]
) -> list[tuple[str, list[str]]]:
    """(method, devices it hits) of each reset the model says closing every device of each of
    ``sets`` runs (those of a set closed together, the others idle), sorted."""
    out = []
    for members in sets:
        for _, step in model.close_steps(members):
            out += [(_secondary_bus(r.method), sorted(str(t) for t in r.targets)) for r in step]
    return sorted(out)


def performed_resets(events: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(method, devices it hit) of each reset event guest_vmm.resets() listed, sorted."""
    return sorted((_secondary_bus(e["via"] or e["kind"]), sorted(e["affected"])) for e in events)
