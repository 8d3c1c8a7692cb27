"""The QEMU guest tier: one guest (tools/vmtest) booted per test session.

Every test here gets the same booted guest through the `guest` fixture and runs commands in
it with `guest.run(...)` / `guest.run_python(...)`; each command starts only after everything
the previous one left running was killed, so device files are released between tests. Tests
skip, with the reason, where QEMU, the kernel image or busybox-static are missing (install
them with tools/vmtest/install-deps.sh).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "vmtest"))

import vmtest  # noqa: E402


@pytest.fixture(scope="session")
def vm_available() -> None:
    """Skip with a clear reason where the guest cannot run."""
    missing = vmtest.missing_requirements()
    if missing:
        pytest.skip("QEMU guest tier unavailable: " + "; ".join(missing))


@pytest.fixture(scope="session")
def guest(vm_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[vmtest.Guest]:
    """The session's booted guest; its results_dir is shared with the host (same path)."""
    with vmtest.Guest(results_dir=tmp_path_factory.mktemp("vmtest")) as booted:
        yield booted


@pytest.fixture(scope="session")
def layout(guest: vmtest.Guest) -> vmtest.Layout:
    return guest.layout


def guest_env() -> dict[str, str]:
    """PYTHONPATH for /usr/bin/python3 in the guest: the source tree, tools/vmtest, site-packages."""
    return {"PYTHONPATH": vmtest.guest_pythonpath(REPO, REPO / "tools" / "vmtest")}


@pytest.fixture(scope="session")
def conformance_results(guest: vmtest.Guest) -> dict[str, Any]:
    """Every conformance scenario on the real kernel: one guest command, one JSON document."""
    result = guest.run(
        [vmtest.GUEST_PYTHON, str(REPO / "tests" / "conformance" / "scenarios.py"), "--json"],
        cwd=REPO,
        env=guest_env(),
        timeout=300,
        check=True,
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return dict(doc["results"])
