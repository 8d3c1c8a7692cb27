"""The bench's modes by name: the letter of the original report and what each does.

``--help`` lists them, so this module imports nothing: the modes themselves
(:mod:`vfiopy.bench._modes`) bring in the release machinery and the simulator's
helpers, which a command line that only prints its usage need not load.
"""

from __future__ import annotations

# name -> (letter, description); the release benchmark's default sweep, in its order
SWEEP_MODES: dict[str, tuple[str, str]] = {
    "exit": ("e", "one process holds all and exits"),
    "close": ("c", "close loop"),
    "threads": ("t", "one thread per device fd"),
    "procs": ("p", "one process per IOMMU group, exiting at once"),
    "vfiopy": ("v", "release manager, concurrent per domain"),
    "vfiopy-planned": ("V", "release manager with the plan made beforehand"),
    "open": ("o", "open loop"),
    "acquire": ("a", "release manager's concurrent acquire"),
    "acquire-planned": ("A", "concurrent acquire with the plan made beforehand"),
}

# Host-driver modes (simulator only): asked for by name, never in the default sweep.
HOST_MODES: dict[str, tuple[str, str]] = {
    "restore-parallel": (
        "r",
        "vfiopy-bind restore: host drivers back, probes in parallel (simulator)",
    ),
    "restore-serial": (
        "s",
        "the same one device at a time, as a serial reattach does (simulator)",
    ),
    "bringup": (
        "b",
        "open, bus master, map BARs, MSI-X, device after device; no MEMORY flip of "
        "vfiopy's own (simulator)",
    ),
    "bringup-naive": (
        "n",
        "the same, sizing each BAR by writing it with decoding off (simulator)",
    ),
}
