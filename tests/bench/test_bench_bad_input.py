"""``python -m vfiopy.bench`` given bad input: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mock_vfio.machine")

from vfiopy.bench import _cli, _sweep


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the bench; assert a usage error (exit 2, no traceback); its stderr."""
    capsys.readouterr()
    try:
        code = _cli.run(argv)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_empty_simulate_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--simulate needs a topology" in usage_error(["--simulate", ""], capsys)


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("[[device]]\nvendor = 0x10de\n", "addr is missing"),
        ('[[device]]\naddr = "0000:01:00.0"\ndevice = "x"\n', "device must be an integer"),
        (
            '[[device]]\naddr = "0000:01:00.0"\n[device.sriov]\ntotal_vfs = 2\nnum_vfs = 4\n',
            "num_vfs must be 0 to total_vfs (2), not 4",
        ),
    ],
)
def test_bad_topology_file(
    toml: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    err = usage_error(["--simulate", str(path), "--modes", "close"], capsys)
    assert says in err
    assert len(err.strip().splitlines()) == 1


def test_missing_topology_file_is_not_an_unknown_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(["--simulate", str(tmp_path / "none.toml")], capsys)
    assert "no such topology file" in err


# --- with --json, one JSON document on every exit path --------------------------------------


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    """Run the bench with ``--json -``: its exit status, its one document, its stderr."""
    capsys.readouterr()
    code = _cli.run([*argv, "--json", "-"])
    out, err = capsys.readouterr()
    doc = json.loads(out)  # exactly one: json.loads refuses anything after it
    assert doc["schema"] == 1 and isinstance(doc["runs"], list)
    return code, doc, err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--time-scale", "nan"], "argument --time-scale: invalid finite number value: 'nan'"),
        (["--time-scale", "inf"], "argument --time-scale: invalid finite number value: 'inf'"),
        (["--mmio", "--mmio-calls", "0"], "argument --mmio-calls: invalid whole number >= 1"),
        (["--mmio", "--mmio-calls", "-5"], "argument --mmio-calls: invalid whole number >= 1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--modes", "x"], "'x'"),
        (["--time-scale", "-1"], "--time-scale must be >= 0"),
        (["--startup", "0"], "--startup needs at least 1 round"),
        (["--simulate", ""], "--simulate needs a topology"),
        (["--simulate", "gpus:x"], "gpus:N needs a whole number"),
        (["--simulate", "gpus:2,kernel=bogus"], "kernel=bogus"),
        (["--simulate", "nosuch"], "unknown topology 'nosuch'"),
        (["--simulate", "gpus:2", "--devices", "0"], "--devices must be positive"),
    ],
)
def test_every_usage_error_is_one_json_document(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc, err = run_json(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert doc["ok"] is False and doc["runs"] == [] and says in doc["error"]
    assert err.splitlines()[-1].endswith(f"error: {doc['error']}")  # the same one line


@pytest.mark.parametrize(
    "argv", [["--time-scale", "nan"], ["--time-scale", "inf"], ["--mmio", "--mmio-calls", "0"]]
)
def test_values_that_ran_before_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # nan wrote invalid JSON; 0 calls printed a cost per call over none
    usage_error(["--simulate", "gpus:1", "--modes", "c", *argv], capsys)


def test_a_usage_error_fills_the_json_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bench.json"
    path.write_text('{"an earlier run": "much longer than the error document" }' * 20)
    usage_error(["--simulate", "gpus:x", "--json", str(path)], capsys)
    doc = json.loads(path.read_text())
    assert doc["ok"] is False and "gpus:N" in doc["error"]


@pytest.mark.parametrize("where", ["no-such-dir/bench.json", "."])
def test_unwritable_json_path_fails_before_the_sweep(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_sweep(*_: Any) -> None:
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(_sweep, "run_sweep", no_sweep)
    path = tmp_path / where
    err = usage_error(["--simulate", "gpus:1", "--modes", "c", "--json", str(path)], capsys)
    assert err.strip().splitlines() == [
        f"python -m vfiopy.bench: error: --json {path}: "
        + ("No such file or directory" if where != "." else "Is a directory")
    ]


@pytest.mark.parametrize(
    ("fault", "code", "says"),
    [(KeyboardInterrupt, 130, "interrupted"), (RuntimeError("a bug"), 1, "RuntimeError: a bug")],
)
def test_an_interrupted_or_broken_sweep_is_still_one_json_document(
    fault: BaseException | type[BaseException],
    code: int,
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(*_: Any) -> None:
        raise fault

    monkeypatch.setattr(_sweep, "run_sweep", broken)
    got, doc, err = run_json(["--simulate", "gpus:1", "--modes", "c", "--time-scale", "0"], capsys)
    assert "Traceback" in err if code == 1 else "interrupted" in err
    assert got == code
    assert doc["ok"] is False and says in doc["error"]
