"""The bench's host-driver modes: restore-parallel against restore-serial, on the simulator."""

from __future__ import annotations

import itertools

import pytest

from vfiopy.bench._modes import parse_mode
from vfiopy.bench._sim import SimFactory
from vfiopy.bench._sweep import Point, run_point

N = 6
SCALE = 0.5  # nvme's 0.4 s probe: 200 ms, far beyond a thread's start-up


def _run(name: str) -> tuple[object, list[tuple[float, float]]]:
    systems = []
    factory = SimFactory("nvme:16")

    def make(n: int, k: str, r: str, scale: float) -> object:
        s = factory(n, k, r, scale)
        systems.append(s)
        return s

    result = run_point(make, Point(N, "devset", "pre-6.3", parse_mode(name)), SCALE)  # type: ignore[arg-type]
    machine = systems[0].machine  # type: ignore[attr-defined]
    probes = sorted((e.start, e.end) for e in machine.events("probe"))
    return result, probes


def test_restore_parallel_overlaps_the_probes() -> None:
    result, probes = _run("restore-parallel")
    assert result.ok, result.error  # type: ignore[attr-defined]
    assert result.phase == "host" and result.resets == 0 and result.expected_resets == 0  # type: ignore[attr-defined]
    assert result.n_functions == N  # type: ignore[attr-defined]
    assert len(probes) == N  # one nvme probe per device
    first_end = min(e for _, e in probes)
    assert sum(s < first_end for s, _ in probes) >= 2


def test_restore_serial_one_at_a_time_and_the_bounds() -> None:
    serial, probes = _run("restore-serial")
    parallel, _ = _run("r")
    assert serial.ok and len(probes) == N  # type: ignore[attr-defined]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(probes))
    # the model's bounds: the sum of the probes against the longest
    assert serial.lower_bound_s == pytest.approx(N * parallel.lower_bound_s)  # type: ignore[attr-defined]


def test_host_modes_refuse_real_systems() -> None:
    mode = parse_mode("restore-parallel")

    class Real:
        groups = ()

    with pytest.raises(ValueError, match="simulator only"):
        mode.run(Real())  # type: ignore[arg-type]
