"""What a release, reset or acquire did: one record per device, one per domain.

Each domain carries what the model predicted (``resets``, and for a release the
resets by method) and, where the run's resets could be seen, what was observed:
the simulator's trace on ``--simulate`` runs, the guest's kprobe tracer in
``tests/vm``.  The two are kept apart so that a reader sees where they differ.
"""

from __future__ import annotations

import enum
import errno as _errno
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vfiopy.release._constants import SCHEMA


class Status(enum.StrEnum):
    """The fate of one device; every device of a run ends in exactly one."""

    RELEASED = "released"
    RESET = "reset"  # reset without closing: the device stays open and ours
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(slots=True)
class DeviceResult:
    """One device: where it sits, what happened, and when (seconds from the run's start)."""

    address: str
    domain: str
    status: Status = Status.SKIPPED
    error: str | None = None
    errno: int | None = None
    start_s: float = 0.0
    end_s: float = 0.0
    # For a file taken from a process (--pid): its fd numbers there, how it was
    # identified, and, while it is not, the devices it may be.
    fds: list[int] | None = None
    identified_by: str | None = None
    candidates: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "address": self.address,
            "domain": self.domain,
            "status": str(self.status),
            "error": self.error,
            "start_s": round(self.start_s, 6),
            "end_s": round(self.end_s, 6),
        }
        if self.fds is not None:
            out["fds"] = list(self.fds)
            out["identified_by"] = self.identified_by
            out["candidates"] = list(self.candidates or [])
        return out


@dataclass(slots=True)
class DomainResult:
    """One reset domain; ``resets`` is how many resets the run expects to cause there.

    ``None`` where that is not known in advance (the kernel decides, e.g. a
    set whose bus reset is blocked by a function bound to a host driver).
    """

    id: str
    devices: list[str]
    resets: int | None
    timed_out: bool = False
    # Idle vfio-pci functions, not part of the request, that the set's reset resets too.
    also_reset: list[str] = field(default_factory=list)
    # The model's resets by method (``{"flr": 2}``), where it predicts them one by one.
    predicted: dict[str, int] | None = None
    # The resets by method that hit the domain's functions, where a trace saw the run.
    observed: dict[str, int] | None = None
    # The functions whose resets count as the domain's (``devices`` when empty): all it
    # touches, by address, since a --pid device the fds do not name is listed by its fd.
    functions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "devices": list(self.devices), "resets": self.resets}
        if self.also_reset:
            out["also_reset"] = list(self.also_reset)
        if self.predicted is not None:
            out["predicted"] = dict(self.predicted)
        if self.observed is not None:
            out["observed"] = dict(self.observed)
        return out

    @property
    def observed_resets(self) -> int | None:
        return None if self.observed is None else sum(self.observed.values())

    @property
    def matches(self) -> bool | None:
        """Whether the observed resets are the predicted ones; None where either is unknown."""
        if self.observed is None or self.resets is None:
            return None
        if self.predicted is not None:
            return self.observed == self.predicted
        return self.observed_resets == self.resets


@dataclass(frozen=True, slots=True)
class ObservedReset:
    """One reset a trace saw: ``method`` (flr, pm, bus, slot, ...) over ``targets``."""

    method: str
    targets: tuple[str, ...]


def count_methods(methods: Iterable[str]) -> dict[str, int]:
    """``["flr", "bus", "flr"]`` -> ``{"bus": 1, "flr": 2}`` (sorted, for stable JSON)."""
    return dict(sorted(Counter(methods).items()))


@dataclass(slots=True)
class FileResult:
    """A VFIO file other than a device (group, container, iommufd) taken from a process."""

    kind: str
    link: str
    fds: list[int]
    status: Status = Status.SKIPPED
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "link": self.link,
            "fds": list(self.fds),
            "status": str(self.status),
            "error": self.error,
        }


@dataclass(slots=True)
class Report:
    """The outcome of one run; ``ok`` only when every device was released."""

    action: str
    domains: list[DomainResult] = field(default_factory=list)
    devices: list[DeviceResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    interrupted: bool = False
    pid: int | None = None  # the process whose files were taken (--pid)
    files: list[FileResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    observed_by: str | None = None  # what saw the resets: "simulator", "guest kprobes"

    def observe(self, source: str, resets: Iterable[ObservedReset]) -> None:
        """Record, per domain, the resets ``source`` saw hit any of its devices."""
        seen = list(resets)
        self.observed_by = source
        for d in self.domains:
            ours = set(d.functions or d.devices)
            d.observed = count_methods(r.method for r in seen if ours.intersection(r.targets))

    @property
    def ok(self) -> bool:
        return all(d.status in (Status.RELEASED, Status.RESET) for d in self.devices) and all(
            f.status is not Status.FAILED for f in self.files
        )

    def counts(self) -> dict[str, int]:
        out = {str(s): 0 for s in Status}
        for d in self.devices:
            out[str(d.status)] += 1
        return out

    def failed(self) -> list[DeviceResult]:
        return [d for d in self.devices if d.status in (Status.FAILED, Status.SKIPPED)]

    def __repr__(self) -> str:
        # Summarised: the field-by-field repr of 2048 devices is long and slow to build, and
        # asyncio builds it for the task that returned the report.
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items() if v)
        return (
            f"<Report {self.action} ok={self.ok} {len(self.domains)} domains "
            f"{len(self.devices)} devices ({counts}) in {self.elapsed_s:.3f} s>"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "elapsed_s": round(self.elapsed_s, 6),
            "domains": [d.to_json() for d in self.domains],
            "devices": [d.to_json() for d in self.devices],
            **({"pid": self.pid, "files": [f.to_json() for f in self.files]} if self.pid else {}),
            **({"notes": list(self.notes)} if self.notes else {}),
            **({"observed_by": self.observed_by} if self.observed_by else {}),
        }


def describe(exc: BaseException) -> tuple[str, int | None]:
    """A one-line message and the errno for an exception caught around a device."""
    err = exc.errno if isinstance(exc, OSError) else None
    text = str(exc)
    if isinstance(exc, OSError) and err and not text.strip():
        text = f"{_errno.errorcode.get(err, err)} ({exc.strerror})"
    return text or type(exc).__name__, err


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most ``(start, end)`` intervals open at one instant; touching ones do not overlap."""
    # At equal times an end (-1) sorts before a start (+1).
    edges = sorted(e for start, end in intervals for e in ((start, 1), (end, -1)))
    best = cur = 0
    for _, step in edges:
        cur += step
        best = max(best, cur)
    return best
