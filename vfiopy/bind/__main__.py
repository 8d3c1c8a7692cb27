"""``python -m vfiopy.bind``: see :mod:`vfiopy.bind.cli`."""

from __future__ import annotations

from vfiopy.bind.cli import run

if __name__ == "__main__":
    run()
