"""The compiled VFIO/iommufd binding, and names for the kernel's constants.

``ffi`` and ``lib`` are cffi objects (typed ``Any`` by nature); everything
above this module uses the enums here and the helpers in ``kernel.py``.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from vfiopy._uapi_cffi import ffi as _ffi
from vfiopy._uapi_cffi import lib as _lib
from vfiopy.errors import VfioError

if TYPE_CHECKING:
    from types import TracebackType

    from vfiopy.kernel import Kernel

ffi: Any = _ffi
lib: Any = _lib

CData = Any  # a cffi struct pointer or buffer

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")  # the host's: 16 KiB or 64 KiB on some arm64


class Ioctl:
    """Every VFIO and iommufd ioctl request number, as the installed header gives it.

    Not an IntEnum: container and device ioctls share numbers (IOMMU_GET_INFO
    and GET_PCI_HOT_RESET_INFO are both VFIO_BASE + 12), and an enum would
    silently turn one into an alias of the other.
    """

    GET_API_VERSION: int = lib.VFIO_GET_API_VERSION
    CHECK_EXTENSION: int = lib.VFIO_CHECK_EXTENSION
    SET_IOMMU: int = lib.VFIO_SET_IOMMU
    GROUP_GET_STATUS: int = lib.VFIO_GROUP_GET_STATUS
    GROUP_SET_CONTAINER: int = lib.VFIO_GROUP_SET_CONTAINER
    GROUP_UNSET_CONTAINER: int = lib.VFIO_GROUP_UNSET_CONTAINER
    GROUP_GET_DEVICE_FD: int = lib.VFIO_GROUP_GET_DEVICE_FD
    DEVICE_GET_INFO: int = lib.VFIO_DEVICE_GET_INFO
    DEVICE_GET_REGION_INFO: int = lib.VFIO_DEVICE_GET_REGION_INFO
    DEVICE_GET_IRQ_INFO: int = lib.VFIO_DEVICE_GET_IRQ_INFO
    DEVICE_SET_IRQS: int = lib.VFIO_DEVICE_SET_IRQS
    DEVICE_RESET: int = lib.VFIO_DEVICE_RESET
    DEVICE_GET_PCI_HOT_RESET_INFO: int = lib.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO
    DEVICE_PCI_HOT_RESET: int = lib.VFIO_DEVICE_PCI_HOT_RESET
    DEVICE_IOEVENTFD: int = lib.VFIO_DEVICE_IOEVENTFD
    DEVICE_FEATURE: int = lib.VFIO_DEVICE_FEATURE
    DEVICE_BIND_IOMMUFD: int = lib.VFIO_DEVICE_BIND_IOMMUFD
    DEVICE_ATTACH_IOMMUFD_PT: int = lib.VFIO_DEVICE_ATTACH_IOMMUFD_PT
    DEVICE_DETACH_IOMMUFD_PT: int = lib.VFIO_DEVICE_DETACH_IOMMUFD_PT
    IOMMU_GET_INFO: int = lib.VFIO_IOMMU_GET_INFO
    IOMMU_MAP_DMA: int = lib.VFIO_IOMMU_MAP_DMA
    IOMMU_UNMAP_DMA: int = lib.VFIO_IOMMU_UNMAP_DMA
    IOMMU_ENABLE: int = lib.VFIO_IOMMU_ENABLE
    IOMMU_DISABLE: int = lib.VFIO_IOMMU_DISABLE
    IOMMUFD_DESTROY: int = lib.IOMMU_DESTROY
    IOMMUFD_IOAS_ALLOC: int = lib.IOMMU_IOAS_ALLOC
    IOMMUFD_IOAS_ALLOW_IOVAS: int = lib.IOMMU_IOAS_ALLOW_IOVAS
    IOMMUFD_IOAS_IOVA_RANGES: int = lib.IOMMU_IOAS_IOVA_RANGES
    IOMMUFD_IOAS_MAP: int = lib.IOMMU_IOAS_MAP
    IOMMUFD_IOAS_UNMAP: int = lib.IOMMU_IOAS_UNMAP
    IOMMUFD_OPTION: int = lib.IOMMU_OPTION


class IommuType(enum.IntEnum):
    TYPE1 = lib.VFIO_TYPE1_IOMMU
    SPAPR_TCE = lib.VFIO_SPAPR_TCE_IOMMU
    TYPE1v2 = lib.VFIO_TYPE1v2_IOMMU
    NOIOMMU = lib.VFIO_NOIOMMU_IOMMU


class Extension(enum.IntEnum):
    TYPE1_IOMMU = lib.VFIO_TYPE1_IOMMU
    SPAPR_TCE_IOMMU = lib.VFIO_SPAPR_TCE_IOMMU
    TYPE1v2_IOMMU = lib.VFIO_TYPE1v2_IOMMU
    DMA_CC_IOMMU = lib.VFIO_DMA_CC_IOMMU
    EEH = lib.VFIO_EEH
    TYPE1_NESTING_IOMMU = lib.VFIO_TYPE1_NESTING_IOMMU
    SPAPR_TCE_v2_IOMMU = lib.VFIO_SPAPR_TCE_v2_IOMMU
    NOIOMMU_IOMMU = lib.VFIO_NOIOMMU_IOMMU
    UNMAP_ALL = lib.VFIO_UNMAP_ALL
    UPDATE_VADDR = lib.VFIO_UPDATE_VADDR


class GroupFlag(enum.IntFlag):
    VIABLE = lib.VFIO_GROUP_FLAGS_VIABLE
    CONTAINER_SET = lib.VFIO_GROUP_FLAGS_CONTAINER_SET


class DeviceFlag(enum.IntFlag):
    RESET = lib.VFIO_DEVICE_FLAGS_RESET
    PCI = lib.VFIO_DEVICE_FLAGS_PCI
    PLATFORM = lib.VFIO_DEVICE_FLAGS_PLATFORM
    AMBA = lib.VFIO_DEVICE_FLAGS_AMBA
    CCW = lib.VFIO_DEVICE_FLAGS_CCW
    AP = lib.VFIO_DEVICE_FLAGS_AP
    FSL_MC = lib.VFIO_DEVICE_FLAGS_FSL_MC
    CAPS = lib.VFIO_DEVICE_FLAGS_CAPS


class RegionFlag(enum.IntFlag):
    READ = lib.VFIO_REGION_INFO_FLAG_READ
    WRITE = lib.VFIO_REGION_INFO_FLAG_WRITE
    MMAP = lib.VFIO_REGION_INFO_FLAG_MMAP
    CAPS = lib.VFIO_REGION_INFO_FLAG_CAPS


class RegionCap(enum.IntEnum):
    SPARSE_MMAP = lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP
    TYPE = lib.VFIO_REGION_INFO_CAP_TYPE
    MSIX_MAPPABLE = lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE


class PciRegion(enum.IntEnum):
    BAR0 = lib.VFIO_PCI_BAR0_REGION_INDEX
    BAR1 = lib.VFIO_PCI_BAR1_REGION_INDEX
    BAR2 = lib.VFIO_PCI_BAR2_REGION_INDEX
    BAR3 = lib.VFIO_PCI_BAR3_REGION_INDEX
    BAR4 = lib.VFIO_PCI_BAR4_REGION_INDEX
    BAR5 = lib.VFIO_PCI_BAR5_REGION_INDEX
    ROM = lib.VFIO_PCI_ROM_REGION_INDEX
    CONFIG = lib.VFIO_PCI_CONFIG_REGION_INDEX
    VGA = lib.VFIO_PCI_VGA_REGION_INDEX


VFIO_PCI_NUM_REGIONS: int = lib.VFIO_PCI_NUM_REGIONS


class PciIrq(enum.IntEnum):
    INTX = lib.VFIO_PCI_INTX_IRQ_INDEX
    MSI = lib.VFIO_PCI_MSI_IRQ_INDEX
    MSIX = lib.VFIO_PCI_MSIX_IRQ_INDEX
    ERR = lib.VFIO_PCI_ERR_IRQ_INDEX
    REQ = lib.VFIO_PCI_REQ_IRQ_INDEX


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = lib.VFIO_IRQ_INFO_EVENTFD
    MASKABLE = lib.VFIO_IRQ_INFO_MASKABLE
    AUTOMASKED = lib.VFIO_IRQ_INFO_AUTOMASKED
    NORESIZE = lib.VFIO_IRQ_INFO_NORESIZE


class IrqSetFlag(enum.IntFlag):
    DATA_NONE = lib.VFIO_IRQ_SET_DATA_NONE
    DATA_BOOL = lib.VFIO_IRQ_SET_DATA_BOOL
    DATA_EVENTFD = lib.VFIO_IRQ_SET_DATA_EVENTFD
    ACTION_MASK = lib.VFIO_IRQ_SET_ACTION_MASK
    ACTION_UNMASK = lib.VFIO_IRQ_SET_ACTION_UNMASK
    ACTION_TRIGGER = lib.VFIO_IRQ_SET_ACTION_TRIGGER


IRQ_SET_DATA_TYPE_MASK: int = lib.VFIO_IRQ_SET_DATA_TYPE_MASK
IRQ_SET_ACTION_TYPE_MASK: int = lib.VFIO_IRQ_SET_ACTION_TYPE_MASK


class HotResetFlag(enum.IntFlag):
    DEV_ID = lib.VFIO_PCI_HOT_RESET_FLAG_DEV_ID
    DEV_ID_OWNED = lib.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED


VFIO_PCI_DEVID_OWNED: int = lib.VFIO_PCI_DEVID_OWNED
VFIO_PCI_DEVID_NOT_OWNED: int = lib.VFIO_PCI_DEVID_NOT_OWNED


class FeatureFlag(enum.IntFlag):
    GET = lib.VFIO_DEVICE_FEATURE_GET
    SET = lib.VFIO_DEVICE_FEATURE_SET
    PROBE = lib.VFIO_DEVICE_FEATURE_PROBE


FEATURE_MASK: int = lib.VFIO_DEVICE_FEATURE_MASK


class Feature(enum.IntEnum):
    PCI_VF_TOKEN = lib.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN
    MIGRATION = lib.VFIO_DEVICE_FEATURE_MIGRATION
    MIG_DEVICE_STATE = lib.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    LOW_POWER_ENTRY = lib.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY
    LOW_POWER_ENTRY_WITH_WAKEUP = lib.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP
    LOW_POWER_EXIT = lib.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT
    DMA_LOGGING_START = lib.VFIO_DEVICE_FEATURE_DMA_LOGGING_START
    DMA_LOGGING_STOP = lib.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
    DMA_LOGGING_REPORT = lib.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
    MIG_DATA_SIZE = lib.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
    BUS_MASTER = lib.VFIO_DEVICE_FEATURE_BUS_MASTER


class IommuInfoFlag(enum.IntFlag):
    PGSIZES = lib.VFIO_IOMMU_INFO_PGSIZES
    CAPS = lib.VFIO_IOMMU_INFO_CAPS


class IommuInfoCap(enum.IntEnum):
    IOVA_RANGE = lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
    MIGRATION = lib.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION
    DMA_AVAIL = lib.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL


class DmaMapFlag(enum.IntFlag):
    READ = lib.VFIO_DMA_MAP_FLAG_READ
    WRITE = lib.VFIO_DMA_MAP_FLAG_WRITE
    VADDR = lib.VFIO_DMA_MAP_FLAG_VADDR


class DmaUnmapFlag(enum.IntFlag):
    GET_DIRTY_BITMAP = lib.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    ALL = lib.VFIO_DMA_UNMAP_FLAG_ALL
    VADDR = lib.VFIO_DMA_UNMAP_FLAG_VADDR


class IoasMapFlag(enum.IntFlag):
    FIXED_IOVA = lib.IOMMU_IOAS_MAP_FIXED_IOVA
    WRITEABLE = lib.IOMMU_IOAS_MAP_WRITEABLE
    READABLE = lib.IOMMU_IOAS_MAP_READABLE


PROT_READ: int = lib.PROT_READ
PROT_WRITE: int = lib.PROT_WRITE
MAP_SHARED: int = lib.MAP_SHARED
MAP_PRIVATE: int = lib.MAP_PRIVATE
MAP_ANONYMOUS: int = lib.MAP_ANONYMOUS
# Hugetlb memory without a hugetlbfs mount: MAP_HUGETLB (Linux 2.6.32, 4e52780d41a7), with
# the page size's log2 in bits 26-31 (MAP_HUGE_SHIFT, Linux 3.8, 42d7395feb56).  The
# asm-generic values, which x86, arm64, riscv, powerpc and s390 use.
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26


class Struct:
    """A zeroed UAPI struct in a buffer of its own, ``argsz``/``size`` set.

    ``total`` larger than the struct leaves room for a trailing capability
    chain or array, as the kernel's INFO ioctls and SET_IRQS expect.  ``p``
    is the typed pointer handed to ioctl; ``raw`` owns the memory, so keep
    the ``Struct`` alive for as long as ``p`` is used.
    """

    __slots__ = ("ctype", "p", "raw", "size")

    def __init__(self, ctype: str, total: int = 0) -> None:
        self.ctype = ctype
        self.size = max(ffi.sizeof(ctype), total)
        self.raw: Any = ffi.new("char[]", self.size)
        self.p: Any = ffi.cast(ctype + " *", self.raw)
        if ctype.startswith("struct iommu_"):
            self.p.size = self.size
        elif "argsz" in {f for f, _ in ffi.typeof(ctype).fields}:
            self.p.argsz = self.size

    def at(self, ctype: str, offset: int) -> Any:
        """A typed pointer to ``ctype`` at ``offset`` bytes into the buffer."""
        if offset < 0 or offset + ffi.sizeof(ctype) > self.size:
            raise ValueError(f"{ctype} at {offset} lies outside a {self.size}-byte buffer")
        return ffi.cast(ctype + " *", self.raw + offset)

    def tobytes(self) -> bytes:
        return bytes(ffi.buffer(self.raw, self.size))


class Closable:
    """An object holding a kernel resource that ``close()`` releases; a context manager."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Cap(NamedTuple):
    """One entry of a VFIO info capability chain: ``offset`` is from the buffer start."""

    id: int
    version: int
    offset: int


