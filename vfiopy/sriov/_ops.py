"""SR-IOV on demand: create a PF's VFs without probing them, bind only those asked for.

Writing ``sriov_numvfs`` adds each VF (``pci_iov_add_virtfn``) and, with the PF's
``sriov_drivers_autoprobe`` on (the default), probes it with its host driver, serially on
the writer's thread: tens of seconds for 64 VFs with i40e/iavf or ixgbe/ixgbevf, while a VM
host hands out a few.  :func:`enable_vfs`:

1. checks first (nothing is touched when one fails): the PF exists and is not a VF, has an
   SR-IOV capability (``sriov_totalvfs``), the count is 1..``sriov_totalvfs``, no other
   non-zero count exists (``sriov_numvfs_store`` refuses to change one: EBUSY), a PF driver
   that creates VFs is bound (none: ENOENT; vfio-pci needs its ``enable_sriov`` module
   parameter), the VFs' driver is loaded;
2. turns ``sriov_drivers_autoprobe`` off (``pci_device_can_probe`` in
   ``drivers/pci/pci-driver.c`` then probes a VF only when it has a ``driver_override``);
3. writes the count (when the VFs do not exist yet);
4. binds the requested VFs concurrently: ``driver_override`` = the driver (vfio-pci or a
   host driver), ``drivers_probe``; the VFs bound to vfio-pci are recorded in the bind state
   file, so ``vfiopy-bind restore`` unbinds them again;
5. puts ``sriov_drivers_autoprobe`` back as it was, whatever happened.

Sources: ``sriov_numvfs_store`` and ``sriov_drivers_autoprobe_store`` in
``drivers/pci/iov.c`` (checks in this order since Linux 5.x: ERANGE, same count, no driver
ENOENT, no ``sriov_configure`` ENOENT, non-zero to non-zero EBUSY);
``vfio_pci_sriov_configure`` (``drivers/vfio/pci/vfio_pci.c``: ENOENT without
``enable_sriov``); ``vfio_pci_validate_vf_token`` (``drivers/vfio/pci/vfio_pci_core.c``,
Linux 5.7+) for the VF token.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vfiopy.bind._ops import (
    DEFAULT_MAX_PARALLEL,
    BindRefused,
    BindUsageError,
    DeviceResult,
    _driver_or_none,
    _fail,
    _parallel,
    check_driver,
    parse_request,
)
from vfiopy.bind._state import BindState, Entry
from vfiopy.errors import SysfsError, VfioError
from vfiopy.kernel import Kernel, default_kernel
from vfiopy.sysfs import VFIO_DRIVER, PciAddress, Sysfs

SCHEMA = 1


@dataclass
class SriovReport:
    """What :func:`enable_vfs` or :func:`disable_vfs` did; ``devices`` are the VFs bound."""

    action: str
    pf: str
    driver: str | None = None
    total_vfs: int = 0
    numvfs_before: int = 0
    numvfs_after: int = 0
    autoprobe_before: bool | None = None
    autoprobe_after: bool | None = None
    enable_s: float = 0.0
    elapsed_s: float = 0.0
    dry_run: bool = False
    devices: list[DeviceResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.status in ("bound", "already", "planned") for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "action": self.action,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "pf": self.pf,
            "driver": self.driver,
            "total_vfs": self.total_vfs,
            "numvfs_before": self.numvfs_before,
            "numvfs_after": self.numvfs_after,
            "autoprobe_before": self.autoprobe_before,
            "autoprobe_after": self.autoprobe_after,
            "enable_s": round(self.enable_s, 6),
            "elapsed_s": round(self.elapsed_s, 6),
            "devices": [d.to_json() for d in self.devices],
        }


def _autoprobe(sysfs: Sysfs, pf: PciAddress) -> bool:
    return sysfs.read(pf, "sriov_drivers_autoprobe") not in ("0", "N", "n")


def _set_autoprobe(sysfs: Sysfs, pf: PciAddress, on: bool) -> None:
    sysfs.write(pf, "sriov_drivers_autoprobe", "1" if on else "0")


def check_pf(sysfs: Sysfs, pf: PciAddress, count: int) -> tuple[int, int]:
    """``(sriov_totalvfs, sriov_numvfs)`` of a PF that can have ``count`` VFs now, else
    :class:`BindUsageError` (a count out of range) or :class:`BindRefused`."""
    s = str(pf)
    if sysfs.is_virtfn(pf):
        raise BindRefused(errno.EINVAL, s, "check PF", detail="it is a VF, not a PF", advice="")
    if not sysfs.kernel.exists(sysfs.path(pf, "sriov_totalvfs")):
        raise BindRefused(
            errno.ENODEV,
            s,
            "check PF",
            detail="it has no SR-IOV capability (no sriov_totalvfs)",
            advice="give the PF of an SR-IOV device (lspci -vs ADDR lists 'SR-IOV')",
        )
    total = sysfs.sriov_totalvfs(pf)
    if not 1 <= count <= total:
        raise BindUsageError(
            errno.ERANGE,
            s,
            "check VF count",
            detail=f"{count} VFs asked for; sriov_totalvfs is {total}",
            advice=f"ask for 1 to {total}",
        )
    current = sysfs.sriov_numvfs(pf)
    if current and current != count:
        raise BindRefused(
            errno.EBUSY,
            s,
            "check VF count",
            detail=f"{current} VFs exist; the kernel changes a non-zero count only through 0",
            advice=f"ask for {current}, or remove them first (--disable; their users must let go)",
        )
    driver = sysfs.driver(pf)
    if driver is None:
        raise BindRefused(
            errno.ENOENT,
            s,
            "check PF driver",
            detail="no driver is bound to the PF, and its driver creates the VFs",
            advice="bind the PF to its driver first",
        )
    if driver == VFIO_DRIVER:
        param = f"{sysfs.root}/module/vfio_pci/parameters/enable_sriov"
        try:
            enabled = sysfs.kernel.read_text(param).strip() in ("Y", "1")
        except OSError:
            enabled = False
        if not enabled:
            raise BindRefused(
                errno.ENOENT,
                s,
                "check PF driver",
                detail="the PF is on vfio-pci, whose enable_sriov parameter is off",
                advice="load vfio-pci with enable_sriov=1 (modprobe vfio-pci enable_sriov=1)",
            )
    return total, current


def vf_addresses(sysfs: Sysfs, pf: PciAddress, numbers: Iterable[int]) -> list[str]:
    """The addresses VFs ``numbers`` get, before they exist: routing ID = the PF's +
    ``sriov_offset`` + n * ``sriov_stride`` (the SR-IOV capability's First VF Offset and VF
    Stride, which sysfs shows for the count set now or next)."""
    offset = int(sysfs.read(pf, "sriov_offset"))
    stride = int(sysfs.read(pf, "sriov_stride"))
    rid = pf.bus << 8 | pf.devfn
    out = []
    for n in numbers:
        r = rid + offset + n * stride
        out.append(str(PciAddress.from_devfn(pf.domain, r >> 8, r & 0xFF)))
    return out


def _bind_to(sysfs: Sysfs, addr: str, driver: str) -> None:
    """``addr`` (unbound) to ``driver`` through its own override and ``drivers_probe``."""
    if driver == VFIO_DRIVER:
        sysfs.bind_vfio(addr)
        return
    a = PciAddress.parse(addr)
    sysfs.write(a, "driver_override", driver)
    current = sysfs.driver(a)
    if current not in (None, driver):
        sysfs.write(a, "driver/unbind", addr)
    probe = f"{sysfs.root}/bus/pci/drivers_probe"
    try:
        sysfs.kernel.write_text(probe, addr)
    except OSError as exc:
        raise SysfsError.from_oserror(exc, addr, "write drivers_probe", probe) from exc
    after = sysfs.driver(a)
    if after != driver:
        raise SysfsError(
            errno.ENODEV,
            addr,
            f"bind {driver}",
            detail=f"after drivers_probe the driver is {after or 'none'}",
            advice=f"check dmesg for {driver}'s probe error",
        )


async def enable_vfs(
    pf: str | PciAddress,
    count: int,
    bind: Iterable[int] = (),
    *,
    driver: str = VFIO_DRIVER,
    kernel: Kernel | None = None,
    state: BindState | None = None,
    dry_run: bool = False,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
) -> SriovReport:
    """Create ``count`` VFs on ``pf`` with no host driver probing them, then bind the VFs
    numbered ``bind`` (0-based) to ``driver`` concurrently; autoprobe is restored after.

    Raises :class:`BindUsageError` (an address or driver naming nothing, a count or VF
    number out of range) and :class:`BindRefused` (no SR-IOV, another count in place, no PF
    driver) before anything is touched; the binds' outcomes are in the report.
    """
    t0 = time.monotonic()
    sysfs = Sysfs(kernel if kernel is not None else default_kernel())
    a = parse_request(sysfs, [str(pf)])[0]
    check_driver(sysfs, driver)
    wanted = sorted(set(bind))
    total, current = check_pf(sysfs, a, count)
    bad = [i for i in wanted if not 0 <= i < count]
    if bad:
        raise BindUsageError(
            errno.ERANGE,
            str(a),
            "check VF numbers",
            detail=f"VF {bad[0]} asked for; the VFs are numbered 0 to {count - 1}",
            advice="",
        )
    report = SriovReport("enable", str(a), driver, total, current, current, dry_run=dry_run)
    report.autoprobe_before = report.autoprobe_after = _autoprobe(sysfs, a)
    if dry_run:
        report.numvfs_after = count
        report.devices = [
            DeviceResult(vf, status="planned", driver_after=driver)
            for vf in vf_addresses(sysfs, a, wanted)
        ]
        report.elapsed_s = time.monotonic() - t0
        return report
    try:
        if report.autoprobe_before:
            _set_autoprobe(sysfs, a, False)
        if current != count:
            t1 = time.monotonic()
            sysfs.write(a, "sriov_numvfs", str(count))
            report.enable_s = time.monotonic() - t1
        report.numvfs_after = sysfs.sriov_numvfs(a)
        vfs = sysfs.virtfns(a)
        todo = [DeviceResult(str(vfs[i])) for i in wanted]
        report.devices = todo
        await _bind_vfs(sysfs, todo, driver, state, max_parallel, t0)
    finally:
        if report.autoprobe_before:
            _set_autoprobe(sysfs, a, True)
        report.autoprobe_after = _autoprobe(sysfs, a)
    report.elapsed_s = time.monotonic() - t0
    return report


async def _bind_vfs(
    sysfs: Sysfs,
    todo: Sequence[DeviceResult],
    driver: str,
    state: BindState | None,
    max_parallel: int,
    t0: float,
) -> None:
    for r in todo:
        r.driver_before = r.driver_after = _driver_or_none(sysfs, r.address)
        try:
            r.group = sysfs.iommu_group(r.address)
        except VfioError:
            r.group = None

    def bind_one(r: DeviceResult) -> None:
        if r.driver_before == driver:
            r.status = "already"
            return
        try:
            _bind_to(sysfs, r.address, driver)
        except VfioError as exc:
            _fail(r, exc)
            r.driver_after = _driver_or_none(sysfs, r.address)
            return
        r.status, r.driver_after = "bound", driver

    await _parallel(todo, bind_one, max_parallel, t0)
    bound = [r for r in todo if r.status == "bound" and driver == VFIO_DRIVER]
    if state is not None and bound:
        with state.locked() as entries:
            for r in bound:
                entries.setdefault(
                    r.address, Entry(r.driver_before, None, r.group or -1, time.time())
                )
            state.save(entries)


async def disable_vfs(
    pf: str | PciAddress, *, kernel: Kernel | None = None, state: BindState | None = None
) -> SriovReport:
    """Remove ``pf``'s VFs (``sriov_numvfs`` = 0); refused while a VFIO user holds one."""
    from vfiopy.release._plan import find_holders

    t0 = time.monotonic()
    sysfs = Sysfs(kernel if kernel is not None else default_kernel())
    a = parse_request(sysfs, [str(pf)])[0]
    if not sysfs.kernel.exists(sysfs.path(a, "sriov_numvfs")):
        raise BindRefused(
            errno.ENODEV, str(a), "check PF", detail="it has no SR-IOV capability", advice=""
        )
    report = SriovReport("disable", str(a), total_vfs=sysfs.sriov_totalvfs(a))
    report.numvfs_before = sysfs.sriov_numvfs(a)
    vfs = [str(v) for v in sysfs.virtfns(a)]
    holders = find_holders(sysfs.kernel, vfs)
    held = [f"{v} (pid {', '.join(map(str, holders[v]))})" for v in vfs if holders.get(v)]
    if held:
        raise BindRefused(
            errno.EBUSY,
            str(a),
            "check VFs in use",
            detail=f"open through VFIO: {', '.join(held)}",
            advice="stop those processes first; removing the VFs would wait for them",
        )
    if report.numvfs_before:
        sysfs.write(a, "sriov_numvfs", "0")
    report.numvfs_after = sysfs.sriov_numvfs(a)
    if state is not None and state.exists():
        with state.locked() as entries:
            for v in vfs:
                entries.pop(v, None)
            state.save(entries)
    report.elapsed_s = time.monotonic() - t0
    return report


__all__ = ["SriovReport", "check_pf", "disable_vfs", "enable_vfs"]
