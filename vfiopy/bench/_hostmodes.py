"""Benchmark modes of the host side, on the simulator only: restoring host drivers.

``restore-parallel`` (r)  ``vfiopy.bind.restore_devices``: every device back on its
                          host driver, the probes side by side;
``restore-serial``   (s)  the same one device at a time (``max_parallel=1``), as a
                          manager that reattaches devices in turn does.

The setup (untimed) writes a state file recording each chosen device's host driver
(the topology's ``native_driver``), as ``vfiopy-bind bind`` would have; the devices start
on vfio-pci.  The lower bound is the model's: for each device the vfio-pci remove plus its
driver's probe (:mod:`mock_vfio.hostdrv`), the longest of them in parallel, their sum one
at a time.  These modes rebind devices, so they refuse to run on real ones.
"""

from __future__ import annotations

import tempfile
from typing import Any

from vfiopy.bench._target import System

HOST = "host"  # the phase: host drivers, no VFIO open or release


def _machine(system: System) -> Any:
    machine = getattr(system, "machine", None)
    if machine is None:
        raise ValueError("the host-driver modes run on the simulator only (they rebind devices)")
    return machine


def _devices(system: System) -> list[str]:
    return [d for g in system.groups for d in g.devices]


def _native(machine: Any, addr: str) -> str:
    driver = machine.devices[addr].spec.native_driver
    if driver is None:
        raise ValueError(f"{addr} has no native_driver in topology {machine.topology.name}")
    return str(driver)


def restore_costs(system: System) -> list[float]:
    """Per device: vfio-pci's remove plus its host driver's probe, model seconds."""
    from mock_vfio.hostdrv import probe_cost, remove_cost

    machine = _machine(system)
    return [remove_cost("vfio-pci") + probe_cost(_native(machine, a)) for a in _devices(system)]


def bound_parallel(system: System) -> float:
    return max(restore_costs(system), default=0.0)


def bound_serial(system: System) -> float:
    return sum(restore_costs(system))


def _restore(system: System, max_parallel: int) -> Any:
    import anyio

    from vfiopy.bench._modes import _Timer
    from vfiopy.bind import BindState, Entry, restore_devices

    machine = _machine(system)
    with tempfile.TemporaryDirectory(prefix="vfiopy-bench-") as tmp:
        state = BindState(f"{tmp}/bind.json")
        group = {a: machine.devices[a].group_id for a in _devices(system)}
        state.save({a: Entry(_native(machine, a), None, g, 0.0) for a, g in group.items()})
        anyio.run(anyio.sleep, 0)  # the event loop's imports, before the timed window
        timer = _Timer(system)

        async def timed() -> Any:
            with timer:  # the library call, not the event loop's start
                return await restore_devices(
                    kernel=system.kernel, state=state, max_parallel=max_parallel
                )

        report = anyio.run(timed)
        if not report.ok:
            raise RuntimeError("; ".join(d.error or d.status for d in report.failed()))
    return timer.window()


def mode_restore_parallel(system: System) -> Any:
    return _restore(system, max_parallel=len(_devices(system)))


def mode_restore_serial(system: System) -> Any:
    return _restore(system, max_parallel=1)


__all__ = [
    "HOST",
    "bound_parallel",
    "bound_serial",
    "mode_restore_parallel",
    "mode_restore_serial",
]
