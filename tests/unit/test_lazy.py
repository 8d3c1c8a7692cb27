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


@pytest.mark.parametrize(
    ("tool", "heavy"),
    [("vfiopy.release.cli", HEAVY), ("vfiopy.bench._cli", BENCH_HEAVY)],
)
def test_help_imports_nothing_heavy(tool: str, heavy: tuple[str, ...]) -> None:
    code = (
        "import contextlib, io, sys\n"
        f"from {tool} import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == []


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
