"""BAR caching on the real kernel: tests/vm/guest_bar_caching.py on the guest's ivshmem-plain.

ivshmem's BAR2 is 1 MiB of RAM behind a 64-bit prefetchable BAR, so the guest's sysfs
offers resource2_wc.  The guest kernel (Debian's 6.1) has CONFIG_IO_STRICT_DEVMEM: once
vfio-pci claims BAR2 (its first VFIO mmap), a resource2_wc mapping made before is revoked
(a later access is SIGBUS) and a new one is refused with EINVAL, until the last close.  The
script's document is checked here; its bandwidths are only required to exist (TCG).
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
import vmtest
from conftest import REPO, Guests, guest_env

pytestmark = pytest.mark.vm

SCRIPT = REPO / "tests" / "vm" / "guest_bar_caching.py"


@pytest.fixture(scope="module")
def caching_doc(guests: Guests, layout: vmtest.Layout) -> dict[str, Any]:
    argv = [*layout.bdfs("ivshmem"), layout.bdfs("e1000e")[0]]
    result = guests.run(
        [vmtest.GUEST_PYTHON, str(SCRIPT), *argv], cwd=REPO, env=guest_env(), timeout=300
    )
    assert result.returncode == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def retired_before(step: dict[str, Any], why: str) -> None:
    assert step["closed"], step
    access = step["access"]
    assert access["errno"] == errno.EBADF and f"retired before {why}" in access["text"], access


def test_only_bar2_is_prefetchable(caching_doc: dict[str, Any]) -> None:
    assert caching_doc["prefetchable"] == {"bar0": False, "bar2": True}


def test_write_through_one_read_through_the_other(caching_doc: dict[str, Any]) -> None:
    d = caching_doc
    assert d["wc"]["caching"] == "wc-sysfs" and d["wc_to_uc"]["caching"] == "uncached"
    assert d["wc_to_uc"]["a_after_reset"]  # the reset left ivshmem's RAM as it was
    assert d["wc_to_uc"]["b_read_uncached"]  # written write-combined, read uncached
    assert d["uc_to_wc"]["c_read_wc"]  # written uncached, read write-combined


def test_vfiopy_retires_the_mapping_around_its_resets(caching_doc: dict[str, Any]) -> None:
    d = caching_doc
    retired_before(d["reset"], "VFIO_DEVICE_RESET")
    retired_before(d["hot_reset"], "VFIO_DEVICE_PCI_HOT_RESET")
    retired_before(d["memory"], "a config write clearing PCI_COMMAND_MEMORY")
    # Before vfio-pci's claim, which would have revoked it under this process (SIGBUS).
    retired_before(d["wc_to_uc"]["wc"], "the first uncached access of BAR2")


def test_the_kernel_refuses_wc_on_a_claimed_bar(caching_doc: dict[str, Any]) -> None:
    claimed = caching_doc["claimed"]
    assert claimed["errno"] == errno.EINVAL and "CONFIG_IO_STRICT_DEVMEM" in claimed["text"]


def test_write_combining_refused_where_it_does_not_apply(caching_doc: dict[str, Any]) -> None:
    r = caching_doc["refused"]
    for key in ("ivshmem_bar0", "nic_bar0", "nic_bar0_vfio"):
        assert r[key]["errno"] == errno.EINVAL and "BAR0 is not prefetchable" in r[key]["text"]
    assert r["vfio"]["type"] == "FeatureNotSupportedError" and r["vfio"]["errno"] == errno.ENOTTY
    assert "caching='wc-sysfs'" in r["vfio"]["text"]


def test_write_bandwidth_is_reported(caching_doc: dict[str, Any]) -> None:
    d = caching_doc
    for step in (d["wc"], d["wc_to_uc"], d["uc_to_wc"]):
        assert len(step["runs_mbps"]) == 5 and all(r > 0 for r in step["runs_mbps"]), step
