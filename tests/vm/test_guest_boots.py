"""The guest boots, its devices belong to vfio-pci, and reset tracing sees the real kernel."""

from __future__ import annotations

import json
import textwrap

import pytest
import vmtest
from conftest import Guests

pytestmark = pytest.mark.vm


def test_devices_bound_to_vfio_pci(guest: Guests, layout: vmtest.Layout) -> None:
    code = textwrap.dedent(
        """
        import json, os, sys
        out = {"container": os.path.exists("/dev/vfio/vfio"), "devices": {}}
        for bdf in sys.argv[1:]:
            p = f"/sys/bus/pci/devices/{bdf}"
            drv = os.path.basename(os.readlink(p + "/driver")) if os.path.exists(p + "/driver") else ""
            group = os.path.basename(os.readlink(p + "/iommu_group"))
            with open(p + "/reset_method") as f:
                reset = f.read().strip()
            out["devices"][bdf] = {"driver": drv, "group": group, "reset_method": reset,
                                   "node": os.path.exists(f"/dev/vfio/{group}")}
        print(json.dumps(out))
        """
    )
    result = guest.run_python(code, *layout.bdfs(), timeout=120, check=True)
    seen = json.loads(result.stdout)
    assert seen["container"], "/dev/vfio/vfio missing"
    for dev in layout.devices:
        state = seen["devices"][dev.bdf]
        assert state["driver"] == "vfio-pci", (dev, state)
        assert state["node"], f"/dev/vfio/{state['group']} missing for {dev.bdf}"
        if dev.reset_method is not None:
            assert state["reset_method"] == dev.reset_method, (dev, state)
    pair = layout.by_role("mf")
    assert len({seen["devices"][d.bdf]["group"] for d in pair}) == 1, "the pair shares one group"
    singles = layout.by_role("e1000e")
    assert len({seen["devices"][d.bdf]["group"] for d in singles}) == len(singles)


def test_multifunction_pair_bus_reset_once_at_last_close(
    guest: Guests, layout: vmtest.Layout
) -> None:
    """vfio-pci resets a device set with one bus reset when its last device closes."""
    first, last = (d.bdf for d in layout.by_role("mf"))
    code = textwrap.dedent(
        """
        import json, os, sys
        import guest_trace
        from collect_facts import Vfio

        first, last = sys.argv[1:3]
        guest_trace.start()
        vfio = Vfio()
        fds = [vfio.device(first), vfio.device(last)]
        os.close(fds[0])
        after_first = guest_trace.read()
        os.close(fds[1])
        events = guest_trace.read()
        vfio.close()
        guest_trace.stop()
        print(json.dumps({
            "after_first": guest_trace.bus_resets_of(after_first, first),
            "first": guest_trace.bus_resets_of(events, first),
            "last": guest_trace.bus_resets_of(events, last),
            "events": guest_trace.to_json(events),
        }))
        """
    )
    result = guest.run_python(code, first, last, timeout=120, check=True)
    seen = json.loads(result.stdout)
    assert seen["after_first"] == 0, seen["events"]
    assert seen["first"] == 1, seen["events"]
    assert seen["last"] == 1, seen["events"]
    bus = [e for e in seen["events"] if e["kind"] == "bus"]
    assert bus[0]["dev"] == layout.by_role("mf")[0].bridge
    assert bus[0]["ret"] == 0
