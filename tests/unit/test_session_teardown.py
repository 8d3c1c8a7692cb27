"""Session.close: devices before DMA, and no group closed under an open in flight."""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest

from vfiopy._uapi import Ioctl, PciIrq
from vfiopy.errors import OpenDeviceError, VfioError
from vfiopy.session import Backend, Session

GPU0 = "0000:03:00.0"  # the machine and k fixtures (conftest) simulate gpus:2
AUDIO0 = "0000:03:00.1"
GPU1 = "0000:04:00.0"
_UNMAPS = {Ioctl.IOMMU_UNMAP_DMA, Ioctl.IOMMUFD_IOAS_UNMAP}


@pytest.mark.parametrize("backend", ["container", "iommufd"])
def test_close_stops_the_devices_before_it_unmaps_their_dma(k: Any, backend: Backend) -> None:
    s = Session(k, backend=backend)
    devices = [s.open_device(a) for a in (GPU0, AUDIO0, GPU1)]
    device_fds = {d.fd for d in devices}
    devices[0].irq(PciIrq.MSIX).enable(1)
    space_fd = s.container.fd if s.container is not None else s.iommufd.fd  # type: ignore[union-attr]
    buffers = [s.alloc_dma_buffer(8192) for _ in range(3)]
    assert all(b.iova for b in buffers)

    order: list[str] = []
    ioctl, close = k.ioctl, k.close

    def recording_ioctl(fd: int, request: int, arg: Any = 0) -> int:
        if fd == space_fd and request in _UNMAPS:
            order.append("unmap")
        result: int = ioctl(fd, request, arg)
        return result

    def recording_close(fd: int) -> None:
        if fd in device_fds:
            order.append("close device")
        close(fd)

    k.ioctl, k.close = recording_ioctl, recording_close
    s.close()
    assert order == ["close device"] * 3 + ["unmap"] * 3
    assert all(b.closed for b in buffers) and all(d.closed for d in devices)
    assert sorted(k.fd_table()) == []


def test_close_waits_for_an_open_in_flight_before_closing_its_group(k: Any) -> None:
    s = Session(k)
    s.open_device(GPU1)  # another group, so the container stays in use meanwhile
    order: list[str] = []
    entered, go_on = threading.Event(), threading.Event()
    group_fds: set[int] = set()
    ioctl, close = k.ioctl, k.close

    def slow_get_device_fd(fd: int, request: int, arg: Any = 0) -> int:
        if request != Ioctl.GROUP_GET_DEVICE_FD:
            result: int = ioctl(fd, request, arg)
            return result
        group_fds.add(fd)
        order.append("get device fd")
        entered.set()
        go_on.wait()
        result = ioctl(fd, request, arg)
        order.append("got device fd")
        return result

    def recording_close(fd: int) -> None:
        if fd in group_fds:
            order.append("close group")
        close(fd)

    k.ioctl, k.close = slow_get_device_fd, recording_close
    outcome: list[BaseException | None] = []

    def opener() -> None:
        try:
            s.open_device(GPU0)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t_open = threading.Thread(target=opener)
    t_open.start()
    entered.wait()
    t_close = threading.Thread(target=s.close)
    t_close.start()
    while not s.closed:  # the closer has begun; it must now wait for the open
        threading.Event().wait(0.001)
    assert "close group" not in order
    go_on.set()
    t_open.join()
    t_close.join()
    assert order == ["get device fd", "got device fd", "close group"]
    err = outcome[0]
    assert isinstance(err, OpenDeviceError) and err.errno == errno.EBADF
    assert "closed meanwhile" in str(err)
    assert s.devices == [] and sorted(k.fd_table()) == []


def test_a_closed_group_refuses_instead_of_reaching_a_reused_number(k: Any) -> None:
    with Session(k) as s:
        dev = s.open_device(GPU0)
        group = dev.group
        assert group is not None
        s.close_device(dev)
        assert group.closed
        other = s.open_device(GPU1)
        assert other.group is not None
        with pytest.raises(OpenDeviceError) as info:
            group.get_device_fd(AUDIO0)
        assert info.value.errno == errno.EBADF and "group" in str(info.value)
        with pytest.raises(VfioError) as info2:
            group.status()
        assert info2.value.errno == errno.EBADF
