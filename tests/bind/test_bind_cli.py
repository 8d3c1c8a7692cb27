"""``python -m vfiopy.bind`` end to end on the simulator: exit codes, one JSON document on
every path, the simulated host's bindings kept between runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bind_helpers import AUDIO, GPU, NIC0, NIC1, NVME

from vfiopy.bind.cli import main

SIM = ["--simulate", "vm-host", "--time-scale", "0.01"]


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> tuple[int, dict]:
    code = main([*argv, *SIM, "--sim-dir", str(tmp_path), "--json"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1, out  # one JSON document, whatever happened
    return code, json.loads(lines[0])


def by_address(doc: dict) -> dict[str, dict]:
    return {d["address"]: d for d in doc["devices"]}


def test_bind_status_restore(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, doc = run(capsys, tmp_path, "bind", NIC1, NVME, GPU, AUDIO)
    assert code == 0 and doc["ok"] and doc["action"] == "bind"
    assert {a: d["status"] for a, d in by_address(doc).items()} == dict.fromkeys(
        [NIC1, NVME, GPU, AUDIO], "bound"
    )
    assert doc["state_file"] == str(tmp_path / "bind.json")
    # a new run sees the devices on vfio-pci: the simulated host kept them
    code, doc = run(capsys, tmp_path, "status")
    assert code == 0
    assert {a: d["driver_after"] for a, d in by_address(doc).items()} == dict.fromkeys(
        [NIC1, NVME, GPU, AUDIO], "vfio-pci"
    )
    code, doc = run(capsys, tmp_path, "restore")
    assert code == 0 and doc["ok"]
    assert {a: (d["driver_before"], d["driver_after"]) for a, d in by_address(doc).items()} == {
        NIC1: ("vfio-pci", "e1000e"),
        NVME: ("vfio-pci", "nvme"),
        GPU: ("vfio-pci", "nvidia"),
        AUDIO: ("vfio-pci", "snd_hda_intel"),
    }
    # the state file is gone: a second restore has nothing to go on
    code, doc = run(capsys, tmp_path, "restore")
    assert code == 1 and not doc["ok"] and "no state file" in doc["error"]


def test_refusal_is_exit_1_and_touches_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, doc = run(capsys, tmp_path, "bind", GPU)  # its audio function stays on the host
    assert code == 1 and not doc["ok"]
    assert by_address(doc)[GPU]["status"] == "refused"
    code, doc = run(capsys, tmp_path, "status")
    assert doc["devices"] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["bind", "3b:00"],  # malformed
        ["bind", "0000:3b:00.0"],  # no such device
        ["bind"],  # nothing asked
        ["restore", "--driver", "no_such_driver", NIC1],  # no such driver
        ["restore", "--driver", "e1000e"],  # --driver without addresses
        ["status", NIC1],
        ["frob"],
        ["bind", NIC0, "--max-parallel", "0"],
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    code, doc = run(capsys, tmp_path, *argv)
    assert code == 2 and doc["ok"] is False and doc["error"]
    assert not os.path.exists(tmp_path / "bind.json")


def test_dry_run_changes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, doc = run(capsys, tmp_path, "bind", NIC1, "--dry-run")
    assert code == 0 and doc["dry_run"] and by_address(doc)[NIC1]["status"] == "planned"
    code, doc = run(capsys, tmp_path, "bind", NIC1)
    assert by_address(doc)[NIC1]["driver_before"] == "e1000e"  # still on its driver


def test_console_script_and_module(tmp_path: Path) -> None:
    """``python -m vfiopy.bind``: the one-line error and exit status of a real process."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfiopy.bind",
            "bind",
            "0000:3b:00.0",
            *SIM,
            "--sim-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "0000:3b:00.0" in errors[0] and "ENODEV" in errors[0]
