"""Property tests (hypothesis): the profiles that bound their budget.

``ci``, the default, keeps the whole property suite to well under a minute on a busy machine:
few examples, no per-example deadline (a loaded CI machine is slow, and a deadline would fail
a test for its timing), no example database written into the tree. ``thorough`` is for a
developer hunting a bug: ``HYPOTHESIS_PROFILE=thorough python -m pytest tests/property``.
A failure prints the ``@reproduce_failure`` blob that replays it.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _no_simulate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VFIOPY_SIMULATE", raising=False)
