"""Run commands against the real Linux vfio-pci driver in a QEMU guest.

The guest boots the host's own kernel (/boot/vmlinuz-*) with a tiny initramfs (busybox-static
and the VFIO modules), mounts the host root `/` read-only over virtio-9p, chroots into it and
runs the command there, so the guest sees the same repository, virtualenv and Python as the host.
Test devices are bound to vfio-pci before the command runs.

Why a whole VM: vfio-pci needs an IOMMU, devices nobody else drives, and root. TCG (no KVM) is
slow but enough: resets are timed by the guest kernel's own sleeps, not by emulation speed.

Device layout (fixed; addresses come from the firmware's bus numbering, verified at boot):

  bridge            bus  device(s)                           what it models
  00:02.0-00:02.7   1-8  0000:0N:00.0 e1000e (8086:10d3)     one NIC per PCIe root port; own
  00:03.0-00:03.3   9-12                                     IOMMU group and device set;
                                                             reset_method `bus` (~135 ms each)
  00:04.0           n+1  0000:<n+1>:00.0, 00.1 e1000e pair   multifunction: one group, one
                                                             device set; function reset
                                                             disabled, so vfio does one bus
                                                             reset when the last one closes
  00:05.0 (PCIe-    n+2  0000:<n+2>:01.0 edu (1234:11e8)     conventional PCI device, bus
          to-PCI)                                            reset only, MSI, DMA engine; shares
                                                             its IOMMU group with the bridge,
                                                             whose shpchp driver is unbound
  00:06.0           n+3  0000:<n+3>:00.0 ivshmem-plain       BAR0 registers (non-prefetchable),
                         (1af4:1110)                         BAR2 1 MiB of shared RAM, 64-bit
                                                             prefetchable (write-combining);
                                                             reset_method `bus`

with n = number of single e1000e (default 6: NICs on buses 01-06, the pair on 07, edu on 08,
ivshmem on 09).  ivshmem's port came last so no earlier device moved; being on bus 0 it takes
an IOMMU group number before the devices behind the ports (theirs are one higher than
without it).
The 9p shares are virtio devices at 00:08.0 (host root) and 00:09.0 (results directory).

Guarding against host drivers: e1000e is not in the initramfs and nothing loads modules on
its own in the guest (no udev); every test device gets `driver_override=vfio-pci` before it
is probed. tests/vm/guest_bind.py loads e1000e from the host root (vfiopy-bind's NICs need
their host driver) and unloads it, the NICs back on vfio-pci, when it is done.

Protocol with the guest (all through the shared results directory, under `.vmtest/`):
  conf                host -> guest: results path, devices to bind, reset methods to set
  ready | fatal       guest -> host: setup finished (guest uptime) | why it could not
  devices             guest -> host: "<bdf> <driver> <iommu group> <reset_method>" per device
                      ("?": no reset_method attribute, as before Linux 5.15, where the
                      kernel's fixed order is left as it is and the console says so)
  jobs/N/job.sh, go   host -> guest: command N (go is created last)
  jobs/N/status, ...  guest -> host: exit status (written last), stdout, stderr, start, end
  shutdown            host -> guest: power off

Resets are counted in the guest with guest_trace.py (kprobes); collect_facts.py writes
guest-facts.md, what this guest really looks like.

Use:
    import vmtest
    if not vmtest.missing_requirements():
        with vmtest.Guest() as guest:            # one boot, many commands
            r = guest.run(["ls", "/dev/vfio"], cwd="/")
            r = guest.run_python("import guest_trace; print(guest_trace.start())")
    vmtest.run(["ls", "/dev/vfio"])            # one boot, one command
    python3 tools/vmtest/vmtest.py [options] -- COMMAND...

Commands run as root in a chroot of the host root: read-only, except fresh tmpfs on /tmp,
/run, /var/tmp and /dev/shm, and the shared results directory (mounted at its host path).
The root is cached by the guest (9p cache=loose): a host file changed after the guest read it
may look stale there, so pass generated files through the results directory (never cached).

Environment: VFIOPY_VMTEST_KERNEL (kernel image), VFIOPY_VMTEST_MODULES (its modules dir),
VFIOPY_VMTEST_CACHE (initramfs cache, default ~/.cache/vfiopy-vmtest), VFIOPY_VMTEST_QEMU,
VFIOPY_VMTEST_BUSYBOX. Another kernel than the host's (fetch-kernel.sh unpacks Debian's 6.12
and prints the two variables) boots with the host root all the same: a module the
guest loads later must come from VFIOPY_VMTEST_MODULES (`resolve_modules`, `module_bytes`),
not from the host root's /lib/modules.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import lzma
import math
import os
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ENV_KERNEL = "VFIOPY_VMTEST_KERNEL"
ENV_MODULES = "VFIOPY_VMTEST_MODULES"
ENV_CACHE = "VFIOPY_VMTEST_CACHE"
ENV_QEMU = "VFIOPY_VMTEST_QEMU"
ENV_BUSYBOX = "VFIOPY_VMTEST_BUSYBOX"

INSTALL_HINT = "install with `sudo tools/vmtest/install-deps.sh`"
GUEST_PYTHON = "/usr/bin/python3"
E1000E_ID = "8086:10d3"
EDU_ID = "1234:11e8"
IVSHMEM_ID = "1af4:1110"
# Each root port needs a 4 KiB I/O window for the e1000e's I/O BAR; x86 has 64 KiB of I/O
# ports. With 13 single NICs (15 windows with the pair's port and edu's bridge) SeaBIOS hangs.
MAX_E1000E = 12
# Loaded in this order after their dependencies; e1000e is deliberately absent.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "vfio", "vfio_iommu_type1", "vfio_pci")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# d88f521da3ef (5.15): the reset_method attribute; before it the kernel's order is fixed.
RESET_METHOD_ATTR = (5, 15)
INITRAMFS_FORMAT = 1  # bump when the initramfs layout changes in a way the inputs don't show

HERE = Path(__file__).resolve().parent


class VmError(RuntimeError):
    """The guest could not be built, booted, or driven."""


class RequirementError(VmError):
    """Something the guest needs is missing on the host."""


class GuestSetupError(VmError):
    """The guest booted but its devices are not as the layout promises."""


class GuestCommandError(VmError):
    """A command in the guest exited non-zero (raised by CommandResult.check())."""


# ---------------------------------------------------------------------------------------------
# Device layout


@dataclasses.dataclass(frozen=True)
class GuestDevice:
    name: str  # QEMU device id
    role: str  # "e1000e", "mf", "edu" or "ivshmem"
    bdf: str  # guest PCI address
    ids: str  # vendor:device
    bridge: str  # upstream bridge in the guest
    # Written to sysfs before the command runs; "" disables function reset; None: kernel default.
    reset_method: str | None


@dataclasses.dataclass(frozen=True)
class Layout:
    devices: tuple[GuestDevice, ...]
    qemu_args: tuple[str, ...]
    # Devices the guest unbinds from their driver: they share an IOMMU group with a test device
    # and their driver would make the group not viable for VFIO.
    unbind: tuple[str, ...] = ()

    def by_role(self, role: str) -> list[GuestDevice]:
        return [d for d in self.devices if d.role == role]

    def bdfs(self, role: str | None = None) -> list[str]:
        return [d.bdf for d in self.devices if role is None or d.role == role]


def layout(e1000e_count: int = 6) -> Layout:
    """The guest's PCI topology; see the module docstring for the table."""
    if not 0 <= e1000e_count <= MAX_E1000E:
        raise ValueError(f"e1000e_count must be 0..{MAX_E1000E}, not {e1000e_count}")
    devices: list[GuestDevice] = []
    args: list[str] = []
    for i in range(e1000e_count):
        slot, fn = 2 + i // 8, i % 8
        port = f"rp{i}"
        # Root ports as functions of one slot, like libvirt; QEMU gives them ACS, so each port
        # (and its NIC) is its own IOMMU group.
        mf = ",multifunction=on" if fn == 0 else ""
        args += [
            "-device",
            f"pcie-root-port,id={port},bus=pcie.0,addr={slot:#x}.{fn},chassis={i + 1}{mf}",
        ]
        args += ["-device", f"e1000e,id=nic{i},bus={port},addr=0.0,romfile="]
        devices.append(
            GuestDevice(f"nic{i}", "e1000e", f"0000:{i + 1:02x}:00.0", E1000E_ID,
                        f"0000:00:{slot:02x}.{fn}", "bus")
        )  # fmt: skip
    mf_bus = e1000e_count + 1
    args += ["-device", f"pcie-root-port,id=rpmf,bus=pcie.0,addr=0x4.0,chassis={MAX_E1000E + 1}"]
    args += ["-device", "e1000e,id=mf0,bus=rpmf,addr=0.0,multifunction=on,romfile="]
    args += ["-device", "e1000e,id=mf1,bus=rpmf,addr=0.1,romfile="]
    for fn in (0, 1):
        # No function reset (like a GPU with its audio function): vfio's only reset is then one
        # bus reset of the whole device set at its last close. `bus` is not possible as a
        # function reset here, the functions share the bus.
        devices.append(
            GuestDevice(f"mf{fn}", "mf", f"0000:{mf_bus:02x}:00.{fn}", E1000E_ID,
                        "0000:00:04.0", "")
        )  # fmt: skip
    edu_bus = e1000e_count + 2
    # Slot 1: QEMU's SHPC on this bridge refuses slot 0 ("Unsupported PCI slot 0 for
    # standard hotplug controller. Valid slots are between 1 and 31").
    args += ["-device", "pcie-pci-bridge,id=pcibr,bus=pcie.0,addr=0x5.0"]
    args += ["-device", "edu,id=edu,bus=pcibr,addr=1.0"]
    devices.append(
        GuestDevice("edu", "edu", f"0000:{edu_bus:02x}:01.0", EDU_ID, "0000:00:05.0", None)
    )
    ivshmem_bus = e1000e_count + 3
    # No I/O window for this port (ivshmem has no I/O BAR): SeaBIOS runs out of I/O space
    # with too many (see MAX_E1000E).
    args += ["-device", "pcie-root-port,id=rpivshmem,bus=pcie.0,addr=0x6.0,chassis="
             f"{MAX_E1000E + 2},io-reserve=0"]  # fmt: skip
    args += ["-object", "memory-backend-ram,id=ivmem,size=1M"]
    args += ["-device", "ivshmem-plain,id=ivshmem,memdev=ivmem,bus=rpivshmem,addr=0.0"]
    devices.append(
        GuestDevice("ivshmem", "ivshmem", f"0000:{ivshmem_bus:02x}:00.0", IVSHMEM_ID,
                    "0000:00:06.0", "bus")
    )  # fmt: skip
    # A PCIe-to-PCI bridge shares its group with the devices behind it. Its shpchp driver does
    # not declare driver-managed DMA (pcieport does), so while bound, the group is not viable.
    return Layout(tuple(devices), tuple(args), unbind=("0000:00:05.0",))


