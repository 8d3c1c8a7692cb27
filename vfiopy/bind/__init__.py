"""Bind host devices to vfio-pci and restore them to their drivers, concurrently.

``python -m vfiopy.bind`` (``vfiopy-bind``) is the command line; from Python::

    from vfiopy.bind import BindState, bind_devices, restore_devices

    state = BindState("/run/vfiopy/bind.json")
    report = await bind_devices(["0000:3b:00.0", "0000:3b:00.1"], state=state)
    assert report.ok, [d.error for d in report.failed()]
    ...
    report = await restore_devices(state=state)  # every device back, probes in parallel

See :mod:`vfiopy.bind._ops` for the steps and checks, :mod:`vfiopy.bind._inuse` for what
counts as the host using a device, and :mod:`vfiopy.bind._state` for the state file.
"""

from __future__ import annotations

from vfiopy.bind._inuse import HostUse, in_use
from vfiopy.bind._ops import (
    DEFAULT_MAX_PARALLEL,
    STATUSES,
    BindRefused,
    BindReport,
    BindUsageError,
    DeviceResult,
    bind_devices,
    check_driver,
    parse_request,
    restore_devices,
)
from vfiopy.bind._state import DEFAULT_STATE_PATH, BindState, Entry, StateError

__all__ = [
    "DEFAULT_MAX_PARALLEL",
    "DEFAULT_STATE_PATH",
    "STATUSES",
    "BindRefused",
    "BindReport",
    "BindState",
    "BindUsageError",
    "DeviceResult",
    "Entry",
    "HostUse",
    "StateError",
    "bind_devices",
    "check_driver",
    "in_use",
    "parse_request",
    "restore_devices",
]
