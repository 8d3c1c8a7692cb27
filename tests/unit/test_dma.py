"""The IOVA allocator and DmaBuffer's order of setup and teardown."""

from __future__ import annotations

import errno

import pytest
from fakekernel import FakeKernel

from vfiopy.dma import DmaBuffer, IovaAllocator, IovaRange
from vfiopy.errors import DmaMapError
from vfiopy.kernel import LinuxKernel

MB = 1 << 20


def test_allocations_are_aligned_disjoint_and_inside_ranges() -> None:
    ranges = [IovaRange(0, 0xFEDFFFFF), IovaRange(0xFEF00000, (1 << 48) - 1)]
    a = IovaAllocator(ranges)
    blocks = [(a.allocate(n), n) for n in (1, 4096, 4097, 3 * MB, 5)]
    assert blocks[0][0] == 4096  # IOVA 0 is never handed out
    seen: list[tuple[int, int]] = []
    for iova, n in blocks:
        size = -(-n // 4096) * 4096
        assert iova % 4096 == 0
        assert any(r.start <= iova and iova + size - 1 <= r.last for r in ranges)
        assert all(iova + size <= s or s + z <= iova for s, z in seen)
        seen.append((iova, size))
    big = a.allocate(2 * MB, align=2 * MB)
    assert big % (2 * MB) == 0


def test_skips_holes_and_reuses_freed_blocks() -> None:
    a = IovaAllocator([IovaRange(0x1000, 0x4FFF), IovaRange(0x10000, 0x1FFFF)])
    x = a.allocate(0x3000)
    y = a.allocate(0x2000)  # does not fit in what is left of the first range
    assert (x, y) == (0x1000, 0x10000)
    a.free(x)
    assert a.allocate(0x4000) == 0x1000  # freed block merged with its neighbour
    with pytest.raises(DmaMapError) as info:
        a.allocate(0x100000)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(ValueError):
        a.free(0x123000)


def test_free_merges_back_to_the_original_ranges() -> None:
    ranges = [IovaRange(0x1000, 0xFFFFF)]
    a = IovaAllocator(ranges)
    got = [a.allocate(0x1000 * (i + 1)) for i in range(10)]
    for iova in got[::2] + got[1::2]:
        a.free(iova)
    assert a.free_ranges == ranges


def test_rejects_bad_arguments() -> None:
    a = IovaAllocator([IovaRange(0, 0xFFFFF)])
    for size, align in ((0, None), (4096, 3000), (4096, 1024)):
        with pytest.raises(ValueError):
            a.allocate(size, align)


class Space:
    def __init__(self, fail: int = 0) -> None:
        self.maps: dict[int, tuple[int, int]] = {}
        self.fail = fail
        self.log: list[str] = []

    def map(
        self, vaddr: int, iova: int, size: int, *, read: bool = True, write: bool = True
    ) -> None:
        if self.fail:
            raise DmaMapError(self.fail, step="VFIO_IOMMU_MAP_DMA")
        self.maps[iova] = (vaddr, size)
        self.log.append("map")

    def unmap(self, iova: int, size: int) -> int:
        self.log.append("unmap")
        return self.maps.pop(iova)[1]

    def iova_ranges(self) -> list[IovaRange]:
        return [IovaRange(0, (1 << 39) - 1)]


def test_dma_buffer_on_real_anonymous_memory() -> None:
    space = Space()
    alloc = IovaAllocator(space.iova_ranges())
    with DmaBuffer(space, 10000, allocator=alloc, kernel=LinuxKernel()) as buf:
        assert buf.size == 12288 and buf.iova in space.maps
        buf.write(100, b"hello")
        assert buf.read(100, 5) == b"hello"
        buf.view()[0] = 7
        assert buf.read(0, 1) == b"\x07"
        with pytest.raises(ValueError):
            buf.read(12280, 100)
    assert space.maps == {} and alloc.free_ranges[0].start == 4096
    with pytest.raises(DmaMapError) as info:
        buf.read(0, 1)
    assert info.value.errno == errno.EBADF
    buf.close()  # idempotent


def test_dma_buffer_map_failure_releases_memory_and_iova() -> None:
    k = FakeKernel()
    space = Space(fail=errno.ENOMEM)
    alloc = IovaAllocator(space.iova_ranges())
    with pytest.raises(DmaMapError):
        DmaBuffer(space, 4096, allocator=alloc, kernel=k)
    assert k.maps == {}
    assert alloc.free_ranges == IovaAllocator(space.iova_ranges()).free_ranges


def test_dma_buffer_fixed_iova() -> None:
    k = FakeKernel()
    space = Space()
    buf = DmaBuffer(space, 4096, iova=0x8000_0000, kernel=k)
    assert buf.iova == 0x8000_0000
    buf.close()
    assert space.log == ["map", "unmap"]
    del buf  # the address range goes with the last reference to the buffer
    assert k.maps == {}
    with pytest.raises(ValueError):
        DmaBuffer(space, 4096, kernel=k)


def test_allocate_below_a_dma_mask() -> None:
    a = IovaAllocator([IovaRange(0, (1 << 40) - 1)])
    low = a.allocate(1 << 20, limit=1 << 28)
    assert low + (1 << 20) <= 1 << 28
    with pytest.raises(DmaMapError) as e:
        a.allocate(1 << 29, limit=1 << 28)
    assert e.value.errno == errno.ENOSPC and "below 0x10000000" in str(e.value)


def test_missing_iommufd_says_to_use_the_container_backend() -> None:
    from vfiopy.errors import OpenIommufdError
    from vfiopy.iommufd import Iommufd

    with pytest.raises(OpenIommufdError) as e:
        Iommufd(LinuxKernel(), path="/nonexistent/iommu")
    assert e.value.errno == errno.ENOENT
    assert "container backend" in str(e.value) and "/nonexistent/iommu" in str(e.value)
