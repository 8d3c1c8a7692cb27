"""``python -m vfiopy.bench`` given bad input: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mock_vfio.machine")

from vfiopy.bench import _cli


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
