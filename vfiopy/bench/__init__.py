"""``python -m vfiopy.bench``: concurrent release versus close loops and process exit.

Times how long N VFIO devices take to release (process exit, a close loop, a
thread per fd, a process per group, vfiopy's release manager) and to open
(a loop, concurrent acquire), on the kernel simulator or on real devices, and
compares each run with the lower bound modelled from the topology's costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vfiopy.bench._cli import main as main
    from vfiopy.bench._cli import run as run
    from vfiopy.bench._modes import MODES as MODES
    from vfiopy.bench._results import SCHEMA as SCHEMA
    from vfiopy.bench._results import MmioResult as MmioResult
    from vfiopy.bench._results import RunResult as RunResult
    from vfiopy.bench._results import Sweep as Sweep
else:
    # Imported at first use (see vfiopy._lazy): `python -m vfiopy.bench --help` imports this
    # package before its command line is read, and the modes import the release machinery.
    from vfiopy._lazy import lazy_exports

    __getattr__, __dir__, _ = lazy_exports(
        globals(),
        {
            "vfiopy.bench._cli": ("main", "run"),
            "vfiopy.bench._modes": ("MODES",),
            "vfiopy.bench._results": ("SCHEMA", "MmioResult", "RunResult", "Sweep"),
        },
    )

__all__ = ["MODES", "SCHEMA", "MmioResult", "RunResult", "Sweep", "main", "run"]
