"""``python -m vfiopy.release`` and signals: SIGHUP never stops it, Ctrl-C says what is left,
a SIGTERM after the release still gets the report and the release's status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from release_helpers import MachineFactory, signalled_while_releasing, slow_resets, vfio_devices
from test_cli import check_schema, run

# A CLI run in a child process, a signal sent to itself at a chosen point (so that a
# signal the tool does not handle ends that process, not the test run).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from vfiopy.release import _clirun, cli
    from vfiopy.simulate import simulated_kernel
    from vfiopy.sysfs import VFIO_DRIVER, Sysfs

    sig, when = getattr(signal, sys.argv[1]), sys.argv[2]
    kernel = simulated_kernel("gpus:2,scale=0.02")
    s = Sysfs(kernel)
    addrs = [str(a) for a in s.devices() if s.driver(a) == VFIO_DRIVER]
    run = _clirun._Signals.run

    def signalled(self, main):
        if when == "before":
            os.kill(os.getpid(), sig)
        report = run(self, main)
        if when == "after":
            os.kill(os.getpid(), sig)
        return report

    _clirun._Signals.run = signalled
    sys.exit(cli.main([*addrs, "--json"], kernel=kernel))
    """
)


def child(sig: str, when: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VFIOPY_SIM")}
    return subprocess.run(
        [sys.executable, "-c", CHILD, sig, when],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("when", ["before", "after"])
def test_sighup_never_stops_the_tool(when: str) -> None:
    proc = child("SIGHUP", when)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_schema(doc)
    assert doc["ok"] and len(doc["devices"]) == 4
    assert all(r["status"] == "released" for r in doc["devices"])


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_just_after_the_release_keeps_its_report_and_status(sig: str) -> None:
    proc = child(sig, "after")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one document
    assert doc["ok"] and all(r["status"] == "released" for r in doc["devices"])
    assert "Traceback" not in proc.stderr


def test_ctrl_c_says_what_is_left_and_a_second_why_it_cannot_stop_sooner(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:4")
    cli = m.spawn(name="cli")
    addrs = vfio_devices(cli)
    slow_resets(m, addrs, 50.0)  # 1 s at the tests' time scale: the signals come first
    code, doc, err = signalled_while_releasing(
        m, signal.SIGINT, 2, lambda: run([*addrs, "--json"], cli, capsys)
    )
    check_schema(doc)
    assert code == 0, err
    assert all(r["status"] == "released" for r in doc["devices"])
    lines = [line for line in err.splitlines() if line.startswith("SIGINT: ")]
    assert len(lines) == 2, err
    assert "finishing" in lines[0] and "domain" in lines[0] and "Ctrl-C again" in lines[0]
    assert "still finishing" in lines[1] and "cannot exit before it returns" in lines[1]
    assert m.open_fds() == 0
