"""One benchmark run's numbers, and the versioned JSON document that holds a sweep."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = 1

# Phases: what a run times.
TEARDOWN = "teardown"
BRINGUP = "bringup"


@dataclass(slots=True)
class RunResult:
    """What one mode did to one set of devices on one kernel model.

    ``lower_bound_s`` comes from the topology's modelled costs (never from a
    measured run); ``cpu_s`` is the benchmark process's CPU time over the timed
    window, which on the simulator includes the simulator's own Python.
    """

    mode: str
    phase: str
    n_devices: int
    kernel_model: str
    reset_model: str
    time_scale: float
    topology: str
    n_functions: int = 0
    n_domains: int = 0
    wall_s: float = 0.0
    resets: int = 0
    expected_resets: int | None = None
    lower_bound_s: float = 0.0
    cpu_s: float = 0.0
    max_concurrent_resets: int = 0
    target_s: float | None = None
    ok: bool = True
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        """Wall time over the lower bound; ``None`` where the bound is zero."""
        return self.wall_s / self.lower_bound_s if self.lower_bound_s > 0 else None

    @property
    def cpu_per_device_ms(self) -> float:
        return 1000.0 * self.cpu_s / self.n_functions if self.n_functions else 0.0

    @property
    def meets_target(self) -> bool | None:
        return None if self.target_s is None else self.ok and self.wall_s <= self.target_s

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["wall_s"] = round(self.wall_s, 6)
        out["lower_bound_s"] = round(self.lower_bound_s, 6)
        out["cpu_s"] = round(self.cpu_s, 6)
        ratio = self.ratio
        out["ratio"] = None if ratio is None else round(ratio, 4)
        out["cpu_per_device_ms"] = round(self.cpu_per_device_ms, 4)
        out["meets_target"] = self.meets_target
        return out


@dataclass(slots=True)
class MmioResult:
    """Mapped-BAR ``read32`` cost: ``ns_per_call`` over ``calls`` reads of one register;
    and the write bandwidth of 4 KiB bursts into ``write_region`` mapped uncached and, where
    the BAR is prefetchable and ``resourceN_wc`` maps, write-combining (MB/s, medians)."""

    device: str
    region: int
    calls: int
    ns_per_call: float
    backend: str
    write_region: int | None = None
    write_uncached_mbps: float | None = None
    write_wc_mbps: float | None = None
    write_wc_unavailable: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ns_per_call"] = round(self.ns_per_call, 2)
        for key in ("write_uncached_mbps", "write_wc_mbps"):
            if out[key] is not None:
                out[key] = round(out[key], 1)
        return out


@dataclass(slots=True)
class Sweep:
    """Every run of one invocation, plus where it ran."""

    runs: list[RunResult] = field(default_factory=list)
    mmio: MmioResult | None = None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "machine": machine_info(),
            "args": self.args,
            "runs": [r.to_json() for r in self.runs],
            "mmio": None if self.mmio is None else self.mmio.to_json(),
        }


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (``/proc/cpuinfo``), or the platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # here and below, not with the benchmark's command line (--help)

    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import platform

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
    }
