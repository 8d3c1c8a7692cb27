"""A one-line progress display on stderr for sweeps long enough to wonder about."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

# Short sweeps finish before a display would help; showing one only flickers.
_SHOW_AFTER_S = 2.0
_REFRESH_S = 0.5


class Progress:
    """``[k/total] run, elapsed`` rewritten in place; silent unless ``stream`` is a TTY.

    A ticker thread refreshes the line, so a single long run (64 sequential
    one-second bus resets) still shows that time passes.
    """

    def __init__(
        self, total: int, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._done = 0
        self._what = ""
        self._start = time.monotonic()
        self._width = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._ticker = threading.Thread(target=self._tick, name="bench-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()

    def start(self, what: str) -> None:
        """Say which run starts now."""
        with self._lock:
            self._what = what
        self._draw()

    def advance(self) -> None:
        with self._lock:
            self._done += 1

    def _tick(self) -> None:
        while not self._stop.wait(_REFRESH_S):
            self._draw()

    def _draw(self) -> None:
        elapsed = time.monotonic() - self._start
        if not self.enabled or elapsed < _SHOW_AFTER_S:
            return
        with self._lock:
            if self._stop.is_set():
                return
            line = f"[{min(self._done + 1, self.total)}/{self.total}] {self._what}  {elapsed:.0f} s"
            self.stream.write("\r" + line.ljust(self._width))
            self.stream.flush()
            self._width = max(self._width, len(line))
