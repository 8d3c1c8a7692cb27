"""``python -m vfiopy.release`` on the simulator: flows, output, exit codes, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from typing import Any

import anyio
import pytest
from mock_vfio.pci_driver import bind, unbind
from release_helpers import (
    MachineFactory,
    concurrent,
    overlap,
    signalled_while_releasing,
    slow_resets,
    vfio_devices,
)

from vfiopy.release import DomainResult, ObservedReset, Report, acquire
from vfiopy.release._clirun import summary
from vfiopy.release.cli import main
from vfiopy.session import Session


def start_vmm(m: Any, addrs: list[str] | None = None, **kw: Any) -> Any:
    """A simulated VMM process holding ``addrs`` (default: every vfio-pci device)."""
    vmm = m.spawn(name="vmm", **kw)
    session = Session(vmm)
    anyio.run(acquire, session, addrs if addrs is not None else vfio_devices(vmm))
    return vmm


def run(argv: list[str], kernel: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    capsys.readouterr()  # drop what setup logged (structlog's defaults print to stdout)
    code = main(argv, kernel=kernel)
    out, err = capsys.readouterr()
    doc = json.loads(out) if "--json" in argv and out.strip() else out
    return code, doc, err


def check_schema(doc: dict[str, Any]) -> None:
    assert set(doc) >= {"schema", "ok", "elapsed_s", "domains", "devices"}
    assert doc["schema"] == 1 and isinstance(doc["ok"], bool)
    assert isinstance(doc["elapsed_s"], float)
    for d in doc["domains"]:
        optional = {"also_reset", "predicted", "observed"}
        assert {"id", "devices", "resets"} <= set(d) <= {"id", "devices", "resets"} | optional
        for part in ("predicted", "observed"):  # resets by method
            assert all(isinstance(n, int) and n > 0 for n in d.get(part, {}).values())
        if "predicted" in d:
            assert sum(d["predicted"].values()) == d["resets"]
        assert isinstance(d["id"], str) and all(isinstance(a, str) for a in d["devices"])
        assert d["resets"] is None or isinstance(d["resets"], int)
    for r in doc["devices"]:
        base = {"address", "domain", "status", "error", "start_s", "end_s"}
        # A file taken from a process (--pid) also says how it was identified.
        assert set(r) in (base, base | {"fds", "identified_by", "candidates"})
        assert r["status"] in ("released", "failed", "skipped")
        assert r["error"] is None or isinstance(r["error"], str)
        assert isinstance(r["start_s"], float) and isinstance(r["end_s"], float)
        assert r["start_s"] <= r["end_s"]


# --- --pid -------------------------------------------------------------------------------


def test_pid_flow_overlaps_the_resets_the_exit_would_serialise(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:8")
    vmm = start_vmm(m)
    slow_resets(m, vfio_devices(vmm))
    since = len(m.trace)
    code, doc, err = run(["--pid", str(vmm.getpid()), "--json"], m.spawn(name="cli"), capsys)
    assert code == 0, err
    check_schema(doc)
    assert doc["ok"] and len(doc["devices"]) == 16 and len(doc["domains"]) == 8
    assert not vmm.alive
    resets = [e for e in m.unique_resets(cause="devset") if e in m.trace[since:]]
    assert len(resets) == 8 and concurrent(resets), resets
    # Released by our threads, not by the exiting VMM.
    assert {e.pid for e in m.events("release")[-16:]} != {vmm.getpid()}
    assert m.open_fds() == 0


def test_the_vmm_exit_alone_resets_one_by_one(machine: MachineFactory) -> None:
    # The contrast the --pid flow is for.
    m = machine("gpus:8")
    vmm = start_vmm(m)
    since = len(m.trace)
    vmm.exit()
    resets = [e for e in m.unique_resets(cause="devset") if e in m.trace[since:]]
    assert len(resets) == 8 and overlap(resets) == 1


def test_pid_without_permission_touches_nothing(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:2")
    vmm = start_vmm(m, ptraceable=False)
    code, _, err = run(["--pid", str(vmm.getpid())], m.spawn(name="cli"), capsys)
    assert code == 1
    assert "pidfd_getfd" in err and "EPERM" in err and "ptrace" in err
    assert vmm.alive
    assert "nothing was signalled" in err


def test_absent_pid_is_a_usage_error(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:2")
    code, _, err = run(["--pid", "424242"], m.spawn(name="cli"), capsys)
    assert code == 2
    assert "424242" in err and "ESRCH" in err


def test_pid_dry_run_signals_nothing(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:4")
    vmm = start_vmm(m)
    before = len(m.trace)
    code, out, err = run(["--pid", str(vmm.getpid()), "--dry-run"], m.spawn(name="cli"), capsys)
    assert code == 0, err
    assert vmm.alive
    assert "4 reset domains" in out and "resets: 1" in out
    assert not [e for e in m.trace[before:] if e.kind in ("reset", "release")]
    vmm.exit()
    assert m.open_fds() == 0


# --- ADDR ---------------------------------------------------------------------------------


def test_address_flow_both_address_forms(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:4")
    cli = m.spawn(name="cli")
    addrs = vfio_devices(cli)
    slow_resets(m, addrs)
    short = [a[5:] if i % 2 else a for i, a in enumerate(addrs)]  # 3b:00.0 and 0000:3b:00.0
    code, doc, err = run([*short, "--json"], cli, capsys)
    assert code == 0, err
    check_schema(doc)
    assert sorted(r["address"] for r in doc["devices"]) == addrs
    assert all(r["status"] == "released" for r in doc["devices"])
    resets = m.unique_resets(cause="devset")
    assert len(resets) == 4 and concurrent(resets), resets
    assert m.open_fds() == 0


def test_dry_run_json_is_the_plan(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:4")
    cli = m.spawn(name="cli")
    addrs = vfio_devices(cli)
    code, doc, _ = run([*addrs, "--dry-run", "--json"], cli, capsys)
    assert code == 0
    check_schema(doc)
    assert doc["dry_run"] is True and doc["ok"] is True
    assert [d["resets"] for d in doc["domains"]] == [1] * 4
    assert all(r["status"] == "skipped" for r in doc["devices"])
    assert not m.events("open") and not m.resets()


# Three functions of one multifunction device behind a bridge, each with FLR: one FLR per
# close and no bus reset (the case the model once predicted as a bus reset).
MULTIFUNCTION_FLR = """
bridge = [{addr = "0000:00:01.0", secondary = 5, subordinate = 5}]
device = [{addr = "0000:05:00.0", flr = true}, {addr = "0000:05:00.1", flr = true},
          {addr = "0000:05:00.2", flr = true}]
