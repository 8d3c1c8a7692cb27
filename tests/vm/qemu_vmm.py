"""A real VMM in the vmtest guest: QEMU holding vfio-pci devices, driven over QMP.

Runs in the guest (its /usr/bin/python3, standard library only). The guest's own
`qemu-system-x86_64` (the host's, seen through the shared root) runs nested under TCG as the VMM
that owns the test devices, the way a management layer starts one:

    vmm = Vmm([NIC1, NIC2, (PAIR0, PAIR1)], hotplug_ports=1)
    vmm.start()                       # returns once every VFIO file is open and QMP answers
    vmm.vfio_files().counts()         # {"container": 1, "group": 3, "device": 4}
    vmm.device_add("hp0", NIC3)       # hot-plug into the empty root port
    vmm.device_del("hot")             # unplugged at once: the guest never powered the slot on
    exit_ = vmm.terminate()           # SIGTERM; the kernel's resets run before QEMU is reaped

Each single device sits alone on its own pcie-root-port; a tuple of functions is one
multifunction device in the VMM (`multifunction=on` on function 0, `addr=0.N`). The guest CPU
never runs (`-S`), so nothing but QEMU itself touches the devices.

What the guest's QEMU 7.2 does (tools/vmtest/guest-facts.md has the measurements):
- it holds one container (/dev/vfio/vfio), one file per IOMMU group (the pair's group once)
  and one device file per function, no duplicates;
- QMP answers `query-status` only after the machine reset, in which QEMU hot-resets every
  device it opened, so an answer means the start-up resets are over;
- hot-unplug without a guest needs native PCIe hot-plug on the root ports (q35's default ACPI
  hot-plug waits for the guest's ACPI code, hence the `-global` in vmm_command) and a slot whose
  power controller is off: a root port that was empty at the machine reset. A device present at
  start-up sits in a powered slot; `device_del` of it only presses the attention button and
  nothing happens without a guest (DEVICE_DELETED never comes, the device stays open);
- the device and group files of an unplugged device are closed by the time DEVICE_DELETED
  is sent; unplugging function 0 of a multifunction slot unplugs every function;
- on SIGTERM or SIGKILL the exiting task releases the device files one after another (the
  kernel's task-exit file release), each release paying its reset, and the process is reaped
  only after the last one.

Hooks for a release tool or guardian watching this QEMU: `Vmm.pid`, `Vmm.vfio_files()`,
`Vmm.send_signal()` and `Vmm.wait()` (QEMU is this process's child: only it can reap QEMU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

QEMU = "/usr/bin/qemu-system-x86_64"
SYSFS_PCI = Path("/sys/bus/pci/devices")
DEVICE_LINK = "anon_inode:[vfio-device]"
CONTAINER_PATH = "/dev/vfio/vfio"

Json = dict[str, Any]
Device = str | Sequence[str]
"""A host PCI address (one device on its own root port) or the functions of one
multifunction device, function 0 first."""


class VmmError(RuntimeError):
    """QEMU did not start, did not open its devices, or did not do what was asked in time."""


class QmpError(VmmError):
    """A QMP command returned an error, or QMP did not answer in time."""


# ---------------------------------------------------------------------------------------------
# QMP


class Qmp:
    """A minimal QMP client on a UNIX socket: one command at a time, events queued."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.events: list[Json] = []
        self._buf = b""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                break
            except OSError as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"cannot connect to QMP at {self.path}: {err}") from err
                time.sleep(0.05)
        self._sock = sock
        greeting = self._read(deadline - time.monotonic())
        if greeting is None or "QMP" not in greeting:
            self.close()
            raise QmpError(f"no QMP greeting from {self.path}: {greeting!r}")
        self.greeting: Json = greeting
        self.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, timeout: float) -> Json | None:
        """The next message, or None after `timeout` seconds; EOF raises QmpError."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                return None
            data = self._sock.recv(65536)
            if not data:
                raise QmpError(f"QMP connection {self.path} closed")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        message: Json = json.loads(line)
        return message

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run `command`; its `return` value, or QmpError with QMP's error."""
        request: Json = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline - time.monotonic())
            if reply is None:
                raise QmpError(f"QMP {command}: no answer in {timeout:.0f} s")
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            else:
                return reply.get("return")

    def wait_event(
        self, name: str, *, timeout: float, data: Mapping[str, Any] | None = None
    ) -> Json:
        """The first event `name` whose data contains `data` (queued ones first); QmpError
        after `timeout` seconds. Other events stay queued."""

        def wanted(event: Json) -> bool:
            if event.get("event") != name:
                return False
            got = event.get("data") or {}
            return all(got.get(k) == v for k, v in (data or {}).items())

        for event in self.events:
            if wanted(event):
                self.events.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline - time.monotonic())
            if message is None:
                raise QmpError(f"no QMP event {name} {dict(data or {})} in {timeout:.0f} s")
            if "event" not in message:
                continue  # a late reply to a command that timed out
            if wanted(message):
                return message
            self.events.append(message)


