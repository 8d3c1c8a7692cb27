"""Concurrent acquire, release and reset of many VFIO devices, one reset per domain.

The kernel resets a device when it is opened and its whole device set when
the last device of the set is released; a process exit releases its files
one by one.  This package plans the work by reset domain and runs the
domains in parallel on worker threads (anyio, so asyncio and trio), so many
devices cost about one reset, and never resets a domain holding a device
that was not asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vfiopy.release._constants import DEFAULT_MAX_PARALLEL as DEFAULT_MAX_PARALLEL
    from vfiopy.release._constants import SCHEMA as SCHEMA
    from vfiopy.release._engine import ProgressFn as ProgressFn
    from vfiopy.release._manager import AcquireError as AcquireError
    from vfiopy.release._manager import acquire as acquire
    from vfiopy.release._manager import plan_for as plan_for
    from vfiopy.release._manager import release as release
    from vfiopy.release._manager import release_addresses as release_addresses
    from vfiopy.release._manager import release_fds as release_fds
    from vfiopy.release._manager import reset as reset
    from vfiopy.release._plan import Domain as Domain
    from vfiopy.release._plan import Plan as Plan
    from vfiopy.release._plan import PlanError as PlanError
    from vfiopy.release._plan import UsageError as UsageError
    from vfiopy.release._plan import find_holders as find_holders
    from vfiopy.release._plan import make_plan as make_plan
    from vfiopy.release._report import DeviceResult as DeviceResult
    from vfiopy.release._report import DomainResult as DomainResult
    from vfiopy.release._report import ObservedReset as ObservedReset
    from vfiopy.release._report import Report as Report
    from vfiopy.release._report import Status as Status
    from vfiopy.release._takeover import Takeover as Takeover
    from vfiopy.release._takeover import release_process as release_process
    from vfiopy.release._takeover import take_over as take_over
else:
    # Imported at first use (see vfiopy._lazy): `python -m vfiopy.release` imports this
    # package before its command line is read.
    from vfiopy._lazy import lazy_exports

    __getattr__, __dir__, _ = lazy_exports(
        globals(),
        {
            "vfiopy.release._constants": ("DEFAULT_MAX_PARALLEL", "SCHEMA"),
            "vfiopy.release._engine": ("ProgressFn",),
            "vfiopy.release._manager": (
                "AcquireError",
                "acquire",
                "plan_for",
                "release",
                "release_addresses",
                "release_fds",
                "reset",
            ),
            "vfiopy.release._plan": (
                "Domain",
                "Plan",
                "PlanError",
                "UsageError",
                "find_holders",
                "make_plan",
            ),
            "vfiopy.release._report": (
                "DeviceResult",
                "DomainResult",
                "ObservedReset",
                "Report",
                "Status",
            ),
            "vfiopy.release._takeover": ("Takeover", "release_process", "take_over"),
        },
    )

__all__ = [
    "DEFAULT_MAX_PARALLEL",
    "SCHEMA",
    "AcquireError",
    "DeviceResult",
    "Domain",
    "DomainResult",
    "ObservedReset",
    "Plan",
    "PlanError",
    "ProgressFn",
    "Report",
    "Status",
    "Takeover",
    "UsageError",
    "acquire",
    "find_holders",
    "make_plan",
    "plan_for",
    "release",
    "release_addresses",
    "release_fds",
    "release_process",
    "reset",
    "take_over",
]
