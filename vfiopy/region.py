"""Device regions (BARs, ROM, config space) and their mmaps.

A region is a window of the device fd at a fixed file offset.  Config space,
I/O-port BARs and areas that cannot be mapped are accessed with pread/pwrite;
memory BARs are mmapped, honouring the sparse-mmap capability (vfio-pci
leaves the MSI-X table out of the mappable areas unless MSIX_MAPPABLE).

A mapping holds a reference to the device file: the device's release, and
the reset that comes with it, waits for the last munmap.  So every
:class:`Mapping` is unmapped before its device fd is closed.

Caching (``Region.mmap(caching=)``, :class:`Caching`): vfio-pci maps every BAR
uncached (``vfio_pci_core_mmap`` sets ``pgprot_noncached``, since vfio-pci's
first version, Linux 3.6).  No mainline kernel has a VFIO write-combining
mapping yet (``VFIO_DEVICE_FEATURE_DMA_BUF``, Linux 6.19, exports BAR slices
without one), so ``Caching.WC`` probes and refuses.  ``Caching.WC_SYSFS`` maps
the PCI core's ``resourceN_wc`` file instead, which exists only for
prefetchable memory BARs (``pci_create_resource_files``).  vfio-pci knows
nothing of that mapping: it is not zapped on a reset or when memory decoding
goes off, so vfiopy retires it (zero pages, then unmapped) before every reset,
memory disable and low-power entry it performs itself; resets the kernel does on
its own (at open and release, another holder's, AER recovery) leave it live.
Under ``CONFIG_IO_STRICT_DEVMEM`` (Debian, Ubuntu) the kernel also revokes it
when vfio-pci claims the BAR, at the first VFIO mmap, read or write of that
BAR (an access after that is SIGBUS), and refuses new ones (EINVAL) until the
device's last close: vfiopy retires its own first.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vfiopy._fdguard import FdGuard
from vfiopy._log import get_logger
from vfiopy._uapi import (
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Closable,
    RegionCap,
    RegionFlag,
    cap_chain,
    ffi,
    ioctl_info,
    lib,
)
from vfiopy.errors import DeviceInfoError, RegionError, raise_as
from vfiopy.kernel import O_RDWR, Kernel, RemapKernel

if TYPE_CHECKING:
    from vfiopy.device import Device

log = get_logger(__name__)

_BAR5 = 5
# struct resource flags, as sysfs `resource` shows them (include/linux/ioport.h)
IORESOURCE_IO = 0x100
IORESOURCE_PREFETCH = 0x2000


class Caching(enum.Enum):
    """How :meth:`Region.mmap` maps a BAR."""

    #: vfio-pci's own mapping, uncached: every load and store reaches the device in order.
    UNCACHED = "uncached"
    #: write-combining through a VFIO kernel feature; no mainline kernel offers one yet.
    WC = "wc"
    #: write-combining through the PCI core's ``resourceN_wc`` sysfs file (root only), a
    #: mapping vfio-pci cannot zap: vfiopy retires it around its own resets.
    WC_SYSFS = "wc-sysfs"


# Every live WC_SYSFS mapping by device address: a hot reset retires those of every
# device it resets, whichever Device object mapped them.
_wc_lock = threading.Lock()
_wc_live: dict[str, set[Mapping]] = {}


_REMAP_ADVICE = (
    "map it again (Region.mmap(caching='wc-sysfs')) once that is done; vfiopy retires "
    "resourceN_wc mappings around its own resets because the kernel does not"
)


def retire_write_combined(devices: Iterable[str], why: str) -> int:
    """Retire every live ``resourceN_wc`` mapping of ``devices`` before ``why``; how many."""
    with _wc_lock:
        doomed = [m for d in devices for m in _wc_live.get(d, ())]
    for m in doomed:
        m.retire(why)
    return len(doomed)


def write_combined_devices() -> set[str]:
    """The addresses of the devices with a live ``resourceN_wc`` mapping."""
    with _wc_lock:
        return set(_wc_live)


def _caching(value: Caching | str, device: str, index: int) -> Caching:
    try:
        return Caching(value)
    except ValueError:
        raise RegionError(
            errno.EINVAL,
            device,
            "mmap",
            detail=f"region {index}: unknown caching {value!r}",
            advice="use one of " + ", ".join(repr(c.value) for c in Caching),
        ) from None


@dataclass(frozen=True)
class Area:
    """A mappable part of a region: ``offset`` and ``size`` within the region."""

    offset: int
    size: int


class Region:
    """One region of a device, as VFIO_DEVICE_GET_REGION_INFO describes it.

    ``guard`` is the device's: once the device is closed, every access raises
    EBADF instead of reaching whatever file reused the fd number.
    """

    def __init__(
        self, kernel: Kernel, fd: int, device: str, index: int, guard: FdGuard | None = None
    ) -> None:
        self.kernel = kernel
        self.fd = fd
        self.device = device
        self.index = index
        self._guard = guard if guard is not None else FdGuard(fd, device)

        def fill(p: Any) -> None:
            p.index = index

        step = "VFIO_DEVICE_GET_REGION_INFO"
        with self._guard.hold(DeviceInfoError, step) as held:
            s = ioctl_info(
                kernel,
                held,
                step,
                "struct vfio_region_info",
                error=DeviceInfoError,
                device=device,
                detail=f"region {index}",
                fill=fill,
            )
        self.flags = RegionFlag(int(s.p.flags))
        self.size = int(s.p.size)
        self.offset = int(s.p.offset)
        self.type: tuple[int, int] | None = None
        self.msix_mappable = False
        self.sparse: list[Area] | None = None
        if self.flags & RegionFlag.CAPS:
            for cap in cap_chain(s, int(s.p.cap_offset)):
                if cap.id == RegionCap.SPARSE_MMAP:
                    c = s.at("struct vfio_region_info_cap_sparse_mmap", cap.offset)
                    item = ffi.sizeof("struct vfio_region_sparse_mmap_area")
                    room = (s.size - cap.offset - ffi.sizeof(c[0])) // item
                    self.sparse = [
                        Area(int(c.areas[i].offset), int(c.areas[i].size))
                        for i in range(min(int(c.nr_areas), room))
                    ]
                elif cap.id == RegionCap.TYPE:
                    t = s.at("struct vfio_region_info_cap_type", cap.offset)
                    self.type = (int(t.type), int(t.subtype))
                elif cap.id == RegionCap.MSIX_MAPPABLE:
                    self.msix_mappable = True
        self.mappings: list[Mapping] = []
        # The Device this region belongs to (set by Device.region); None for a bare Region.
        self.owner: Device | None = None
        # Whether vfio-pci has claimed this BAR (its first VFIO mmap, read or write does).
        self._claimed = index > _BAR5
        # Called with (offset, data) before each write; the device sets it on its config
        # region to refuse clearing PCI_COMMAND_MEMORY under live BAR mappings.
        self.write_check: Callable[[int, bytes], None] | None = None

    @property
    def areas(self) -> list[Area]:
        """The parts of the region that mmap accepts (none without FLAG_MMAP)."""
        if not self.flags & RegionFlag.MMAP or not self.size:
            return []
        if self.sparse is not None:
            return [a for a in self.sparse if a.size and a.offset + a.size <= self.size]
        return [Area(0, self.size)]

    # --- pread/pwrite -----------------------------------------------------------
    def _check(self, off: int, n: int, step: str) -> None:
        if off < 0 or n < 0 or off + n > self.size:
            raise RegionError(
                errno.EINVAL,
                self.device,
                step,
                detail=f"region {self.index}: [{off:#x}, +{n:#x}) is outside its "
                f"{self.size:#x} bytes",
                advice="keep offsets inside the region (see Region.size)",
            )

    def read(self, off: int, n: int) -> bytes:
        """Read ``n`` bytes at region offset ``off`` with pread."""
        self._check(off, n, "pread")
        if not self._claimed:
            self._claim()
        with (
            self._guard.hold(RegionError, "pread") as fd,
            raise_as(RegionError, self.device, "pread", f"region {self.index} offset {off:#x}"),
        ):
            data = self.kernel.pread(fd, n, self.offset + off)
        if len(data) != n:
            raise RegionError(
                errno.EIO,
                self.device,
                "pread",
                detail=f"region {self.index} offset {off:#x}: {len(data)} of {n} bytes",
            )
        return data

    def write(self, off: int, data: bytes) -> None:
        """Write ``data`` at region offset ``off`` with pwrite."""
        self._check(off, len(data), "pwrite")
        if self.write_check is not None:
            self.write_check(off, bytes(data))
        if not self._claimed:
            self._claim()
        with (
            self._guard.hold(RegionError, "pwrite") as fd,
            raise_as(RegionError, self.device, "pwrite", f"region {self.index} offset {off:#x}"),
        ):
            done = self.kernel.pwrite(fd, bytes(data), self.offset + off)
        if done != len(data):
            raise RegionError(
                errno.EIO,
                self.device,
                "pwrite",
                detail=f"region {self.index} offset {off:#x}: {done} of {len(data)} bytes",
            )

    # --- mmap ---------------------------------------------------------------------
    def mmap(
        self, area: int | None = None, *, caching: Caching | str = Caching.UNCACHED
    ) -> Mapping:
        """Map one mappable area (``area`` indexes :attr:`areas`; default: the only one).

        ``caching`` (:class:`Caching` or its value): ``"uncached"``, vfio-pci's mapping;
        ``"wc"``, write-combining through a VFIO feature, probed, and refused with
        :class:`vfiopy.features.FeatureNotSupportedError` (no mainline kernel has one);
        ``"wc-sysfs"``, write-combining through ``resourceN_wc`` (root): the kernel does not
        unmap it on resets or memory disable it does itself, so use it only when you own
        every reset of the device.  vfiopy retires it (accesses then raise EBADF; map
        again) before :meth:`Device.reset`, :meth:`Device.hot_reset`, a config write
        clearing PCI_COMMAND_MEMORY, a low-power entry and the first uncached access of
        the BAR.  Write-combining is refused (EINVAL) for I/O and non-prefetchable BARs.
        The mapping's ``caching`` says what it got.
        """
        mode = _caching(caching, self.device, self.index)
        if mode is not Caching.UNCACHED:
            self._check_write_combining(mode)
        areas = self.areas
        if not areas:
            raise RegionError(
                errno.EINVAL,
                self.device,
                "mmap",
                detail=f"region {self.index} has no mappable area",
                advice="use Region.read/write (pread/pwrite) for this region",
            )
        if area is None:
            if len(areas) > 1:
                raise RegionError(
                    errno.EINVAL,
                    self.device,
                    "mmap",
                    detail=f"region {self.index} has {len(areas)} sparse areas",
                    advice="pass the area index, or use Region.mmap_all()",
                )
            area = 0
        if not 0 <= area < len(areas):
            raise RegionError(
                errno.EINVAL, self.device, "mmap", detail=f"region {self.index} has no area {area}"
            )
        if mode is Caching.UNCACHED and not self._claimed:
            self._claim()
        # Listed before the use ends, so the device's close, which waits for
        # it, finds the mapping and unmaps it before closing the fd.
        with self._guard.hold(RegionError, "mmap"):
            m = Mapping(self, areas[area], mode)
            self.mappings.append(m)
        if mode is Caching.WC_SYSFS:
            m.revocable = not self._claimed
            with _wc_lock:
                _wc_live.setdefault(self.device, set()).add(m)
            log.warning(
                "region.wc_sysfs_mapped",
                bdf=self.device,
                bar=self.index,
                note="the kernel does not unmap resourceN_wc mappings on resets or memory "
                "disable it performs itself (open, release, another holder's reset, AER "
                "recovery); vfiopy retires this mapping around its own",
            )
        return m

    @property
    def prefetchable(self) -> bool:
        """Whether this is a prefetchable memory BAR (sysfs ``resource``), the only kind
        write-combining may map."""
        if self.index > _BAR5:
            return False
        flags = self._resource_flags()
        return bool(flags & IORESOURCE_PREFETCH and not flags & IORESOURCE_IO)

    def _resource_flags(self) -> int:
        """The BAR's struct resource flags, from sysfs ``resource`` (line = BAR index)."""
        from vfiopy.sysfs import Sysfs

        lines = Sysfs(self.kernel).read(self.device, "resource").splitlines()
        try:
            return int(lines[self.index].split()[2], 16)
        except (IndexError, ValueError):
            raise RegionError(
                errno.EINVAL,
                self.device,
                "read resource",
                detail=f"no flags for BAR{self.index} in {lines!r}",
            ) from None

    def _check_write_combining(self, mode: Caching) -> None:
        step = f"mmap BAR{self.index} write-combining"
        if self.index > _BAR5:
            raise RegionError(
                errno.EINVAL,
                self.device,
                step,
                detail=f"region {self.index} is not a BAR",
                advice="write-combining applies to prefetchable memory BARs only",
            )
        flags = self._resource_flags()
        if flags & IORESOURCE_IO:
            raise RegionError(
                errno.EINVAL,
                self.device,
                step,
                detail=f"BAR{self.index} is an I/O-port BAR",
                advice="write-combining applies to prefetchable memory BARs only; use "
                "Region.read/write for port I/O",
            )
        if not flags & IORESOURCE_PREFETCH:
            raise RegionError(
                errno.EINVAL,
                self.device,
                step,
                detail=f"BAR{self.index} is not prefetchable: its registers may have side "
                "effects that merged, reordered or repeated stores would break (the kernel "
                f"offers no resource{self.index}_wc for it)",
                advice="map it uncached (caching='uncached', the default)",
            )
        if mode is Caching.WC:
            from vfiopy.features import require_vfio_write_combining

            require_vfio_write_combining(self)

    def _claim(self) -> None:
        """Before vfio-pci's first access of this BAR, which claims its region: retire the
        ``resourceN_wc`` mappings made before, which a CONFIG_IO_STRICT_DEVMEM kernel
        revokes at the claim (their next access would be SIGBUS)."""
        self._claimed = True
        for m in list(self.mappings):
            if m.revocable:
                m.retire(
                    f"the first uncached access of BAR{self.index}, where vfio-pci claims "
                    "the BAR and a CONFIG_IO_STRICT_DEVMEM kernel revokes the mapping (SIGBUS)",
                    "such a kernel refuses resourceN_wc until the device's last close: map "
                    "write-combining before any uncached access of the BAR, or use the "
                    "uncached mapping",
                )

    def retire_write_combined(self, why: str) -> int:
        """Retire this region's ``resourceN_wc`` mappings before ``why``; how many."""
        doomed = [m for m in self.mappings if m.caching is Caching.WC_SYSFS]
        for m in doomed:
            m.retire(why)
        return len(doomed)

    def mmap_all(self) -> list[Mapping]:
        """Map every mappable area; all or none."""
        out: list[Mapping] = []
        try:
            for i in range(len(self.areas)):
                out.append(self.mmap(i))
        except BaseException:
            for m in out:
                m.close()
            raise
        return out

    def close(self) -> None:
        """Unmap every mapping of this region."""
        errors: list[BaseException] = []
        for m in list(self.mappings):
            try:
                m.close()
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return (
            f"Region(index={self.index}, size={self.size:#x}, flags={self.flags!r}, "
            f"areas={self.areas})"
        )


