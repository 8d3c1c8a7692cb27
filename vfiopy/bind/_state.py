"""The bind state file: each device's driver before vfiopy bound it to vfio-pci.

It lives under ``/run`` (default ``/run/vfiopy/bind.json``): a tmpfs cleared at boot,
when every device is back on the driver the kernel probes for it, so a state older than
the boot is never applied.  It is vfiopy's own file, not a kernel interface, so it is
read and written with ordinary file calls rather than through the Kernel seam; tests and
the simulator point it elsewhere.

Writers take an exclusive ``flock`` on ``PATH.lock`` for the whole read-change-write, and
replace the file atomically (write a temporary file, fsync, rename), so two runs at once
and a crash mid-write both leave a whole file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from vfiopy.errors import VfioError

DEFAULT_STATE_PATH = "/run/vfiopy/bind.json"
SCHEMA = 1


class StateError(VfioError):
    """The state file cannot be read or written."""

    step_name = "state file"


@dataclass
class Entry:
    """One device: the driver (and driver_override) it had before vfiopy bound it."""

    driver: str | None
    override: str | None
    group: int
    bound_at: float

    @classmethod
    def from_json(cls, raw: object) -> Entry:
        if not isinstance(raw, dict):
            raise ValueError(f"entry {raw!r} is not an object")
        driver, override = raw.get("driver"), raw.get("override")
        group, at = raw.get("group", -1), raw.get("bound_at", 0.0)
        if not (driver is None or isinstance(driver, str)) or not (
            override is None or isinstance(override, str)
        ):
            raise ValueError(f"entry {raw!r}: driver and override must be strings or null")
        if isinstance(group, bool) or not isinstance(group, int):
            raise ValueError(f"entry {raw!r}: group must be an integer")
        if isinstance(at, bool) or not isinstance(at, int | float):
            raise ValueError(f"entry {raw!r}: bound_at must be a number")
        return cls(driver, override, group, float(at))


class BindState:
    """The state file at ``path``."""

    def __init__(self, path: str = DEFAULT_STATE_PATH) -> None:
        self.path = path

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> dict[str, Entry]:
        """The entries by address; empty when there is no file.

        A file that is not a state file (bad JSON, another schema) raises
        :class:`StateError` naming it: it is never guessed at, nor overwritten.
        """
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise self._bad(f"cannot read it: {exc}") from None
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise self._bad(f"not a vfiopy bind state (schema {SCHEMA})")
        devices = raw.get("devices")
        if not isinstance(devices, dict):
            raise self._bad("its devices are not an object")
        try:
            return {str(a): Entry.from_json(e) for a, e in devices.items()}
        except ValueError as exc:
            raise self._bad(str(exc)) from None

    def _bad(self, detail: str) -> StateError:
        return StateError(
            errno.EINVAL,
            None,
            f"read {self.path}",
            detail=detail,
            advice="move it aside; restore the devices with --driver NAME",
        )

    def save(self, entries: dict[str, Entry]) -> None:
        """Replace the file with ``entries`` (removing it when there are none)."""
        try:
            if not entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                return
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
            doc = {"schema": SCHEMA, "devices": {a: asdict(e) for a, e in sorted(entries.items())}}
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StateError.from_oserror(
                exc,
                None,
                f"write {self.path}",
                advice="run as root, or choose a writable place with --state PATH",
            ) from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Entry]]:
        """The entries under the file's lock; the caller saves what it changed."""
        lock = f"{self.path}.lock"
        try:
            os.makedirs(os.path.dirname(lock) or ".", mode=0o755, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError.from_oserror(
                exc,
                None,
                f"lock {lock}",
                advice="run as root, or choose a writable place with --state PATH",
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.load()
        finally:
            os.close(fd)


def now() -> float:
    return time.time()


__all__ = ["DEFAULT_STATE_PATH", "BindState", "Entry", "StateError"]
