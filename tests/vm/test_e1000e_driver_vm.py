"""examples/e1000e_driver.py on the real kernel: one of the guest's e1000e NICs (QEMU 7.2).

vfio-pci gives the NIC's I/O BAR (BAR2, 32 bytes) no mmap; each pread/pwrite on it is one
port access in the guest kernel (``vfio_pci_bar_rw``).  The example reads the MAC and STATUS
through the IOADDR/IODATA window and through the mmapped BAR0, the MAC from the EEPROM too, and
takes an MSI-X interrupt that IVAR routes to vector 2; here the document it prints is checked
again, and its timings are only required to exist (never compared: TCG).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import vmtest
from conftest import REPO, Guests, guest_env

pytestmark = pytest.mark.vm

EXAMPLE = REPO / "examples" / "e1000e_driver.py"
# QEMU numbers the NICs given no mac= from 52:54:00:12:34:56 in command-line order
# (net/net.c, qemu_macaddr_default_if_unset); vmtest's first NIC is the first on it.
FIRST_MAC = "52:54:00:12:34:56"
LINK_CAUSES = (1 << 2) | (1 << 24)  # ICR's LSC and, under MSI-X, OTHER


@pytest.fixture(scope="module")
def driver_doc(guests: Guests, layout: vmtest.Layout) -> dict[str, Any]:
    nic = layout.bdfs("e1000e")[0]
    result = guests.run(
        [vmtest.GUEST_PYTHON, str(EXAMPLE), nic, "--json", "--count", "2000"],
        cwd=REPO,
        env=guest_env(),
        timeout=240,
    )
    assert result.returncode == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    doc["_nic"] = nic
    return doc


def test_mac_through_bar0_io_window_and_eeprom(driver_doc: dict[str, Any]) -> None:
    doc = driver_doc
    assert doc["ok"] and doc["device"] == doc["_nic"] and not doc["simulated"], doc
    # BAR2 is an I/O BAR (bit 0 of the BAR in config space) that VFIO will not mmap
    assert doc["io_bar"]["config_bar"] & 1 and not doc["io_bar"]["mmap"], doc["io_bar"]
    assert doc["io_bar"]["size"] == 0x20
    m = doc["mac"]
    # QEMU's reset loads RAL0/RAH0 from the MAC it also put in EEPROM words 0-2
    # (e1000x_reset_mac_addr, e1000x_core_prepare_eeprom), checksum included.
    assert m["mac"] == m["io"] == m["eeprom"] == FIRST_MAC, m
    assert m["address_valid"] and m["eeprom_checksum"] == 0xBABA


def test_link_status_through_io_window_matches_mmio(driver_doc: dict[str, Any]) -> None:
    s = driver_doc["link"]
    assert s["agree"] and s["io"] in (s["mmio_before"], s["mmio_after"]), s
    assert s["io"] not in (0, 0xFFFFFFFF)  # a register, not an unclaimed port
    assert s["ioaddr_readback"] == 0x08
    # QEMU's e1000e comes out of reset with the link up at 1000 Mb/s, full duplex.
    assert (s["up"], s["full_duplex"], s["speed_mbps"]) == (True, True, 1000), s


def test_msix_routed_by_ivar(driver_doc: dict[str, Any]) -> None:
    i = driver_doc["interrupt"]
    assert (i["kind"], i["vectors"], i["vector"]) == ("msix", 5, 2), i
    assert i["interrupts"] >= 1  # a real MSI-X message, delivered to vector 2's eventfd
    assert i["other_vectors"] == [0, 0]  # and to no other vector
    assert i["icr"] & LINK_CAUSES == LINK_CAUSES
    assert i["icr_after_clear"] & LINK_CAUSES == 0


def test_port_io_cost_is_reported(driver_doc: dict[str, Any]) -> None:
    c = driver_doc["cost"]
    assert c["count"] == 2000
    assert all(c[k] > 0 for k in ("io_read_ns", "io_indirect_read_ns", "mmio_read32_ns")), c
