"""vfiopy's loggers: structlog, following the application's configuration.

The library never configures logging.  Until the application configures
structlog, structlog's default prints every event, debug ones included, to
stdout, in the middle of the program's own output; so until then vfiopy's
loggers do what the standard library does for a library without handlers:
events at warning and above go to stderr, the others are dropped.  Once the
application calls ``structlog.configure``, every event follows it.  A command line may
defer its set-up to its first event that the set-up would not drop
(:func:`defer_configuration`): a quiet run then never imports structlog.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
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


# A command line's set-up waiting for the first event it would not drop: (level, set-up).
_deferred: tuple[int, Callable[[], None]] | None = None
_deferred_lock = threading.Lock()
_LEVELS = {
    "debug": 10,
    "info": 20,
    "warn": 30,
    "warning": 30,
    "err": 40,
    "error": 40,
    "exception": 40,
    "critical": 50,
    "fatal": 50,
}


def defer_configuration(level: int, configure: Callable[[], None]) -> None:
    """Run ``configure``, a structlog set-up that drops the events below ``level``, at the
    first event at ``level`` or above (or the first ``bind``); until then the events below
    it are dropped as that set-up would, and structlog is not imported: a quiet command
    line does not pay for it."""
    global _deferred
    with _deferred_lock:
        _deferred = (level, configure)


def forget_deferred_configuration() -> None:
    """Drop a set-up of :func:`defer_configuration` that no event has run."""
    global _deferred
    with _deferred_lock:
        _deferred = None


def _drops(name: str) -> bool:
    """Whether the deferred set-up would drop the events of method ``name``; when it would
    keep them, it runs now (another thread's event waits until it is done)."""
    global _deferred
    deferred = _deferred
    if deferred is None:
        return False
    if _LEVELS.get(name, deferred[0]) < deferred[0]:
        return True
    with _deferred_lock:
        if _deferred is not None:
            _deferred[1]()
            _deferred = None
    return False


def _drop(*_args: Any, **_values: Any) -> None:
    return None


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
        if _deferred is not None:
            return _BoundLater(self, values)
        return self._target().bind(**values)

    def __getattr__(self, name: str) -> Any:
        if _drops(name):
            return _drop
        return getattr(self._target(), name)


def get_logger(name: str) -> Logger:
    return Logger(name)


class _BoundLater:
    """``bind`` while a command line's set-up waits: the same dropping until then, and
    structlog's logger bound once, when the set-up has run (as ``bind`` would have)."""

    def __init__(self, logger: Logger, values: dict[str, Any]) -> None:
        self._logger = logger
        self._values = values
        self._bound: Any = None

    def bind(self, **values: Any) -> Any:
        return self._logger.bind(**self._values, **values)

    def __getattr__(self, name: str) -> Any:
        if self._bound is None:
            if _drops(name):
                return _drop
            self._bound = self._logger._target().bind(**self._values)
        return getattr(self._bound, name)
