"""A vfio-pci device's BAR mappings: ``memory_lock``, the zap and the fault.

Mirrors the mmap half of drivers/vfio/pci/vfio_pci_core.c.  From Linux 5.8 (abafbc551fdd)
vfio-pci takes the device's ``memory_lock`` for writing around anything that can turn BAR
decoding off (a write clearing PCI_COMMAND_MEMORY, VFIO_DEVICE_RESET, an FLR through config
space, low-power entry, the hot reset) and zaps the user's BAR mappings first; its fault
handler maps a page back, under ``memory_lock`` for reading, only while the user's command
register has MEMORY set (``__vfio_pci_memory_enabled``), else the access gets SIGBUS.  pread
and pwrite of a BAR take ``memory_lock`` for reading and fail with EIO the same way.

The simulator backs a BAR with shared memory that its device models read.  Each user mmap is
a mapping of its own of those pages (mremap with an old size of 0 duplicates a shared
mapping), so a store through it reaches the model.  A zap maps an empty memfd over the user's
range: a load there lies past the file's end, SIGBUS as in the kernel.  The kernel faults
the pages back on the next access; the simulator cannot see accesses, so it puts them back
when MEMORY is set again.  Around a reset the kernel's fault waits on ``memory_lock`` and then
maps the page again; a load cannot wait here, so a reset's zap is only recorded and the
mapping stays.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mock_vfio.trace import oserror
from mock_vfio.version import MMIO_BLOCKING

if TYPE_CHECKING:
    from mock_vfio.pci import Device

_libc = ctypes.CDLL(None, use_errno=True)


def _libc_fn(name: str, restype: Any, *argtypes: Any) -> Any:
    fn = getattr(_libc, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


_ptr, _size, _int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
_mmap = _libc_fn("mmap", _ptr, _ptr, _size, _int, _int, _int, ctypes.c_long)
_mremap = _libc_fn("mremap", _ptr, _ptr, _size, _size, _int, _ptr)
_munmap = _libc_fn("munmap", _int, _ptr, _size)

_PROT_RW = 0x1 | 0x2
_MAP_SHARED, _MAP_FIXED = 0x01, 0x10
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_FAILED = ctypes.c_void_p(-1).value


def _check(addr: int | None, what: str) -> int:
    if addr is None or addr == _FAILED:
        err = ctypes.get_errno() or errno.ENOMEM
        raise oserror(err, what)
    return addr


def _duplicate(src: int, length: int, at: int | None = None) -> int:
    """A new mapping of the shared pages at ``src`` (at ``at`` when given, replacing it)."""
    if at is None:
        return _check(_mremap(src, 0, length, _MREMAP_MAYMOVE, None), "mremap")
    flags = _MREMAP_MAYMOVE | _MREMAP_FIXED
    return _check(_mremap(src, 0, length, flags, at), "mremap")


def _hole(at: int, length: int) -> None:
    """An empty file mapped over [at, +length): every access there is SIGBUS."""
    fd = os.memfd_create("vfio-zapped", os.MFD_CLOEXEC)
    try:
        _check(_mmap(at, length, _PROT_RW, _MAP_SHARED | _MAP_FIXED, fd, 0), "mmap")
    finally:
        os.close(fd)


class RwSem:
    """``struct rw_semaphore``: many readers or one writer, writers not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @property
    def held(self) -> bool:
        with self._cond:
            return self._writer or self._readers > 0

    def down_read(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting_writers)
            self._readers += 1

    def up_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def down_write(self) -> None:
        with self._cond:
            self._waiting_writers += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._waiting_writers -= 1
            self._writer = True

    def down_write_trylock(self) -> bool:
        with self._cond:
            if self._writer or self._readers:
                return False
            self._writer = True
            return True

    def up_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self.down_read()
        try:
            yield
        finally:
            self.up_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        self.down_write()
        try:
            yield
        finally:
            self.up_write()


@dataclass(slots=True)
class View:
    """One user mmap of a BAR: [addr, +length) shows the BAR from offset ``pos``."""

    addr: int
    length: int
    index: int
    pos: int


class BarMaps:
    """The user mappings of one device's BARs (the device file's address space)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: list[View] = []
        self.zapped = False

    def map(self, index: int, base: int, pos: int, length: int) -> int:
        """A new user mapping of BAR ``index`` (its pages at ``base``) from ``pos``."""
        with self._lock:
            if self.zapped:
                addr = _duplicate(base + pos, length)
                _hole(addr, length)  # mapped while zapped: its first access faults
            else:
                addr = _duplicate(base + pos, length)
            self._views.append(View(addr, length, index, pos))
            return addr

    def unmap(self, addr: int, length: int) -> bool:
        """munmap of a user mapping; False when [addr, +length) is none of ours."""
        with self._lock:
            for i, v in enumerate(self._views):
                if v.addr == addr and v.length == length:
                    del self._views[i]
                    _munmap(addr, length)
                    return True
        return False

    def zap(self) -> int:
        """``vfio_pci_zap_bars``: every user mapping faults from now on; how many there are."""
        with self._lock:
            for v in self._views:
                _hole(v.addr, v.length)
            self.zapped = True
            return len(self._views)

    def fault_in(self, base_of: dict[int, int]) -> None:
        """What the fault handler does on the next access with memory enabled."""
        with self._lock:
            if not self.zapped:
                return
            for v in self._views:
                _duplicate(base_of[v.index] + v.pos, v.length, v.addr)
            self.zapped = False

    def count(self) -> int:
        with self._lock:
            return len(self._views)

    def clear(self) -> None:
        """Unmap everything (the machine goes away)."""
        with self._lock:
            for v in self._views:
                _munmap(v.addr, v.length)
            self._views.clear()


def user_memory_enabled(dev: Device) -> bool:
    """``__vfio_pci_memory_enabled``: the user's command register has MEMORY set (a VF's is
    hard-wired to 0 and never counts, ebfa440ce38b), and the device is not in low power."""
    return not dev.low_power and (dev.is_vf or dev.memory_enabled())


def zap_bars(dev: Device, cause: str) -> None:
    """``vfio_pci_zap_bars``, with ``memory_lock`` held for writing (5.8+).

    A reset's zap is only counted: the kernel's fault waits the reset out and maps the page
    again, which a load here cannot do.
    """
    if dev.machine.kernel_version < MMIO_BLOCKING:
        return
    if cause != "reset":
        dev.maps.zap()
    dev.machine.counters.add(f"zaps.{cause}")


def fault_in_bars(dev: Device) -> None:
    """Memory enabled again: what the fault handler maps on the next access."""
    if dev.maps.zapped and user_memory_enabled(dev):
        dev.maps.fault_in({i: dev.bar_address(i) for i in range(6) if dev.bar(i) is not None})
