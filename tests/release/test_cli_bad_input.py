"""``python -m vfiopy.release`` given bad input: one line on stderr, exit 2, no traceback.

Every case runs the CLI as the shell does (``main`` without a kernel), so a
check that happens too late would reach the simulator or this host.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from release_helpers import MachineFactory, vfio_devices
from test_cli import check_schema, run, start_vmm

from vfiopy import kernel as kernel_mod
from vfiopy.release.cli import main


@pytest.fixture
def no_real_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches this machine's kernel."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the real kernel was used")

    monkeypatch.setattr(kernel_mod.LinuxKernel, "__init__", refuse)
    monkeypatch.delenv("VFIOPY_SIMULATE", raising=False)


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; assert a usage error (exit 2, no traceback); its stderr."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    if "--json" in argv:
        doc = json.loads(out)
        assert doc["ok"] is False
    return err


@pytest.mark.usefixtures("no_real_kernel")
@pytest.mark.parametrize("spec", ["", " "])
def test_empty_simulate_never_reaches_the_host(
    spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra in (["--dry-run"], []):
        err = usage_error(["--simulate", spec, *extra, "0000:00:01.0"], capsys)
        assert "--simulate needs a topology" in err


# --- item: a bad simulator spec or topology file -------------------------------------------

BAD_TOML = {
    "missing.toml": None,  # no such file
    "syntax.toml": "[[device]\naddr = ",
    "no-addr.toml": "[[device]]\nvendor = 0x10de\n",
    "device-str.toml": '[[device]]\naddr = "0000:01:00.0"\ndevice = "x"\n',
    "too-many-vfs.toml": (
        '[[device]]\naddr = "0000:01:00.0"\n[device.sriov]\ntotal_vfs = 2\nnum_vfs = 4\n'
    ),
}
BAD_FILE_SAYS = {
    "missing.toml": "no such topology file",
    "syntax.toml": "not valid TOML",
    "no-addr.toml": "addr is missing",
    "device-str.toml": "device must be an integer, not 'x'",
    "too-many-vfs.toml": "num_vfs must be 0 to total_vfs (2), not 4",
}


@pytest.mark.usefixtures("no_real_kernel")
@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("nosuch", "unknown topology 'nosuch'"),
        ("gpus:x", "gpus:N needs a whole number"),
        ("gpus:-1", "gpus:N needs a whole number"),
        ("gpus:2,scale=abc", "scale=abc"),
        ("gpus:2,scale=nan", "scale=nan"),
        ("gpus:2,kernel=bogus", "kernel=bogus"),
        ("gpus:2,reset=bogus", "reset=bogus"),
        ("gpus:2,colour=red", "unknown simulation option"),
    ],
)
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_bad_spec_is_a_usage_error(
    spec: str, says: str, json_flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(["--simulate", spec, "--dry-run", "0000:03:00.0", *json_flag], capsys)
    assert says in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.usefixtures("no_real_kernel")
def test_bad_spec_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VFIOPY_SIMULATE", "nosuch")
    # the parser reads the variable when it is built, as the shell's run does
    assert "unknown topology 'nosuch'" in usage_error(["--dry-run", "0000:03:00.0"], capsys)


@pytest.mark.usefixtures("no_real_kernel")
@pytest.mark.parametrize("name", sorted(BAD_TOML))
def test_bad_topology_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    if BAD_TOML[name] is not None:
        path.write_text(BAD_TOML[name])
    err = usage_error(["--simulate", str(path), "--dry-run", "0000:01:00.0", "--json"], capsys)
    assert BAD_FILE_SAYS[name] in err
    assert len(err.strip().splitlines()) == 1


# --- item: --pid option values -------------------------------------------------------------


@pytest.mark.usefixtures("no_real_kernel")
@pytest.mark.parametrize("pid", ["0", "-1", str(2**31), str(2**32), str(2**64), "0x10"])
def test_pid_that_no_process_can_have(pid: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before any kernel is asked (Linux pids are 1 to 2^22).
    err = usage_error(["--pid", pid], capsys)
    assert "--pid" in err and "bug" not in err


@pytest.mark.parametrize(
    "option",
    [
        ["--pid", "VMM", "--signal", "32"],
        ["--pid", "VMM", "--signal", "33"],
        ["--pid", "VMM", "--signal", "35"],
        ["--pid", "VMM", "--signal", "63"],
        ["--pid", "VMM", "--signal", "0"],
        ["--pid", "VMM", "--grace", "nan"],
        ["--pid", "VMM", "--grace", "inf"],
        ["--pid", "VMM", "--timeout", "nan"],
        ["--addresses", "--time-scale", "nan"],
    ],
)
def test_bad_pid_option_values_signal_nothing(
    option: list[str], machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:2")
    vmm = start_vmm(m)
    argv = [str(vmm.getpid()) if a == "VMM" else a for a in option]
    if argv[0] == "--addresses":
        argv = [*vfio_devices(vmm), *argv[1:]]
    capsys.readouterr()
    code = main(argv, kernel=m.spawn(name="cli"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "bug" not in err
    assert vmm.alive and not vmm.signals


@pytest.mark.parametrize("err", [errno.EPERM, errno.EIO])
def test_pidfd_send_signal_failure_is_a_report(
    err: int, machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:2")
    vmm = start_vmm(m)
    m.faults.fail("pidfd_send_signal", err)
    code, doc, stderr = run(["--pid", str(vmm.getpid()), "--json"], m.spawn(name="cli"), capsys)
    assert code == 1, stderr
    check_schema(doc)
    assert doc["ok"] is False and doc["devices"]
    assert all(r["status"] == "failed" for r in doc["devices"])
    assert all("nothing was signalled" in r["error"] for r in doc["devices"])
    assert "Traceback" not in stderr
    assert vmm.alive and not vmm.signals


# --- item: with --json, one JSON document on every exit path --------------------------------


@pytest.mark.usefixtures("no_real_kernel")
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        # argparse's own usage errors
        (["--timeout", "nan", "0000:03:00.0"], "argument --timeout: invalid finite number"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--pid", "0"], "argument --pid: invalid process id"),
        (["--backend", "vfio", "0000:03:00.0"], "argument --backend: invalid choice"),
        (["0000:03:00.0", "--grace"], "argument --grace: expected one argument"),
        # those found after argparse
        ([], "give device addresses or --pid PID"),
        (["--simulate", "gpus:2", "--watch"], "--watch needs --pid PID"),
        (["--pid", "1", "0000:03:00.0"], "give device addresses or --pid, not both"),
        (["--simulate", "", "0000:03:00.0"], "--simulate needs a topology"),
        (["--simulate", "gpus:2", "3b:00"], "'3b:00' is not a PCI address"),
        (["--simulate", "gpus:2", "--pid", "1", "--signal", "40"], "unknown signal '40'"),
        (["--simulate", "gpus:2", "--max-parallel", "0", "0000:03:00.0"], "--max-parallel"),
    ],
)
@pytest.mark.parametrize("flag", ["--json", "--js"])  # argparse takes an abbreviation too
def test_every_usage_error_is_one_json_document(
    argv: list[str], says: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    code = main([flag, *argv])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(out.splitlines()) == 1, out  # one document, on one line
    doc = json.loads(out)
    check_schema(doc)
    assert doc["ok"] is False and doc["devices"] == [] and says in doc["error"]
    # stderr keeps its one-line message, the document's error
    assert err.splitlines()[-1].endswith(f"error: {doc['error']}")


@pytest.mark.usefixtures("no_real_kernel")
def test_usage_error_without_json_leaves_stdout_empty(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["--timeout", "nan", "0000:03:00.0"]) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.usefixtures("no_real_kernel")
def test_an_internal_error_is_still_one_json_document(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vfiopy.release import _plan

    def broken(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(_plan, "parse_addresses", broken)
    capsys.readouterr()
    code = main(["--json", "--simulate", "gpus:2", "--dry-run", "0000:03:00.0"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" in err and "RuntimeError: a bug" in err  # what a bug report needs
    doc = json.loads(out)
    assert doc["ok"] is False and doc["error"] == "internal error: RuntimeError: a bug"


@pytest.mark.usefixtures("no_real_kernel")
def test_an_error_after_the_report_adds_no_second_document(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vfiopy.release import _clirun

    def broken(*_: Any) -> list[str]:
        raise RuntimeError("a bug after the report")

    monkeypatch.setattr(_clirun, "_sim_summary", broken)
    capsys.readouterr()
    code = main(["--json", "--simulate", "gpus:1,scale=0", "0000:03:00.0", "0000:03:00.1"])
    out, err = capsys.readouterr()
    assert code == 1 and "a bug after the report" in err
    (line,) = out.splitlines()
    doc = json.loads(line)
    assert {d["status"] for d in doc["devices"]} == {"released"} and "error" not in doc
