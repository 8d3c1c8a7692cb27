"""The QEMU guest tier: one guest (tools/vmtest) booted per test session.

Every test here gets the session's booted guest through the `guest` fixture (a fresh one only
after a command hung or killed the last) and runs commands in it with `guest.run(...)` /
`guest.run_python(...)`; each command starts only after everything the previous one left
running was killed, so device files are released between tests. Tests
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


class Guests:
    """The session's guest, replaced by a fresh boot when a command hung it or killed it.

    A hung guest fails the test that hung it; the tests after it get a new guest instead of
    inheriting the corpse. After MAX_BOOTS boots the tier stops booting and every later test
    fails with the reason of the last death.
    """

    MAX_BOOTS = 3

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._current: vmtest.Guest | None = None
        self.boots = 0
        self.deaths: list[str] = []

    def get(self) -> vmtest.Guest:
        current = self._current
        if current is not None and current.usable:
            return current
        if current is not None:
            self.deaths.append(current.death or "guest stopped")
            current.close(timeout=0)
            self._current = None
        if self.boots >= self.MAX_BOOTS:
            raise vmtest.VmError(
                f"not booting a guest again after {self.boots} boots; guests died: "
                + "; ".join(self.deaths)
            )
        self.boots += 1
        booted = vmtest.Guest(results_dir=self._tmp.mktemp("vmtest"))
        try:
            booted.start()
        except BaseException:
            booted.close(timeout=0)
            raise
        self._current = booted
        return booted

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


@pytest.fixture(scope="session")
def guests(vm_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guests]:
    pool = Guests(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def guest(guests: Guests) -> vmtest.Guest:
    """A booted, usable guest; its results_dir is shared with the host (same path)."""
    return guests.get()


@pytest.fixture(scope="session")
def layout(guests: Guests) -> vmtest.Layout:
    return guests.get().layout


def guest_env() -> dict[str, str]:
    """PYTHONPATH for /usr/bin/python3 in the guest: the source tree, tools/vmtest, site-packages."""
    return {"PYTHONPATH": vmtest.guest_pythonpath(REPO, REPO / "tools" / "vmtest")}


@pytest.fixture(scope="session")
def conformance_results(guests: Guests) -> dict[str, Any]:
    """Every conformance scenario on the real kernel: one guest command, one JSON document."""
    result = guests.get().run(
        [vmtest.GUEST_PYTHON, str(REPO / "tests" / "conformance" / "scenarios.py"), "--json"],
        cwd=REPO,
        env=guest_env(),
        timeout=300,
        check=True,
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return dict(doc["results"])
