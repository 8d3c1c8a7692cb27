"""``python -m vfiopy.release`` given bad input: one line on stderr, exit 2, no traceback.

Every case runs the CLI as the shell does (``main`` without a kernel), so a
check that happens too late would reach the simulator or this host.
"""

from __future__ import annotations

import json
from pathlib import Path
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
