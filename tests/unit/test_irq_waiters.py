"""Tasks waiting for an interrupt wake when its eventfds go away, on asyncio and trio.

The guards below (fail_after) only turn a hang into a failure; nothing here
depends on how long a step takes.
"""

from __future__ import annotations

import errno
from typing import Any

import anyio
import pytest

from vfiopy._uapi import PciIrq
from vfiopy.errors import IrqError
from vfiopy.irq import Irq
from vfiopy.session import Session

GPU0 = "0000:03:00.0"  # the machine and k fixtures (conftest) simulate gpus:2
HANG = 10  # seconds before a waiter that never wakes fails the test


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _waiting(irq: Irq, vector: int, out: list[object]) -> None:
    try:
        out.append(await irq.wait(vector))
    except IrqError as exc:
        out.append(exc)


async def _run_against_waiter(irq: Irq, action: Any, *, in_thread: bool = False) -> object:
    """Start a task in ``irq.wait(0)``, run ``action`` once it is parked; the task's outcome."""
    out: list[object] = []
    with anyio.fail_after(HANG):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_waiting, irq, 0, out)
            await anyio.wait_all_tasks_blocked()
            if in_thread:
                await anyio.to_thread.run_sync(action)
            else:
                action()
    return out[0]


def _closed(outcome: object, *words: str) -> None:
    assert isinstance(outcome, IrqError), outcome
    assert outcome.errno == errno.EBADF
    for word in words:
        assert word in str(outcome)


@pytest.mark.anyio
@pytest.mark.parametrize("in_thread", [False, True], ids=["loop", "thread"])
async def test_disable_wakes_the_waiter(k: Any, in_thread: bool) -> None:
    with Session(k) as s:
        msix = s.open_device(GPU0).irq(PciIrq.MSIX)
        msix.enable(2)
        outcome = await _run_against_waiter(msix, msix.disable, in_thread=in_thread)
        _closed(outcome, GPU0, "disabled while a task waited")
        assert not msix.enabled


@pytest.mark.anyio
@pytest.mark.parametrize("in_thread", [False, True], ids=["loop", "thread"])
async def test_device_close_wakes_the_waiter(k: Any, in_thread: bool) -> None:
    with Session(k) as s:
        dev = s.open_device(GPU0)
        msix = dev.irq(PciIrq.MSIX)
        msix.enable(1)
        outcome = await _run_against_waiter(msix, lambda: s.close_device(dev), in_thread=in_thread)
        _closed(outcome, GPU0, "the device is closed")
        with pytest.raises(IrqError) as info:
            await msix.wait(0)
        assert info.value.errno == errno.EBADF


@pytest.mark.anyio
@pytest.mark.parametrize("in_thread", [False, True], ids=["loop", "thread"])
async def test_a_waiter_follows_a_re_enable_and_gets_the_next_interrupt(
    k: Any, in_thread: bool
) -> None:
    with Session(k) as s:
        msix = s.open_device(GPU0).irq(PciIrq.MSIX)
        old = msix.enable(1)

        def re_enable_and_fire() -> None:
            msix.enable(2)
            msix.trigger(0)

        outcome = await _run_against_waiter(msix, re_enable_and_fire, in_thread=in_thread)
        assert outcome == 1
        assert msix.eventfds != old


@pytest.mark.anyio
async def test_re_enable_reusing_the_fd_numbers_loses_no_interrupt(k: Any) -> None:
    with Session(k) as s:
        msix = s.open_device(GPU0).irq(PciIrq.MSIX)
        msix.enable(1)
        msix.trigger(0)  # counted on the old eventfd, not read yet
        msix.disable()
        msix.enable(1)  # may well get the number back
        msix.trigger(0)
        with anyio.fail_after(HANG):
            assert await msix.wait(0) == 1

        msix.trigger(0)
        msix.enable(1)  # re-enabled while an interrupt is pending: carried over
        assert msix.read(0) == 1
        msix.trigger(0)
        msix.enable(1)
        with anyio.fail_after(HANG):
            assert await msix.wait(0) == 1
