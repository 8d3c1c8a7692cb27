"""DMA on the real kernel: a 2 MiB hugepage buffer and a bytearray, both read and written by
edu's DMA engine through the guest's intel-iommu (type1, Linux 6.1; tests/vm/guest_dma.py)."""

from __future__ import annotations

import json

import pytest
import vmtest
from conftest import REPO, Guests, guest_env

pytestmark = pytest.mark.vm

M2 = 2 << 20


def test_edu_dma_between_a_hugepage_buffer_and_a_bytearray(
    guests: Guests, layout: vmtest.Layout
) -> None:
    edu = layout.bdfs("edu")[0]
    result = guests.run(
        [vmtest.GUEST_PYTHON, str(REPO / "tests" / "vm" / "guest_dma.py"), edu],
        cwd=REPO,
        env=guest_env(),
        timeout=240,
    )
    assert result.returncode == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["hugepages_free"] >= 1  # the guest reserved the page it maps
    # Both directions arrived: hugepage -> device -> bytearray, bytearray -> device -> hugepage.
    assert doc["to_bytearray"] and doc["to_hugepage"], doc
    assert doc["hugepage_iova"] % M2 == 0 and doc["hugepage_vaddr"] % M2 == 0, doc
    assert doc["bytearray_iova"] % 4096 == 0 and doc["bytearray_iova"] < 1 << 28, doc
    assert doc["pinned"], doc  # the bytearray could not be resized while mapped
    # type1 counts the mappings: two while mapped, none left after unmapping.
    assert doc["dma_avail_mapped"] == doc["dma_avail_before"] - 2, doc
    assert doc["dma_avail_after"] == doc["dma_avail_before"], doc
