"""`python -m vfiopy.bench` on the simulator: schema, modes, reset counts, exit codes.

Sweeps run at a tiny time scale; nothing here asserts a duration. Ordering
facts come from the simulator's reset trace (which resets overlapped).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mock_vfio.machine")

from vfiopy.bench import _cli, _modes
from vfiopy.bench._modes import MODES, Mode

TEARDOWN = ("exit", "close", "threads", "procs", "vfiopy", "vfiopy-planned")
BRINGUP = ("open", "acquire", "acquire-planned")
RUN_KEYS = {
    "mode": str,
    "n_devices": int,
    "kernel_model": str,
    "wall_s": float,
    "resets": int,
    "lower_bound_s": float,
}


def bench(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "bench.json"
    code = _cli.run([*args, "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else {}


def runs_by_mode(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["mode"]: r for r in doc["runs"]}


def test_gpus_every_mode_runs_and_matches_the_schema(tmp_path: Path) -> None:
    code, doc = bench(tmp_path, "--simulate", "gpus:4", "--time-scale", "0.001")
    assert code == 0
    assert doc["schema"] == 1
    assert isinstance(doc["runs"], list)
    for run in doc["runs"]:
        for key, typ in RUN_KEYS.items():
            assert isinstance(run[key], typ), (key, run[key])
        assert run["ok"], run
    assert set(runs_by_mode(doc)) == set(TEARDOWN + BRINGUP)
    assert {r["n_devices"] for r in doc["runs"]} == {4}


def test_reset_counts_follow_the_topology(tmp_path: Path) -> None:
    code, doc = bench(tmp_path, "--simulate", "gpus:4", "--time-scale", "0.001")
    assert code == 0
    runs = runs_by_mode(doc)
    # Four GPUs, each a two-function set on its own bus with bus reset only:
    # no reset at open, one bus reset per set at its last close, whatever the mode.
    for mode in TEARDOWN:
        assert runs[mode]["resets"] == 4, mode
        assert runs[mode]["expected_resets"] == 4, mode
        assert runs[mode]["n_functions"] == 8
    for mode in BRINGUP:
        assert runs[mode]["resets"] == 0, mode


def test_vfs_reset_at_open_and_close(tmp_path: Path) -> None:
    code, doc = bench(
        tmp_path, "--simulate", "vfs:3", "--time-scale", "0.001", "--modes", "c", "v", "o", "a"
    )
    assert code == 0
    runs = runs_by_mode(doc)
    # Each VF has FLR and a set of its own: one FLR at open, one at release.
    for mode in ("close", "vfiopy", "open", "acquire"):
        assert runs[mode]["resets"] == 3, mode
        assert runs[mode]["expected_resets"] == 3, mode


def test_lower_bound_is_modelled_not_measured(tmp_path: Path) -> None:
    code, doc = bench(
        tmp_path,
        "--simulate", "gpus:4",
        "--time-scale", "0.001",
        "--kernel-model", "devset", "legacy",
        "--modes", "vfiopy",
    )  # fmt: skip
    assert code == 0
    bound = {r["kernel_model"]: r["lower_bound_s"] for r in doc["runs"]}
    # pre-6.3 bus reset: 1 s of model time; devset: one set's reset, legacy: all four.
    assert bound["devset"] == pytest.approx(0.001)
    assert bound["legacy"] == pytest.approx(0.004)


def test_devset_vfiopy_resets_overlap_process_exit_does_not(tmp_path: Path) -> None:
    # Bus resets of 0.15 s, far beyond a thread's start-up on a busy machine: two of them
    # overlap whenever the mode runs them concurrently (never asked: all four at once).
    code, doc = bench(
        tmp_path, "--simulate", "gpus:4", "--time-scale", "0.15", "--modes", "e", "c", "v", "t", "p"
    )
    assert code == 0
    runs = runs_by_mode(doc)
    assert runs["vfiopy"]["max_concurrent_resets"] > 1
    assert runs["threads"]["max_concurrent_resets"] > 1
    assert runs["procs"]["max_concurrent_resets"] > 1
    assert runs["exit"]["max_concurrent_resets"] == 1
    assert runs["close"]["max_concurrent_resets"] == 1


def test_legacy_kernel_serialises_every_mode(tmp_path: Path) -> None:
    code, doc = bench(
        tmp_path,
        "--simulate", "gpus:3",
        "--time-scale", "0.02",
        "--kernel-model", "legacy",
        "--modes", "v", "t", "p",
    )  # fmt: skip
    assert code == 0
    for run in doc["runs"]:
        assert run["resets"] == 3
        assert run["max_concurrent_resets"] == 1, run["mode"]


def test_sweep_over_devices_and_reset_models(tmp_path: Path) -> None:
    code, doc = bench(
        tmp_path,
        "--simulate", "gpus:16",
        "--devices", "1", "2",
        "--reset-model", "pre-6.3", "current",
        "--time-scale", "0.001",
        "--modes", "vfiopy",
    )  # fmt: skip
    assert code == 0
    seen = {(r["n_devices"], r["reset_model"]) for r in doc["runs"]}
    assert seen == {(1, "pre-6.3"), (2, "pre-6.3"), (1, "current"), (2, "current")}
    for r in doc["runs"]:
        assert r["resets"] == r["n_devices"]
        assert r["topology"] == f"gpus:{r['n_devices']}"


def test_simulate_spec_options_replace_flags(tmp_path: Path) -> None:
    code, doc = bench(tmp_path, "--simulate", "gpus:2,kernel=legacy,scale=0.001", "--modes", "v")
    assert code == 0
    (run,) = doc["runs"]
    assert (run["kernel_model"], run["time_scale"], run["resets"]) == ("legacy", 0.001, 2)


@pytest.mark.parametrize(("key", "version", "sets"), [("version", "6.1", 1), ("kernel", "6.18", 4)])
def test_the_spec_version_is_the_machines(
    key: str, version: str, sets: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vfs:4 with the spec's version, over an environment that says otherwise: before 6.17
    the VFs share one device set, so the bound is their FLRs in series; from 6.17, one FLR."""
    monkeypatch.setenv("VFIOPY_SIM_KERNEL_VERSION", "6.18" if version == "6.1" else "6.1")
    spec = f"vfs:4,{key}={version},scale=0.001"
    code, doc = bench(tmp_path, "--simulate", spec, "--modes", "v")
    assert code == 0
    (run,) = doc["runs"]
    flr = 0.1 * 0.001
    assert run["lower_bound_s"] == pytest.approx(flr * 4 / sets)


