"""The benchmark's pieces that need no simulator: overlap, bound, progress, child."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from vfiopy.bench import _child, _progress
from vfiopy.bench._results import RunResult
from vfiopy.bench._target import Costs, ResetEvent, max_overlap
from vfiopy.kmodel import parse_release


def ev(start: float, end: float) -> ResetEvent:
    return ResetEvent("bus", "0000:01:00.0", "bus:0000:01", start, end)


def test_max_overlap() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([ev(0, 1), ev(1, 2), ev(2, 3)]) == 1  # touching is not overlapping
    assert max_overlap([ev(0, 2), ev(1, 3), ev(1.5, 1.6)]) == 3


def test_lower_bound_is_the_longest_set_or_all_of_them_under_one_lock() -> None:
    costs = Costs({"a": 1.0, "b": 0.5}, {}, 2, 0)
    assert costs.lower_bound(costs.teardown, serialised=False) == 1.0
    assert costs.lower_bound(costs.teardown, serialised=True) == 1.5
    assert costs.lower_bound({}, serialised=False) == 0.0


def test_kernel_releases() -> None:
    assert parse_release("6.1.0-18-amd64") == (6, 1)
    assert parse_release("4.19.0-rc1") == (4, 19)
    assert parse_release("6.18.44-fc-v657\n") == (6, 18)
    assert parse_release("linux") is None


def test_ratio_and_target() -> None:
    r = RunResult("vfiopy", "teardown", 4, "devset", "pre-6.3", 1.0, "gpus:4")
    r.wall_s, r.lower_bound_s, r.target_s = 1.05, 1.0, 1.12
    assert r.ratio == pytest.approx(1.05)
    assert r.meets_target is True
    r.lower_bound_s = 0.0
    assert r.ratio is None and r.to_json()["ratio"] is None


def test_progress_is_silent_off_a_tty() -> None:
    stream = io.StringIO()
    with _progress.Progress(3, stream) as p:
        p.start("run")
        p.advance()
    assert stream.getvalue() == ""


def test_progress_draws_and_clears_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_progress, "_SHOW_AFTER_S", 0.0)
    stream = io.StringIO()
    with _progress.Progress(2, stream, enabled=True) as p:
        p.start("vfiopy N=4")
    text = stream.getvalue()
    assert "[1/2] vfiopy N=4" in text
    assert text.endswith("\r")  # the line is wiped at the end


def test_child_reports_an_open_failure() -> None:
    # A plain python3 runs the child; with no VFIO here (or no group 99999) it must
    # answer "error ..." instead of "ready", and exit non-zero.
    spec = {
        "ioctls": {"GROUP_SET_CONTAINER": 0, "SET_IOMMU": 0, "GROUP_GET_DEVICE_FD": 0},
        "iommu_type": 3,
        "groups": [{"group": "99999", "devices": ["0000:ff:1f.7"]}],
    }
    res = subprocess.run(
        [sys.executable, _child.__file__, json.dumps(spec)],
        input="",
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert res.returncode == 1
    assert res.stdout.startswith("error E")


def test_real_devices_have_no_target() -> None:
    from vfiopy.bench._modes import MODES
    from vfiopy.bench._sweep import target_for

    vfiopy_mode = MODES["vfiopy"]
    assert target_for(vfiopy_mode, "real", 1.0) is None
    assert target_for(vfiopy_mode, "gpus:4", 1.0) is not None
