"""Closing a mapping or a DMA buffer under a racing access never faults (real mmap).

Each scenario runs in a child process, so a SIGSEGV fails the test instead of
the whole run.  The race is forced, not hoped for: the access's load is made
to run after the close, just as a thread switch between the bounds check and
the load would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

_PRELUDE = """
import gc
from typing import Any

from vfiopy._uapi import MAP_ANONYMOUS, MAP_SHARED, RegionFlag
from vfiopy.kernel import LinuxKernel
from vfiopy.region import Region


class BarKernel(LinuxKernel):
    # A BAR of one page: region info answered here, the memory is real anonymous memory.
    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        arg.flags = RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP
        arg.size, arg.offset = 4096, 0
        return 0

    def mmap(self, fd: int, length: int, offset: int, prot: int, flags: int) -> int:
        return super().mmap(-1, length, 0, prot, MAP_SHARED | MAP_ANONYMOUS)


def mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        spans = [line.split()[0].split("-") for line in f]
    return any(int(lo, 16) <= addr < int(hi, 16) for lo, hi in spans)
"""


def _run(body: str) -> str:
    code = _PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_load_that_passed_its_check_survives_the_close() -> None:
    out = _run(
        """
        region = Region(BarKernel(), 999, "0000:01:00.0", 0)
        m = region.mmap(0)
        m.write32(0x10, 0x12345678)
        load, store = m._r32, m._w32

        def late_load(addr: int) -> int:
            m.close()  # lands between the bounds check and the load
            return load(addr)

        m._r32 = late_load
        print("read", m.read32(0x10))
        m2 = region.mmap(0)

        def late_store(addr: int, value: int) -> None:
            m2.close()
            store(addr, value)

        m2._w32 = late_store
        m2.write32(0x10, 1)
        try:
            m.read32(0x10)
        except OSError as exc:
            print("after close", exc.errno)
        addr = m.addr
        print("reserved while referenced", mapped(addr))
        del m, late_load
        gc.collect()
        print("unmapped when gone", not mapped(addr))
        """
    )
    assert out.split("\n")[:4] == [
        "read 0",
        "after close 9",
        "reserved while referenced True",
        "unmapped when gone True",
    ]


def test_a_dma_buffer_view_used_after_free_reads_zeros() -> None:
    out = _run(
        """
        from vfiopy.dma import DmaBuffer, IovaRange

        class Space:
            def map(self, vaddr: int, iova: int, size: int, *, read: bool = True,
                    write: bool = True) -> None:
                pass

            def unmap(self, iova: int, size: int) -> int:
                return size

            def iova_ranges(self) -> list[IovaRange]:
                return [IovaRange(0, (1 << 39) - 1)]

        buf = DmaBuffer(Space(), 8192, iova=0x10000, kernel=LinuxKernel())
        view = buf.view()
        view[0:5] = b"hello"
        buf.close()
        print("after free", bytes(view[0:5]))
        view[0:5] = b"later"  # lands in zero pages of our own, not in reused memory
        addr = buf.vaddr
        del buf
        gc.collect()
        print("kept for the view", mapped(addr))
        del view
        gc.collect()
        print("unmapped with the view", not mapped(addr))
        """
    )
    assert out.split("\n")[:3] == [
        "after free b'\\x00\\x00\\x00\\x00\\x00'",
        "kept for the view True",
        "unmapped with the view True",
    ]
