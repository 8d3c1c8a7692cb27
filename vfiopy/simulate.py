"""A simulated kernel for vfiopy, from tools/mock_vfio (the ``mock_vfio`` package).

``VFIOPY_SIMULATE=gpus:8`` makes :func:`vfiopy.kernel.default_kernel` use it.
The spec is a topology (a name, ``gpus:N``, ``vfs:N``, ``nvme:N`` or a TOML
path), optionally followed by ``,kernel=devset|legacy``, ``,reset=pre-6.3|current``
and ``,scale=F``; the environment variables ``VFIOPY_SIM_KERNEL_MODEL``,
``VFIOPY_SIM_RESET_MODEL`` and ``VFIOPY_SIM_TIME_SCALE`` give the defaults.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vfiopy.kernel import Kernel

if TYPE_CHECKING:
    from mock_vfio import Machine


def parse_spec(spec: str) -> tuple[str, str, str, float]:
    """(topology, kernel model, reset model, time scale) of a simulation spec."""
    topo, *opts = (s.strip() for s in spec.split(","))
    kernel = os.environ.get("VFIOPY_SIM_KERNEL_MODEL", "devset")
    reset = os.environ.get("VFIOPY_SIM_RESET_MODEL", "pre-6.3")
    scale = float(os.environ.get("VFIOPY_SIM_TIME_SCALE", "1.0"))
    for opt in opts:
        key, _, val = opt.partition("=")
        if key == "kernel":
            kernel = val
        elif key == "reset":
            reset = val
        elif key == "scale":
            scale = float(val)
        else:
            raise ValueError(f"unknown simulation option {opt!r} in {spec!r}")
    return topo, kernel, reset, scale


def simulated_kernel(spec: str) -> Kernel:
    """A new simulated machine for ``spec`` and one process in it, as a Kernel."""
    from mock_vfio import Machine, load_topology

    topo, kernel, reset, scale = parse_spec(spec)
    machine = Machine(load_topology(topo), kernel_model=kernel, reset_model=reset, time_scale=scale)
    return machine.spawn(name="vfiopy")


def machine_of(kernel: object) -> Machine | None:
    """The simulated machine behind ``kernel``, or None for a real kernel."""
    try:
        from mock_vfio import SimProcess
    except ImportError:  # the simulator is not installed (e.g. a real-kernel guest)
        return None
    return kernel.machine if isinstance(kernel, SimProcess) else None


__all__ = ["machine_of", "parse_spec", "simulated_kernel"]
