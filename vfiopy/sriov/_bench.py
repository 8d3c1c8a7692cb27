"""Enabling many VFs to hand out a few, two ways, on the simulator.

``autoprobe``: what a host does by default: ``sriov_numvfs`` with
``sriov_drivers_autoprobe`` on, so the VFs' host driver probes every VF on the writer's
thread, then the VFs wanted are moved to vfio-pci one after another (unbind, override,
probe).  ``vfiopy``: :func:`vfiopy.sriov.enable_vfs`, autoprobe off and only the VFs wanted
bound, concurrently.  Each way gets a fresh simulated machine; the bounds are the model's
costs (:mod:`mock_vfio.hostdrv`), never a measurement.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from vfiopy.errors import VfioError
from vfiopy.sysfs import VFIO_DRIVER, PciAddress, Sysfs


def _first_pf(sysfs: Sysfs) -> PciAddress:
    for a in sysfs.devices():
        if sysfs.kernel.exists(sysfs.path(a, "sriov_totalvfs")) and not sysfs.is_virtfn(a):
            return a
    raise ValueError("the topology has no SR-IOV PF")


def compare(
    spec: str, pf: str | None, count: int, nbind: int, time_scale: float | None
) -> list[dict[str, Any]]:
    import anyio
    from mock_vfio.hostdrv import VF_ADD_COST, probe_cost, remove_cost

    from vfiopy.simulate import machine_of, simulated_kernel
    from vfiopy.sriov._ops import check_pf, enable_vfs

    if not 0 <= nbind <= count:
        raise ValueError(f"--bind {nbind}: give 0 to --count ({count})")
    anyio.run(anyio.sleep, 0)  # the event loop's imports, before anything is timed
    runs = []
    for way in ("autoprobe", "vfiopy"):
        kernel = simulated_kernel(spec + (f",scale={time_scale}" if time_scale is not None else ""))
        machine = machine_of(kernel)
        assert machine is not None
        sysfs = Sysfs(kernel)
        try:
            a = PciAddress.parse(pf) if pf else _first_pf(sysfs)
            check_pf(sysfs, a, count)
        except VfioError as exc:
            raise ValueError(str(exc)) from None
        native = machine.devices[str(a)].spec.vf_native_driver or "?"
        scale = machine.time_scale
        t0 = time.perf_counter()
        if way == "autoprobe":
            sysfs.write(a, "sriov_numvfs", str(count))
            for vf in sysfs.virtfns(a)[:nbind]:
                sysfs.bind_vfio(vf)
            ok = True
            bound = count * (VF_ADD_COST + probe_cost(native)) + nbind * (
                remove_cost(native) + probe_cost(VFIO_DRIVER)
            )
        else:
            report = anyio.run(partial(enable_vfs, a, count, range(nbind), kernel=kernel))
            ok = report.ok
            bound = count * VF_ADD_COST + (probe_cost(VFIO_DRIVER) if nbind else 0.0)
        wall = time.perf_counter() - t0
        vfs = sysfs.virtfns(a)
        on_vfio = sum(sysfs.driver(v) == VFIO_DRIVER for v in vfs)
        runs.append(
            {
                "way": way,
                "pf": str(a),
                "vfs": len(vfs),
                "bound": on_vfio,
                "ok": ok and len(vfs) == count and on_vfio == nbind,
                "wall_s": round(wall, 6),
                "bound_s": round(bound * scale, 6),
                "host_probes": sum(e.value == native for e in machine.events("probe")),
                "vf_driver": native,
                "time_scale": scale,
            }
        )
        machine.close()
    return runs


__all__ = ["compare"]
