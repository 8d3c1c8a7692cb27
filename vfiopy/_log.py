"""vfiopy's loggers: structlog, following the application's configuration.

The library never configures logging.  Until the application configures
structlog, structlog's default prints every event, debug ones included, to
stdout, in the middle of the program's own output; so until then vfiopy's
loggers do what the standard library does for a library without handlers:
events at warning and above go to stderr, the others are dropped.  Once the
application calls ``structlog.configure``, every event follows it.
"""

from __future__ import annotations

import sys
from typing import Any


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (pytest swaps it per test)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


# structlog (and logging) are imported at the first event, not with vfiopy: structlog imports
# asyncio and ssl, a large part of a command-line tool's start-up.
_structlog: Any = None
_LAST_RESORT: Any = None


def _load() -> Any:
    global _structlog, _LAST_RESORT
    import logging

    import structlog

    _LAST_RESORT = structlog.wrap_logger(
        _Stderr(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    _structlog = structlog
    return structlog


class Logger:
    """A module's logger: structlog's for ``name`` once structlog is configured."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._configured: Any = None

    def _target(self) -> Any:
        structlog = _structlog or _load()
        if not structlog.is_configured():
            return _LAST_RESORT
        if self._configured is None:
            self._configured = structlog.get_logger(self._name)
        return self._configured

    def bind(self, **values: Any) -> Any:
        return self._target().bind(**values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)


def get_logger(name: str) -> Logger:
    return Logger(name)
