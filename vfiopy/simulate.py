"""A simulated kernel for vfiopy, from tools/mock_vfio (the ``mock_vfio`` package).

``VFIOPY_SIMULATE=gpus:8`` makes :func:`vfiopy.kernel.default_kernel` use it.
The spec is a topology (a name, ``gpus:N``, ``vfs:N``, ``nvme:N`` or a TOML
path), optionally followed by ``,version=X.Y``, ``,kernel=X.Y`` (the same;
``kernel=devset|legacy`` names a locking model instead),
``,reset=pre-6.3|current`` and ``,scale=F``; the environment variables
``VFIOPY_SIM_KERNEL_VERSION`` (default 6.1), ``VFIOPY_SIM_KERNEL_MODEL``,
``VFIOPY_SIM_RESET_MODEL`` and ``VFIOPY_SIM_TIME_SCALE`` give the defaults.

The kernel version decides the kernel and reset models that are not chosen:
``legacy`` locking before 5.0, the ``pre-6.3`` reset path before 6.3.  The
spec's options override the environment's, and within either an explicit
model wins over the one its version implies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vfiopy.kernel import Kernel

if TYPE_CHECKING:
    from mock_vfio import Machine


NO_TOPOLOGY = (
    "--simulate needs a topology such as gpus:8 (python -m mock_vfio list); "
    "an empty one would act on this machine's real devices"
)


KERNEL_MODELS = ("devset", "legacy")
RESET_MODELS = ("pre-6.3", "current")


@dataclass(frozen=True)
class SimSpec:
    """A simulation spec with every default applied."""

    topology: str
    kernel_model: str
    reset_model: str
    time_scale: float
    kernel_version: tuple[int, int]


def parse_spec(spec: str) -> SimSpec:
    """The machine a simulation spec (and the VFIOPY_SIM_* environment) describes."""
    from mock_vfio.version import (
        DEFAULT_KERNEL_VERSION,
        default_kernel_model,
        default_reset_model,
        is_version,
        parse_version,
    )

    topo, *opts = (s.strip() for s in spec.split(","))
    given: dict[str, str] = {}
    for opt in opts:
        key, _, val = opt.partition("=")
        if key not in ("version", "kernel", "reset", "scale"):
            raise ValueError(f"unknown simulation option {opt!r} in {spec!r}")
        # kernel=6.1 names the kernel's version; kernel=devset|legacy, a locking model.
        given["version" if key == "kernel" and is_version(val) else key] = val
    env_version = os.environ.get("VFIOPY_SIM_KERNEL_VERSION")
    try:
        if "version" in given:
            version = parse_version(given["version"])
        elif env_version:
            version = parse_version(env_version)
        else:
            version = DEFAULT_KERNEL_VERSION
    except ValueError as exc:
        where = f"spec {spec!r}" if "version" in given else "VFIOPY_SIM_KERNEL_VERSION"
        raise ValueError(f"{exc} in {where}") from None
    # A model the spec implies through its version beats the environment's model.
    env: Mapping[str, str] = {} if "version" in given else os.environ
    kernel = _option(spec, given, env, "kernel", "VFIOPY_SIM_KERNEL_MODEL", KERNEL_MODELS)
    reset = _option(spec, given, env, "reset", "VFIOPY_SIM_RESET_MODEL", RESET_MODELS)
    return SimSpec(
        topology=topo,
        kernel_model=default_kernel_model(version) if kernel is None else kernel,
        reset_model=default_reset_model(version) if reset is None else reset,
        time_scale=_scale(spec, given),
        kernel_version=version,
    )


def _where(spec: str, given: Mapping[str, str], key: str, variable: str) -> str:
    return f"in spec {spec!r}" if key in given else f"in {variable}"


def _option(
    spec: str,
    given: Mapping[str, str],
    env: Mapping[str, str],
    key: str,
    variable: str,
    choices: tuple[str, ...],
) -> str | None:
    """A model named in the spec, else in the environment; ValueError for an unknown one."""
    value = given.get(key, env.get(variable))
    if value is not None and value not in choices:
        raise ValueError(
            f"{key}={value} {_where(spec, given, key, variable)}: choose {' or '.join(choices)}"
        )
    return value


def _scale(spec: str, given: Mapping[str, str]) -> float:
    text = given.get("scale", os.environ.get("VFIOPY_SIM_TIME_SCALE", "1.0"))
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale >= 0):
        where = _where(spec, given, "scale", "VFIOPY_SIM_TIME_SCALE")
        raise ValueError(f"scale={text} {where}: give a number >= 0 (1 is real time)")
    return scale


def simulated_kernel(spec: str) -> Kernel:
    """A new simulated machine for ``spec`` and one process in it, as a Kernel."""
    from mock_vfio import Machine, load_topology

    s = parse_spec(spec)
    machine = Machine(
        load_topology(s.topology),
        kernel_model=s.kernel_model,
        reset_model=s.reset_model,
        time_scale=s.time_scale,
        kernel_version=s.kernel_version,
    )
    return machine.spawn(name="vfiopy")


def machine_of(kernel: object) -> Machine | None:
    """The simulated machine behind ``kernel``, or None for a real kernel."""
    try:
        from mock_vfio import SimProcess
    except ImportError:  # the simulator is not installed (e.g. a real-kernel guest)
        return None
    return kernel.machine if isinstance(kernel, SimProcess) else None


__all__ = ["SimSpec", "machine_of", "parse_spec", "simulated_kernel"]
