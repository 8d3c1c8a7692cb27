"""The modes of the original report, plus vfiopy's, as timed functions.

Teardown (N devices held open, then released):
  ``exit``    (e) one process holds every device and exits: the kernel releases
              its files one after another on the exiting task;
  ``close``   (c) a loop closing one device after another;
  ``threads`` (t) one thread per device fd, all closing at once;
  ``procs``   (p) one process per IOMMU group, all exiting at once;
  ``vfiopy``  the release manager: concurrent per reset domain, planning included;
  ``vfiopy-planned`` the same with the plan made beforehand (untimed), as a VMM
              that planned at start-up would call it: what is left is the
              concurrent release itself.
Bring-up (nothing open, then N devices opened):
  ``open``    a loop opening one device after another;
  ``acquire`` the release manager's concurrent acquire, planning included;
  ``acquire-planned`` the same with the plan made beforehand.

Planning reads sysfs and /proc for every device; on the simulator those reads
are Python, so the ``-planned`` modes show how much of a run that is.

Each mode gets a fresh :class:`System`, does its untimed setup, and returns the
timed window; the sweep turns that into a :class:`RunResult`.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from vfiopy.bench import _vfiopy
from vfiopy.bench._modenames import HOST_MODES as HOST_NAMES
from vfiopy.bench._modenames import SWEEP_MODES
from vfiopy.bench._results import BRINGUP, TEARDOWN
from vfiopy.bench._target import Group, System

_SETUP_THREADS = 64


@dataclass(slots=True)
class Window:
    """The timed part of a run: wall and CPU seconds, and the system clock's span."""

    wall_s: float
    cpu_s: float
    start: float
    end: float


def _cpu_now() -> float:
    # Children count too: in --real, modes exit and procs spend their CPU there.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime


class _Timer:
    def __init__(self, system: System) -> None:
        self.system = system

    def __enter__(self) -> _Timer:
        self.cpu0 = _cpu_now()
        self.mark0 = self.system.now()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.mark1 = self.system.now()
        self.cpu = _cpu_now() - self.cpu0

    def window(self) -> Window:
        return Window(self.wall, self.cpu, self.mark0, self.mark1)


def _all_devices(groups: Sequence[Group]) -> list[str]:
    return [d for g in groups for d in g.devices]


def _run_threads(fns: Sequence[Callable[[], None]]) -> None:
    """Run every fn on its own thread, released together; re-raise the first failure."""
    errors: list[BaseException] = []
    gate = threading.Barrier(len(fns) + 1) if fns else None

    def body(fn: Callable[[], None]) -> None:
        assert gate is not None
        gate.wait()
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    if gate is not None:
        gate.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --- teardown --------------------------------------------------------------------


def mode_exit(system: System) -> Window:
    child = system.start_child("bench-exit", system.groups)
    with _Timer(system) as t:
        child.exit()
    return t.window()


def mode_procs(system: System) -> Window:
    # Started side by side: each open resets its device, and 2048 VFs in turn
    # would spend minutes in untimed setup.
    from concurrent.futures import ThreadPoolExecutor  # here: it imports logging

    with ThreadPoolExecutor(max_workers=_SETUP_THREADS) as pool:
        children = list(
            pool.map(lambda g: system.start_child(f"bench-procs-{g.group}", [g]), system.groups)
        )
    with _Timer(system) as t:
        # Every process exits at once: their releases run on separate tasks.
        _run_threads([c.exit for c in children])
    return t.window()


def mode_close(system: System) -> Window:
    held = _vfiopy.open_all(system.kernel, _all_devices(system.groups))
    with _Timer(system) as t:
        for dev in held.devices:
            held.close_device(dev)
        held.close()
    return t.window()


def mode_threads(system: System) -> Window:
    held = _vfiopy.open_all(system.kernel, _all_devices(system.groups))
    with _Timer(system) as t:
        _run_threads([partial(held.close_device, dev) for dev in held.devices])
        held.close()
    return t.window()


