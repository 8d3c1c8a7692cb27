"""``python -m vfiopy.sriov``: see :mod:`vfiopy.sriov.cli`."""

from __future__ import annotations

from vfiopy.sriov.cli import run

if __name__ == "__main__":
    run()