def cap_chain(buf: Struct, first: int) -> Iterator[Cap]:
    """Walk the capability chain of a DEVICE/REGION/IOMMU info buffer.

    The kernel shifts every ``next`` to an offset from the start of the info
    struct and ends the chain with 0.  A corrupt chain (out of bounds, or a
    loop) ends the walk instead of reading past the buffer.
    """
    header = ffi.sizeof("struct vfio_info_cap_header")
    seen: set[int] = set()
    offset = first
    while offset and offset not in seen and offset + header <= buf.size:
        seen.add(offset)
        h = buf.at("struct vfio_info_cap_header", offset)
        yield Cap(int(h.id), int(h.version), offset)
        offset = int(h.next)


def ioctl(
    kernel: Kernel,
    fd: int,
    name: str,
    arg: Any = 0,
    *,
    error: type[VfioError],
    device: str | None,
    detail: str | None = None,
    advice: str | Mapping[int, str] | None = None,
) -> int:
    """Issue the ioctl ``name`` (spelled as in the UAPI header) on ``fd``.

    A failure becomes ``error`` naming the device, the ioctl and the errno;
    ``advice`` is one text, or texts by errno (others get the generic advice).
    """
    try:
        return kernel.ioctl(fd, getattr(lib, name), arg)
    except OSError as exc:
        if isinstance(advice, Mapping):
            advice = advice.get(exc.errno or 0)
        raise error.from_oserror(exc, device, name, detail, advice) from exc


