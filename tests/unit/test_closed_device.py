"""A closed device, and everything derived from it, refuses every use with EBADF.

The kernel gives a closed fd number to the next open, so a use after close would
otherwise reach another device: these tests open a second device on the very fd
number the first one had.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

import pytest

from vfiopy._uapi import Feature, PciIrq, PciRegion
from vfiopy.errors import DmaMapError, VfioError
from vfiopy.session import Session

GPU0 = "0000:03:00.0"  # the machine and k fixtures (conftest) simulate gpus:2
AUDIO0 = "0000:03:00.1"


def _refused(call: Callable[[], object], device: str) -> VfioError:
    with pytest.raises(VfioError) as info:
        call()
    err = info.value
    assert err.errno == errno.EBADF, err
    assert err.device == device and err.step, err
    assert "closed" in str(err)
    return err


def test_closed_device_never_reaches_the_device_that_reused_its_fd(k: Any) -> None:
    with Session(k) as s:
        a = s.open_device(GPU0)
        cfg = a.config
        assert cfg.device_id == 0x2330
        fd = a.fd
        s.close_device(a)
        b = s.open_device(AUDIO0)
        assert b.fd == fd  # the number was reused: a stale use would reach b
        command = b.config.command

        _refused(lambda: cfg.device_id, GPU0)
        _refused(lambda: a.config.device_id, GPU0)

        def write_command() -> None:
            cfg.command = 6

        _refused(write_command, GPU0)
        assert b.config.command == command


def test_everything_derived_from_a_closed_device_refuses(k: Any) -> None:
    with Session(k) as s:
        a = s.open_device(GPU0)
        bar0 = a.region(PciRegion.BAR0)
        mapping = bar0.mmap(0)
        msix = a.irq(PciIrq.MSIX)
        msix.enable(1)
        intx = a.irq(PciIrq.INTX)
        buf = s.alloc_dma_buffer(4096)
        s.close_device(a)
        s.free_dma_buffer(buf)
        b = s.open_device(AUDIO0)
        assert b.fd == a.fd

        for call in (
            lambda: bar0.read(0, 4),
            lambda: bar0.write(0, b"\0\0\0\0"),
            lambda: bar0.mmap(0),
            lambda: mapping.read32(mapping.offset),
            lambda: mapping.write32(mapping.offset, 1),
            lambda: msix.enable(1),
            lambda: msix.trigger(0),
            lambda: msix.read(0),
            lambda: intx.mask(),
            lambda: intx.enable(),
            lambda: a.region(PciRegion.BAR2),
            lambda: a.irq(PciIrq.MSI),
            a.reset,
            a.hot_reset_info,
            a.hot_reset,
            lambda: a.feature_probe(Feature.LOW_POWER_ENTRY, put=True),
        ):
            _refused(call, GPU0)
        with pytest.raises(DmaMapError) as info:
            buf.read(0, 1)
        assert info.value.errno == errno.EBADF and "closed" in str(info.value)
        with pytest.raises(DmaMapError):
            buf.view()
        a.close()  # idempotent


def test_close_waits_for_a_use_in_flight_before_closing_the_fd(k: Any) -> None:
    with Session(k) as s:
        a = s.open_device(GPU0)
        cfg = a.config
        order: list[str] = []
        entered, go_on = threading.Event(), threading.Event()
        pread, close = k.pread, k.close

        def slow_pread(fd: int, size: int, offset: int) -> bytes:
            order.append("pread")
            entered.set()
            go_on.wait()
            data: bytes = pread(fd, size, offset)
            order.append("pread done")
            return data

        def recording_close(fd: int) -> None:
            if fd == a.fd:
                order.append("close device fd")
            close(fd)

        k.pread, k.close = slow_pread, recording_close
        reader = threading.Thread(target=lambda: cfg.vendor_id)
        reader.start()
        entered.wait()
        closer = threading.Thread(target=s.close_device, args=(a,))
        closer.start()
        # The closer has refused new uses; it must now wait for the read in flight.
        while not a._guard.closed:
            threading.Event().wait(0.001)
        assert "close device fd" not in order
        go_on.set()
        reader.join()
        closer.join()
        assert order == ["pread", "pread done", "close device fd"]
