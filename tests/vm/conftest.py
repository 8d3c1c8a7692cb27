"""The QEMU guest tier: one guest (tools/vmtest) booted per test session.

Every test here gets the same booted guest through the `guest` fixture and runs commands in
it with `guest.run(...)` / `guest.run_python(...)`; each command starts only after everything
the previous one left running was killed, so device files are released between tests. Tests
skip, with the reason, where QEMU, the kernel image or busybox-static are missing (install
them with tools/vmtest/install-deps.sh).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

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
