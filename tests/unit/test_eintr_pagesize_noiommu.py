"""Interrupted ioctl and mmap calls are retried; the host's page size; no-IOMMU is opt-in."""

from __future__ import annotations

import errno
import gc
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fakekernel import FakeKernel
from structlog.testing import capture_logs

import vfiopy.kernel
from vfiopy._uapi import MAP_ANONYMOUS, MAP_SHARED, PROT_READ, PROT_WRITE, GroupFlag, IommuType, lib
from vfiopy.container import Container
from vfiopy.errors import OpenGroupError, SetIommuError
from vfiopy.group import Group
from vfiopy.kernel import LinuxKernel


class _Interrupted:
    """The binding, with each helper failing EINTR ``times`` times before it runs."""

    def __init__(self, times: int, err: int = errno.EINTR) -> None:
        self.times, self.err = times, err
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(lib, name)

        def helper(*args: Any) -> Any:
            self.calls.append(name)
            if self.calls.count(name) <= self.times:
                return -self.err
            return real(*args)

        return helper


@pytest.fixture
def no_collector() -> Iterator[None]:
    """A mapping of an earlier test that the cycle collector frees would munmap through
    a patched binding too: collect it first, and not while calls are counted."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_collector")
def test_ioctl_and_mmap_retry_eintr(monkeypatch: pytest.MonkeyPatch) -> None:
    k = LinuxKernel()
    binding = _Interrupted(2)
    monkeypatch.setattr(vfiopy.kernel, "lib", binding)
    addr = k.mmap(-1, 8192, 0, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS)
    k.remap_anonymous(addr, 8192)
    k.munmap(addr, 8192)
    fd = k.eventfd()
    try:
        with pytest.raises(OSError) as info:  # an eventfd has no ioctls: the real answer
            k.ioctl(fd, lib.VFIO_GET_API_VERSION, 0)
        assert info.value.errno == errno.ENOTTY
    finally:
        k.close(fd)
    for name in ("vfiopy_mmap", "vfiopy_remap_anonymous", "vfiopy_munmap", "vfiopy_ioctl_int"):
        assert binding.calls.count(name) == 3  # two interruptions, then the call itself


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    binding = _Interrupted(1, errno.EIO)
    monkeypatch.setattr(vfiopy.kernel, "lib", binding)
    with pytest.raises(OSError) as info:
        LinuxKernel().ioctl(0, lib.VFIO_GET_API_VERSION, 0)
    assert info.value.errno == errno.EIO and binding.calls == ["vfiopy_ioctl_int"]


def test_page_size_is_the_hosts() -> None:
    # A 16 KiB-page host (some arm64), as the library sees it at import.
    code = """
import os
real = os.sysconf
os.sysconf = lambda name: 16384 if name == "SC_PAGE_SIZE" else real(name)
from vfiopy._uapi import PAGE_SIZE
from vfiopy.dma import IovaAllocator, IovaRange
print(PAGE_SIZE, IovaAllocator([IovaRange(0, 1 << 30)]).allocate(100))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["16384", "16384"]  # 16 KiB pages; IOVA 0 is left out


def _noiommu_kernel() -> FakeKernel:
    """A kernel whose vfio offers only no-IOMMU mode, with group 12 as noiommu-12."""
    k = FakeKernel()
    k.nodes.add("/dev/vfio/vfio")
    k.pci_device("0000:01:00.0", 12)
    k.nodes.discard("/dev/vfio/12")
    k.nodes.add("/dev/vfio/noiommu-12")
    k.on("VFIO_GET_API_VERSION", lambda path, arg: int(lib.VFIO_API_VERSION))
    k.on("VFIO_CHECK_EXTENSION", lambda path, arg: int(arg == IommuType.NOIOMMU))
    k.on("VFIO_SET_IOMMU", lambda path, arg: 0)
    k.on("VFIO_GROUP_GET_STATUS", lambda path, arg: setattr(arg, "flags", GroupFlag.VIABLE) or 0)
    k.on("VFIO_GROUP_SET_CONTAINER", lambda path, arg: 0)
    k.on("VFIO_GROUP_UNSET_CONTAINER", lambda path, arg: 0)
    return k


def test_noiommu_is_refused_unless_allowed() -> None:
    k = _noiommu_kernel()
    with pytest.raises(OpenGroupError) as info:
        Group(12, k)
    assert info.value.errno == errno.EPERM and "allow_noiommu=True" in str(info.value)
    with capture_logs() as logs, Container(k) as c, Group(12, k, allow_noiommu=True) as g:
        g.set_container(c)
        with pytest.raises(SetIommuError) as info2:
            c.set_iommu()
        assert "allow_noiommu=True" in str(info2.value) and c.iommu_type is None
        assert c.set_iommu(allow_noiommu=True) is IommuType.NOIOMMU
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert warnings == ["group.noiommu", "container.noiommu"]
    assert k.fds == {}
