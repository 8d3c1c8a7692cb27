"""A simulated machine's host-side state kept between processes.

Each command line run with ``--simulate`` builds a new machine from its topology; a
host's bindings, though, outlive the commands that change them (bind now, restore after
the VM stops).  ``save`` writes what those commands change — each function's driver and
``driver_override``, each PF's VF count, ``sriov_drivers_autoprobe`` and VF token — and
``load`` puts it back on a fresh machine of the same topology, without the probe costs.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from mock_vfio.iov import set_numvfs
from mock_vfio.machine import Machine
from mock_vfio.pci_driver import bind, unbind

SCHEMA = 1


def snapshot(m: Machine) -> dict[str, Any]:
    devices = {
        a: {"driver": d.driver, "override": d.driver_override}
        for a, d in sorted(m.devices.items())
        if not d.removed
    }
    numvfs = {a: d.numvfs for a, d in m.devices.items() if d.numvfs}
    tokens = dict(m.host.vf_tokens)
    return {
        "schema": SCHEMA,
        "topology": m.topology.name,
        "numvfs": numvfs,
        "autoprobe": dict(m.host.autoprobe),
        "vf_tokens": tokens,
        "vfio_enable_sriov": m.host.vfio_enable_sriov,
        "devices": devices,
    }


def apply(m: Machine, doc: dict[str, Any]) -> None:
    """Bring ``m`` (fresh, of the same topology) to the state ``doc`` describes."""
    scale, m.time_scale = m.time_scale, 0.0
    try:
        m.host.autoprobe.update({str(a): bool(v) for a, v in doc.get("autoprobe", {}).items()})
        for a, n in doc.get("numvfs", {}).items():
            pf = m.devices.get(a)
            if pf is not None and pf.numvfs != n:
                with contextlib.suppress(OSError):
                    if pf.numvfs:
                        set_numvfs(m, pf, 0)
                    set_numvfs(m, pf, int(n))
        m.host.vf_tokens.update(doc.get("vf_tokens", {}))
        m.host.vfio_enable_sriov = bool(doc.get("vfio_enable_sriov", False))
        for a, want in doc.get("devices", {}).items():
            dev = m.devices.get(a)
            if dev is None:
                continue
            dev.driver_override = want.get("override")
            driver = want.get("driver")
            if dev.driver == driver:
                continue
            with contextlib.suppress(OSError):
                if dev.driver is not None:
                    unbind(m, dev)
                if driver is not None:
                    bind(m, dev, driver)
    finally:
        m.time_scale = scale


def save(m: Machine, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(snapshot(m), f, indent=1)
    os.replace(tmp, path)


def load(m: Machine, path: str) -> bool:
    """Apply the state saved at ``path`` when it is this topology's; False when none is."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return False
    if doc.get("topology") != m.topology.name:
        return False
    apply(m, doc)
    return True


__all__ = ["apply", "load", "save", "snapshot"]