# ---------------------------------------------------------------------------------------------
# VFIO files of a process


@dataclasses.dataclass(frozen=True)
class VfioFiles:
    """The VFIO files a process holds: descriptor -> what it is."""

    container: tuple[int, ...]  # /dev/vfio/vfio
    groups: dict[str, tuple[int, ...]]  # IOMMU group number -> descriptors of /dev/vfio/N
    devices: tuple[int, ...]  # anon_inode:[vfio-device]

    def counts(self) -> dict[str, int]:
        return {
            "container": len(self.container),
            "group": sum(len(fds) for fds in self.groups.values()),
            "device": len(self.devices),
        }

    def to_json(self) -> Json:
        return {
            "container": list(self.container),
            "groups": {g: list(fds) for g, fds in sorted(self.groups.items())},
            "devices": list(self.devices),
            "counts": self.counts(),
        }


def vfio_files(pid: int) -> VfioFiles:
    """What /proc/PID/fd shows of VFIO; a descriptor closed mid-read is skipped."""
    container: list[int] = []
    groups: dict[str, list[int]] = {}
    devices: list[int] = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError as err:
        raise VmmError(f"cannot list the files of process {pid}: {err}") from err
    for name in sorted(names, key=int):
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue
        if target == CONTAINER_PATH:
            container.append(int(name))
        elif target == DEVICE_LINK:
            devices.append(int(name))
        elif target.startswith("/dev/vfio/") and target[len("/dev/vfio/") :].isdigit():
            groups.setdefault(target[len("/dev/vfio/") :], []).append(int(name))
    return VfioFiles(tuple(container), {g: tuple(fds) for g, fds in groups.items()}, tuple(devices))


def iommu_group(bdf: str) -> str:
    return os.path.basename(os.readlink(SYSFS_PCI / bdf / "iommu_group"))


@dataclasses.dataclass(frozen=True)
class ExpectedFiles:
    """What a VMM holding some functions holds: one container, each of their IOMMU groups
    once, one device file per function."""

    container: int
    groups: tuple[str, ...]
    devices: int

    @classmethod
    def of(cls, functions: Sequence[str]) -> ExpectedFiles:
        groups = sorted({iommu_group(f) for f in functions}, key=int)
        return cls(1 if functions else 0, tuple(groups), len(functions))

    def held_by(self, files: VfioFiles) -> bool:
        return (
            len(files.container) == self.container
            and tuple(sorted(files.groups, key=int)) == self.groups
            and all(len(fds) == 1 for fds in files.groups.values())
            and len(files.devices) == self.devices
        )


# ---------------------------------------------------------------------------------------------
# the VMM


def functions_of(device: Device) -> tuple[str, ...]:
    return (device,) if isinstance(device, str) else tuple(device)


def device_args(functions: Sequence[str], port: str, id_prefix: str) -> list[Json]:
    """`device_add`/-device properties of one device on root port `port`: a single function at
    0.0, or a multifunction device (function 0 first, with multifunction=on)."""
    if len(functions) == 1:
        return [{"driver": "vfio-pci", "host": functions[0], "bus": port, "id": id_prefix}]
    return [
        {
            "driver": "vfio-pci",
            "host": host,
            "bus": port,
            "addr": f"0.{fn}",
            "id": f"{id_prefix}.{fn}",
            **({"multifunction": "on"} if fn == 0 else {}),
        }
        for fn, host in enumerate(functions)
    ]


def _device_opt(props: Mapping[str, Any]) -> str:
    return ",".join(
        [str(props["driver"])] + [f"{k}={v}" for k, v in props.items() if k != "driver"]
    )


