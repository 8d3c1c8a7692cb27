"""``python -m vfiopy.release``: see :mod:`vfiopy.release.cli`."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from vfiopy.release import cli


def run() -> NoReturn:
    """Run the CLI and exit with its status (also the ``vfiopy-release`` console script)."""
    code = cli.main()
    # Everything is released and reported by now: leave without the interpreter's
    # teardown (module finalisation, thread-pool joins), which a VMM manager waiting
    # for this process would otherwise wait for too; a worker abandoned in a hung
    # reset (--timeout) would even keep the interpreter from exiting.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
