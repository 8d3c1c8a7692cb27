"""SR-IOV: ``sriov_numvfs`` making and removing VFs (drivers/pci/iov.c)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from mock_vfio.pci_driver import add_function, stop_and_remove
from mock_vfio.topology import FunctionSpec, make_addr, split_addr
from mock_vfio.trace import oserror

if TYPE_CHECKING:
    from mock_vfio.machine import Machine
    from mock_vfio.pci import Device


def set_numvfs(machine: Machine, pf: Device, n: int, *, probe: bool = False) -> None:
    """``sriov_numvfs``: ``probe`` (a write at run time, not the topology's boot
    state) creates the VFs unbound and lets the host probe each (``HostDrivers``)."""
    s = pf.spec
    if n > s.sriov_total:  # sriov_numvfs_store checks the range first
        raise oserror(errno.ERANGE, f"{n} > sriov_totalvfs {s.sriov_total}")
    if n == pf.numvfs:
        return
    if n and pf.numvfs:
        raise oserror(errno.EBUSY, "disable VFs first")
    if n == 0:
        for vf in pf.vfs:
            if vf.open_count:
                raise oserror(errno.EBUSY, f"{vf.addr} is in use")
        for vf in pf.vfs:
            stop_and_remove(machine, vf)
        pf.vfs = []
        pf.numvfs = 0
        return
    dom, bus, slot, fn = split_addr(pf.addr)
    rid = (bus << 8) | (slot << 3) | fn
    gid = machine.topology.next_group()
    gid = max([gid, *machine.groups]) + 1
    for i in range(n):
        r = rid + s.vf_offset + i * s.vf_stride
        spec = FunctionSpec(
            addr=make_addr(r >> 8, (r >> 3) & 0x1F, r & 7, dom),
            vendor=s.vendor,
            device=s.vf_device,
            class_code=s.class_code,
            subsystem_vendor=s.subsystem_vendor,
            subsystem_device=s.subsystem_device,
            bars=s.vf_bars,
            msix=None,
            pm=False,
            link_speed=s.link_speed,
            link_width=s.link_width,
            flr=True,
            iommu_group=gid + i,
            driver=None if probe else s.vf_driver,
            native_driver=s.vf_native_driver,
            interrupt_pin=0,
            physfn=pf.addr,
            vf_index=i,
        )
        if s.vf_msix:
            from mock_vfio.topology import Msix

            spec.msix = Msix(
                s.vf_msix,
                3 if any(b.index == 3 for b in s.vf_bars) else 0,
                0,
                3 if any(b.index == 3 for b in s.vf_bars) else 0,
                0x2000,
            )
        pf.vfs.append(add_function(machine, spec))
        if probe:
            machine.host.vf_added(pf.vfs[-1])
    pf.numvfs = n
