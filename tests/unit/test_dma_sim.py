"""DMA on the simulator: hugepage buffers, the caller's own memory, the IOMMU's page sizes
and IOVA ranges, IOMMU_OPTION_HUGE_PAGES, and nothing left mapped after close."""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
from collections.abc import Iterator
from typing import Any

import pytest

from vfiopy._uapi import PAGE_SIZE
from vfiopy.dma import DmaBuffer, IovaAllocator, IovaRange
from vfiopy.errors import DmaMapError
from vfiopy.iommufd import IommuOption
from vfiopy.session import Session

mock_vfio = pytest.importorskip("mock_vfio")

GPU = "0000:03:00.0"
M2, G1 = 2 << 20, 1 << 30
BACKENDS = ["container", "iommufd"]


def _machine(**kw: Any) -> Any:
    return mock_vfio.Machine(mock_vfio.load_topology("gpus:1"), time_scale=0.001, **kw)


@pytest.fixture
def pool_machine() -> Iterator[Any]:
    """A machine whose MAP_HUGETLB mmaps take pages from a simulated pool."""
    m = _machine(hugepages={M2: 4, G1: 1})
    try:
        yield m
    finally:
        m.close()


def _table(k: Any, s: Session) -> Any:
    """The simulator's IOVA mapping table of the session's space (type1 or IOAS)."""
    if s.container is not None:
        return k.file_of(s.container.fd).container.dma
    assert s.iommufd is not None
    return k.file_of(s.iommufd.fd).ctx.ioas[s.ioas_id].dma


def _addr(obj: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(obj))


def _aligned_slice(ba: bytearray, n: int) -> memoryview:
    """A page-aligned ``n``-byte view into ``ba`` (which needs n + PAGE_SIZE bytes)."""
    off = -_addr(ba) % PAGE_SIZE
    return memoryview(ba)[off : off + n]


# --- 1. hugepage buffers ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_hugepage_buffers_are_aligned_and_take_whole_pages(pool_machine: Any, backend: str) -> None:
    k = pool_machine.spawn("t")
    with Session(k, backend=backend) as s:
        s.open_device(GPU)
        small = s.alloc_dma_buffer(5000)
        two = s.alloc_dma_buffer(3 << 20, hugepage="2M")
        one = s.alloc_dma_buffer(4096, hugepage="1G")
        assert (two.size, one.size) == (2 * M2, G1)  # rounded up to whole hugepages
        assert two.vaddr % M2 == 0 and two.iova % M2 == 0
        assert one.vaddr % G1 == 0 and one.iova % G1 == 0
        assert pool_machine.hugepages == {M2: 2, G1: 0}
        table = _table(k, s)
        assert {i: table.maps[i][:2] for i in table.maps} == {
            small.iova: (small.size, small.vaddr),
            two.iova: (two.size, two.vaddr),
            one.iova: (one.size, one.vaddr),
        }
        two.write(M2 + 5, b"huge")
        # What the device reads at the IOVA is the buffer's memory.
        vaddr = table.translate(two.iova + M2 + 5, 4, write=False)
        assert ctypes.string_at(vaddr, 4) == b"huge"
        s.free_dma_buffer(two)
        del two
        gc.collect()  # the range goes with the last reference (no remap on the simulator)
        assert pool_machine.hugepages[M2] == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_free_hugepages_says_how_to_reserve_them(pool_machine: Any, backend: str) -> None:
    k = pool_machine.spawn("t")
    with Session(k, backend=backend) as s:
        s.open_device(GPU)
        s.alloc_dma_buffer(M2, hugepage="2M")  # 3 of 4 left
        with pytest.raises(DmaMapError) as e:
            s.alloc_dma_buffer(7 << 20, hugepage="2M")  # 4 pages
        err = e.value
        assert err.errno == errno.ENOMEM and err.step == "mmap 2M hugepages"
        msg = str(err)
        assert "0x800000 bytes" in msg and "ENOMEM" in msg and "4 free 2M hugepages" in msg
        # The simulated host has no sysfs pool to read: the advice says by how much.
        assert "raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages by 4" in msg
        # Nothing half-done: one buffer mapped, its pages taken, the rest free.
        assert len(_table(k, s).maps) == 1 and pool_machine.hugepages[M2] == 3
        with pytest.raises(ValueError, match="'2M', '1G' or None"):
            s.alloc_dma_buffer(M2, hugepage="4M")  # type: ignore[arg-type]


