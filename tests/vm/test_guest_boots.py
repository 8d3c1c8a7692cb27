"""The guest boots, its devices belong to vfio-pci, and reset tracing sees the real kernel."""

from __future__ import annotations

import json
import textwrap

import pytest
import vmtest
from conftest import Guests, booted_version, close_counts, open_counts, summed

from vfiopy.kmodel import RESET_METHOD_ATTR, KernelModel

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
            reset = None  # no attribute: a kernel before 5.15
            if os.path.exists(p + "/reset_method"):
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
        if booted_version() < RESET_METHOD_ATTR:
            assert state["reset_method"] is None, (dev, state)  # the kernel's fixed order
        elif dev.reset_method is not None:
            assert state["reset_method"] == dev.reset_method, (dev, state)
    pair = layout.by_role("mf")
    assert len({seen["devices"][d.bdf]["group"] for d in pair}) == 1, "the pair shares one group"
    singles = layout.by_role("e1000e")
    assert len({seen["devices"][d.bdf]["group"] for d in singles}) == len(singles)


def test_multifunction_pair_resets_at_open_and_close(
    guest: Guests, layout: vmtest.Layout, model: KernelModel
) -> None:
    """The pair's resets are the model's: with its function resets disabled (reset_method,
    5.15+) one bus reset of the device set when its last device closes; before 5.15 the
    kernel's fixed order gives each function its PM reset at open and close, and no bus reset
    follows (no function of the set still needs one)."""
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
            "function": [sum(e.kind == "function" and e.dev == a for e in events) for a in (first, last)],
            "events": guest_trace.to_json(events),
        }))
        """
    )
    result = guest.run_python(code, first, last, timeout=120, check=True)
    seen = json.loads(result.stdout)
    pair = [first, last]
    want = [summed(open_counts(model, a), close_counts(model, pair, a)) for a in pair]
    first_close = close_counts(model, pair, first, steps=slice(0, 1))
    assert seen["after_first"] == open_counts(model, first)["bus"] + first_close["bus"]
    assert [seen["first"], seen["last"]] == [w["bus"] for w in want], seen["events"]
    assert seen["function"] == [w["function"] for w in want], seen["events"]
    bus = [e for e in seen["events"] if e["kind"] == "bus"]
    assert all(e["dev"] == layout.by_role("mf")[0].bridge and e["ret"] == 0 for e in bus), bus
