"""Run in the guest by test_dma_vm.py: edu's DMA engine between a 2 MiB hugepage buffer and
the caller's own memory (a page-aligned slice of a bytearray), through the guest's IOMMU.

Reserves one 2 MiB hugepage for the run (nr_hugepages restored after), copies a pattern
hugepage -> device buffer -> bytearray and another back the other way, and prints one JSON
document: what arrived, the IOVAs, whether the bytearray was pinned, and type1's count of
free mappings before, while mapped and after unmapping.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import edu_driver as e

from vfiopy import PciRegion, Session
from vfiopy.pci import Command

POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
M2 = 2 << 20


async def copy(edu: e.Edu, src: int, dst: int, n: int, to_ram: bool) -> None:
    """One DMA of ``n`` bytes, polled until the engine is idle again."""
    await edu.wait_clear(e.REG_DMA_CMD, e.DMA_START, "the DMA engine to be idle")
    edu.write64(e.REG_DMA_SRC, src)
    edu.write64(e.REG_DMA_DST, dst)
    edu.write64(e.REG_DMA_COUNT, n)
    edu.write64(e.REG_DMA_CMD, e.DMA_START | (e.DMA_TO_RAM if to_ram else 0))
    await edu.wait_clear(e.REG_DMA_CMD, e.DMA_START, f"a DMA of {n} bytes")


def run(address: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = e.DMA_BYTES
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(n))
    with Session() as s:
        dev = s.open_device(address)
        region = dev.region(PciRegion.BAR0)
        edu = e.Edu(dev, region, region.mmap(), timeout=30.0)
        cfg = dev.config
        cfg.command = cfg.command | Command.MASTER
        assert s.container is not None
        out["dma_avail_before"] = s.container.dma_avail()
        huge = s.alloc_dma_buffer(M2, limit=e.DMA_MASK + 1, hugepage="2M")
        ba = bytearray(3 * 4096)
        off = -ctypes.addressof(ctypes.c_char.from_buffer(ba)) % 4096
        view = memoryview(ba)[off : off + 2 * 4096]
        mine = s.map_dma(view, limit=e.DMA_MASK + 1)
        out.update(
            hugepage_iova=huge.iova,
            hugepage_vaddr=huge.vaddr,
            bytearray_iova=mine.iova,
            dma_avail_mapped=s.container.dma_avail(),
        )
        huge.write(0, pattern)

        async def both_ways() -> None:
            await copy(edu, huge.iova, e.DEVICE_BUFFER, n, to_ram=False)
            await copy(edu, e.DEVICE_BUFFER, mine.iova, n, to_ram=True)
            view[4096 : 4096 + n] = pattern[::-1]
            await copy(edu, mine.iova + 4096, e.DEVICE_BUFFER, n, to_ram=False)
            await copy(edu, e.DEVICE_BUFFER, huge.iova + M2 // 2, n, to_ram=True)

        anyio.run(both_ways)
        out["to_bytearray"] = bytes(view[:n]) == pattern
        out["to_hugepage"] = huge.read(M2 // 2, n) == pattern[::-1]
        try:
            ba.extend(b"x")
            out["pinned"] = False
        except BufferError:
            out["pinned"] = True
        cfg.command = cfg.command & ~Command.MASTER
        s.free_dma_buffer(huge)
        s.unmap_dma(mine)
        view.release()
        out["dma_avail_after"] = s.container.dma_avail()
    return out


def main() -> int:
    nr = POOL / "nr_hugepages"
    before = int(nr.read_text())
    nr.write_text(str(before + 1))
    try:
        out = {"hugepages_free": int((POOL / "free_hugepages").read_text())}
        out.update(run(sys.argv[1]))
    finally:
        nr.write_text(str(before))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