def _host_free_2m() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.fixture
def host_2m_pages() -> Iterator[int]:
    """Two free 2 MiB pages in the host's pool: there already, or reserved as root for the
    test (nr_hugepages restored after).  Skips, saying why, when neither is possible; the
    simulated-pool tests above cover the same code then."""
    nr = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    if _host_free_2m() >= 2:
        yield 2
        return
    try:
        with open(nr) as f:
            before = int(f.read())
        with open(nr, "w") as f:
            f.write(str(before + 2))
    except OSError as exc:
        pytest.skip(f"the host has no free 2 MiB hugepages and cannot reserve any: {exc}")
    try:
        if _host_free_2m() < 2:
            pytest.skip("the host could not reserve 2 MiB hugepages (memory too fragmented)")
        yield 2
    finally:
        with open(nr, "w") as f:
            f.write(str(before))


def test_hugepage_buffer_on_the_hosts_own_pool(host_2m_pages: int) -> None:
    m = _machine()  # hugepages=None: MAP_HUGETLB goes to the host
    try:
        k = m.spawn("t")
        with Session(k) as s:
            s.open_device(GPU)
            free = _host_free_2m()
            buf = s.alloc_dma_buffer(M2, hugepage="2M")
            assert buf.vaddr % M2 == 0 and buf.iova % M2 == 0
            buf.write(0, b"x")  # touching it takes the page from the pool
            assert _host_free_2m() == free - 1
            s.free_dma_buffer(buf)
    finally:
        m.close()


def test_hosts_own_shortage_is_reported_with_its_errno() -> None:
    """A real MAP_HUGETLB failure on this host: 1 GiB pages, where none are free."""
    try:
        with open("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages") as f:
            if int(f.read()) > 0:
                pytest.skip("this host has free 1 GiB pages: no shortage to report")
    except FileNotFoundError:
        pass  # no 1 GiB pool at all: mmap fails with EINVAL, still an error to report
    m = _machine()
    try:
        with Session(m.spawn("t")) as s:
            s.open_device(GPU)
            with pytest.raises(DmaMapError) as e:
                s.alloc_dma_buffer(G1, hugepage="1G")
            assert e.value.errno in (errno.ENOMEM, errno.EINVAL)
            assert "hugepages-1048576kB/nr_hugepages" in str(e.value)
    finally:
        m.close()


# --- 2. the caller's own memory -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_dma_of_mmap_bytearray_and_numpy(k: Any, backend: str) -> None:
    np = pytest.importorskip("numpy")
    with Session(k, backend=backend) as s:
        s.open_device(GPU)
        table = _table(k, s)
        mm = mmap.mmap(-1, 2 * PAGE_SIZE)
        ba = bytearray(3 * PAGE_SIZE)
        view = _aligned_slice(ba, 2 * PAGE_SIZE)
        arr = np.frombuffer(mmap.mmap(-1, 4 * PAGE_SIZE), dtype=np.uint32).reshape(4, -1)
        maps = [s.map_dma(mm), s.map_dma(view), s.map_dma(arr)]
        for m, obj in zip(maps, (mm, view, arr), strict=True):
            assert m.obj is obj and m.iova % PAGE_SIZE == 0
            assert table.maps[m.iova][:2] == (m.size, m.vaddr)
        # The device sees the caller's bytes, and writes land in the caller's object.
        mm[10:13] = b"abc"
        assert ctypes.string_at(table.translate(maps[0].iova + 10, 3, write=False), 3) == b"abc"
        ctypes.memmove(table.translate(maps[2].iova + 4, 4, write=True), b"\x01\0\0\0", 4)
        assert arr[0, 1] == 1
        # Pinned: the bytearray cannot be resized while mapped.
        with pytest.raises(BufferError):
            ba.extend(b"x")
        s.unmap_dma(maps[1])
        view.release()
        ba.extend(b"x")  # released with the mapping
        assert maps[1].iova not in table.maps
        # A larger IOVA alignment on request (for memory the caller put on hugepages).
        big = s.map_dma(mmap.mmap(-1, 2 * M2), align=M2)
        assert big.iova % M2 == 0 and table.maps[big.iova][0] == 2 * M2


