"""The modelled lower bound: what the kernel must do, from the topology, never from a run.

The resets and their costs come from :mod:`vfiopy.kmodel`: per device set,
everything the kernel does runs under the set's mutex, hence in series, so a
set's time is the sum of its resets; sets run side by side, except under the
global lock of kernels before 5.0, where the bound is the sum of the sets.
"""

from __future__ import annotations

from collections.abc import Sequence

from vfiopy.bench._target import Costs
from vfiopy.kmodel import KernelModel


def model_costs(model: KernelModel, addresses: Sequence[str]) -> Costs:
    """Per device set: the serial work at teardown and at bring-up of ``addresses``."""
    teardown: dict[str, float] = {}
    bringup: dict[str, float] = {}
    for p in model.closes(addresses):
        teardown[p.set.id] = teardown.get(p.set.id, 0.0) + p.seconds
    t_resets = sum(p.count for p in model.closes(addresses))
    opens = model.opens(addresses)
    for p in opens:
        bringup[p.set.id] = bringup.get(p.set.id, 0.0) + p.seconds
    return Costs(teardown, bringup, t_resets, sum(p.count for p in opens))
