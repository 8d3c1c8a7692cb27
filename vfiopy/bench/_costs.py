"""The modelled lower bound: what the kernel must do, from the topology, never from a run.

vfio-pci's work per device set (drivers/vfio/pci/vfio_pci_core.c), all under
the set's mutex, hence serial inside a set:

* open: ``vfio_pci_core_enable`` -> ``pci_try_reset_function``: one function
  reset when the device has one (``reset_works``);
* last close: ``vfio_pci_core_disable`` does that function reset again, and
  ``vfio_pci_dev_set_try_reset`` bus-resets the set once when a device of it
  could not be function-reset (``needs_reset`` still set) and none is open.

Sets run in parallel since Linux 5.0; before, a global ``driver_lock``
serialised every open and release, so the bound is then the sum of the sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vfiopy.bench._target import Costs

# Methods that reset more than the function: usable as a function reset only
# when the function is alone on its bus (pci_parent_bus_reset/pci_reset_bus_function).
BUS_METHODS = frozenset({"bus", "cxl_bus"})


@dataclass(frozen=True, slots=True)
class FunctionModel:
    """One chosen function as the kernel sees it."""

    address: str
    devset: str
    methods: tuple[str, ...]
    alone_on_bus: bool

    @property
    def function_reset(self) -> str | None:
        """The method ``__pci_reset_function_locked`` would use, or ``None``."""
        for m in self.methods:
            if m in BUS_METHODS and not self.alone_on_bus:
                continue
            return m
        return None


def model_costs(
    functions: Sequence[FunctionModel],
    method_cost: Callable[[FunctionModel, str], float],
    bus_cost: Callable[[str], float | None],
) -> Costs:
    """Per device set: the serial work at teardown and at bring-up, and reset counts.

    ``method_cost(f, method)`` is the modelled time of one function reset,
    ``bus_cost(devset)`` that of the set's bus (or slot) reset, unscaled, or
    ``None`` where the kernel cannot reset the set (then the close does none).
    """
    teardown: dict[str, float] = {}
    bringup: dict[str, float] = {}
    needs_bus: set[str] = set()
    t_resets = b_resets = 0
    for f in functions:
        teardown.setdefault(f.devset, 0.0)
        bringup.setdefault(f.devset, 0.0)
        method = f.function_reset
        if method is None:
            needs_bus.add(f.devset)
            continue
        cost = method_cost(f, method)
        teardown[f.devset] += cost
        bringup[f.devset] += cost
        t_resets += 1
        b_resets += 1
    for s in needs_bus:
        bus = bus_cost(s)
        if bus is not None:
            teardown[s] += bus
            t_resets += 1
    return Costs(teardown, bringup, t_resets, b_resets)


# Nominal costs for real devices (seconds): PCIe r6.0 sec 6.6.2 gives 100 ms
# after an FLR; pci_pm_reset waits 10 ms twice (d3hot_delay); before 6.3 a
# secondary bus reset slept 1 s after deasserting reset, 6.3+ waits 100 ms on
# fast links (pci_bridge_wait_for_secondary_bus), so 100 ms is the floor.
NOMINAL_METHOD_S = {"flr": 0.1, "af_flr": 0.1, "pm": 0.02, "device_specific": 0.1}
BUS_PRE_6_3_S = 1.0
BUS_CURRENT_MIN_S = 0.1


def kernel_at_least(release: str, version: tuple[int, int]) -> bool:
    """Whether ``uname -r`` text names ``version`` or later (unparsable: assume so)."""
    parts = release.split(".")
    try:
        major, minor = int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return True
    return (major, minor) >= version
