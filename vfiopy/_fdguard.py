"""An fd number shared by an object and the objects derived from it.

The kernel hands a closed fd number to the very next open, so an object that
keeps using its number after close reads or writes whatever file got it (the
next device opened, say).  Every use of a guarded number therefore goes
through :meth:`FdGuard.hold`, and :meth:`FdGuard.shut` refuses new uses and
waits for those in flight before the owner may close the number.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from types import TracebackType

    from vfiopy.errors import VfioError

E = TypeVar("E", bound="VfioError")


class FdGuard:
    """Counts the uses of ``fd`` in flight; once shut, every new use raises EBADF.

    ``with guard.hold(error, step) as fd:`` yields the number or raises ``error``
    (errno EBADF, naming ``name`` and ``step``) when the owner is closed.
    """

    __slots__ = ("_cond", "_users", "closed", "fd", "name", "what")

    def __init__(self, fd: int, name: str, what: str = "the device") -> None:
        self.fd = fd
        self.name = name
        self.what = what
        self.closed = False
        self._users = 0
        self._cond = threading.Condition(threading.Lock())

    def closed_error(self, error: type[E], step: str | None) -> E:
        return error(errno.EBADF, self.name, step, detail=f"{self.what} is closed")

    def hold(self, error: type[VfioError], step: str | None = None) -> _Use:
        """One use: the ``with`` block gets the fd, or ``error`` when the owner is closed."""
        return _Use(self, error, step)

    def enter(self, error: type[VfioError], step: str | None) -> int:
        with self._cond:
            if self.closed:
                raise self.closed_error(error, step)
            self._users += 1
        return self.fd

    def leave(self) -> None:
        with self._cond:
            self._users -= 1
            if not self._users:
                self._cond.notify_all()

    def shut(self) -> bool:
        """Refuse new uses and wait for the ones in flight; False when already shut.

        Called by the owner's close, which may then close the fd: no use of the
        number can still be running, nor start later.
        """
        with self._cond:
            if self.closed:
                return False
            self.closed = True
            self._cond.wait_for(lambda: not self._users)
        return True


class _Use:
    """A ``with`` block using a guarded fd: counted from its start to its end."""

    __slots__ = ("error", "guard", "step")

    def __init__(self, guard: FdGuard, error: type[VfioError], step: str | None) -> None:
        self.guard, self.error, self.step = guard, error, step

    def __enter__(self) -> int:
        return self.guard.enter(self.error, self.step)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.guard.leave()


__all__ = ["FdGuard"]
