"""The request and error interrupts as events, and Session(release_on_request=True).

The simulator does what vfio_unregister_group_dev does on an unbind of a device that is open:
no new open gets it, the request eventfd is signalled at once and every 10 s (model time),
and the writer of ``unbind`` waits until the last file reference is gone.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

import anyio
import pytest
from mock_vfio import Machine

import vfiopy
from vfiopy import PciIrq, PciRegion
from vfiopy.errors import DeviceInfoError, IrqError
from vfiopy.events import error_event, request_event

from .conftest import EDU, NICS

UNBIND = "/sys/bus/pci/drivers/vfio-pci/unbind"


def start_unbind(p: Any, addr: str) -> threading.Thread:
    t = threading.Thread(target=p.write_text, args=(UNBIND, addr), daemon=True)
    t.start()
    return t


def test_request_event_awaited_then_released(qemu: Machine) -> None:
    p = qemu.spawn()
    with vfiopy.Session(p) as session:
        dev = session.open_device(NICS[0])
        event = request_event(dev)
        assert event.pending() == 0  # nothing asked yet
        unbind: list[threading.Thread] = []

        async def main() -> int:
            unbind.append(start_unbind(qemu.spawn(), NICS[0]))
            with anyio.fail_after(30):
                return await event.wait()

        assert anyio.run(main) >= 1
        assert unbind[0].is_alive()  # the unbind waits for us
        session.close_device(dev)
        unbind[0].join()
    assert qemu.device(NICS[0]).driver is None
    assert qemu.open_fds() == 0


def test_session_releases_a_requested_device(qemu: Machine) -> None:
    p = qemu.spawn()
    with vfiopy.Session(p, release_on_request=True) as session:
        dev = session.open_device(NICS[1])
        other = session.open_device(NICS[2])
        bar0 = dev.region(PciRegion.BAR0).mmap()
        msi = dev.irq(PciIrq.MSI)
        msi.enable(1)
        waiter_error: list[BaseException] = []

        async def main() -> None:
            async with anyio.create_task_group() as tg:

                async def wait_msi() -> None:
                    try:
                        await msi.wait(0)
                    except IrqError as exc:
                        waiter_error.append(exc)

                tg.start_soon(wait_msi)
                await anyio.sleep(0)
                unbind = start_unbind(qemu.spawn(), NICS[1])
                # the unbind returns only once the session closed the device
                await anyio.to_thread.run_sync(unbind.join)

        anyio.run(main)
        assert qemu.device(NICS[1]).driver is None
        assert session.device(NICS[1]) is None and dev.closed and bar0.closed
        assert [e.errno for e in waiter_error] == [errno.EBADF]  # the awaiting task was told
        assert session.device(NICS[2]) is other and not other.closed  # the others stay
        kinds = [e.kind for e in qemu.trace if e.device == NICS[1]]
        assert kinds.index("request") < kinds.index("release") < kinds.index("unbind")
    assert qemu.open_fds() == 0


def test_session_closed_first_stops_watching(qemu: Machine) -> None:
    p = qemu.spawn()
    session = vfiopy.Session(p, release_on_request=True)
    session.open_device(NICS[3])
    session.close()
    assert qemu.open_fds() == 0
    # nothing holds the device now: the unbind needs no request
    qemu.spawn().write_text(UNBIND, NICS[3])
    assert not qemu.events("request")


def test_error_event_loopback_and_conventional_pci(qemu: Machine) -> None:
    with vfiopy.Session(qemu.spawn()) as session:
        nic = session.open_device(NICS[4])
        event = error_event(nic)
        event.irq.trigger(0)  # DATA_NONE|ACTION_TRIGGER: the kernel's loopback

        async def main() -> int:
            with anyio.fail_after(30):
                return await event.wait()

        assert anyio.run(main) == 1
        event.close()
        assert not event.irq.enabled
        # edu sits on a conventional PCI bus: vfio-pci has no error interrupt for it
        edu = session.open_device(EDU)
        with pytest.raises(DeviceInfoError) as info:
            error_event(edu)
        assert info.value.errno == errno.EINVAL and "PCI Express" in str(info.value)
