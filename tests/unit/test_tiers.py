"""The test tiers the README gives: `-m "not vm"` is the quick tier and leaves out every test
under tests/vm (each boots QEMU), and the `vm` marker is registered."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def collect(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: nothing selected
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_vm_marker_is_registered() -> None:
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in ini["addopts"]
    assert any(m.split(":")[0] == "vm" for m in ini["markers"])


def test_every_test_under_tests_vm_is_in_the_vm_tier() -> None:
    assert collect("tests/vm"), "no test under tests/vm"
    assert collect("-m", "not vm", "tests/vm") == []