def ioctl_info(
    kernel: Kernel,
    fd: int,
    name: str,
    ctype: str,
    *,
    error: type[VfioError],
    device: str | None,
    detail: str | None = None,
    advice: str | Mapping[int, str] | None = None,
    fill: Callable[[Any], None] | None = None,
) -> Struct:
    """An INFO ioctl whose reply may end in a capability chain.

    When the chain does not fit, the kernel answers success with ``argsz``
    raised to the size it needs (and ``cap_offset`` 0): grow and ask again.
    ``fill`` sets the input fields (an index) of each fresh struct.
    """
    total = 0
    for _ in range(8):  # the chain only grows if the device changes in between
        s = Struct(ctype, total)
        if fill is not None:
            fill(s.p)
        ioctl(kernel, fd, name, s.p, error=error, device=device, detail=detail, advice=advice)
        if s.p.argsz <= s.size:
            return s
        total = int(s.p.argsz)
    raise error(errno.EMSGSIZE, device, name, detail="argsz kept growing")


def open_node(
    kernel: Kernel,
    path: str,
    flags: int,
    *,
    error: type[VfioError],
    device: str | None,
    advice: Mapping[int, str] | None = None,
) -> int:
    """Open a /dev node; EACCES names the node and the permission it needs."""
    try:
        return kernel.open(path, flags)
    except OSError as exc:
        err = exc.errno or 0
        text = (advice or {}).get(err)
        if text is None and err in (errno.EACCES, errno.EPERM):
            text = (
                f"{path} needs read and write permission for this user: check its owner and "
                f"mode (ls -l {path}), add the user to the owning group, or run as root"
            )
        raise error.from_oserror(exc, device, f"open {path}", None, text) from exc
