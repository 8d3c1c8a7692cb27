"""The kernel simulator (``mock_vfio``) as a benchmark :class:`System`.

Each run gets a fresh :class:`mock_vfio.machine.Machine`: resets are real
sleeps and locks are real locks, so what a mode gains from concurrency is
measured.  ``gpus:N``, ``vfs:N`` and ``nvme:N`` are rebuilt with the sweep's
N; another topology is built whole and the run takes its first N IOMMU groups.
The lower bound is :mod:`vfiopy.kmodel`'s prediction for the machine's kernel
version and models, read from its sysfs before anything runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from vfiopy.bench import _vfiopy
from vfiopy.bench._costs import model_costs
from vfiopy.bench._target import Costs, Group, ResetEvent
from vfiopy.kernel import Kernel
from vfiopy.kmodel import KernelModel
from vfiopy.sysfs import Sysfs

PARAMETRIC = ("gpus", "vfs", "nvme")


def _simulator() -> tuple[ModuleType, ModuleType, ModuleType]:
    """``mock_vfio``'s machine, topology and trace modules.

    Imported by name: the simulator is a separate package (tools/mock_vfio),
    absent from a wheel-only install, and --real must work without it.
    """
    try:
        return (
            importlib.import_module("mock_vfio.machine"),
            importlib.import_module("mock_vfio.topology_load"),
            importlib.import_module("mock_vfio.trace"),
        )
    except ImportError as exc:
        raise ValueError(
            "the kernel simulator (package mock_vfio, tools/mock_vfio) is not installed; "
            "install vfiopy from a source checkout (pip install -e .) or use --real"
        ) from exc


def topology_for(spec: str, n: int) -> str:
    """``gpus:16`` with N=4 -> ``gpus:4``; other topologies are used as given."""
    kind, _, num = spec.partition(":")
    if kind in PARAMETRIC and num.isdigit() and n > 0:
        return f"{kind}:{n}"
    return spec


class SimChild:
    """A simulated process holding devices; its exit runs the releases on the caller's thread."""

    def __init__(self, proc: Any, held: _vfiopy.Held) -> None:
        self.proc = proc
        # Kept so the session's objects outlive the setup; the exit releases the fds.
        self.held = held

    def exit(self) -> None:
        self.proc.exit()


class SimSystem:
    def __init__(
        self,
        spec: str,
        n: int,
        kernel_model: str,
        reset_model: str,
        time_scale: float,
        kernel_version: tuple[int, int] | None = None,
    ) -> None:
        self.topology = topology_for(spec, n)
        self.kernel_model = kernel_model
        self.reset_model = reset_model
        self.time_scale = time_scale
        machine, topology, trace = _simulator()
        self._now: Callable[[], float] = trace.now
        from vfiopy.simulate import parse_spec

        self.machine: Any = machine.Machine(
            topology.load_topology(self.topology),
            kernel_model=kernel_model,
            reset_model=reset_model,
            time_scale=time_scale,
            # the version (the spec's, else VFIOPY_SIM_KERNEL_VERSION, default 6.1) decides
            # what the models do not, such as the VFs' device sets
            kernel_version=kernel_version or parse_spec(self.topology).kernel_version,
        )
        self.kernel: Kernel = self.machine.spawn(name="bench")
        groups: dict[int, Group] = {}
        for dev in sorted(self.machine.devices.values(), key=lambda d: d.addr):
            if dev.driver != "vfio-pci" or dev.devset is None:
                continue
            g = groups.setdefault(dev.group_id, Group(str(dev.group_id), dev.devset.name))
            g.devices.append(dev.addr)
        chosen = list(groups.values())
        if n > 0 and topology_for(spec, n + 1) == spec:
            if n > len(chosen):
                raise ValueError(
                    f"topology {spec} has {len(chosen)} IOMMU groups bound to vfio-pci, "
                    f"fewer than --devices {n}"
                )
            chosen = chosen[:n]
        if not chosen:
            raise ValueError(f"topology {self.topology} has no device bound to vfio-pci")
        self.groups = chosen
        self.costs = self._costs()

    def _costs(self) -> Costs:
        m = self.machine
        model = KernelModel(
            Sysfs(self.kernel),
            m.kernel_version,
            serialised=self.kernel_model == "legacy",
            link_delays=self.reset_model == "current",
        )
        return model_costs(model, [d for g in self.groups for d in g.devices])

    @property
    def serialised(self) -> bool:
        return self.kernel_model == "legacy"

    def start_child(self, name: str, groups: Sequence[Group]) -> SimChild:
        proc = self.machine.spawn(name=name)
        held = _vfiopy.open_all(proc, [d for g in groups for d in g.devices])
        return SimChild(proc, held)

    def now(self) -> float:
        return self._now()

    def resets(self) -> list[ResetEvent]:
        # One event per reset operation: a bus reset hits both functions of a GPU.
        return [
            ResetEvent(e.method or "?", e.device or "", e.devset or "", e.start, e.end)
            for e in self.machine.unique_resets()
        ]

    def leave_open(self, close: Callable[[], None]) -> None:
        # The machine goes with the run: its kernel state needs no release.
        pass

    def discard(self) -> None:
        self.machine.close()


class SimFactory:
    """Builds a :class:`SimSystem` per run from one topology spec."""

    def __init__(self, spec: str, kernel_version: tuple[int, int] | None = None) -> None:
        self.spec = spec
        self.kernel_version = kernel_version  # the spec's version=, else the environment's
        _, topology, _ = _simulator()
        topology.load_topology(topology_for(spec, 1))  # unknown names raise ValueError here

    def __call__(self, n: int, kernel_model: str, reset_model: str, time_scale: float) -> SimSystem:
        return SimSystem(self.spec, n, kernel_model, reset_model, time_scale, self.kernel_version)
