"""The release's figures that its command line's usage prints.

``--help`` shows the JSON schema and the default thread cap, so they live here,
in a module that imports nothing: their users (:mod:`vfiopy.release._engine`,
:mod:`vfiopy.release._report`) import anyio, dataclasses and structlog, which
a command line that only prints its usage need not load.
"""

from __future__ import annotations

SCHEMA = 1
"""Version of the JSON document a run writes (``Report.to_json``)."""

DEFAULT_MAX_PARALLEL = 4096
"""Worker threads at most (one per reset domain below it).  Each one sleeps in the kernel
for a reset, so threads are cheap; a cap below the domain count turns one reset of time
into several rounds (2048 VFs behind a cap of 256 take 8 FLRs)."""
