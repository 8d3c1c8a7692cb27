"""The ioctl ABI as the kernel reads it (include/uapi/linux/vfio.h, iommufd.h).

Ioctl arguments are the caller's cffi structs; handlers read ``argsz`` (or
``size``) first and check it against ``offsetofend`` of the last field the
kernel needs, as include/uapi/linux/vfio.h requires, then decode the same
bytes the kernel would and write back only what the kernel copies out.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from mock_vfio.trace import oserror
from vfiopy._uapi import Ioctl, ffi

PAGE = 4096


def page_align(n: int) -> int:
    """``PAGE_ALIGN``: ``n`` rounded up to a whole page."""
    return (n + PAGE - 1) & ~(PAGE - 1)


OFFSET_SHIFT = 40
OFFSET_MASK = (1 << OFFSET_SHIFT) - 1
CONFIG_INDEX = 7
ROM_INDEX = 6
VGA_INDEX = 8
NUM_IRQS = 5
INTX, MSI, MSIX, ERR, REQ = range(5)
U64_MAX = (1 << 64) - 1
_IOCTLS: dict[str, int] = {k: v for k, v in vars(Ioctl).items() if k.isupper()}


# --- argument access -----------------------------------------------------------------


def addr_of(arg: Any) -> int:
    if isinstance(arg, int):
        if arg == 0:
            raise oserror(errno.EFAULT, "NULL ioctl argument")
        return arg
    a = int(ffi.cast("uintptr_t", arg))
    if a == 0:
        raise oserror(errno.EFAULT, "NULL ioctl argument")
    return a


def as_struct(addr: int, ctype: str) -> Any:
    return ffi.cast(ctype + " *", addr)


def u32_at(addr: int) -> int:
    return int(ffi.cast("uint32_t *", addr)[0])


def read_mem(addr: int, n: int) -> bytes:
    return bytes(ffi.buffer(ffi.cast("char *", addr), n))


def write_mem(addr: int, data: bytes) -> None:
    ffi.memmove(ffi.cast("char *", addr), data, len(data))


def offsetofend(ctype: str, fld: str) -> int:
    return int(ffi.offsetof(ctype, fld)) + int(
        ffi.sizeof(ffi.typeof(ctype).fields[_fidx(ctype, fld)][1].type)
    )


def _fidx(ctype: str, fld: str) -> int:
    for i, (name, _) in enumerate(ffi.typeof(ctype).fields):
        if name == fld:
            return i
    raise KeyError(fld)


def sizeof(ctype: str) -> int:
    return int(ffi.sizeof(ctype))


def check_argsz(addr: int, ctype: str, last: str) -> tuple[int, int]:
    """(argsz, minsz); EINVAL when argsz < minsz, as every vfio ioctl does."""
    argsz = u32_at(addr)
    minsz = offsetofend(ctype, last)
    if argsz < minsz:
        raise oserror(errno.EINVAL, f"{ctype}: argsz {argsz} < {minsz}")
    return argsz, minsz


class CapChain:
    """``struct vfio_info_cap``: capabilities appended after the info struct."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._last = -1

    def add(self, cap_id: int, version: int, body: bytes) -> None:
        off = len(self.buf)
        if self._last >= 0:
            struct.pack_into("<I", self.buf, self._last + 4, off)
        raw = struct.pack("<HHI", cap_id, version, 0) + body
        raw += b"\0" * (-len(raw) % 8)
        self.buf += raw
        self._last = off

    def shifted(self, base: int) -> bytes:
        """The chain with ``next`` offsets relative to the start of the user buffer."""
        out = bytearray(self.buf)
        off = 0
        while True:
            nxt = struct.unpack_from("<I", out, off + 4)[0]
            struct.pack_into("<I", out, off + 4, nxt + base if nxt else 0)
            if not nxt:
                break
            off = nxt
        return bytes(out)


def put_caps(addr: int, argsz: int, info_size: int, caps: CapChain) -> tuple[int, int, bool]:
    """Copy a chain if it fits: (argsz to report, cap_offset, fitted)."""
    if not caps.buf:
        return argsz, 0, True
    need = info_size + len(caps.buf)
    if argsz < need:
        return need, 0, False
    write_mem(addr + info_size, caps.shifted(info_size))
    return argsz, info_size, True
