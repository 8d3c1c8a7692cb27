"""Which simulated task a thread runs for, and its uninterruptible (D-state) waits.

A thread inside a simulated system call runs for that call's process, as a kernel thread of
control runs for ``current``.  A wait that the kernel does in TASK_UNINTERRUPTIBLE (a device
reset, which holds its locks until the hardware is back) marks the process ``D`` for as long
as it lasts: /proc/PID/stat shows it, and neither SIGKILL nor the exit that follows can end
the process before the wait returns (kernel/exit.c: a task reaches do_exit only on its way
out of the call).  Signals as the simulated processes take them: SIGTERM and SIGKILL both
end them (kernel/signal.c with no handler installed).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


def current() -> TaskSched | None:
    """The process this thread runs a system call for, if any."""
    task: TaskSched | None = getattr(_local, "task", None)
    return task


@contextmanager
def running(task: TaskSched) -> Iterator[None]:
    """Run the body as ``task``'s system call (nests: the previous task comes back)."""
    prev = getattr(_local, "task", None)
    _local.task = task
    try:
        yield
    finally:
        _local.task = prev


def uninterruptible(wait: Callable[[], object]) -> None:
    """``wait()`` in D state on behalf of the current task (none: a plain wait)."""
    task = current()
    if task is None:
        wait()
        return
    task.enter_uninterruptible()
    try:
        wait()
    finally:
        task.leave_uninterruptible()


class TaskSched:
    """A process's scheduling state: its threads in uninterruptible waits, and its exit."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._dwaits = 0
        self._exit_started = False

    @property
    def state(self) -> str:
        """The state letter of /proc/PID/stat: D while a thread waits uninterruptibly, else S
        (a simulated process sleeps between its calls)."""
        with self._cond:
            return "D" if self._dwaits else "S"

    def enter_uninterruptible(self) -> None:
        with self._cond:
            self._dwaits += 1

    def leave_uninterruptible(self) -> None:
        with self._cond:
            self._dwaits -= 1
            self._cond.notify_all()

    def begin_exit(self) -> bool:
        """Wait until no thread is in an uninterruptible wait (only then does a killed task
        reach do_exit); False when another exit of the process started first."""
        with self._cond:
            self._cond.wait_for(lambda: self._dwaits == 0)
            started, self._exit_started = self._exit_started, True
            return not started

    def deliver(self, sig: int, exit_task: Callable[[], None], name: str) -> None:
        """SIGKILL or SIGTERM (which the simulated processes do not catch): the exit runs on
        the sender's thread, or on a thread of its own when it cannot start at once (SIGTERM's
        handling, a task in D state); kill(2) does not wait for either."""
        if sig == signal.SIGKILL and self.state != "D":
            exit_task()
        elif sig in (signal.SIGKILL, signal.SIGTERM):
            threading.Thread(target=exit_task, name=name, daemon=True).start()