def test_mmio_is_reported(tmp_path: Path) -> None:
    code, doc = bench(
        tmp_path, "--simulate", "gpus:1", "--time-scale", "0", "--modes", "c", "--mmio"
    )
    assert code == 0
    assert doc["mmio"]["ns_per_call"] > 0
    assert doc["mmio"]["calls"] > 0
    # The GPU's BAR1 is prefetchable: both write rows, write-combining through resource1_wc.
    m = doc["mmio"]
    assert m["write_region"] == 1 and m["write_wc_unavailable"] is None
    assert m["write_uncached_mbps"] > 0 and m["write_wc_mbps"] > 0


def test_mmio_write_row_without_a_prefetchable_bar(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--simulate", "nvme:1", "--time-scale", "0", "--modes", "c", "--mmio"]
    assert _cli.run(argv) == 0
    out = capsys.readouterr().out
    assert "uncached" in out and "write-combining not measured: no prefetchable BAR" in out
    assert "ordinary memory either way" in out


def test_table_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.run(["--simulate", "gpus:2", "--time-scale", "0", "--modes", "c", "v"]) == 0
    out = capsys.readouterr().out
    assert "vfiopy" in out and "close" in out and "machine:" in out


def test_json_to_stdout_moves_the_table_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        _cli.run(["--simulate", "gpus:1", "--time-scale", "0", "--modes", "v", "--json", "-"]) == 0
    )
    cap = capsys.readouterr()
    assert json.loads(cap.out)["schema"] == 1
    assert "vfiopy" in cap.err


# --- exit codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--modes", "x"],
        ["--simulate", "no-such-topology"],
        ["--devices", "0"],
        ["--kernel-model", "bsd"],
        ["--time-scale", "-1"],
        ["--simulate", "gpus:2,colour=red"],
        ["--simulate", "qemu-vmtest", "--devices", "999"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's own errors leave through SystemExit; the others return 2.
    try:
        code = _cli.run(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_real_without_vfio_access_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    if os.access("/dev/vfio/vfio", os.R_OK | os.W_OK):
        pytest.skip("this machine has VFIO access; the check needs one without")
    assert _cli.run(["--real", "0000:01:00.0"]) == 2
    assert "/dev/vfio/vfio" in capsys.readouterr().err


def test_a_failed_run_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(system: object) -> _modes.Window:
        raise OSError(5, "Input/output error")

    monkeypatch.setitem(MODES, "close", Mode("close", "c", "teardown", broken, "broken"))
    code, doc = bench(tmp_path, "--simulate", "gpus:1", "--time-scale", "0", "--modes", "close")
    assert code == 1
    (run,) = doc["runs"]
    assert run["ok"] is False and "Input/output error" in run["error"]
    assert "FAILED" in capsys.readouterr().out


def test_plot_without_matplotlib_exits_2_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry makes `import matplotlib` raise ImportError, as when it is absent.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "x.png"
    assert _cli.run(["--simulate", "gpus:1", "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "vfiopy[plot]" in err
    assert not png.exists()


def test_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "teardown.png"
    code = _cli.run(
        ["--simulate", "gpus:4", "--devices", "1", "2", "--time-scale", "0.001",
         "--modes", "c", "v", "--plot", str(png)]
    )  # fmt: skip
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point_help() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "vfiopy.bench", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0
    assert "--simulate" in res.stdout and "--real" in res.stdout