def vmm_command(
    devices: Sequence[Device],
    *,
    qmp_path: str,
    hotplug_ports: int = 0,
    qemu: str = QEMU,
    memory_mib: int = 64,
) -> list[str]:
    """The QEMU command line: device i on root port rp<i> with id dev<i> (functions
    dev<i>.<fn>), then `hotplug_ports` empty root ports hp0, hp1, ..."""
    argv = [
        qemu, "-machine", "q35", "-accel", "tcg", "-m", str(memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none",
        "-monitor", "none", "-S", "-qmp", f"unix:{qmp_path},server=on,wait=off",
        # Native PCIe hot-plug on the root ports: only it can unplug without a guest.
        "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
    ]  # fmt: skip
    chassis = 0
    for i, device in enumerate(devices):
        chassis += 1
        argv += ["-device", f"pcie-root-port,id=rp{i},chassis={chassis}"]
        for props in device_args(functions_of(device), f"rp{i}", f"dev{i}"):
            argv += ["-device", _device_opt(props)]
    for i in range(hotplug_ports):
        chassis += 1
        argv += ["-device", f"pcie-root-port,id=hp{i},chassis={chassis}"]
    return argv


def _set_pdeathsig() -> None:
    # In the child before exec: QEMU dies with the process that started it, even on SIGKILL.
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclasses.dataclass(frozen=True)
class Exit:
    """How QEMU ended: `signal_at` and `exited_at` are time.monotonic() values (the clock
    guest_trace reports resets in); `exited_at` is when it was reaped, after the kernel
    released its files."""

    signal: int
    signal_at: float
    exited_at: float
    returncode: int

    @property
    def seconds(self) -> float:
        return self.exited_at - self.signal_at


class Vmm:
    """One nested QEMU holding `devices` (see vmm_command for the ids)."""

    def __init__(
        self,
        devices: Sequence[Device],
        *,
        hotplug_ports: int = 0,
        qemu: str = QEMU,
        memory_mib: int = 64,
        die_with_parent: bool = True,
    ) -> None:
        self.devices = [functions_of(d) for d in devices]
        self.hotplug_ports = hotplug_ports
        self._dir = Path(tempfile.mkdtemp(prefix="vfiopy-vmm-"))
        self.qmp_path = str(self._dir / "qmp.sock")
        self.argv = vmm_command(
            devices, qmp_path=self.qmp_path, hotplug_ports=hotplug_ports, qemu=qemu,
            memory_mib=memory_mib,
        )  # fmt: skip
        self._die_with_parent = die_with_parent
        self._stderr_path = self._dir / "stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self.plugged: dict[str, tuple[str, ...]] = {}  # device id -> host functions (hot-added)
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.exit: Exit | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's pid (the hook for `python -m vfiopy.release --pid`)."""
        if self._proc is None:
            raise VmmError("QEMU not started")
        return self._proc.pid

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            raise VmmError("QEMU not started")
        return self._qmp

    @property
    def stderr(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def expected_files(self, devices: Iterable[Sequence[str]] | None = None) -> ExpectedFiles:
        """The VFIO files QEMU holds with `devices` (default: those it was started with and
        those hot-added since)."""
        held = list(self.devices if devices is None else devices)
        if devices is None:
            held += list(self.plugged.values())
        return ExpectedFiles.of([f for fns in held for f in fns])

    def start(self, *, timeout: float = 120.0) -> float:
        """Start QEMU; return once it holds every VFIO file and QMP answers `query-status`
        (after the machine reset). Returns the seconds that took; VmmError (with QEMU's
        stderr) when QEMU exits or is not ready within `timeout`."""
        if self._proc is not None:
            raise VmmError("QEMU already started")
        expected = self.expected_files()
        stderr = self._stderr_path.open("wb")
        try:
            self.started_at = time.monotonic()
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=_set_pdeathsig if self._die_with_parent else None,
            )
        finally:
            stderr.close()
        deadline = self.started_at + timeout
        try:
            self._wait_files(expected, deadline, "start")
            self._qmp = Qmp(self.qmp_path, timeout=max(1.0, deadline - time.monotonic()))
            status = self._qmp.execute(
                "query-status", timeout=max(1.0, deadline - time.monotonic())
            )
        except BaseException as err:
            self.kill()
            if isinstance(err, VmmError):
                raise VmmError(
                    f"{err}\nQEMU: {' '.join(self.argv)}\nstderr:\n{self.stderr}"
                ) from err
            raise
        if status.get("status") != "prelaunch":
            self.kill()
            raise VmmError(f"QEMU status {status!r}, expected prelaunch (-S)")
        self.ready_at = time.monotonic()
        return self.ready_at - self.started_at

    def _wait_files(self, expected: ExpectedFiles, deadline: float, doing: str) -> VfioFiles:
        proc = self._proc
        assert proc is not None
        while True:
            if proc.poll() is not None:
                raise VmmError(f"QEMU exited with status {proc.returncode} during {doing}")
            files = vfio_files(proc.pid)
            if expected.held_by(files):
                return files
            if time.monotonic() > deadline:
                raise VmmError(
                    f"QEMU's VFIO files after {doing}: {files.to_json()}, expected {expected}"
                )
            time.sleep(0.02)

    def vfio_files(self) -> VfioFiles:
        return vfio_files(self.pid)

    def send_signal(self, sig: int) -> float:
        """Signal QEMU; the time.monotonic() it was sent."""
        if self._proc is None:
            raise VmmError("QEMU not started")
        at = time.monotonic()
        self._proc.send_signal(sig)
        return at

    def wait(self, timeout: float | None = None) -> int:
        """Reap QEMU (it is this process's child); its return code."""
        if self._proc is None:
            raise VmmError("QEMU not started")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise VmmError(f"QEMU still running after {timeout} s") from err

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 120.0) -> Exit:
        """Signal QEMU and reap it; how long that took. QEMU is reaped only after the kernel
        released its device files, so the time includes their resets."""
        at = self.send_signal(sig)
        returncode = self.wait(timeout)
        self.exit = Exit(sig, at, time.monotonic(), returncode)
        self._close_qmp()
        return self.exit

    def terminate(self, *, timeout: float = 120.0) -> Exit:
        return self.stop(signal.SIGTERM, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL and reap, if still running (cleanup; for a timed kill use stop(SIGKILL))."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(120)
        self._close_qmp()

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Vmm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hot-plug ------------------------------------------------------------------------------

    def device_add(
        self, port: str, device: Device, *, device_id: str = "hot", timeout: float = 60.0
    ) -> VfioFiles:
        """Hot-plug `device` into the empty root port `port` (a multifunction device: the other
        functions first, function 0 last, which is when QEMU signals the slot). Returns once
        QEMU holds its files. Its QMP id is `device_id` (functions: `<device_id>.<fn>`)."""
        functions = functions_of(device)
        if device_id in self.plugged:
            raise VmmError(f"device id {device_id} already plugged")
        expected = self.expected_files([*self.devices, *self.plugged.values(), functions])
        props = device_args(functions, port, device_id)
        for p in [*props[1:], props[0]]:
            self.qmp.execute("device_add", p, timeout=timeout)
        self.plugged[device_id] = functions
        return self._wait_files(expected, time.monotonic() + timeout, f"device_add {device_id}")

    def device_del(self, device_id: str, *, timeout: float = 60.0) -> list[Json]:
        """Unplug hot-plugged device `device_id` (all its functions); wait for each function's
        DEVICE_DELETED and for its files to be closed. Returns the events."""
        functions = self.plugged.get(device_id)
        if functions is None:
            raise VmmError(
                f"{device_id} was not hot-plugged: only such devices unplug without a guest"
            )
        ids = (
            [device_id]
            if len(functions) == 1
            else [f"{device_id}.{fn}" for fn in range(len(functions))]
        )
        deadline = time.monotonic() + timeout
        self.qmp.execute("device_del", {"id": ids[0]}, timeout=timeout)
        events = [
            self.qmp.wait_event(
                "DEVICE_DELETED", data={"device": i}, timeout=max(0.0, deadline - time.monotonic())
            )
            for i in ids
        ]
        del self.plugged[device_id]
        self._wait_files(self.expected_files(), deadline, f"device_del {device_id}")
        return events


def main(argv: Sequence[str] | None = None) -> int:
    """`python3 qemu_vmm.py [--signal N] BDF|BDF+BDF...`: start QEMU with the devices, print
    its command line, its VFIO files and its exit as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("devices", nargs="*", help="BDF, or BDF+BDF for a multifunction device")
    parser.add_argument("--hotplug-ports", type=int, default=0)
    parser.add_argument("--signal", type=int, default=int(signal.SIGTERM))
    args = parser.parse_args(argv)
    vmm = Vmm([d.split("+") for d in args.devices], hotplug_ports=args.hotplug_ports)
    try:
        ready = vmm.start()
        files = vmm.vfio_files()
        exit_ = vmm.stop(args.signal)
        doc = {
            "argv": vmm.argv,
            "ready_s": ready,
            "files": files.to_json(),
            "exit": {**dataclasses.asdict(exit_), "seconds": exit_.seconds},
            "stderr": vmm.stderr,
        }
        print(json.dumps(doc))
    finally:
        vmm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