# ---------------------------------------------------------------------------------------------
# Host requirements


@dataclasses.dataclass(frozen=True)
class KernelImage:
    path: Path
    release: str
    modules_dir: Path

    @property
    def version(self) -> tuple[int, int]:
        """MAJOR.MINOR of the release, (0, 0) when it does not start with them."""
        m = re.match(r"(\d+)\.(\d+)", self.release)
        return (int(m[1]), int(m[2])) if m else (0, 0)


def _release_key(release: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", release)]


def _bzimage_release(path: Path) -> str | None:
    """The release string an x86 bzImage carries (setup header `kernel_version`)."""
    try:
        with path.open("rb") as f:
            head = f.read(0x4000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    (ptr,) = struct.unpack_from("<H", head, 0x20E)
    text = head[ptr + 0x200 : ptr + 0x300].split(b"\0")[0].decode(errors="replace")
    return text.split(" ")[0] or None


def find_kernel() -> KernelImage:
    """The kernel to boot: $VFIOPY_VMTEST_KERNEL, else the newest /boot/vmlinuz-*."""
    override = os.environ.get(ENV_KERNEL)
    if override:
        path = Path(override)
        if not path.is_file():
            raise RequirementError(f"{ENV_KERNEL}={override}: no such file")
        release = _bzimage_release(path) or path.name.removeprefix("vmlinuz-")
    else:
        images = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _release_key(p.name[8:]))
        if not images:
            raise RequirementError(
                f"no kernel in /boot/vmlinuz-*: {INSTALL_HINT} (linux-image-amd64)"
            )
        path = images[-1]
        release = path.name.removeprefix("vmlinuz-")
    modules = Path(os.environ.get(ENV_MODULES) or f"/lib/modules/{release}")
    if not os.access(path, os.R_OK):
        raise RequirementError(
            f"kernel {path} is not readable by this user (run as root, or chmod a+r it)"
        )
    if not (modules / "modules.dep").is_file():
        raise RequirementError(f"no {modules}/modules.dep for kernel {path} (set {ENV_MODULES})")
    return KernelImage(path, release, modules)


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP (dynamic loader) program header."""
    try:
        with path.open("rb") as f:
            ehdr = f.read(64)
            if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
                return False
            (phoff,) = struct.unpack_from("<Q", ehdr, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def find_busybox() -> Path:
    candidates = [os.environ.get(ENV_BUSYBOX, ""), "/bin/busybox", "/usr/bin/busybox"]
    for name in filter(None, candidates):
        path = Path(name)
        if _is_static_elf(path):
            return path
    raise RequirementError(f"no statically linked busybox (package busybox-static): {INSTALL_HINT}")


def find_qemu() -> Path:
    name = os.environ.get(ENV_QEMU, "qemu-system-x86_64")
    found = shutil.which(name)
    if not found:
        raise RequirementError(f"{name} not found (package qemu-system-x86): {INSTALL_HINT}")
    return Path(found)


def missing_requirements() -> list[str]:
    """Why the guest cannot run here, one reason per item; empty when it can."""
    missing: list[str] = []
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return [
            f"the QEMU guest tier needs an x86_64 Linux host, not {sys.platform}/{platform.machine()}"
        ]
    checks = (find_qemu, find_busybox)
    for check in checks:
        try:
            check()
        except RequirementError as err:
            missing.append(str(err))
    try:
        kernel = find_kernel()
        resolve_modules(kernel.modules_dir, GUEST_MODULES)
    except RequirementError as err:
        missing.append(str(err))
    if not os.access(GUEST_PYTHON, os.X_OK):
        missing.append(
            f"{GUEST_PYTHON} missing: the guest's helpers run under the host's system Python"
        )
    return missing


# ---------------------------------------------------------------------------------------------
# Initramfs


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base).replace("-", "_")


def resolve_modules(modules_dir: Path, names: Sequence[str]) -> list[Path]:
    """Module files for `names` and their dependencies, dependencies first (from modules.dep)."""
    deps: dict[str, list[str]] = {}
    files: dict[str, str] = {}
    try:
        dep_text = (modules_dir / "modules.dep").read_text()
    except OSError as err:
        raise RequirementError(f"cannot read {modules_dir}/modules.dep: {err}") from err
    for line in dep_text.splitlines():
        target, _, rest = line.partition(":")
        if not target:
            continue
        name = module_name(target)
        files[name] = target
        deps[name] = [module_name(d) for d in rest.split()]
    builtin: set[str] = set()
    with contextlib.suppress(OSError):
        builtin = {module_name(x) for x in (modules_dir / "modules.builtin").read_text().split()}

    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name not in files:
            raise RequirementError(
                f"kernel module {name} not in {modules_dir} (needed by {' <- '.join(chain) or 'vmtest'})"
            )
        for dep in deps[name]:
            visit(dep, (*chain, name))
        order.append(name)

    for name in names:
        visit(name.replace("-", "_"), ())
    return [modules_dir / files[name] for name in order]


def module_bytes(path: Path) -> bytes:
    """A module file as insmod takes it (decompressed)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        raise RequirementError(
            f"{path}: zstd-compressed modules are not supported (busybox insmod)"
        )
    return data


class _Cpio:
    """Writer for the newc cpio format the kernel unpacks as initramfs (no root needed)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        raw = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        header = b"070701" + b"".join(b"%08x" % v for v in fields)
        self._ino += 1
        self._out.write(header + raw + b"\0" * (-(len(header) + len(raw)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vfiopy-vmtest"


def build_initramfs(kernel: KernelImage, cache_dir: Path | None = None) -> Path:
    """The initramfs for `kernel`, from the cache unless one of its inputs changed."""
    busybox = find_busybox()
    modules = resolve_modules(kernel.modules_dir, GUEST_MODULES)
    init = (HERE / "guest_init.sh").read_bytes()
    key = hashlib.sha256(f"{INITRAMFS_FORMAT}\0{kernel.release}\0".encode() + init)
    for path in (busybox, *modules):
        st = path.stat()
        key.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    cache = cache_dir or default_cache_dir()
    target = cache / f"initramfs-{kernel.release}-{key.hexdigest()[:16]}.cpio"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initramfs-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            cpio = _Cpio(out)
            for d in (
                "bin",
                "dev",
                "etc",
                "lib",
                "lib/modules",
                "proc",
                "sys",
                "newroot",
                "results",
                "tmp",
            ):
                cpio.dir(d)
            # The kernel opens /dev/console for init's stdio before anything is mounted.
            cpio.chardev("dev/console", 5, 1)
            cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
            cpio.file("init", init, 0o755)
            names = []
            for path in modules:
                name = module_name(str(path)) + ".ko"
                cpio.file(f"lib/modules/{name}", module_bytes(path))
                names.append(name)
            cpio.file("etc/vmtest-modules", ("\n".join(names) + "\n").encode())
            cpio.close()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Drop images whose inputs changed, unless recent: another run may be about to boot one.
    for old in cache.glob("initramfs-*.cpio"):
        with contextlib.suppress(OSError):
            if old != target and time.time() - old.stat().st_mtime > 3600:
                old.unlink()
    return target


# ---------------------------------------------------------------------------------------------
# The guest


@dataclasses.dataclass(frozen=True)
class VmConfig:
    e1000e_count: int = 6
    cpus: int = 2
    memory_mib: int = 1024
    accel: str = "tcg"  # "kvm" works too where /dev/kvm is usable
    cpu: str = "max"
    boot_timeout: float = 180.0
    kernel: KernelImage | None = None  # default: find_kernel()
    cache_dir: Path | None = None
    extra_cmdline: tuple[str, ...] = ()
    extra_qemu_args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DeviceState:
    bdf: str
    driver: str  # "" when unbound
    iommu_group: str
    # Enabled methods, comma-separated ("" none); None when there is no reset_method attribute:
    # a kernel before 5.15 (d88f521da3ef added it), or a device with no reset method at all.
    reset_method: str | None


@dataclasses.dataclass(frozen=True)
class CommandResult:
    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float  # seconds the command ran in the guest (guest clock)
    timed_out: bool = False
    boot_seconds: float | None = None  # set by the one-shot run(): QEMU start to guest ready
    console: str = ""  # set by the one-shot run(): the guest's serial console

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> CommandResult:
        if self.returncode != 0 or self.timed_out:
            why = "timed out" if self.timed_out else f"exited {self.returncode}"
            raise GuestCommandError(
                f"guest command {shlex.join(self.command)} {why}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
            )
        return self


def _uptime(path: Path) -> float:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan


def _set_pdeathsig() -> None:
    # Runs in the child before exec: QEMU dies with the process that started it, even on SIGKILL.
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _kept_paths() -> list[str]:
    """Host paths the guest must see although they may lie under /tmp, /run or /var/tmp,
    which the guest covers with fresh tmpfs: this checkout (CI clones it anywhere), the
    running interpreter's environment and PYTHONPATH."""
    paths = {str(Path(__file__).resolve().parents[2]), sys.prefix, sys.base_prefix}
    paths.update(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    covered = ("/tmp/", "/run/", "/var/tmp/")
    return sorted(p for p in paths if p.startswith(covered) and " " not in p)


class Guest:
    """One booted guest that runs commands one after another until close()."""

    def __init__(
        self,
        config: VmConfig | None = None,
        *,
        results_dir: str | os.PathLike[str] | None = None,
        echo_console: bool = False,
    ) -> None:
        self.config = config or VmConfig()
        self.layout = layout(self.config.e1000e_count)
        self._own_results = results_dir is None
        base = (
            Path(results_dir)
            if results_dir is not None
            else Path(tempfile.mkdtemp(prefix="vfiopy-vmtest-"))
        )
        base.mkdir(parents=True, exist_ok=True)
        # The guest mounts the share at this same path inside the chroot: no symlinks in it.
        self.results_dir = base.resolve()
        self._ctl = self.results_dir / ".vmtest"
        self._echo = echo_console
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._console: list[str] = []
        self._lock = threading.Lock()
        self._jobs = 0
        self._dead: str | None = None
        self.boot_seconds: float | None = None
        self.guest_ready_uptime: float | None = None
        self.devices: dict[str, DeviceState] = {}
        self.kernel_version: tuple[int, int] = (0, 0)  # the booted kernel's MAJOR.MINOR
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], Guest] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # On an exception (Ctrl-C, a failed assertion mid-command) a graceful power-off would
        # wait for the running command: stop QEMU at once instead.
        self.close(timeout=60.0 if exc_type is None else 0.0)

    @property
    def usable(self) -> bool:
        """True while the guest is up and has not hung or died."""
        return self._proc is not None and self._dead is None and self._proc.poll() is None

    @property
    def console(self) -> str:
        with self._lock:
            return "".join(self._console)

    def qemu_command(self, kernel: KernelImage, initramfs: Path) -> list[str]:
        cfg = self.config
        qemu = find_qemu()
        accel = cfg.accel
        machine = "q35"
        if accel == "kvm":
            machine += ",kernel-irqchip=split"  # KVM's in-kernel irqchip cannot do intremap
        # no_timer_check: under TCG on a busy host the IO-APIC timer check can miss its
        # ticks and panic ("timer doesn't work through Interrupt-remapped IO-APIC").
        cmdline = [
            "console=ttyS0", "quiet", "panic=-1", "intel_iommu=on", "no_timer_check",
            "rdinit=/init", *cfg.extra_cmdline,
        ]  # fmt: skip
        share = "local,security_model=none,multidevs=remap"
        return [
            str(qemu),
            "-machine", machine, "-accel", accel, "-cpu", cfg.cpu,
            "-smp", str(cfg.cpus), "-m", str(cfg.memory_mib),
            "-nodefaults", "-no-user-config", "-nographic", "-monitor", "none", "-no-reboot",
            "-serial", "stdio", "-nic", "none",
            # Without this, q35's ACPI hotplug owns the root ports, their links never report
            # active and each bus reset costs ~2 s and fails.
            "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            # Interrupt remapping: without it Linux 6.1 refuses VFIO_SET_IOMMU (EPERM) unless
            # allow_unsafe_interrupts is set.
            "-device", "intel-iommu,intremap=on",
            "-kernel", str(kernel.path), "-initrd", str(initramfs), "-append", " ".join(cmdline),
            "-fsdev", f"{share},id=fsroot,path=/,readonly=on",
            "-device", "virtio-9p-pci,fsdev=fsroot,mount_tag=vmroot,bus=pcie.0,addr=0x8.0",
            "-fsdev", f"{share},id=fsresults,path={self.results_dir}",
            "-device", "virtio-9p-pci,fsdev=fsresults,mount_tag=vmresults,bus=pcie.0,addr=0x9.0",
            *self.layout.qemu_args,
            *cfg.extra_qemu_args,
        ]  # fmt: skip

    def _write_conf(self) -> None:
        if self._ctl.exists():
            shutil.rmtree(self._ctl)  # stale jobs from an earlier guest would run again
        (self._ctl / "jobs").mkdir(parents=True)
        bind = self.layout.bdfs()
        reset = [
            f"{d.bdf}={d.reset_method}" for d in self.layout.devices if d.reset_method is not None
        ]
        conf = (
            f"VMTEST_RESULTS={shlex.quote(str(self.results_dir))}\n"
            f"VMTEST_BIND={shlex.quote(' '.join(bind))}\n"
            f"VMTEST_RESET={shlex.quote(' '.join(reset))}\n"
            f"VMTEST_UNBIND={shlex.quote(' '.join(self.layout.unbind))}\n"
            f"VMTEST_KEEP={shlex.quote(' '.join(_kept_paths()))}\n"
        )
        (self._ctl / "conf").write_text(conf)

    def start(self) -> None:
        if self._proc is not None:
            raise VmError("guest already started")
        kernel = self.config.kernel or find_kernel()
        self.kernel_version = kernel.version
        initramfs = build_initramfs(kernel, self.config.cache_dir)
        self._write_conf()
        argv = self.qemu_command(kernel, initramfs)
        preexec = _set_pdeathsig if threading.current_thread() is threading.main_thread() else None
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=preexec, start_new_session=True,
        )  # fmt: skip
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        self._reader = threading.Thread(
            target=self._read_console, name="vmtest-console", daemon=True
        )
        self._reader.start()
        try:
            self._wait_ready(t0)
            self._read_devices()
        except BaseException:
            self._terminate()
            raise
        self.boot_seconds = time.monotonic() - t0

    def _read_console(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "")
            with self._lock:
                self._console.append(line)
            if self._echo:
                sys.stderr.write(line)

    def _console_tail(self, lines: int = 40) -> str:
        with self._lock:
            return "".join(self._console[-lines:])

    def _check_alive(self, doing: str) -> None:
        assert self._proc is not None
        if self._dead:
            raise VmError(f"guest is no longer usable: {self._dead}")
        rc = self._proc.poll()
        if rc is not None:
            if self._reader is not None:
                self._reader.join(5)
            self._dead = f"QEMU exited with status {rc} while {doing}"
            raise VmError(f"{self._dead}; console tail:\n{self._console_tail()}")

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.config.boot_timeout
        while True:
            fatal = self._ctl / "fatal"
            if fatal.exists():
                self._dead = f"guest setup failed: {fatal.read_text().strip()}"
                raise GuestSetupError(f"{self._dead}; console tail:\n{self._console_tail()}")
            if (self._ctl / "ready").exists():
                self.guest_ready_uptime = _uptime(self._ctl / "ready")
                return
            self._check_alive("booting")
            if time.monotonic() > deadline:
                self._dead = f"guest not ready after {self.config.boot_timeout:.0f} s"
                raise VmError(f"{self._dead}; console tail:\n{self._console_tail()}")
            time.sleep(0.05)

    def _read_devices(self) -> None:
        for line in (self._ctl / "devices").read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                bdf, driver, group, reset = (p if p != "-" else "" for p in parts)
                self.devices[bdf] = DeviceState(bdf, driver, group, None if reset == "?" else reset)
        problems = []
        for dev in self.layout.devices:
            state = self.devices.get(dev.bdf)
            if state is None:
                problems.append(f"{dev.bdf} ({dev.role}) not found in the guest")
            elif state.driver != "vfio-pci":
                problems.append(
                    f"{dev.bdf} ({dev.role}) bound to {state.driver or 'no driver'}, not vfio-pci"
                )
            elif state.reset_method is None and self.kernel_version < RESET_METHOD_ATTR:
                # No attribute to set: the kernel's own order decides (the console says so);
                # the tests ask vfiopy.kmodel what that order gives for this kernel.
                continue
            elif dev.reset_method is not None and state.reset_method != dev.reset_method:
                problems.append(
                    f"{dev.bdf} reset_method is {state.reset_method!r}, not {dev.reset_method!r}"
                )
        if problems:
            self._dead = "device setup failed"
            raise GuestSetupError(
                "guest devices differ from the layout:\n  "
                + "\n  ".join(problems)
                + f"\nconsole tail:\n{self._console_tail()}"
            )

    def close(self, timeout: float = 60.0) -> None:
        """Power the guest off (kill QEMU if it does not stop within `timeout`). Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None and not self._dead and timeout > 0:
            with contextlib.suppress(OSError):
                (self._ctl / "shutdown").touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self._terminate()
        if self._reader is not None:
            self._reader.join(10)  # QEMU is gone: the pipe reaches EOF
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._own_results:
            shutil.rmtree(self.results_dir, ignore_errors=True)
        elif self._ctl.is_dir():
            with contextlib.suppress(OSError):
                (self._ctl / "console.log").write_text(self.console)

    def _terminate(self) -> None:
        """Stop QEMU now (SIGTERM, then SIGKILL) and reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill(proc)
        if self._finalizer is not None:
            self._finalizer.detach()

    # -- commands ------------------------------------------------------------------------------

    def run(
        self,
        command: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        check: bool = False,
    ) -> CommandResult:
        """Run `command` in the guest's chroot of the host root and wait for it.

        The environment is a clean one (PATH, HOME=/tmp, LANG, PYTHONDONTWRITEBYTECODE, the
        host's PYTHONPATH if set) updated with `env`. `cwd` defaults to the host's cwd; it must
        exist in the guest (the host root; /tmp in the guest is a fresh tmpfs). After the command
        every process it left behind is killed, so its device files are released before the
        next command starts. Raises VmError when the guest dies or hangs.
        """
        if self._proc is None:
            raise VmError("guest not started")
        self._check_alive("waiting to run a command")
        if not command:
            raise ValueError("empty command")
        self._jobs += 1
        job = self._ctl / "jobs" / str(self._jobs)
        job.mkdir()
        full_env = {
            "PATH": GUEST_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        if os.environ.get("PYTHONPATH"):
            full_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        full_env.update(env or {})
        workdir = os.fspath(cwd) if cwd is not None else os.getcwd()
        script = (
            "#!/bin/sh\n"
            f"cd {shlex.quote(workdir)} || exit 125\n"
            f"exec env -i {' '.join(shlex.quote(f'{k}={v}') for k, v in full_env.items())} "
            f"{shlex.join(command)}\n"
        )
        (job / "job.sh").write_text(script)
        (job / "params").write_text(f"JOB_TIMEOUT={max(1, math.ceil(timeout))}\n")
        (job / "go").touch()
        deadline = time.monotonic() + timeout + 30  # grace: the guest kills the job itself
        status = job / "status"
        while not status.exists():
            self._check_alive(f"running {shlex.join(command)}")
            if time.monotonic() > deadline:
                self._dead = f"guest stopped answering during job {self._jobs}: {_brief(command)}"
                self._terminate()
                raise VmError(f"{self._dead}; console tail:\n{self._console_tail(80)}")
            time.sleep(0.02)
        rc = int(status.read_text().strip() or "255")
        elapsed = _uptime(job / "end") - _uptime(job / "start")
        # busybox timeout sends SIGKILL at the deadline: the shell reports 128 + 9.
        timed_out = rc == 137 and elapsed >= timeout - 0.5
        return_value = CommandResult(
            tuple(command), rc,
            (job / "stdout").read_text(errors="replace"), (job / "stderr").read_text(errors="replace"),
            elapsed, timed_out,
        )  # fmt: skip
        return return_value.check() if check else return_value

    def run_python(
        self,
        code: str,
        *args: str,
        pythonpath: Sequence[str | os.PathLike[str]] = (),
        **kwargs: Any,
    ) -> CommandResult:
        """Run `code` with the guest's /usr/bin/python3; `pythonpath` goes before site-packages.

        tools/vmtest is always importable, so `import guest_trace` works. Keyword arguments
        are those of run(); an `env` there is merged over PYTHONPATH.
        """
        env = {"PYTHONPATH": guest_pythonpath(*pythonpath, HERE)}
        env.update(kwargs.pop("env", None) or {})
        return self.run([GUEST_PYTHON, "-c", code, *args], env=env, **kwargs)


def _brief(command: Sequence[str], limit: int = 160) -> str:
    """A command on one short line, for messages repeated by every later test."""
    text = " ".join(shlex.join(command).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def guest_pythonpath(*first: str | os.PathLike[str]) -> str:
    """PYTHONPATH for the guest's /usr/bin/python3: `first`, then this interpreter's site-packages.

    The guest sees the host root, so host paths are valid there. Compiled extensions (cffi's)
    load only if this interpreter has the same minor version as /usr/bin/python3. Editable
    installs are .pth files, which PYTHONPATH entries do not run: pass the source tree in `first`.
    A virtualenv's own python (a real binary, not a pyenv shim) also runs in the guest directly.
    """
    paths = [os.fspath(p) for p in first]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    return os.pathsep.join(paths)


def run(
    command: Sequence[str],
    *,
    config: VmConfig | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    results_dir: str | os.PathLike[str] | None = None,
    echo_console: bool = False,
) -> CommandResult:
    """Boot a guest, run one command, power off."""
    with Guest(config, results_dir=results_dir, echo_console=echo_console) as guest:
        result = guest.run(command, cwd=cwd, env=env, timeout=timeout)
        boot = guest.boot_seconds
    return dataclasses.replace(result, boot_seconds=boot, console=guest.console)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmtest.py",
        description="Run COMMAND against real vfio-pci in a QEMU guest (chroot of the host root).",
        epilog="exit status: the command's; 2 usage, 3 missing requirements, 4 guest failure, "
        "124 command timed out",
    )
    parser.add_argument(
        "--e1000e", type=int, default=6, metavar="N", help="single e1000e NICs (default 6)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="command timeout, seconds")
    parser.add_argument("--boot-timeout", type=float, default=180.0, help="boot timeout, seconds")
    parser.add_argument("--cwd", help="working directory in the guest (default: current)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="extra environment"
    )
    parser.add_argument(
        "--results-dir", help="shared writable directory (kept); default: a temporary one"
    )
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="echo the guest console to stderr"
    )
    parser.add_argument("--layout", action="store_true", help="print the device layout and exit")
    parser.add_argument("--check", action="store_true", help="report missing requirements and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    if args.layout:
        for dev in layout(args.e1000e).devices:
            method = {None: "kernel default", "": "none"}.get(dev.reset_method, dev.reset_method)
            print(f"{dev.bdf}  {dev.ids}  {dev.role:7} behind {dev.bridge}  reset_method: {method}")
        return 0
    missing = missing_requirements()
    if args.check or missing:
        for reason in missing:
            print(f"vmtest: missing: {reason}", file=sys.stderr)
        return 3 if missing else 0
    if not command:
        parser.error("no command given (use -- COMMAND...)")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env wants K=V, not {item!r}")
        env[key] = value
    config = VmConfig(
        e1000e_count=args.e1000e, cpus=args.cpus, memory_mib=args.memory, accel=args.accel,
        boot_timeout=args.boot_timeout,
    )  # fmt: skip
    try:
        result = run(
            command, config=config, cwd=args.cwd, env=env, timeout=args.timeout,
            results_dir=args.results_dir, echo_console=args.verbose,
        )  # fmt: skip
    except VmError as err:
        print(f"vmtest: {err}", file=sys.stderr)
        return 4
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(
        f"vmtest: exit {result.returncode} in {result.elapsed:.2f} s (boot {result.boot_seconds or 0:.1f} s)"
        + (" TIMED OUT" if result.timed_out else ""),
        file=sys.stderr,
    )
    return 124 if result.timed_out else result.returncode


if __name__ == "__main__":
    sys.exit(main())
