"""``python -m vfiopy.release`` given bad input: one line on stderr, exit 2, no traceback.

Every case runs the CLI as the shell does (``main`` without a kernel), so a
check that happens too late would reach the simulator or this host.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

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
