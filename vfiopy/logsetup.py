"""Logging set-up for vfiopy's command-line tools (the library itself never configures logging).

DESIGN: structlog events on stderr, a console renderer on a TTY and JSON lines
otherwise, so machine-readable results on stdout stay clean.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, TextIO


def configure_cli_logging(level: int = logging.WARNING, stream: TextIO | None = None) -> None:
    """Send structlog events at ``level`` and above to ``stream`` (default stderr)."""
    import structlog  # here, not above: it imports asyncio, which `--help` need not pay for

    out = stream if stream is not None else sys.stderr
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if out.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def defer_cli_logging(level: int = logging.WARNING, stream: TextIO | None = None) -> None:
    """:func:`configure_cli_logging` at vfiopy's first event at ``level`` or above: a run
    that logs nothing at that level (``-q``) never imports structlog."""
    from vfiopy._log import defer_configuration

    defer_configuration(level, functools.partial(configure_cli_logging, level, stream))


def verbosity_level(verbose: int, quiet: bool = False, default: int = logging.WARNING) -> int:
    """The level for ``-v`` counts: -q errors only, -v info, -vv debug."""
    if quiet:
        return logging.ERROR
    if verbose >= 2:
        return logging.DEBUG
    if verbose:
        return logging.INFO
    return default
