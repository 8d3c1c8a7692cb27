"""``python -m vfiopy.release``: see :mod:`vfiopy.release.cli`."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from vfiopy.release import cli


def run() -> NoReturn:
    """Run the CLI and exit with its status (also the ``vfiopy-release`` console script)."""
    code = cli.main()
    if cli.abandoned_workers:
        # A worker stuck in a hung reset would keep the interpreter from exiting
        # (thread pools join their threads): report, then leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
