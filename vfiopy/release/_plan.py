"""Group devices by reset domain and refuse what we must not touch.

A reset domain is what a device's set can touch: the kernel's device set and
what its bus or slot reset would hit, as :mod:`vfiopy.kmodel` predicts for
the kernel's version, which also says which resets each close will run.  A
domain whose predicted resets would hit a vfio-pci device that is not ours
(reset behind its owner's back) is refused here, before anything is opened.
A neighbour bound to a host driver is safe: the kernel will not bus-reset a
set it cannot own whole, and the model predicts only function resets there.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vfiopy.errors import AddressError, GroupNotViableError, SysfsError, VfioError
from vfiopy.kernel import Kernel
from vfiopy.kmodel import KernelModel, KernelVersion, Reset, label
from vfiopy.release._report import DomainResult, count_methods
from vfiopy.sysfs import PciAddress, Sysfs


class PlanError(VfioError):
    """A device cannot be released or reset safely; nothing was touched."""

    step_name = "plan"


class UsageError(VfioError):
    """The request names nothing that exists (a malformed address, an absent device or pid)."""

    step_name = "usage"


@dataclass(slots=True)
class Domain:
    """One reset domain: ``devices`` ours (in request order), ``members`` all it touches."""

    id: str
    devices: list[str]
    members: list[str]
    host_bound: list[tuple[str, str]] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    # The model's resets of each close, in ``devices`` order (make_plan fills them).
    closes: list[list[Reset]] = field(default_factory=list)
    # Whether a reset between boots resets the one device alone (VFIO_DEVICE_RESET).
    function_reset: bool = False

    @property
    def whole(self) -> bool:
        """Whether every function the domain's reset touches is ours."""
        return not self.host_bound and not self.foreign

    @property
    def release_resets(self) -> int:
        """Resets the kernel runs as the domain's devices are closed in order (predicted)."""
        return sum(len(c) for c in self.closes)

    @property
    def predicted(self) -> dict[str, int]:
        """The release's resets by method (``{"flr": 1, "bus": 1}``), as the model predicts."""
        return count_methods(r.method for c in self.closes for r in c)

    def release_result(self, devices: list[str] | None = None) -> DomainResult:
        """The domain's record in a release report, with the model's prediction."""
        return DomainResult(
            self.id,
            list(self.devices if devices is None else devices),
            self.release_resets,
            also_reset=self.also_reset,
            predicted=self.predicted,
            functions=list(self.members),
        )

    @property
    def also_reset(self) -> list[str]:
        """Functions not ours (idle vfio-pci ones) that the predicted resets hit."""
        hit = {str(t) for c in self.closes for r in c for t in r.targets}
        return [a for a in self.foreign if a in hit]

    def reset_kind(self, i: int) -> str | None:
        """The resets the i-th close runs (``flr``, ``flr+bus``, ...), for logs."""
        return label(self.closes[i]) if i < len(self.closes) else None


@dataclass(slots=True)
class Plan:
    domains: list[Domain]

    @property
    def addresses(self) -> list[str]:
        return [a for d in self.domains for a in d.devices]

    def domain_of(self, address: str) -> Domain:
        for d in self.domains:
            if address in d.devices:
                return d
        raise KeyError(address)

    def describe(self, action: str) -> list[str]:
        n, k = len(self.addresses), len(self.domains)
        lines = [f"{action}: {n} device{'s' * (n != 1)} in {k} reset domain{'s' * (k != 1)}"]
        for d in self.domains:
            resets = d.release_resets if action == "release" else 1
            note = (
                ""
                if not d.host_bound
                else " (host-bound neighbours: "
                + ", ".join(f"{a} [{drv}]" for a, drv in d.host_bound)
                + "; function resets only)"
            )
            lines.append(f"  domain {d.id}: {' '.join(d.devices)}  resets: {resets}{note}")
        return lines


class _ListingCache(Sysfs):
    """Sysfs that lists /sys/bus/pci/devices once: planning asks per device, O(n^2) else."""

    _devices: list[PciAddress] | None = None

    def devices(self) -> list[PciAddress]:
        if self._devices is None:
            self._devices = super().devices()
        return self._devices


def parse_addresses(texts: Iterable[str]) -> list[PciAddress]:
    """Parse every address (strictly), dropping repeats; the first bad one raises."""
    out: list[PciAddress] = []
    seen: set[PciAddress] = set()
    for t in texts:
        a = PciAddress.parse(t)
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def domain_id(members: Sequence[PciAddress], addr: PciAddress) -> str:
    if len(members) <= 1:
        return str(addr)
    return f"{addr.domain:04x}:{addr.bus:02x}"


