"""The conformance scenarios on the real kernel, compared with the simulator key by key.

All scenarios run in one guest command (tests/conformance/scenarios.py prints one JSON
document, the `conformance_results` fixture); the simulator's results for the same scenarios
are computed here, on the host.  A difference not listed in scenarios.KNOWN_DIFFERENCES fails
and names the scenario and the key.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import vmtest

from vfiopy.kmodel import parse_release

pytestmark = pytest.mark.vm

CONFORMANCE = Path(__file__).resolve().parents[1] / "conformance"
if str(CONFORMANCE) not in sys.path:
    sys.path.insert(0, str(CONFORMANCE))
scenarios = importlib.import_module("scenarios")


@pytest.fixture(scope="module")
def sim_results() -> dict[str, Any]:
    """The simulator's results, modelling the kernel the guest boots."""
    pytest.importorskip("mock_vfio")
    version = parse_release(vmtest.find_kernel().release)
    return dict(scenarios.simulate(version=version))


def test_every_scenario_ran_on_the_kernel(conformance_results: dict[str, Any]) -> None:
    failed = {
        name: res.get("traceback", res["error"])
        for name, res in conformance_results.items()
        if isinstance(res, dict) and "error" in res
    }
    assert not failed, "\n".join(f"{name}:\n{tb}" for name, tb in failed.items())
    assert set(conformance_results) == set(scenarios.SCENARIOS)


@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_simulator_agrees_with_kernel(
    name: str, conformance_results: dict[str, Any], sim_results: dict[str, Any]
) -> None:
    problems = scenarios.compare({name: sim_results[name]}, {name: conformance_results[name]})
    assert not problems, "simulator and real kernel differ:\n  " + "\n  ".join(problems)


def test_known_differences_are_still_differences(
    conformance_results: dict[str, Any], sim_results: dict[str, Any]
) -> None:
    """A listed difference the simulator now gets right must leave the table."""
    for (name, key), reason in scenarios.KNOWN_DIFFERENCES.items():
        sim = scenarios.flatten(sim_results[name])
        real = scenarios.flatten(conformance_results[name])
        assert key in sim or key in real, f"{name}: {key}: no such key ({reason})"
        assert sim.get(key) != real.get(key), f"{name}: {key} agrees now; drop it from the table"