def test_map_dma_refuses_what_the_kernel_would(k: Any) -> None:
    np = pytest.importorskip("numpy")
    with Session(k) as s:
        s.open_device(GPU)
        table = _table(k, s)
        ba = bytearray(2 * PAGE_SIZE)
        off = -_addr(ba) % PAGE_SIZE
        bad = memoryview(ba)[off + 16 : off + 16 + PAGE_SIZE] if off else memoryview(ba)[16:]
        with pytest.raises(DmaMapError, match=r"mmap\.mmap\(-1, n\)") as e:
            s.map_dma(bad)
        assert e.value.errno == errno.EINVAL and e.value.step == "map caller memory"
        bad.release()
        ba.extend(b"x")  # a refused buffer is not left pinned
        with pytest.raises(DmaMapError, match="read-only") as e:
            s.map_dma(bytes(PAGE_SIZE))
        assert e.value.errno == errno.EACCES
        arr = np.frombuffer(mmap.mmap(-1, 4 * PAGE_SIZE), dtype=np.uint8).reshape(4, -1)
        with pytest.raises(DmaMapError, match="not C-contiguous"):
            s.map_dma(arr[:, ::2])
        with pytest.raises(DmaMapError, match="does not export a buffer"):
            s.map_dma(12345)
        with pytest.raises(DmaMapError, match="non-zero multiples"):
            s.map_dma(memoryview(mmap.mmap(-1, PAGE_SIZE))[:100])
        assert table.maps == {}
        # A read-only buffer the device only reads is fine.
        ro = mmap.mmap(-1, PAGE_SIZE, prot=mmap.PROT_READ)
        m = s.map_dma(ro, write=False)
        assert table.maps[m.iova][2] == 1  # read-only for the device


# --- 3. the IOMMU's page sizes and IOVA ranges ------------------------------------------


def test_allocator_rounds_to_its_page_and_aligns() -> None:
    a = IovaAllocator([IovaRange(0x1000, (1 << 32) - 1)], page_size=0x10000)
    x, y = a.allocate(100), a.allocate(0x10001)
    assert x == 0x10000 and y == 0x20000  # 0x1000.. rounds up to the first whole page
    assert a.allocate(M2, align=M2) % M2 == 0
    a.free(y)
    assert a.allocate(0x20000) == y  # 0x10001 took two pages


