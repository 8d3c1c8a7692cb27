"""Run every (kernel model, reset model, N, mode) combination and collect the results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vfiopy._log import get_logger
from vfiopy.bench import _vfiopy
from vfiopy.bench._hostmodes import HOST
from vfiopy.bench._modes import Mode
from vfiopy.bench._progress import Progress
from vfiopy.bench._results import BRINGUP, TEARDOWN, RunResult
from vfiopy.bench._target import System, max_overlap

log = get_logger("vfiopy.bench")

SystemFactory = Callable[[int, str, str, float], System]
"""``(n_devices, kernel_model, reset_model, time_scale)`` -> a fresh system."""

# The targets.  The 20 ms is absolute: Python's overhead does not
# shrink with the time scale.
TEARDOWN_FACTOR = 1.10
TEARDOWN_SLACK_S = 0.020
VFS_FACTOR = 1.5
ACQUIRE_FACTOR = 1.10
# Restoring host drivers: about one probe, plus the checks and a thread per device.
RESTORE_FACTOR = 1.25
CPU_TARGET_MS = 0.5


@dataclass(frozen=True, slots=True)
class Point:
    n_devices: int
    kernel_model: str
    reset_model: str
    mode: Mode


def target_for(mode: Mode, topology: str, lower_bound_s: float) -> float | None:
    """The wall time vfiopy's own modes aim at; ``None`` for the baselines.

    Real devices have no target: their bound uses nominal reset costs, not
    what the hardware does, so a ratio to it would measure the guess.
    """
    if topology == "real":
        return None
    if mode.name in ("vfiopy", "vfiopy-planned"):
        if topology.startswith("vfs:"):
            # Thousands of single-VF domains: the bound is one FLR, and thread
            # start-up for each domain is the cost; the issue allows 1.5x.
            return VFS_FACTOR * lower_bound_s
        return TEARDOWN_FACTOR * lower_bound_s + TEARDOWN_SLACK_S
    if mode.name == "restore-parallel":
        return RESTORE_FACTOR * lower_bound_s + TEARDOWN_SLACK_S
    if mode.name in ("acquire", "acquire-planned") and lower_bound_s > 0:
        return ACQUIRE_FACTOR * lower_bound_s
    return None


def run_point(make: SystemFactory, point: Point, time_scale: float) -> RunResult:
    """One measurement on a fresh system; a failure is recorded, not raised."""
    _vfiopy.load()  # what the modes call, imported before any timed window
    mode = point.mode
    try:
        system = make(point.n_devices, point.kernel_model, point.reset_model, time_scale)
    except Exception as exc:
        # The first system was built before the sweep, so this is a fault, not usage.
        error = f"{type(exc).__name__}: {exc}"
        log.error("run setup failed", mode=mode.name, n=point.n_devices, error=error)
        return RunResult(
            mode.name,
            mode.phase,
            point.n_devices,
            point.kernel_model,
            point.reset_model,
            time_scale,
            topology="?",
            ok=False,
            error=error,
        )
    costs = system.costs
    phase_costs = costs.teardown if mode.phase == TEARDOWN else costs.bringup
    if mode.bound is not None:  # host-driver modes: probes, not resets
        bound = mode.bound(system) * time_scale
    else:
        bound = costs.lower_bound(phase_costs, system.serialised) * time_scale
    result = RunResult(
        mode=mode.name,
        phase=mode.phase,
        n_devices=point.n_devices,
        kernel_model=system.kernel_model,
        reset_model=system.reset_model,
        time_scale=time_scale,
        topology=system.topology,
        n_functions=sum(len(g.devices) for g in system.groups),
        n_domains=len({g.domain for g in system.groups}),
        expected_resets=(
            0
            if mode.phase == HOST
            else costs.teardown_resets
            if mode.phase == TEARDOWN
            else costs.bringup_resets
        ),
        lower_bound_s=bound,
        target_s=target_for(mode, system.topology, bound),
    )
    try:
        window = mode.run(system)
    except Exception as exc:
        result.ok = False
        result.error = f"{type(exc).__name__}: {exc}"
        log.error("run failed", mode=mode.name, n=point.n_devices, error=result.error)
        system.discard()
        return result
    result.wall_s = window.wall_s
    result.cpu_s = window.cpu_s
    events = system.resets()
    if events is None:
        result.resets = -1
    else:
        # Resets that started inside the timed window belong to this run; the
        # setup's open resets ended before it.
        mine = [e for e in events if window.start <= e.start <= window.end]
        result.resets = len(mine)
        result.max_concurrent_resets = max_overlap(mine)
    system.discard()
    return result


def plan(
    devices: Sequence[int],
    kernel_models: Sequence[str],
    reset_models: Sequence[str],
    modes: Sequence[Mode],
) -> list[Point]:
    return [
        Point(n, k, r, m)
        for k in kernel_models
        for r in reset_models
        for n in devices
        for m in modes
    ]


def run_sweep(
    make: SystemFactory,
    points: Sequence[Point],
    time_scale: float,
    progress: Progress | None = None,
) -> list[RunResult]:
    out = []
    for p in points:
        if progress is not None:
            progress.start(f"{p.mode.name} N={p.n_devices} {p.kernel_model} {p.reset_model}")
        out.append(run_point(make, p, time_scale))
        if progress is not None:
            progress.advance()
    return out


__all__ = ["BRINGUP", "TEARDOWN", "Point", "plan", "run_point", "run_sweep", "target_for"]
