"""contrib/vfiopy-guard@.service: it parses, and its ExecStart finds the VMM's pid."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from hook_stubs import UNIT, Host


def unit_sections() -> configparser.RawConfigParser:
    # systemd allows a key more than once (Environment=): keep the last, as a check suffices.
    parser = configparser.RawConfigParser(
        strict=False, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_structure() -> None:
    unit = unit_sections()
    assert unit.sections() == ["Unit", "Service"]
    service = unit["Service"]
    assert service["KillMode"] == "mixed"  # SIGTERM to the guardian alone
    assert service["Type"] == "exec"
    assert int(service["TimeoutStopSec"]) > 90  # beyond vfiopy-release's default --timeout
    assert service["EnvironmentFile"] == "-/etc/default/vfiopy-guard"
    assert service["ExecStart"].startswith("/bin/sh -c ")
    assert "--watch --json" in service["ExecStart"]
    assert "Install" not in unit  # started per VMM, never enabled


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / UNIT.name
    shutil.copy(UNIT, copy)
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert UNIT.name.removesuffix(".service") not in r.stderr, r.stderr  # not even a warning


def exec_start(instance: str) -> list[str]:
    """ExecStart as systemd runs it for ``instance``: specifiers, then ``$$`` to ``$``."""
    line = unit_sections()["Service"]["ExecStart"]
    words = shlex.split(line)
    specifiers = {"%I": instance, "%%": "%"}
    words = [re.sub(r"%.", lambda m: specifiers[m.group(0)], w) for w in words]
    assert not any(re.search(r"\$(?!\$)[{A-Za-z]", w.replace("$$", "")) for w in words)
    return [w.replace("$$", "$") for w in words]


def environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env


@pytest.mark.parametrize("form", ["pid", "libvirt-name", "pid-file-path"])
def test_exec_start_finds_the_pid(host: Host, form: str) -> None:
    vmm = host.vmm(host.libvirt_dir / "web-1.pid")
    instance = {
        "pid": str(vmm.pid),
        "libvirt-name": "web-1",  # %I of vfiopy-guard@web\x2d1
        "pid-file-path": str(host.libvirt_dir / "web-1.pid").lstrip("/"),  # %I of a --path escape
    }[form]
    env = {
        **environment(),
        "VFIOPY_LIBVIRT_PID_DIR": str(host.libvirt_dir),
        "VFIOPY_RELEASE_ARGS": "--timeout 30",
        "PATH": host.env()["PATH"],
        "FAKE_STATE": str(host.root),
        "FAKE_GUARDIAN": "record",
    }
    r = subprocess.run(exec_start(instance), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (g,) = host.guardians()
    assert g["argv"] == ["--pid", str(vmm.pid), "--watch", "--json", "--timeout", "30"]


def test_exec_start_without_pid_file_fails(host: Host) -> None:
    env = {**environment(), "VFIOPY_LIBVIRT_PID_DIR": str(host.libvirt_dir)}
    env.update(PATH=host.env()["PATH"], FAKE_STATE=str(host.root))
    r = subprocess.run(exec_start("gone"), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert host.guardians() == []
