"""The request interrupt on the real kernel: unbind a NIC that a vfiopy Session holds.

vfio_unregister_group_dev (Linux 6.1, the guest's) signals the device's request eventfd and
waits for the last file reference.  With ``Session(release_on_request=True)`` the session
closes the device on its watcher thread, so the ``unbind`` write returns; the NIC is then put
back on vfio-pci (its driver_override) for the tests after this one.  One guest command.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import vmtest
from conftest import REPO, Guests

pytestmark = pytest.mark.vm

GUEST_CODE = r"""
import json, sys, threading
import vfiopy
from vfiopy import PciIrq, PciRegion
from vfiopy.events import request_event

nic = sys.argv[1]
base = f"/sys/bus/pci/devices/{nic}"
out = {}
with vfiopy.Session(release_on_request=True) as session:
    dev = session.open_device(nic)
    bar0 = dev.region(PciRegion.BAR0).mmap()
    out["req_count"] = dev.irq(PciIrq.REQ).count
    out["req_enabled"] = dev.irq(PciIrq.REQ).enabled
    err = []
    def unbind():
        try:
            with open(f"{base}/driver/unbind", "w") as f:
                f.write(nic)
        except OSError as exc:
            err.append(exc.errno)
    t = threading.Thread(target=unbind)
    t.start()
    t.join(120)
    out["unbind_returned"] = not t.is_alive()
    out["unbind_errno"] = err
    out["device_closed"] = dev.closed and bar0.closed
    out["session_has_it"] = session.device(nic) is not None
import os
out["driver_after_unbind"] = os.path.exists(f"{base}/driver")
with open("/sys/bus/pci/drivers_probe", "w") as f:
    f.write(nic)
out["driver_restored"] = os.path.basename(os.readlink(f"{base}/driver"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def request_doc(guests: Guests, layout: vmtest.Layout) -> dict[str, Any]:
    nic = layout.bdfs("e1000e")[-1]
    result = guests.run_python(
        GUEST_CODE, nic, pythonpath=[REPO], cwd=REPO, timeout=300, check=True
    )
    doc: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return doc


def test_unbind_of_a_held_device_completes_with_release_on_request(
    request_doc: dict[str, Any],
) -> None:
    d = request_doc
    assert d["req_count"] == 1 and d["req_enabled"], d
    assert d["unbind_returned"] and d["unbind_errno"] == [], d
    assert d["device_closed"] and not d["session_has_it"], d
    assert not d["driver_after_unbind"], d
    assert d["driver_restored"] == "vfio-pci", d
