"""What a benchmark mode runs against: a fresh system per run, simulated or real.

A :class:`System` is one measurement's world: the kernel of the benchmark
process, the devices chosen for the run grouped by IOMMU group and reset
domain, a way to start more processes (mode ``procs`` and ``exit``), and the
resets the kernel performed, where those can be observed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from vfiopy.release._report import max_overlap as _max_overlap

if TYPE_CHECKING:
    from vfiopy.kernel import Kernel


@dataclass(frozen=True, slots=True)
class ResetEvent:
    """One reset the kernel did; times in seconds on the system's own clock."""

    kind: str
    device: str
    devset: str
    start: float
    end: float


@dataclass(slots=True)
class Group:
    """The devices of one IOMMU group chosen for a run (the unit a process opens)."""

    group: str
    domain: str
    devices: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Costs:
    """Modelled costs of the chosen devices, unscaled seconds, from the topology.

    ``teardown``/``bringup`` hold, per reset domain (kernel device set), the
    serial work the kernel does there under the set's lock: function resets
    of each device plus the one bus reset at the set's last close.
    """

    teardown: dict[str, float]
    bringup: dict[str, float]
    # How many resets a full teardown/bring-up of the chosen devices causes.
    teardown_resets: int
    bringup_resets: int

    def lower_bound(self, phase_costs: dict[str, float], serialised: bool) -> float:
        """The longest domain, or (one global lock, kernels before 5.0) all of them."""
        if not phase_costs:
            return 0.0
        return sum(phase_costs.values()) if serialised else max(phase_costs.values())


class Child(Protocol):
    """A process holding devices open, which exits when told (mode ``exit``/``procs``)."""

    def exit(self) -> None:
        """Make the process exit; return once the kernel released its files."""
        ...


class System(Protocol):
    topology: str
    kernel_model: str
    reset_model: str
    time_scale: float
    kernel: Kernel
    groups: list[Group]
    costs: Costs

    @property
    def serialised(self) -> bool:
        """Whether one lock serialises every release (the legacy, pre-5.0 kernel)."""
        ...

    def start_child(self, name: str, groups: Sequence[Group]) -> Child:
        """A process that opened every device of ``groups`` and waits to exit."""
        ...

    def now(self) -> float:
        """The clock of :meth:`resets`."""
        ...

    def resets(self) -> list[ResetEvent] | None:
        """Every reset so far, or ``None`` where they cannot be observed."""
        ...

    def leave_open(self, close: Callable[[], None]) -> None:
        """Devices a bring-up mode opened: ``close`` them at :meth:`discard` if it matters."""
        ...

    def discard(self) -> None:
        """Drop the system; on real devices, close what the run left open."""
        ...


def max_overlap(events: Sequence[ResetEvent]) -> int:
    """The most resets in progress at one instant."""
    return _max_overlap((e.start, e.end) for e in events)