class Mapping(Closable):
    """An mmapped area of a region.

    Offsets are region offsets (so a BAR register keeps its datasheet
    offset whichever sparse area it falls in).  Each ``readN``/``writeN``
    is exactly one access of that width, bounds- and alignment-checked.

    Safe to close while other threads access it: an access that passed its
    check just before the close reads 0 or writes nowhere, never faults.

    ``size`` is the area's and bounds every access; ``length`` is what is mapped, whole
    pages: a BAR smaller than a page is mapped as its page (the rest of which vfio-pci
    reserves), and nothing past ``size`` is reachable through the accessors.

    ``caching`` is what the mapping got (:class:`Caching`).  A ``WC_SYSFS``
    mapping that vfiopy retired before a reset (see :meth:`Region.mmap`) is
    closed; its accesses raise EBADF naming the reason.
    """

    __slots__ = (
        "_base",
        "_end",
        "_hi8",
        "_hi16",
        "_hi32",
        "_hi64",
        "_lo",
        "_r8",
        "_r16",
        "_r32",
        "_r64",
        "_reserved",
        "_retired",
        "_w8",
        "_w16",
        "_w32",
        "_w64",
        "addr",
        "caching",
        "length",
        "offset",
        "region",
        "revocable",
        "size",
    )
    # The C accessors, typed: cffi returns plain ints for these.
    _r8: Callable[[int], int]
    _r16: Callable[[int], int]
    _r32: Callable[[int], int]
    _r64: Callable[[int], int]
    _w8: Callable[[int, int], None]
    _w16: Callable[[int, int], None]
    _w32: Callable[[int, int], None]
    _w64: Callable[[int, int], None]

    def __init__(self, region: Region, area: Area, caching: Caching = Caching.UNCACHED) -> None:
        self._reserved = False  # set by close: the range is ours until __del__
        self._retired: tuple[str, str] | None = None  # (before what, what to do)
        self.revocable = False  # a resourceN_wc mapping made before vfio-pci claimed the BAR
        flags = region.flags
        prot = (PROT_READ if flags & RegionFlag.READ else 0) | (
            PROT_WRITE if flags & RegionFlag.WRITE else 0
        )
        where = f"region {region.index} area [{area.offset:#x}, +{area.size:#x})"
        # Whole pages: vfio-pci maps a BAR smaller than a page (4.7+) as its page.
        self.length = -(-area.size // PAGE_SIZE) * PAGE_SIZE
        if caching is Caching.WC_SYSFS:
            self.addr = _map_resource_wc(region, area, self.length, prot, where)
        else:
            with raise_as(RegionError, region.device, "mmap", where):
                self.addr = region.kernel.mmap(
                    region.fd, self.length, region.offset + area.offset, prot, MAP_SHARED
                )
        self.caching = caching
        self.region = region
        self.offset = area.offset
        self.size = area.size
        # Precomputed so an access is one compare chain, one add, one C call.
        self._base = self.addr - area.offset
        self._set_bounds(area.offset, area.offset + area.size)
        self._r8, self._r16 = lib.vfiopy_read8, lib.vfiopy_read16
        self._r32, self._r64 = lib.vfiopy_read32, lib.vfiopy_read64
        self._w8, self._w16 = lib.vfiopy_write8, lib.vfiopy_write16
        self._w32, self._w64 = lib.vfiopy_write32, lib.vfiopy_write64

    def _set_bounds(self, lo: int, end: int) -> None:
        self._lo, self._end = lo, end
        self._hi8, self._hi16, self._hi32, self._hi64 = end - 1, end - 2, end - 4, end - 8

    @property
    def closed(self) -> bool:
        return self._end <= self._lo

    def _bad(self, off: int, width: int) -> RegionError:
        step = f"mmio access region {self.region.index}"
        if self.closed and self._retired is not None:
            why, advice = self._retired
            return RegionError(
                errno.EBADF,
                self.region.device,
                step,
                detail=f"the write-combined mapping of BAR{self.region.index} was retired "
                f"before {why}",
                advice=advice,
            )
        if self.closed:
            return RegionError(errno.EBADF, self.region.device, step, "the mapping is closed")
        if off % width:
            detail = f"offset {off:#x} is not {width}-byte aligned"
        else:
            detail = f"offset {off:#x} (+{width}) is outside [{self.offset:#x}, +{self.size:#x})"
        return RegionError(errno.EINVAL, self.region.device, step, detail)

    def read8(self, off: int) -> int:
        if not self._lo <= off <= self._hi8:
            raise self._bad(off, 1)
        return self._r8(self._base + off)

    def read16(self, off: int) -> int:
        if off & 1 or not self._lo <= off <= self._hi16:
            raise self._bad(off, 2)
        return self._r16(self._base + off)

    def read32(self, off: int) -> int:
        if off & 3 or not self._lo <= off <= self._hi32:
            raise self._bad(off, 4)
        return self._r32(self._base + off)

    def read64(self, off: int) -> int:
        if off & 7 or not self._lo <= off <= self._hi64:
            raise self._bad(off, 8)
        return self._r64(self._base + off)

    def write8(self, off: int, value: int) -> None:
        if not self._lo <= off <= self._hi8:
            raise self._bad(off, 1)
        self._w8(self._base + off, value)

    def write16(self, off: int, value: int) -> None:
        if off & 1 or not self._lo <= off <= self._hi16:
            raise self._bad(off, 2)
        self._w16(self._base + off, value)

    def write32(self, off: int, value: int) -> None:
        if off & 3 or not self._lo <= off <= self._hi32:
            raise self._bad(off, 4)
        self._w32(self._base + off, value)

    def write64(self, off: int, value: int) -> None:
        if off & 7 or not self._lo <= off <= self._hi64:
            raise self._bad(off, 8)
        self._w64(self._base + off, value)

    def _span(self, off: int, n: int) -> None:
        if n < 0 or not self._lo <= off <= self._end - n:
            raise self._bad(off, 1)

    def read_bytes(self, off: int, n: int) -> bytes:
        """Copy ``n`` bytes out, in 32-bit accesses where aligned, bytes elsewhere."""
        self._span(off, n)
        out: Any = ffi.new("uint8_t[]", n)
        head = min(-off & 3, n)
        for i in range(head):
            out[i] = self._r8(self._base + off + i)
        words = (n - head) // 4
        lib.vfiopy_copy_from_io32(out + head, self._base + off + head, words)
        for i in range(head + 4 * words, n):
            out[i] = self._r8(self._base + off + i)
        return bytes(ffi.buffer(out, n))

    def write_bytes(self, off: int, data: bytes) -> None:
        """Copy ``data`` in, in 32-bit accesses where aligned, bytes elsewhere."""
        n = len(data)
        self._span(off, n)
        head = min(-off & 3, n)
        for i in range(head):
            self._w8(self._base + off + i, data[i])
        words = (n - head) // 4
        src: Any = ffi.from_buffer(bytes(data[head : head + 4 * words]))
        lib.vfiopy_copy_to_io32(self._base + off + head, src, words)
        for i in range(head + 4 * words, n):
            self._w8(self._base + off + i, data[i])

    def close(self) -> None:
        """Unmap the area from the device. Idempotent.

        The bounds close first, so new accesses raise.  An access on another
        thread may have passed its check already and not yet loaded: a
        plain munmap would leave it a hole to fault on.  So the range is
        replaced in one step with zero pages (which drops the device file's
        reference, as munmap would) and only unmapped when this object goes.
        """
        if self.closed:
            return
        self._set_bounds(0, 0)
        if self in self.region.mappings:
            self.region.mappings.remove(self)
        if self.caching is Caching.WC_SYSFS:
            with _wc_lock:
                live = _wc_live.get(self.region.device)
                if live is not None:
                    live.discard(self)
                    if not live:
                        del _wc_live[self.region.device]
        kernel = self.region.kernel
        with raise_as(RegionError, self.region.device, "munmap", f"region {self.region.index}"):
            if isinstance(kernel, RemapKernel):
                try:
                    kernel.remap_anonymous(self.addr, self.length)
                    self._reserved = True
                    return
                except OSError:
                    pass  # unmap after all: the device's release matters more
            kernel.munmap(self.addr, self.length)

    def retire(self, why: str, advice: str = _REMAP_ADVICE) -> None:
        """Close before ``why`` (a reset, memory disable...), so that later accesses say so
        and what to do (``advice``)."""
        if self.closed:
            return
        self._retired = (why, advice)
        log.warning(
            "region.wc_sysfs_retired", bdf=self.region.device, bar=self.region.index, before=why
        )
        self.close()

    def __del__(self) -> None:
        if self._reserved:
            self._reserved = False
            # Nothing can raise out of a finaliser; a failure leaves zero pages mapped.
            with contextlib.suppress(OSError):
                self.region.kernel.munmap(self.addr, self.length)

    def __repr__(self) -> str:
        return (
            f"Mapping(region={self.region.index}, offset={self.offset:#x}, size={self.size:#x}, "
            f"caching={self.caching.value})"
        )


_WC_OPEN_ADVICE = {
    errno.ENOENT: "the kernel offers no resourceN_wc for this BAR (not prefetchable, or the "
    "architecture cannot write-combine PCI mappings)",
    errno.EACCES: "resourceN_wc is root's (mode 0600): run as root",
    errno.EPERM: "run as root; a kernel in lockdown (LOCKDOWN_PCI_ACCESS) refuses it",
}
_WC_MMAP_ADVICE = {
    errno.EINVAL: "the BAR is claimed by a driver and the kernel has CONFIG_IO_STRICT_DEVMEM: "
    "vfio-pci claims a BAR at its first VFIO mmap, read or write and keeps it until the "
    "device's last close; map write-combining before any uncached access of this BAR, or "
    "boot with iomem=relaxed",
    errno.EPERM: "kernel lockdown (LOCKDOWN_PCI_ACCESS) forbids mapping PCI resources",
}


def _map_resource_wc(region: Region, area: Area, length: int, prot: int, where: str) -> int:
    """mmap ``length`` bytes (``area`` in whole pages) of ``resourceN_wc`` (file offset = BAR
    offset); the fd is closed at once, the mapping keeps the file."""
    from vfiopy.sysfs import Sysfs

    kernel = region.kernel
    path = Sysfs(kernel).path(region.device, f"resource{region.index}_wc")
    step = f"open resource{region.index}_wc"
    try:
        fd = kernel.open(path, O_RDWR)
    except OSError as exc:
        raise RegionError.from_oserror(
            exc, region.device, step, path, _WC_OPEN_ADVICE.get(exc.errno or 0)
        ) from exc
    try:
        return kernel.mmap(fd, length, area.offset, prot, MAP_SHARED)
    except OSError as exc:
        raise RegionError.from_oserror(
            exc,
            region.device,
            f"mmap resource{region.index}_wc",
            where,
            _WC_MMAP_ADVICE.get(exc.errno or 0),
        ) from exc
    finally:
        kernel.close(fd)


__all__ = [
    "Area",
    "Caching",
    "Mapping",
    "Region",
    "retire_write_combined",
    "write_combined_devices",
]
