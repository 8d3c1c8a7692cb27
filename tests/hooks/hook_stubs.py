"""A stand-in host for contrib/vfiopy-hook: stub commands on PATH, pid files, a live "QEMU".

The stubs are small Python programs written into a bin directory placed first on the hook's
PATH:

- ``vfiopy-release`` records its argv, session, parent and stdio in ``records/``, then acts as
  a guardian: waits until the ``--pid`` process has exited, then until the gate file ``open``
  exists (tests hold a release in progress with it), writes its report on stdout and a
  ``.done`` record, exits 0. SIGTERM: writes a ``.term`` record and exits 0 (gives its
  references back). ``FAKE_GUARDIAN=record`` makes it record and exit at once.
- ``systemd-run`` records its argv and starts the command after ``--`` in a new session with
  its stdio on files, as systemd would start a transient service, then returns. It refuses a
  unit name whose process still runs, as systemd refuses a unit that exists.
- ``systemctl is-active UNIT`` answers from what ``systemd-run`` started.
- ``qm config VMID ...`` prints ``qm/VMID.conf``, or fails when there is none.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "contrib" / "vfiopy-hook"
UNIT = REPO / "contrib" / "vfiopy-guard@.service"

_COMMON = '''
import json, os, sys, time
from pathlib import Path
STATE = Path(os.environ["FAKE_STATE"])


def write_json(path, doc):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.rename(path)


def alive(pid):
    """Running and not a zombie (a reparented child may wait long for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(") ")[2].split()[0] not in ("Z", "X")
'''

_GUARDIAN = """
import signal

def fd(n):
    try:
        return os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        return None

me = os.getpid()
records = STATE / "records"
signal.signal(signal.SIGTERM, lambda *_: (write_json(records / f"guardian-{me}.term", {}), os._exit(0)))
write_json(records / f"guardian-{me}.json", {
    "argv": sys.argv[1:], "pid": me, "sid": os.getsid(0), "ppid": os.getppid(),
    "stdio": [fd(0), fd(1), fd(2)], "env": {k: v for k, v in os.environ.items() if k.startswith("VFIOPY")},
})
if os.environ.get("FAKE_GUARDIAN") == "record":
    sys.exit(0)
vmm = int(sys.argv[sys.argv.index("--pid") + 1])
while alive(vmm):
    time.sleep(0.02)
while not (STATE / "open").exists():
    time.sleep(0.02)
print(json.dumps({"schema": 1, "ok": True, "devices": [], "domains": []}), flush=True)
write_json(records / f"guardian-{me}.done", {})
"""

_SYSTEMD_RUN = """
import subprocess
argv = sys.argv[1:]
n = len(list((STATE / "records").glob("systemd-run-*.json")))
write_json(STATE / "records" / f"systemd-run-{n}.json", argv)
if os.environ.get("FAKE_SYSTEMD_RUN_FAIL"):
    sys.exit(1)
options, command = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
unit = next(o.split("=", 1)[1] for o in options if o.startswith("--unit="))
units = STATE / "units"
units.mkdir(exist_ok=True)
known = units / unit
if known.exists() and alive(int(known.read_text())):
    sys.stderr.write(f"Failed to start transient service unit: Unit {unit}.service already exists.\\n")
    sys.exit(1)
with open(units / f"{unit}.out", "w") as out, open(units / f"{unit}.err", "w") as err:
    p = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
known.write_text(str(p.pid))
"""

_SYSTEMCTL = """
args = [a for a in sys.argv[1:] if not a.startswith("-")]
if args[:1] != ["is-active"]:
    sys.exit(1)
known = STATE / "units" / args[1].removesuffix(".service")
active = known.exists() and alive(int(known.read_text()))
if "--quiet" not in sys.argv:
    print("active" if active else "inactive")
sys.exit(0 if active else 3)
"""

_QM = """
conf = STATE / "qm" / f"{sys.argv[2]}.conf"
if sys.argv[1] != "config" or not conf.exists():
    sys.stderr.write("Configuration file does not exist\\n")
    sys.exit(2)
sys.stdout.write(conf.read_text())
"""

STUBS = {
    "vfiopy-release": _GUARDIAN,
    "systemd-run": _SYSTEMD_RUN,
    "systemctl": _SYSTEMCTL,
    "qm": _QM,
}


def wait_until(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``cond`` until it holds; the timeout only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(") ")[2].split()[0] not in ("Z", "X")


class Host:
    """One test's stand-in host: directories, stubs, sleeping "QEMU" processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.records = root / "records"
        self.run_dir = root / "run-vfiopy"
        self.libvirt_dir = root / "libvirt-qemu"
        self.pve_dir = root / "qemu-server"
        self.log = root / "hook.log"
        for d in (self.bin, self.records, root / "qm", self.libvirt_dir, self.pve_dir):
            d.mkdir(parents=True)
        for name, body in STUBS.items():
            stub = self.bin / name
            stub.write_text(f"#!{sys.executable}\n{_COMMON}\n{body}")
            stub.chmod(0o755)
        self.vmms: list[subprocess.Popen[bytes]] = []
        self.hooks: list[subprocess.Popen[str]] = []

    def env(self, launcher: str = "setsid", **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "FAKE_STATE": str(self.root),
            "VFIOPY_CONFIG": str(self.root / "no-config"),
            "VFIOPY_LAUNCHER": launcher,
            "VFIOPY_RUN_DIR": str(self.run_dir),
            "VFIOPY_LIBVIRT_PID_DIR": str(self.libvirt_dir),
            "VFIOPY_PVE_PID_DIR": str(self.pve_dir),
            "VFIOPY_HOOK_LOG": str(self.log),
            "VFIOPY_STOP_WAIT": "600",
        }
        env.update(extra)
        return env

    def hook(
        self, *args: str, xml: str = "", launcher: str = "setsid", **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """Run the hook as its manager does: arguments, the XML on stdin, output captured.

        ``run`` returns once the hook exited and every holder of its stdout and stderr closed
        them, so a guardian left on those pipes would hold it (up to the safety timeout).
        """
        return subprocess.run(
            [str(HOOK), *args],
            input=xml,
            capture_output=True,
            text=True,
            env=self.env(launcher, **extra),
            timeout=120,
        )

    def spawn_hook(
        self, *args: str, launcher: str = "setsid", **extra: str
    ) -> subprocess.Popen[str]:
        """The hook in the background, for a test to watch it wait."""
        hook = subprocess.Popen(
            [str(HOOK), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(launcher, **extra),
        )
        self.hooks.append(hook)
        return hook

    def vmm(self, pid_file: Path) -> subprocess.Popen[bytes]:
        """A sleeping process standing for QEMU, its pid in ``pid_file`` as the manager writes it."""
        p = subprocess.Popen(["sleep", "3600"])
        self.vmms.append(p)
        pid_file.write_text(f"{p.pid}\n")
        return p

    def qm_config(self, vmid: int, text: str) -> None:
        (self.root / "qm" / f"{vmid}.conf").write_text(text)

    def open_gate(self) -> None:
        (self.root / "open").touch()

    def guardians(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.records.glob("guardian-*.json"))]

    def finished(self, g: dict[str, Any], what: str = "done") -> bool:
        return (self.records / f"guardian-{g['pid']}.{what}").exists()

    def systemd_runs(self) -> list[list[str]]:
        return [json.loads(p.read_text()) for p in sorted(self.records.glob("systemd-run-*.json"))]

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_guardians(self, n: int) -> list[dict[str, Any]]:
        assert wait_until(lambda: len(self.guardians()) >= n), self.log_lines()
        return self.guardians()

    def cleanup(self) -> None:
        for pid in [*(g["pid"] for g in self.guardians()), *(p.pid for p in self.vmms)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.vmms:
            p.wait()
        for hook in self.hooks:
            if hook.poll() is None:
                hook.kill()
            hook.communicate()


def hostdev_xml(name: str, devices: str) -> str:
    """A domain XML as libvirt formats it (one element a line)."""
    return (
        f"<domain type='kvm' id='3'>\n  <name>{name}</name>\n  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        f"{devices}  </devices>\n</domain>\n"
    )


PCI_HOSTDEV = (
    "    <hostdev mode='subsystem' type='pci' managed='yes'>\n"
    "      <source>\n        <address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>\n"
    "      </source>\n    </hostdev>\n"
)
MDEV_HOSTDEV = (
    '    <hostdev mode="subsystem" type="mdev" model="vfio-pci">\n'
    '      <source><address uuid="c2177883-f1bb-47f0-914d-32a22e3a8804"/></source>\n'
    "    </hostdev>\n"
)
NET_HOSTDEV = (
    "    <interface type='hostdev' managed='yes'>\n"
    "      <source><address type='pci' domain='0x0000' bus='0x04' slot='0x10' function='0x1'/>"
    "</source>\n    </interface>\n"
)
USB_HOSTDEV = (
    "    <hostdev mode='subsystem' type='usb' managed='yes'>\n"
    "      <source><vendor id='0x046d'/><product id='0xc52b'/></source>\n    </hostdev>\n"
)
NO_HOSTDEV = "    <disk type='file' device='disk'><source file='/var/lib/vm1.qcow2'/></disk>\n"
