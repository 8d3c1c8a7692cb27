"""``python -m vfiopy.bench`` given bad input: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

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
