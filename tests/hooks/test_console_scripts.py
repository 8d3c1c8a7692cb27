"""The console scripts reach the CLIs and pass their exit status on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

SCRIPTS = {
    "vfiopy-release": "vfiopy.release.__main__:run",
    "vfiopy-bench": "vfiopy.bench._cli:main",
}


def installed(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return path


def test_entry_points_declared() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    if "vfiopy-release" not in found:
        pytest.skip("vfiopy's metadata is not installed (pip install -e .)")
    assert {name: found[name] for name in SCRIPTS} == SCRIPTS


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--help"], 0),
        (["--no-such-option"], 2),
        (["--watch"], 2),  # --watch needs --pid
        # Refused: the domain holds 03:00.1 too, which was not asked for.
        (["--simulate", "gpus:1", "--time-scale", "0.01", "03:00.0"], 1),
        (["--simulate", "gpus:1", "--time-scale", "0.01", "03:00.0", "03:00.1"], 0),
    ],
)
def test_vfiopy_release_status(argv: list[str], status: int) -> None:
    r = subprocess.run([installed("vfiopy-release"), *argv], capture_output=True, timeout=120)
    assert r.returncode == status, r.stderr


@pytest.mark.parametrize(("argv", "status"), [(["--help"], 0), (["--no-such-option"], 2)])
def test_vfiopy_bench_status(argv: list[str], status: int) -> None:
    r = subprocess.run([installed("vfiopy-bench"), *argv], capture_output=True, timeout=120)
    assert r.returncode == status, r.stderr