def test_type1_smallest_iommu_page_is_honoured() -> None:
    """An IOMMU whose smallest page is 64 KiB (as an arm64 SMMU with a 64K granule)."""
    m = _machine(iova_pgsizes=0x10000 | M2)
    try:
        k = m.spawn("t")
        with Session(k) as s:
            s.open_device(GPU)
            assert s.container is not None and s.container.info().pgsizes == 0x10000 | M2
            bufs = [s.alloc_dma_buffer(n) for n in (1, 0x10000, 0x10001)]
            for b in bufs:
                assert b.iova % 0x10000 == 0 and b.vaddr % 0x10000 == 0 and b.size % 0x10000 == 0
            assert [b.size for b in bufs] == [0x10000, 0x10000, 0x20000]
            # The simulator checks what vfio_dma_do_map checks.
            with pytest.raises(DmaMapError) as e:
                s.dma.map(bufs[0].vaddr, 0x7000_1000, 0x1000)
            assert e.value.errno == errno.EINVAL
            with pytest.raises(DmaMapError, match="IOMMU page \\(0x10000\\)"):
                s.map_dma(mmap.mmap(-1, PAGE_SIZE))
    finally:
        m.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_iova_lies_in_a_reported_range(backend: str) -> None:
    m = _machine()
    m.topology.iommu_address_width = 32  # 4 GiB of IOVA, minus the MSI window
    try:
        k = m.spawn("t")
        with Session(k, backend=backend) as s:
            s.open_device(GPU)
            ranges = s.container.iova_ranges() if s.container else s.dma.iova_ranges()
            assert ranges == [IovaRange(0, 0xFEDFFFFF), IovaRange(0xFEF00000, 0xFFFFFFFF)]
            bufs: list[DmaBuffer] = []
            with pytest.raises(DmaMapError) as e:
                while True:
                    bufs.append(s.alloc_dma_buffer(256 << 20))
            assert e.value.errno == errno.ENOSPC
            # 15 blocks fit below the MSI window; the 1 MiB above it holds none.
            assert len(bufs) == 15
            for b in bufs:
                assert any(r.start <= b.iova and b.iova + b.size - 1 <= r.last for r in ranges)
            assert len(_table(k, s).maps) == 15
    finally:
        m.close()


def test_ranges_that_shrink_after_the_first_buffer_are_honoured() -> None:
    """An IOAS reports the whole space until a device attaches, then loses the MSI window."""
    m = _machine()
    m.topology.iommu_address_width = 32
    try:
        k = m.spawn("t")
        with Session(k, backend="iommufd") as s:
            first = s.alloc_dma_buffer(PAGE_SIZE)  # no device yet: every IOVA is usable
            s.open_device(GPU)
            ranges = s.dma.iova_ranges()
            assert ranges == [IovaRange(0, 0xFEDFFFFF), IovaRange(0xFEF00000, 0xFFFFFFFF)]
            bufs = []
            with pytest.raises(DmaMapError) as e:
                while True:
                    bufs.append(s.alloc_dma_buffer(256 << 20))
            assert e.value.errno == errno.ENOSPC  # not EINVAL from a block in the window
            assert len(bufs) == 15
            for b in bufs:
                assert any(r.start <= b.iova and b.iova + b.size - 1 <= r.last for r in ranges)
            assert first.iova in _table(k, s).maps
    finally:
        m.close()


def test_allocator_keeps_to_the_ranges_usable_now() -> None:
    a = IovaAllocator([IovaRange(0, (1 << 32) - 1)])
    now = [IovaRange(0, 0x2FFF), IovaRange(0x10000, 0x1FFFF)]
    assert a.allocate(0x2000, within=now) == 0x1000
    assert a.allocate(0x2000, within=now) == 0x10000  # 0x3000.. is no longer usable
    with pytest.raises(DmaMapError):
        a.allocate(0x20000, within=now)
    assert a.allocate(0x20000) == 0x12000  # without ``within``: the ranges it was made with


def test_iommufd_alignment_and_reserved_ranges_are_checked(k: Any) -> None:
    with Session(k, backend="iommufd") as s:
        assert s.iommufd is not None and s.ioas_id is not None
        assert s.iommufd.iova_alignment(s.ioas_id) == 1  # no domain attached yet
        s.open_device(GPU)
        assert s.iommufd.iova_alignment(s.ioas_id) == 4096
        mm = mmap.mmap(-1, 2 * PAGE_SIZE)
        vaddr = _addr(mm)
        for iova, length in ((0x10_0800, PAGE_SIZE), (0x10_0000, 100), (0xFEE0_0000, PAGE_SIZE)):
            with pytest.raises(DmaMapError) as e:
                s.iommufd.map(s.ioas_id, vaddr, length, iova=iova)
            assert e.value.errno == errno.EINVAL
        assert _table(k, s).maps == {}


