"""``--startup``: how long the command-line tools take to start, timed as whole processes.

Each round starts a fresh interpreter for every command in turn (a bare ``python -c
pass``, then each tool's ``--help``), so a drift in the machine's speed touches all of
them alike.  A tool's figure is its median wall time over the bare interpreter's: what
importing it and reading its arguments cost, against a target of 60 ms.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from vfiopy.bench._results import SCHEMA, machine_info

TARGET_S = 0.060
BARE = ("-c", "pass")
TOOLS = (("-m", "vfiopy.release", "--help"), ("-m", "vfiopy.bench", "--help"))


@dataclass(slots=True)
class Command:
    """One command's wall times, one per round."""

    argv: tuple[str, ...]
    wall_s: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " ".join(("python", *self.argv))

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.name,
            "min_s": min(self.wall_s),
            "median_s": self.median_s,
            "max_s": max(self.wall_s),
        }


@dataclass(slots=True)
class Startup:
    bare: Command
    tools: list[Command]

    def over_s(self, tool: Command) -> float:
        """The tool's median wall time over the bare interpreter's."""
        return tool.median_s - self.bare.median_s

    def to_json(self) -> dict[str, Any]:
        """The document ``--json`` writes (the sweep's schema number, a ``startup`` part)."""
        return {
            "schema": SCHEMA,
            "machine": machine_info(),
            "startup": {
                "rounds": len(self.bare.wall_s),
                "target_over_bare_s": TARGET_S,
                "bare": self.bare.to_json(),
                "tools": [t.to_json() | {"over_bare_s": self.over_s(t)} for t in self.tools],
            },
        }

    def lines(self) -> list[str]:
        width = max(len(c.name) for c in (self.bare, *self.tools))
        out = [
            f"start-up, whole processes with bytecode caches, {len(self.bare.wall_s)} rounds "
            "(wall ms: min, median, max)"
        ]
        for c in (self.bare, *self.tools):
            row = f"  {c.name:<{width}}  " + "  ".join(
                f"{1000 * s:6.1f}" for s in (min(c.wall_s), c.median_s, max(c.wall_s))
            )
            if c is not self.bare:
                over = self.over_s(c)
                verdict = "within" if over <= TARGET_S else "OVER"
                row += f"  {1000 * over:+.1f} ms over bare: {verdict} the {TARGET_S * 1000:.0f} ms target"
            out.append(row)
        return out


def _time(argv: tuple[str, ...], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        check=True,
    )
    return time.perf_counter() - start


def measure(rounds: int) -> Startup:
    """``rounds`` rounds of every command, after one that is not counted.

    The commands run with bytecode caches, as an installed package does, even where
    PYTHONDONTWRITEBYTECODE is set: the uncounted round writes them to a temporary folder
    (PYTHONPYCACHEPREFIX), not beside the sources, and the folder goes at the end.
    """
    startup = Startup(Command(BARE), [Command(argv) for argv in TOOLS])
    commands = [startup.bare, *startup.tools]
    with tempfile.TemporaryDirectory(prefix="vfiopy-startup-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        for c in commands:
            _time(c.argv, env)
        for _ in range(rounds):
            for c in commands:
                c.wall_s.append(_time(c.argv, env))
    return startup