def mode_vfiopy(system: System) -> Window:
    held = _vfiopy.open_all(system.kernel, _all_devices(system.groups))
    t = _Timer(system)
    _vfiopy.release(held, t)
    return t.window()


def mode_vfiopy_planned(system: System) -> Window:
    addresses = _all_devices(system.groups)
    held = _vfiopy.open_all(system.kernel, addresses)
    planned = _vfiopy.plan(system.kernel, addresses)
    t = _Timer(system)
    _vfiopy.release(held, t, planned)
    return t.window()


# --- bring-up ----------------------------------------------------------------------


def mode_open(system: System) -> Window:
    with _Timer(system) as t:
        held = _vfiopy.open_sequential(system.kernel, _all_devices(system.groups))
    system.leave_open(lambda: _vfiopy.release(held))
    return t.window()


def mode_acquire(system: System) -> Window:
    t = _Timer(system)
    held = _vfiopy.acquire(system.kernel, _all_devices(system.groups), t)
    system.leave_open(lambda: _vfiopy.release(held))
    return t.window()


def mode_acquire_planned(system: System) -> Window:
    addresses = _all_devices(system.groups)
    planned = _vfiopy.plan(system.kernel, addresses)
    t = _Timer(system)
    held = _vfiopy.acquire(system.kernel, addresses, t, planned)
    system.leave_open(lambda: _vfiopy.release(held))
    return t.window()


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    letter: str
    phase: str
    run: Callable[[System], Window]
    about: str
    # The modelled lower bound, unscaled seconds, for modes not bounded by resets
    bound: Callable[[System], float] | None = None


def _mode(
    name: str,
    phase: str,
    run: Callable[[System], Window],
    bound: Callable[[System], float] | None = None,
    names: dict[str, tuple[str, str]] = SWEEP_MODES,
) -> Mode:
    letter, about = names[name]
    return Mode(name, letter, phase, run, about, bound)


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        _mode("exit", TEARDOWN, mode_exit),
        _mode("close", TEARDOWN, mode_close),
        _mode("threads", TEARDOWN, mode_threads),
        _mode("procs", TEARDOWN, mode_procs),
        _mode("vfiopy", TEARDOWN, mode_vfiopy),
        _mode("vfiopy-planned", TEARDOWN, mode_vfiopy_planned),
        _mode("open", BRINGUP, mode_open),
        _mode("acquire", BRINGUP, mode_acquire),
        _mode("acquire-planned", BRINGUP, mode_acquire_planned),
    )
}


# Host-driver modes (simulator only, vfiopy.bench._hostmodes): asked for by name, never
# in the default sweep of the release benchmark.
def _host_modes() -> dict[str, Mode]:
    from vfiopy.bench import _bringup as b
    from vfiopy.bench import _hostmodes as h

    host = HOST_NAMES
    return {
        m.name: m
        for m in (
            _mode("restore-parallel", h.HOST, h.mode_restore_parallel, h.bound_parallel, host),
            _mode("restore-serial", h.HOST, h.mode_restore_serial, h.bound_serial, host),
            _mode("bringup", BRINGUP, b.mode_bringup, b.bound_vfiopy, host),
            _mode("bringup-naive", BRINGUP, b.mode_bringup_naive, b.bound_naive, host),
        )
    }


HOST_MODES = _host_modes()
_BY_LETTER = {m.letter: m for m in (*MODES.values(), *HOST_MODES.values())}


def parse_mode(text: str) -> Mode:
    """A mode by name or by its letter from the original report (e, c, t, p)."""
    m = MODES.get(text) or HOST_MODES.get(text) or _BY_LETTER.get(text)
    if m is None:
        names = ", ".join(f"{m.name} ({m.letter})" for m in (*MODES.values(), *HOST_MODES.values()))
        raise ValueError(f"unknown mode {text!r}; modes: {names}")
    return m
