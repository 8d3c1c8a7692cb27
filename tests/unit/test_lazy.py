"""The packages' names are imported at first use, and the command lines start without the rest.

vfiopy, vfiopy.release and vfiopy.bench list their names twice: under ``if TYPE_CHECKING:`` for type
checkers, and in the map given to vfiopy._lazy for the interpreter. The two must agree.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ("vfiopy", "vfiopy.release", "vfiopy.bench")


def _type_checking_imports(package: str) -> dict[str, str]:
    """name -> module, as the package's ``if TYPE_CHECKING:`` block imports it."""
    path = Path(importlib.import_module(package).__file__ or "")
    names: dict[str, str] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module is not None
                for alias in imp.names:
                    assert alias.asname == alias.name, "a re-export is written `X as X`"
                    names[alias.name] = imp.module
    assert names
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_every_typed_name_is_there_at_run_time(package: str) -> None:
    pkg = importlib.import_module(package)
    declared = _type_checking_imports(package)
    assert set(pkg.__all__) == set(declared)
    assert set(declared) <= set(dir(pkg))
    for name, module in declared.items():
        assert getattr(pkg, name) is getattr(importlib.import_module(module), name), name
    assert not hasattr(pkg, "NoSuchName")


def test_star_import_gives_the_names() -> None:
    scope: dict[str, object] = {}
    exec("from vfiopy import *", scope)
    assert set(_type_checking_imports("vfiopy")) <= set(scope)


# What `--help` of each command line must not import: the event loop (and ssl) that
# structlog.stdlib imports, and the cffi extension with the object model.
HEAVY = ("asyncio", "structlog", "vfiopy._uapi_cffi", "vfiopy.session")


# The bench's --help lists its modes by name only: the modes import the release machinery
# and the benchmark's targets, none of which its usage needs.
BENCH_HEAVY = (*HEAVY, "vfiopy.bench._modes", "vfiopy.release", "dataclasses")

# The release's usage is vfiopy.release.cli alone: the run (with anyio, dataclasses, the
# engine, the report, the takeover and the kernel model) is imported once the arguments are read.
RELEASE_HEAVY = (
    *HEAVY,
    "anyio",
    "dataclasses",
    "logging",
    "vfiopy._log",
    "vfiopy.errors",
    "vfiopy.kmodel",
    "vfiopy.release._clirun",
    "vfiopy.release._engine",
    "vfiopy.release._report",
    "vfiopy.release._takeover",
)


@pytest.mark.parametrize(
    ("tool", "argv", "status", "heavy"),
    [
        ("vfiopy.release.cli", ["--help"], 0, RELEASE_HEAVY),
        # argparse's own usage error, without --json (whose document is the report's)
        ("vfiopy.release.cli", ["--max-parallel", "many"], 2, RELEASE_HEAVY),
        ("vfiopy.bench._cli", ["--help"], 0, BENCH_HEAVY),
    ],
)
def test_usage_imports_nothing_heavy(
    tool: str, argv: list[str], status: int, heavy: tuple[str, ...]
) -> None:
    code = (
        "import contextlib, io, sys\n"
        f"from {tool} import main\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        f"    status = main({argv!r})\n"
        "print(status, bool((out.getvalue() + err.getvalue()).startswith('usage: ')))\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    said, loaded = out.split("\n", 1)
    assert said.split() == [str(status), "True"]
    assert loaded.split() == []


def test_a_quiet_release_imports_no_structlog() -> None:
    pytest.importorskip("mock_vfio")
    code = (
        "import sys\n"
        "from vfiopy.release import cli\n"
        "code = cli.main(['--simulate', 'gpus:2,scale=0', '--simulate-vmm', '-q'])\n"
        "print(code, 'structlog' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["0", "False"]