"""


@pytest.mark.parametrize(
    ("topology", "version"),
    [("gpus:4", (6, 1)), ("multifunction", (6, 1)), ("vfs:4", (6, 1)), ("vfs:4", (6, 18))],
)
def test_a_simulated_release_reports_predicted_and_observed_resets(
    topology: str,
    version: tuple[int, int],
    machine: MachineFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    if topology == "multifunction":
        topology = str(tmp_path / "mf.toml")
        (tmp_path / "mf.toml").write_text(MULTIFUNCTION_FLR)
    m = machine(topology, kernel_version=version)
    cli = m.spawn(name="cli")
    addrs = vfio_devices(cli)
    since = len(m.trace)
    code, doc, err = run([*addrs, "--json"], cli, capsys)
    assert code == 0, err
    check_schema(doc)
    assert doc["observed_by"] == "simulator"
    for d in doc["domains"]:
        assert d["observed"] == d["predicted"], d
    traced = [e for e in m.unique_resets() if e in m.trace[since:] and e.cause != "open"]
    assert sum(sum(d["observed"].values()) for d in doc["domains"]) == len(traced)
    if topology.endswith("mf.toml"):
        assert [d["predicted"] for d in doc["domains"]] == [{"flr": 3}]
    # The human summary says the same, in one line when they agree.
    code, _, err = run(addrs, m.spawn(name="cli2"), capsys)
    assert code == 0
    assert f"resets predicted {len(traced)}, observed {len(traced)} by the simulator\n" in err


def test_a_dry_run_observes_nothing(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = machine("gpus:2").spawn(name="cli")
    code, doc, _ = run([*vfio_devices(cli), "--dry-run", "--json"], cli, capsys)
    assert code == 0 and "observed_by" not in doc
    assert all("observed" not in d and d["predicted"] for d in doc["domains"])


def test_the_summary_names_each_domain_where_observation_and_prediction_differ() -> None:
    report = Report("release")
    report.domains = [
        DomainResult("0000:01", ["0000:01:00.0", "0000:01:00.1"], 2, predicted={"flr": 2}),
        DomainResult("0000:02:00.0", ["0000:02:00.0"], 1, predicted={"bus": 1}),
        DomainResult("pid 7 fd 9", ["pid 7 fd 9"], None),
    ]
    report.observe(
        "guest kprobes",
        [
            ObservedReset("flr", ("0000:01:00.0",)),
            ObservedReset("bus", ("0000:01:00.0", "0000:01:00.1")),
            ObservedReset("bus", ("0000:02:00.0",)),
            ObservedReset("flr", ("0000:09:00.0",)),  # nobody's: counted nowhere
        ],
    )
    assert [d.observed for d in report.domains] == [{"bus": 1, "flr": 1}, {"bus": 1}, {}]
    assert [d.matches for d in report.domains] == [False, True, None]
    assert report.to_json()["observed_by"] == "guest kprobes"
    assert summary(report)[-2:] == [
        "resets predicted 3, observed 3 by the guest kprobes; they differ in:",
        "  0000:01: predicted 2 flr, observed 1 bus, 1 flr",
    ]


@pytest.mark.parametrize("bad", ["3b:00", "../../../etc/passwd", "/sys/bus/pci/devices/x", ""])
def test_malformed_address(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    m = machine("gpus:2")
    code, _, err = run([bad], m.spawn(name="cli"), capsys)
    assert code == 2
    assert "not a PCI address" in err and "0000:3b:00.0" in err
    assert not m.events("open")


def test_absent_device(machine: MachineFactory, capsys: pytest.CaptureFixture[str]) -> None:
    m = machine("gpus:2")
    code, doc, err = run(["0000:99:00.0", "--json"], m.spawn(name="cli"), capsys)
    assert code == 2
    assert doc["ok"] is False and doc["devices"] == [] and "0000:99:00.0" in doc["error"]
    assert "0000:99:00.0" in err and "ENODEV" in err and "lspci" in err
    assert not m.events("open")


def test_device_in_use_by_another_process(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:2")
    vmm = start_vmm(m)
    opens = len(m.events("open"))
    code, _, err = run(vfio_devices(vmm), m.spawn(name="cli"), capsys)
    assert code == 1
    assert f"pid {vmm.getpid()}" in err and "EBUSY" in err and "--pid" in err
    assert len(m.events("open")) == opens


def test_device_not_bound_to_vfio(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:2")
    cli = m.spawn(name="cli")
    addrs = vfio_devices(cli)
    gpu = m.device(addrs[0])
    unbind(m, gpu)
    bind(m, gpu, "nvidia")
    code, _, err = run(addrs, cli, capsys)
    assert code == 1
    assert addrs[0] in err and "nvidia" in err and "driverctl" in err
    assert not m.events("open")


def test_non_viable_group(machine: MachineFactory, capsys: pytest.CaptureFixture[str]) -> None:
    m = machine("gpus:2")
    cli = m.spawn(name="cli")
    addrs = vfio_devices(cli)
    audio = m.device(addrs[1])
    unbind(m, audio)
    bind(m, audio, "snd_hda_intel")
    code, _, err = run([addrs[0]], cli, capsys)
    assert code == 1
    assert addrs[1] in err and "snd_hda_intel" in err and "group" in err
    assert not m.events("open")


def test_usage_errors(machine: MachineFactory, capsys: pytest.CaptureFixture[str]) -> None:
    m = machine("gpus:2")
    cli = m.spawn(name="cli")
    assert run([], cli, capsys)[0] == 2
    assert run(["--pid", "1", "0000:01:00.0"], cli, capsys)[0] == 2
    assert run(["--simulate-vmm"], cli, capsys)[0] == 2
    assert run(["--bogus"], cli, capsys)[0] == 2


# --- signals -------------------------------------------------------------------------------


def test_sigterm_mid_release_still_releases_every_fd(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:8")
    cli = m.spawn(name="cli")
    addrs = vfio_devices(cli)
    slow_resets(m, addrs, 1.0)
    code, doc, err = signalled_while_releasing(
        m, signal.SIGTERM, 1, lambda: run([*addrs, "--json"], cli, capsys)
    )
    check_schema(doc)
    assert len(doc["devices"]) == 16
    assert all(r["status"] == "released" for r in doc["devices"])
    assert "release.interrupted" in err
    assert code == 0
    assert m.open_fds() == 0


# --- the real entry point --------------------------------------------------------------------


def test_module_entry_point_simulated_vmm() -> None:
    env = dict(os.environ)
    env.pop("VFIOPY_SIMULATE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfiopy.release",
            "--simulate",
            "gpus:4",
            "--simulate-vmm",
            "--time-scale",
            "0.02",
            "--reset-model",
            "pre-6.3",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_schema(doc)
    assert doc["ok"] and len(doc["devices"]) == 8
    # The simulator's summary: four bus resets, one per GPU's bus. How many ran at once is a
    # timing (the workers start one after another; on a busy machine the first reset may end
    # before the last begins): the in-process tests assert concurrency on lengthened resets.
    summary = re.search(r"simulator: 4 resets \(4 bus\), up to ([0-9]+) at once", proc.stderr)
    assert summary is not None, proc.stderr
    assert 1 <= int(summary[1]) <= 4


def test_pid_without_vfio_fds_signals_nothing(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:2")
    bystander = m.spawn(name="shell")
    code, _, err = run(["--pid", str(bystander.getpid())], m.spawn(name="cli"), capsys)
    assert code == 1
    assert "no VFIO device fds" in err and "nothing was signalled" in err
    assert bystander.alive and not bystander.signals


def test_pid_flow_iommufd_vmm(machine: MachineFactory, capsys: pytest.CaptureFixture[str]) -> None:
    m = machine("gpus:4")
    vmm = m.spawn(name="vmm")
    session = Session(vmm, backend="iommufd")
    anyio.run(acquire, session, vfio_devices(vmm))
    slow_resets(m, vfio_devices(vmm))
    code, doc, err = run(["--pid", str(vmm.getpid()), "--json"], m.spawn(name="cli"), capsys)
    assert code == 0, err
    assert doc["ok"] and len(doc["devices"]) == 8
    resets = m.unique_resets(cause="devset")
    assert len(resets) == 4 and concurrent(resets), resets
    assert m.open_fds() == 0


def test_pid_flow_kills_after_grace(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # A VMM that ignores SIGTERM (here: SIGINT, which the simulator does not act on).
    m = machine("gpus:2")
    vmm = start_vmm(m)
    code, doc, err = run(
        ["--pid", str(vmm.getpid()), "--signal", "INT", "--grace", "0.05", "--json"],
        m.spawn(name="cli"),
        capsys,
    )
    assert code == 0, err
    assert vmm.signals == [signal.SIGINT, signal.SIGKILL]
    assert doc["ok"] and m.open_fds() == 0


def test_logs_are_json_lines_on_stderr_off_a_tty(
    machine: MachineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    m = machine("gpus:2")
    cli = m.spawn(name="cli")
    code, out, err = run(vfio_devices(cli), cli, capsys)
    assert code == 0
    assert out == ""  # stdout is for --json only
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    released = [e for e in events if e["event"] == "release.device"]
    assert len(released) == 4
    assert all({"bdf", "domain", "reset", "elapsed_s", "level"} <= set(e) for e in released)
    assert "4/4 devices released in 2 reset domains" in err


def test_progress_line_per_domain() -> None:
    import io

    from vfiopy.release import DeviceResult, DomainResult, Status
    from vfiopy.release._clirun import _Progress

    buf = io.StringIO()
    p = _Progress(buf, 2)
    d = DomainResult("0000:03", ["0000:03:00.0"], 1)
    r = DeviceResult("0000:03:00.0", "0000:03", Status.RELEASED, end_s=0.5)
    p("start", d, [r])
    assert "[0/2 domains] running: 0000:03" in buf.getvalue()
    p("end", d, [r])
    p.finish()
    assert "domain 0000:03: ok (1 device, done at 0.500 s)" in buf.getvalue()
    assert "[1/2 domains]" in buf.getvalue()