def make_plan(
    kernel: Kernel,
    addresses: Sequence[PciAddress | str],
    *,
    check_driver: bool = True,
    holders: dict[str, list[int]] | None = None,
    me: int | None = None,
    strict: bool = True,
    version: KernelVersion | None = None,
) -> Plan:
    """The reset domains of ``addresses``, after checking each can be taken safely.

    Raises :class:`UsageError` for an address that names no device, and
    :class:`PlanError` (or :class:`GroupNotViableError`) for a device that is
    not bound to vfio-pci, sits in a non-viable group, is held by another
    process (``holders``: address -> pids, ``me`` excepted), or shares its
    reset domain with a vfio-pci device that was not asked for and that the
    predicted resets would hit.  With ``strict`` off (a release of fds already
    held, which closes them whatever the plan says) nothing raises: such a
    device is only noted in ``Domain.foreign``, and a device gone from sysfs
    gets a domain of its own.  ``version`` is the kernel's (default: running).
    """
    sysfs = _ListingCache(kernel)
    model = KernelModel(sysfs, version)
    addrs = [a if isinstance(a, PciAddress) else PciAddress.parse(a) for a in addresses]
    wanted = {str(a) for a in addrs}
    for a in addrs:
        if strict and not sysfs.exists(a):
            raise UsageError(
                errno.ENODEV,
                str(a),
                "find device",
                detail=f"{sysfs.path(a)} does not exist",
                advice="check the address with lspci -D (the device may have been removed)",
            )
    by_member: dict[str, Domain] = {}
    domains: list[Domain] = []
    for a in addrs:
        s = str(a)
        if check_driver:
            _check_vfio(model, a, holders or {}, me)
        if s in by_member:
            by_member[s].devices.append(s)
            continue
        try:
            members = model.device_set(a).touched
        except SysfsError as exc:
            if not strict:
                # Removed mid-life: its fd still closes, and resets nothing else.
                domains.append(Domain(s, [s], [s]))
                by_member[s] = domains[-1]
                continue
            raise PlanError(
                exc.errno or errno.EIO, s, "find reset domain", detail=str(exc)
            ) from exc
        d = Domain(domain_id(members, a), [s], [str(m) for m in members])
        for m in members:
            ms = str(m)
            by_member[ms] = d
            f = model.function(m)
            if ms in wanted or f is None or f.driver is None:
                continue  # ours, or gone since the listing, or idle without a driver
            if f.vfio:
                d.foreign.append(ms)
            elif not f.is_bridge:
                d.host_bound.append((ms, f.driver))
        domains.append(d)
    for d in domains:
        d.closes = [step for _, step in model.close_steps(d.devices)]
        d.function_reset = len(d.members) == 1 and model.function_reset(d.devices[0]) is not None
        hit = d.also_reset
        if strict and hit:
            raise PlanError(
                errno.EPERM,
                d.devices[0],
                "check reset domain",
                detail=f"its reset domain {d.id} also holds {hit[0]} (bound to vfio-pci), "
                "which was not asked for: the set's bus reset would reset it too",
                advice=f"add {hit[0]} to the request if it is yours, or leave the whole "
                "domain to its owner",
            )
    return Plan(domains)


def _check_vfio(
    model: KernelModel, a: PciAddress, holders: dict[str, list[int]], me: int | None
) -> None:
    s = str(a)
    sysfs = model.sysfs
    drv = sysfs.driver(a)
    if not model.is_vfio_driver(drv):
        raise PlanError(
            errno.ENODEV if drv is None else errno.EBUSY,
            s,
            "check driver",
            detail=f"bound to {drv or 'no driver'}, not vfio-pci or a vfio-pci variant driver",
            advice=f"bind it first (driverctl set-override {s} vfio-pci), or leave it out",
        )
    group = sysfs.iommu_group(a)
    for other in sysfs.group_devices(group):
        if not model.keeps_group_viable(other):
            odrv = (f := model.function(other)) and f.driver
            raise GroupNotViableError(
                errno.EPERM,
                s,
                "check IOMMU group",
                detail=f"IOMMU group {group} also holds {other}, bound to {odrv}",
                advice=f"bind {other} to vfio-pci too (or unbind it); a group is usable only "
                "when all its devices are",
            )
        others = [p for p in holders.get(str(other), []) if p != me]
        if others:
            pids = ", ".join(map(str, others))
            raise PlanError(
                errno.EBUSY,
                s,
                "check in use",
                detail=f"{other} (IOMMU group {group}) is open in pid {pids}",
                advice=f"stop that process first, or use --pid {others[0]} to take its "
                "devices over",
            )


def find_holders(kernel: Kernel, addresses: Iterable[str] | None = None) -> dict[str, list[int]]:
    """Which processes hold VFIO fds for which devices (best effort, by /proc).

    Device fds are identified by fdinfo (or cdev path); group fds
    (/dev/vfio/N) count for every device of group N.  Processes we cannot
    inspect are skipped: the open itself still fails with EBUSY there.
    """
    from vfiopy.release._process import device_fds

    try:
        pids = [int(p) for p in kernel.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    sysfs = _ListingCache(kernel)
    group_cache: dict[int, list[str]] = {}
    out: dict[str, list[int]] = {}
    for pid in pids:
        try:
            fds = device_fds(kernel, pid)
            links = [
                kernel.readlink(f"/proc/{pid}/fd/{n}") for n in kernel.listdir(f"/proc/{pid}/fd")
            ]
        except (OSError, VfioError):
            continue
        held = {f.address for f in fds if f.address}
        for link in links:
            tail = link.removeprefix("/dev/vfio/")
            if link.startswith("/dev/vfio/") and tail.isdigit():
                g = int(tail)
                if g not in group_cache:
                    try:
                        group_cache[g] = [str(d) for d in sysfs.group_devices(g)]
                    except VfioError:
                        group_cache[g] = []
                held.update(group_cache[g])
        for a in held:
            out.setdefault(a, []).append(pid)
    return out


__all__ = [
    "AddressError",
    "Domain",
    "Plan",
    "PlanError",
    "UsageError",
    "find_holders",
    "make_plan",
    "parse_addresses",
]
