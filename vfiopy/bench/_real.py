"""Real devices bound to vfio-pci, through :class:`vfiopy.kernel.LinuxKernel`.

Modes ``exit`` and ``procs`` start real child processes (``_child.py`` under
the system's ``python3``) that open their devices and ``_exit``; the other
modes run in this process.  Resets are counted where the vmtest guest's
kprobe tracer (``guest_trace``, on ``sys.path`` in the guest) is importable;
elsewhere they read as unknown (-1).  The lower bound uses nominal reset
costs (see :mod:`vfiopy.bench._costs`), since real devices publish none.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from vfiopy._uapi import Ioctl, IommuType
from vfiopy.bench._costs import model_costs
from vfiopy.bench._target import Costs, Group, ResetEvent
from vfiopy.errors import VfioError
from vfiopy.kernel import Kernel, LinuxKernel
from vfiopy.kmodel import KernelModel
from vfiopy.release._plan import domain_id
from vfiopy.sysfs import PciAddress, Sysfs

CHILD_SCRIPT = Path(__file__).with_name("_child.py")
# The guest tier runs children with the distribution's interpreter; elsewhere
# the one running us will do.
CHILD_PYTHON = os.environ.get("VFIOPY_BENCH_CHILD_PYTHON") or (
    "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
)
_RESET_KINDS = frozenset({"bus", "flr", "af_flr", "pm"})


def _guest_trace() -> ModuleType | None:
    # By name: the tracer lives in tools/vmtest and is on sys.path only in the guest.
    try:
        return importlib.import_module("guest_trace")
    except ImportError:
        return None


class RealChild:
    """A ``python3 _child.py`` process holding its devices open."""

    def __init__(self, name: str, groups: Sequence[Group]) -> None:
        spec = {
            "ioctls": {
                "GROUP_SET_CONTAINER": Ioctl.GROUP_SET_CONTAINER,
                "SET_IOMMU": Ioctl.SET_IOMMU,
                "GROUP_GET_DEVICE_FD": Ioctl.GROUP_GET_DEVICE_FD,
            },
            "iommu_type": int(IommuType.TYPE1v2),
            "groups": [{"group": g.group, "devices": g.devices} for g in groups],
        }
        self.name = name
        self.proc = subprocess.Popen(
            [CHILD_PYTHON, str(CHILD_SCRIPT), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{name}: child could not open its devices: {line or 'no answer'}")

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        # waitpid returns once do_exit has run the files' task_work (the releases).
        if self.proc.wait() != 0:
            raise RuntimeError(f"{self.name}: child exited with status {self.proc.returncode}")


class RealSystem:
    """The chosen real devices; nothing is simulated, nothing scales."""

    reset_model = "real"

    def __init__(self, addresses: Sequence[str], n: int) -> None:
        self.kernel: Kernel = LinuxKernel()
        self.topology = "real"
        self.kernel_model = f"linux-{platform.release()}"
        self.time_scale = 1.0
        self._cleanup: list[Callable[[], None]] = []
        sysfs = Sysfs(self.kernel)
        groups: dict[str, Group] = {}
        self.model = KernelModel(sysfs)
        for text in addresses:
            a = PciAddress.parse(text)
            if not self.model.is_vfio_driver(sysfs.driver(a)):
                raise ValueError(f"{a}: not bound to vfio-pci; bind it first (driverctl)")
            domain = domain_id(self.model.device_set(a).touched, a)
            group = str(sysfs.iommu_group(a))
            groups.setdefault(group, Group(group, domain)).devices.append(str(a))
        chosen = list(groups.values())[:n] if n else list(groups.values())
        self.groups = chosen
        self.costs: Costs = model_costs(self.model, [d for g in chosen for d in g.devices])
        self._trace = _guest_trace()
        if self._trace is not None:
            try:
                self._trace.start()
            except Exception:
                self._trace = None  # no tracefs or no root: resets stay unknown

    @property
    def serialised(self) -> bool:
        return self.model.serialised

    def start_child(self, name: str, groups: Sequence[Group]) -> RealChild:
        return RealChild(name, groups)

    def now(self) -> float:
        return time.monotonic()

    def resets(self) -> list[ResetEvent] | None:
        if self._trace is None:
            return None
        out = []
        for e in self._trace.read():
            if e.kind in _RESET_KINDS:
                dev = e.affected[0] if e.affected else e.dev
                out.append(ResetEvent(e.kind, dev, e.dev, e.start, e.end or e.start))
        return out

    def leave_open(self, close: Callable[[], None]) -> None:
        self._cleanup.append(close)

    def discard(self) -> None:
        while self._cleanup:
            self._cleanup.pop()()
        if self._trace is not None:
            self._trace.stop()


class RealFactory:
    """Builds a :class:`RealSystem` per run, after checking access once."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)
        if not os.access("/dev/vfio/vfio", os.R_OK | os.W_OK):
            raise ValueError(
                "--real needs read/write access to /dev/vfio/vfio (run as root, with the "
                "vfio-pci module loaded)"
            )
        try:
            for a in self.addresses:
                PciAddress.parse(a)
        except VfioError as exc:
            raise ValueError(str(exc)) from exc

    def __call__(
        self, n: int, kernel_model: str, reset_model: str, time_scale: float
    ) -> RealSystem:
        try:
            return RealSystem(self.addresses, n)
        except VfioError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                raise ValueError(str(exc)) from exc
            raise
