"""Bind devices to vfio-pci and restore them to their drivers, concurrently.

Binding, for each device (``Sysfs.bind_vfio``): ``driver_override`` = ``vfio-pci``
(this device only; ``new_id`` would take every device with its ids), unbind from its
driver, ``drivers_probe``.  Before anything is touched, every device of the request is
checked, and one refusal refuses the whole request:

* the address names a PCI function that is not a bridge (vfio-pci drives only
  header-type-0 functions);
* every other member of its IOMMU group is in the request, already on a vfio-pci driver,
  unbound, on ``pci-stub``, or a bridge: otherwise the group could not be used;
* the host does not use it (:mod:`vfiopy.bind._inuse`): an interface up or with routes,
  a disk mounted, swapped on or held, the console.

The devices' drivers are written to the state file (:mod:`vfiopy.bind._state`) before
the first one is touched.  When any bind fails, every device this run changed is put back
as it was, so a request never ends half-bound.

Restoring, for each device: ``driver_override`` back to what it was, unbind from
vfio-pci, bind to the recorded driver (its ``bind`` file; ``drivers_probe`` when the
driver does not match without the override), check.  A device a VFIO user still holds
open is refused (unbinding it would block until the user closes it).  The probes, the
slow part (a NIC driver's takes hundreds of milliseconds), run in parallel: one worker
thread per device up to ``max_parallel``.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from vfiopy._log import get_logger
from vfiopy.bind._inuse import HostUse
from vfiopy.bind._state import DEFAULT_STATE_PATH, BindState, Entry
from vfiopy.errors import AddressError, SysfsError, VfioError
from vfiopy.kernel import Kernel, default_kernel
from vfiopy.release._plan import PlanError, UsageError
from vfiopy.sysfs import VFIO_DRIVER, PciAddress, Sysfs

SCHEMA = 1
DEFAULT_MAX_PARALLEL = 256

log = get_logger("vfiopy.bind")


# The request names nothing that exists (a device, a driver): the release tool's usage error.
BindUsageError = UsageError
# The host uses a device, or its group could not be used: nothing was touched.
BindRefused = PlanError


@dataclass(slots=True)
class DeviceResult:
    """One device of a run; ``status`` is one of :data:`STATUSES`."""

    address: str
    group: int | None = None
    driver_before: str | None = None
    driver_after: str | None = None
    status: str = "skipped"
    error: str | None = None
    errno: int | None = None
    start_s: float = 0.0
    end_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "group": self.group,
            "driver_before": self.driver_before,
            "driver_after": self.driver_after,
            "status": self.status,
            "error": self.error,
            "start_s": round(self.start_s, 6),
            "end_s": round(self.end_s, 6),
        }


# bound, restored: done; already: nothing to do; planned: --dry-run; refused: a check
# said no; failed: the kernel said no; rolled-back: bound, then undone as another failed;
# skipped: not touched because another device of the request was refused.
STATUSES = (
    "bound",
    "restored",
    "already",
    "planned",
    "refused",
    "failed",
    "rolled-back",
    "skipped",
)
_OK = frozenset({"bound", "restored", "already", "planned"})


@dataclass
class BindReport:
    """What a bind or restore did; ``ok`` when every device reached its target."""

    action: str
    state_file: str
    devices: list[DeviceResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return all(d.status in _OK for d in self.devices)

    def failed(self) -> list[DeviceResult]:
        return [d for d in self.devices if d.status not in _OK]

    def count(self, status: str) -> int:
        return sum(d.status == status for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "action": self.action,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "elapsed_s": round(self.elapsed_s, 6),
            "state_file": self.state_file,
            "devices": [d.to_json() for d in self.devices],
        }


# --- checks ----------------------------------------------------------------------------------


def parse_request(sysfs: Sysfs, texts: Iterable[str]) -> list[PciAddress]:
    """Every address parsed and present, repeats dropped; :class:`AddressError` or
    :class:`BindUsageError` for the first that is malformed or names no device."""
    out: list[PciAddress] = []
    for t in texts:
        a = PciAddress.parse(t)
        if a in out:
            continue
        if not sysfs.exists(a):
            raise BindUsageError(
                errno.ENODEV,
                str(a),
                "find device",
                detail=f"{sysfs.path(a)} does not exist",
                advice="check the address with lspci -D",
            )
        out.append(a)
    return out


def check_driver(sysfs: Sysfs, driver: str) -> None:
    """:class:`BindUsageError` unless ``/sys/bus/pci/drivers/DRIVER`` exists."""
    path = f"{sysfs.root}/bus/pci/drivers/{driver}"
    if "/" in driver or not driver or not sysfs.kernel.exists(path):
        raise BindUsageError(
            errno.ENOENT,
            None,
            f"find driver {driver}",
            detail=f"no PCI driver {driver!r} ({path} does not exist)",
            advice=f"load its module (modprobe {driver}) or check the name "
            "(ls /sys/bus/pci/drivers)",
        )


def _override(sysfs: Sysfs, a: PciAddress) -> str | None:
    try:
        text = sysfs.read(a, "driver_override")
    except SysfsError:
        return None
    return None if text in ("", "(null)") else text


def _group_refusal(
    sysfs: Sysfs, model: Any, a: PciAddress, group: int, asked: set[PciAddress]
) -> str | None:
    for other in sysfs.group_devices(group):
        if other == a or other in asked or model.keeps_group_viable(other):
            continue
        if sysfs.is_bridge(other):
            continue
        drv = sysfs.driver(other)
        return (
            f"IOMMU group {group} also holds {other} (bound to {drv}), which was not asked "
            f"for; add {other} to the request, or unbind it: a group is usable only when all "
            "its devices are on vfio-pci, unbound, or bridges"
        )
    return None


def _vfio_model(sysfs: Sysfs) -> Any:
    from vfiopy.kmodel import KernelModel

    return KernelModel(sysfs)


# --- running ---------------------------------------------------------------------------------


async def _parallel(
    items: Sequence[DeviceResult],
    work: Callable[[DeviceResult], None],
    max_parallel: int,
    t0: float,
) -> None:
    """``work`` on each item in worker threads, ``max_parallel`` at once; stamps the times.

    The workers are threads of our own, each taking the next item when it is done, started
    from one thread hand-off: a task and a hand-off per device would cost more Python than
    the sysfs writes themselves.
    """
    await anyio.to_thread.run_sync(_run_workers, list(items), work, max(1, max_parallel), t0)


def _run_workers(
    items: list[DeviceResult], work: Callable[[DeviceResult], None], width: int, t0: float
) -> None:
    pending = iter(items)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                r = next(pending, None)
            if r is None:
                return
            r.start_s = time.monotonic() - t0
            try:
                work(r)
            finally:
                r.end_s = time.monotonic() - t0

    threads = [
        threading.Thread(target=worker, name=f"vfiopy-bind-{i}", daemon=True)
        for i in range(min(width, len(items)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _fail(r: DeviceResult, exc: OSError, status: str = "failed") -> None:
    r.status = status
    r.errno = exc.errno
    r.error = str(exc)


async def bind_devices(
    addresses: Iterable[str | PciAddress],
    *,
    kernel: Kernel | None = None,
    state: BindState | None = None,
    dry_run: bool = False,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
) -> BindReport:
    """Bind every device of ``addresses`` to vfio-pci, or none of them.

    Raises :class:`AddressError` / :class:`BindUsageError` for a request that names
    nothing (a malformed address, an absent device) and :class:`VfioError` when vfio-pci
    is not loaded; refusals and failures are in the report.
    """
    t0 = time.monotonic()
    sysfs = Sysfs(kernel if kernel is not None else default_kernel())
    state = state if state is not None else BindState(DEFAULT_STATE_PATH)
    asked = parse_request(sysfs, (str(a) for a in addresses))
    report = BindReport("bind", state.path, dry_run=dry_run)
    if not sysfs.kernel.exists(f"{sysfs.root}/bus/pci/drivers/{VFIO_DRIVER}"):
        raise VfioError(
            errno.ENODEV,
            None,
            "find vfio-pci",
            detail=f"{sysfs.root}/bus/pci/drivers/{VFIO_DRIVER} does not exist",
            advice="load the module: modprobe vfio-pci",
        )
    model = _vfio_model(sysfs)
    use = HostUse.read(sysfs.kernel, sysfs.root)
    todo: list[DeviceResult] = []
    refused = False
    for a in asked:
        r = DeviceResult(str(a))
        report.devices.append(r)
        try:
            r.driver_before = r.driver_after = sysfs.driver(a)
            if sysfs.is_bridge(a):
                raise BindRefused(
                    errno.EINVAL,
                    str(a),
                    "check device",
                    detail="it is a bridge; vfio-pci drives only endpoints (header type 0)",
                    advice="give the functions below it instead",
                )
            r.group = sysfs.iommu_group(a)
            if model.is_vfio_driver(r.driver_before):
                r.status = "already"
                continue
            why = _group_refusal(sysfs, model, a, r.group, set(asked))
            if why:
                raise BindRefused(errno.EPERM, str(a), "check IOMMU group", detail=why, advice="")
            if r.driver_before is not None:
                reasons = use.reasons(a)
                if reasons:
                    raise BindRefused(
                        errno.EBUSY,
                        str(a),
                        "check host use",
                        detail=f"the host uses it ({r.driver_before}): " + "; ".join(reasons),
                        advice="stop using it on the host first (ip link set DEV down, umount, "
                        "swapoff), or leave it out",
                    )
        except VfioError as exc:
            _fail(r, exc, "refused")
            refused = True
            continue
        todo.append(r)
    if refused:
        for r in todo:
            r.status = "skipped"
            r.error = "not bound: another device of the request was refused (all or none)"
        report.elapsed_s = time.monotonic() - t0
        return report
    if dry_run:
        for r in todo:
            r.status = "planned"
            r.driver_after = VFIO_DRIVER
        report.elapsed_s = time.monotonic() - t0
        return report
    if todo:
        await _bind_locked(sysfs, state, todo, max_parallel, t0)
    report.elapsed_s = time.monotonic() - t0
    return report


async def _bind_locked(
    sysfs: Sysfs, state: BindState, todo: list[DeviceResult], max_parallel: int, t0: float
) -> None:
    with state.locked() as entries:
        added = []
        for r in todo:
            if r.address not in entries:
                a = PciAddress.parse(r.address)
                entries[r.address] = Entry(
                    r.driver_before, _override(sysfs, a), r.group or -1, time.time()
                )
                added.append(r.address)
        state.save(entries)  # before the first device is touched

        def bind_one(r: DeviceResult) -> None:
            try:
                sysfs.bind_vfio(r.address)
                r.status = "bound"
                r.driver_after = VFIO_DRIVER
                log.info("device bound", bdf=r.address, driver=VFIO_DRIVER, was=r.driver_before)
            except VfioError as exc:
                _fail(r, exc)
                r.driver_after = _driver_or_none(sysfs, r.address)

        await _parallel(todo, bind_one, max_parallel, t0)
        if all(r.status == "bound" for r in todo):
            return

        # All or none: put back every device this run touched, in parallel.
        def undo(r: DeviceResult) -> None:
            e = entries[r.address]
            try:
                _restore_one(sysfs, r.address, e.driver, e.override)
            except VfioError as exc:
                if r.status == "bound":
                    _fail(r, exc)
                log.error("roll back failed", bdf=r.address, error=str(exc))
                return
            if r.status == "bound":
                r.status = "rolled-back"
                r.error = "bound, then put back: another device of the request failed"
            r.driver_after = _driver_or_none(sysfs, r.address)
            if r.address in added:
                del entries[r.address]

        await _parallel(todo, undo, max_parallel, t0)
        state.save(entries)


def _driver_or_none(sysfs: Sysfs, addr: str) -> str | None:
    with contextlib.suppress(VfioError):
        return sysfs.driver(addr)
    return None


def _restore_one(sysfs: Sysfs, addr: str, driver: str | None, override: str | None) -> bool:
    """Put ``addr`` back on ``driver`` (None: unbound) with ``override``; False when it
    already was."""
    a = PciAddress.parse(addr)
    current = sysfs.driver(a)
    sysfs.write(a, "driver_override", override or "\n")  # "\n" clears it
    if current == driver:
        return False
    if current is not None:
        sysfs.write(a, "driver/unbind", str(a))
    if driver is None:
        return True
    path = f"{sysfs.root}/bus/pci/drivers/{driver}/bind"
    try:
        sysfs.kernel.write_text(path, str(a))
    except OSError as exc:
        # bind_store answers ENODEV when the driver's id table does not list the device
        # (it was bound through an override or new_id): probe with the driver as override.
        if exc.errno != errno.ENODEV:
            raise SysfsError.from_oserror(exc, str(a), f"bind {driver}", path) from exc
        sysfs.write(a, "driver_override", driver)
        probe = f"{sysfs.root}/bus/pci/drivers_probe"
        try:
            sysfs.kernel.write_text(probe, str(a))
        except OSError as exc2:
            raise SysfsError.from_oserror(exc2, str(a), "write drivers_probe", probe) from exc2
        finally:
            sysfs.write(a, "driver_override", override or "\n")
    after = sysfs.driver(a)
    if after != driver:
        raise SysfsError(
            errno.ENODEV,
            str(a),
            f"bind {driver}",
            detail=f"after the bind the driver is {after or 'none'}",
            advice=f"check dmesg for {driver}'s probe error",
        )
    return True


async def restore_devices(
    addresses: Iterable[str | PciAddress] | None = None,
    *,
    kernel: Kernel | None = None,
    state: BindState | None = None,
    driver: str | None = None,
    dry_run: bool = False,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
) -> BindReport:
    """Put devices back on the drivers the state file recorded (all of them when
    ``addresses`` is None), in parallel; or, with ``driver``, bind ``addresses`` to it
    regardless of the state (for a lost state file).

    Raises :class:`AddressError` / :class:`BindUsageError` for a request naming nothing
    (an absent device or driver) and :class:`StateError` for a missing or unreadable state
    file; what each device did is in the report.
    """
    from vfiopy.bind._state import StateError

    t0 = time.monotonic()
    sysfs = Sysfs(kernel if kernel is not None else default_kernel())
    state = state if state is not None else BindState(DEFAULT_STATE_PATH)
    asked = None if addresses is None else parse_request(sysfs, (str(a) for a in addresses))
    if driver is not None:
        check_driver(sysfs, driver)
        if not asked:
            raise BindUsageError(
                errno.EINVAL, None, "restore --driver", detail="it needs the devices' addresses"
            )
    elif not state.exists():
        raise StateError(
            errno.ENOENT,
            None,
            f"read {state.path}",
            detail="there is no state file: nothing was bound by vfiopy here since boot, or "
            "the file was removed",
            advice="to put devices on a host driver anyway, give --driver NAME and their addresses",
        )
    report = BindReport("restore", state.path, dry_run=dry_run)
    with state.locked() as entries:
        if driver is not None:
            assert asked is not None
            targets = {str(a): Entry(driver, None, -1, 0.0) for a in asked}
        elif asked is None:
            targets = dict(entries)
        else:
            targets = {}
            for a in asked:
                if str(a) in entries:
                    targets[str(a)] = entries[str(a)]
                else:
                    r = DeviceResult(str(a))
                    _fail(r, _not_recorded(a, state.path), "refused")
                    report.devices.append(r)
        todo = _restore_checks(sysfs, targets, report)
        if dry_run:
            for r in todo:
                r.status = "planned"
                r.driver_after = targets[r.address].driver
        elif todo:

            def restore_one(r: DeviceResult) -> None:
                e = targets[r.address]
                try:
                    changed = _restore_one(sysfs, r.address, e.driver, e.override)
                except VfioError as exc:
                    _fail(r, exc)
                    _back_to_vfio(sysfs, r, driver is None)
                    return
                r.status = "restored" if changed else "already"
                r.driver_after = e.driver
                log.info("device restored", bdf=r.address, driver=e.driver)

            await _parallel(todo, restore_one, max_parallel, t0)
            for r in todo:
                if r.status in ("restored", "already"):
                    entries.pop(r.address, None)
            state.save(entries)
    report.elapsed_s = time.monotonic() - t0
    return report


def _not_recorded(a: PciAddress, path: str) -> BindRefused:
    return BindRefused(
        errno.ENOENT,
        str(a),
        "check state",
        detail=f"not in {path}: vfiopy did not bind it",
        advice="give --driver NAME to put it on a host driver",
    )


def _back_to_vfio(sysfs: Sysfs, r: DeviceResult, recorded: bool) -> None:
    """After a failed restore: back on vfio-pci, never left unbound (its entry stays)."""
    try:
        sysfs.bind_vfio(r.address)
        r.error = f"{r.error}; left on vfio-pci" + (
            ", its entry kept in the state file" if recorded else ""
        )
    except VfioError:
        pass
    r.driver_after = _driver_or_none(sysfs, r.address)


def _restore_checks(
    sysfs: Sysfs, targets: dict[str, Entry], report: BindReport
) -> list[DeviceResult]:
    """A result per target; the ones that may go ahead are returned."""
    from vfiopy.release._plan import find_holders

    holders = find_holders(sysfs.kernel, list(targets))
    todo = []
    loaded: dict[str, bool] = {}
    for addr, e in sorted(targets.items()):
        r = DeviceResult(addr, group=e.group if e.group >= 0 else None)
        report.devices.append(r)
        try:
            if not sysfs.exists(addr):
                raise BindRefused(
                    errno.ENODEV,
                    addr,
                    "find device",
                    detail=f"{sysfs.path(addr)} does not exist",
                    advice="the device is gone (removed); its entry stays in the state file",
                )
            r.driver_before = r.driver_after = sysfs.driver(addr)
            if r.group is None:
                with contextlib.suppress(VfioError):
                    r.group = sysfs.iommu_group(addr)
            pids = holders.get(addr)
            if pids and r.driver_before == VFIO_DRIVER:
                raise BindRefused(
                    errno.EBUSY,
                    addr,
                    "check in use",
                    detail=f"open through VFIO in pid {', '.join(map(str, pids))}",
                    advice="stop that process (or release it: vfiopy-release --pid PID) first; "
                    "unbinding would wait for it",
                )
            if e.driver is not None and e.driver not in loaded:
                loaded[e.driver] = sysfs.kernel.exists(f"{sysfs.root}/bus/pci/drivers/{e.driver}")
            if e.driver is not None and not loaded[e.driver]:
                raise BindRefused(
                    errno.ENOENT,
                    addr,
                    f"find driver {e.driver}",
                    detail=f"{sysfs.root}/bus/pci/drivers/{e.driver} does not exist",
                    advice=f"load it (modprobe {e.driver}) and run restore again",
                )
        except VfioError as exc:
            _fail(r, exc, "refused")
            continue
        todo.append(r)
    return todo


__all__ = [
    "DEFAULT_MAX_PARALLEL",
    "STATUSES",
    "AddressError",
    "BindRefused",
    "BindReport",
    "BindUsageError",
    "DeviceResult",
    "bind_devices",
    "check_driver",
    "parse_request",
    "restore_devices",
]
