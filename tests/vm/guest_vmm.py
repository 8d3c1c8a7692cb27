"""Runs in the guest: a real QEMU (qemu_vmm) as the VMM of the test devices, resets counted
with guest_trace. Standard library only, so the guest's interpreter starts fast.

1. exit: QEMU holds the six NICs and the pair (one multifunction device); its VFIO files are
   listed, it is stopped with SIGTERM, and every device is opened (and closed) again after;
2. hot-plug: QEMU starts with the first NIC and two empty root ports; the last NIC and the
   pair (as one multifunction device) are hot-plugged and unplugged, each is opened again
   while QEMU runs; the first NIC (present at start-up) is asked to unplug too; SIGKILL ends it.

Prints one JSON document (a VmmError fails the command with QEMU's stderr). Usage: python3 guest_vmm.py NIC... -- PAIR...
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import guest_trace
from collect_facts import Vfio
from qemu_vmm import QmpError, Vmm, iommu_group


def resets(bdfs: Sequence[str]) -> dict[str, Any]:
    """The resets recorded since the last clear that touched `bdfs`: the bus resets, every
    reset performed (`methods`: bus, pm, flr, ...; `via` "slot" on a slot's bus reset) and the
    function resets (calls of the kernel's function reset path) per device."""
    events = [e for e in guest_trace.read() if set(e.affected) & set(bdfs)]
    return {
        "bus": guest_trace.to_json([e for e in events if e.kind == "bus"]),
        "methods": guest_trace.to_json([e for e in events if e.kind in guest_trace.METHOD_KINDS]),
        "function": {
            b: sum(1 for e in events if e.kind == "function" and e.dev == b) for b in bdfs
        },
    }


def reopen(bdfs: Sequence[str]) -> dict[str, int]:
    """Open every device in one container and close it again: 0, or the errno per device."""
    out: dict[str, int] = {}
    vfio = Vfio()
    try:
        for bdf in bdfs:
            try:
                os.close(vfio.device(bdf))
                out[bdf] = 0
            except OSError as err:
                out[bdf] = err.errno or -1
    finally:
        vfio.close()
    return out


def exit_phase(nics: list[str], pair: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"groups": {b: iommu_group(b) for b in nics + pair}}
    vmm = Vmm([*nics, pair])
    try:
        out["argv"] = vmm.argv
        out["ready_s"] = vmm.start()
        out["files"] = vmm.vfio_files().to_json()
        guest_trace.clear()
        exit_ = vmm.terminate()
        out["exit"] = {"returncode": exit_.returncode, "seconds": exit_.seconds}
        out["resets"] = resets(nics + pair)
        out["stderr"] = vmm.stderr[-2000:]
    finally:
        vmm.close()
    out["reopen"] = reopen(nics + pair)
    return out


def hotplug_phase(cold: str, hot: str, pair: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    vmm = Vmm([cold], hotplug_ports=2)
    try:
        vmm.start()
        out["start"] = vmm.vfio_files().counts()
        # present at start-up: its slot is powered, QEMU asks the (absent) guest to let go
        out["cold_del"] = vmm.qmp.execute("device_del", {"id": "dev0"})
        vmm.device_add("hp0", hot, device_id="nic")
        out["nic_added"] = vmm.vfio_files().counts()
        vmm.device_add("hp1", pair, device_id="pair")
        out["pair_added"] = vmm.vfio_files().counts()
        guest_trace.clear()
        out["nic_deleted"] = [e["data"]["device"] for e in vmm.device_del("nic")]
        out["nic_files"] = vmm.vfio_files().to_json()
        out["nic_resets"] = resets([hot])
        out["nic_reopen"] = reopen([hot])
        guest_trace.clear()
        out["pair_deleted"] = [e["data"]["device"] for e in vmm.device_del("pair")]
        out["pair_files"] = vmm.vfio_files().to_json()
        out["pair_resets"] = resets(pair)
        out["pair_reopen"] = reopen(pair)
        try:
            vmm.qmp.wait_event("DEVICE_DELETED", data={"device": "dev0"}, timeout=0)
            out["cold_deleted"] = True
        except QmpError:
            out["cold_deleted"] = False
        out["cold_files"] = vmm.vfio_files().counts()
        guest_trace.clear()
        exit_ = vmm.stop(signal.SIGKILL)
        out["exit"] = {"returncode": exit_.returncode, "seconds": exit_.seconds}
        out["exit_resets"] = resets([cold])
    finally:
        vmm.close()
    out["reopen"] = reopen([cold, hot, *pair])
    return out


def main(argv: Sequence[str]) -> int:
    split = argv.index("--")
    nics, pair = list(argv[:split]), list(argv[split + 1 :])
    guest_trace.start()
    try:
        doc = {"exit": exit_phase(nics, pair), "hotplug": hotplug_phase(nics[0], nics[-1], pair)}
    finally:
        guest_trace.stop()
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