def test_iommufd_refuses_a_domain_whose_smallest_page_exceeds_page_size() -> None:
    m = _machine(iova_pgsizes=0x10000)
    try:
        with (
            Session(m.spawn("t"), backend="iommufd") as s,
            pytest.raises(Exception, match="ATTACH_IOMMUFD_PT") as e,
        ):
            s.open_device(GPU)
        assert getattr(e.value, "errno", None) == errno.EINVAL
    finally:
        m.close()


# --- IOMMU_OPTION_HUGE_PAGES -----------------------------------------------------------


def test_huge_pages_option_of_the_ioas(k: Any) -> None:
    with Session(k, backend="iommufd") as s:
        assert s.iommufd is not None and s.ioas_id is not None
        assert s.huge_pages is True  # the kernel's default
        s.open_device(GPU)
        s.huge_pages = False  # nothing mapped yet: allowed
        assert s.huge_pages is False and s.iommufd.iova_alignment(s.ioas_id) == 4096
        s.huge_pages = True
        s.alloc_dma_buffer(PAGE_SIZE)
        with pytest.raises(DmaMapError) as e:
            s.huge_pages = False  # pages mapped in a domain: iopt_disable_large_pages says no
        assert e.value.errno == errno.EINVAL and "set it first" in str(e.value)
        with pytest.raises(DmaMapError) as e:
            s.iommufd.option(IommuOption.HUGE_PAGES, s.ioas_id, 2)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(DmaMapError) as e:
            s.iommufd.option(IommuOption.HUGE_PAGES, 999)
        assert e.value.errno == errno.ENOENT


def test_container_has_no_huge_pages_option(k: Any) -> None:
    with Session(k) as s, pytest.raises(DmaMapError, match="backend='iommufd'") as e:
        s.huge_pages = False
    assert e.value.errno == errno.EOPNOTSUPP


# --- 4. nothing mapped after close --------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_unmaps_every_buffer_and_mapping(pool_machine: Any, backend: str) -> None:
    k = pool_machine.spawn("t")
    ba = bytearray(3 * PAGE_SIZE)
    s = Session(k, backend=backend)
    s.open_device(GPU)
    table = _table(k, s)
    s.alloc_dma_buffer(PAGE_SIZE)
    s.alloc_dma_buffer(M2, hugepage="2M")
    s.map_dma(mmap.mmap(-1, PAGE_SIZE))
    view = _aligned_slice(ba, 2 * PAGE_SIZE)
    s.map_dma(view)
    assert len(table.maps) == len(s.dma_mappings) == 4
    before = pool_machine.counters["dma_unmaps"]
    s.close()
    assert table.maps == {} and s.dma_mappings == []
    # Unmapped one by one by the session, not dropped by the kernel with the last fd.
    assert pool_machine.counters["dma_unmaps"] - before == 4
    view.release()
    ba.extend(b"x")  # the export is released too


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_unmaps_the_rest_when_one_unmap_fails(k: Any, machine: Any, backend: str) -> None:
    with Session(k, backend=backend) as s:
        s.open_device(GPU)
        table = _table(k, s)
        for _ in range(3):
            s.alloc_dma_buffer(PAGE_SIZE)
        if backend == "iommufd":
            # The IOAS outlives the device and its file here, so the one unmap that
            # fails is left to the session's unmap-all.
            machine.faults.fail("IOMMU_IOAS_UNMAP", errno.EIO)
        else:
            # type1 drops every mapping when the container's last group leaves, which
            # the session's close does next.
            machine.faults.fail("VFIO_IOMMU_UNMAP_DMA", errno.EIO)
        with pytest.raises(DmaMapError) as e:
            s.close()
        assert e.value.errno == errno.EIO
    assert table.maps == {}
