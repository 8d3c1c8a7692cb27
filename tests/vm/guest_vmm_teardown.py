"""Runs in the guest: `python -m vfiopy.release --pid` and its `--watch` guardian against a real
QEMU (qemu_vmm) holding the test devices, next to QEMU's own exit; resets counted with
guest_trace. Standard library only here (the CLIs run as separate processes, as they must: QEMU
is this process's child and only it reaps QEMU).

1. exit: QEMU holds the six NICs and the pair; SIGTERM; QEMU's own exit releases the files one
   after another (the baseline);
2. pid: the same QEMU; `python3 -m vfiopy.release --pid QEMU --json` takes its files, signals it,
   waits for its exit and releases the device sets in parallel;
3. guard: QEMU holds five NICs and the pair with one empty root port; `--pid QEMU --watch --json`
   takes its files; the sixth NIC is hot-plugged (the guardian takes it) and unplugged again
   (the guardian lets go: the NIC opens from this process while QEMU runs); then QEMU is
   killed with SIGKILL and the guardian releases the rest.

Every device is opened (and closed) again after each teardown. Times are CLOCK_MONOTONIC
(guest_trace's clock); the CLIs' log timestamps (wall clock) are brought onto it.

Prints one JSON document, or with --bench only the measured numbers
(docs/bench/real-qemu-vmm.json). Usage: python3 guest_vmm_teardown.py [--bench] NIC... -- PAIR...
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import guest_trace
from guest_vmm import reopen, resets
from qemu_vmm import SYSFS_PCI, ExpectedFiles, Vmm, VmmError, iommu_group, vfio_files

REPRODUCE = (
    "python tools/vmtest/vmtest.py --timeout 300 --cwd $PWD --env PYTHONPATH=$PWD:$PWD/tools/vmtest:"
    "$(python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])') -- "
    "/usr/bin/python3 tests/vm/guest_vmm_teardown.py --bench 0000:0{1,2,3,4,5,6}:00.0 -- "
    "0000:07:00.0 0000:07:00.1 > docs/bench/real-qemu-vmm.json"
)
CLI_TIMEOUT = 300.0
WAIT_TIMEOUT = 120.0


class Cli:
    """`python3 -m vfiopy.release --json ARGS` in the background; stderr to a file."""

    def __init__(self, *args: str) -> None:
        self.args = list(args)
        self.stderr_path = Path(tempfile.mkstemp(prefix="vfiopy-release-", suffix=".err")[1])
        self.started_at = time.monotonic()
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vfiopy.release", "--json", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.exited_at: float | None = None
        self.released_at: float | None = None  # first seen holding no VFIO file, after some
        self._watcher = threading.Thread(target=self._watch_files, daemon=True)
        self._watcher.start()

    def _watch_files(self) -> None:
        # Every 10 ms: cheap next to the releases, and the only view of when the tool's last
        # VFIO file (the container, after the devices and groups) was closed.
        seen = False
        while True:
            try:
                held = sum(vfio_files(self.pid).counts().values())
            except VmmError:
                held = 0  # gone (a zombie lists no fds either)
            if held:
                seen = True
            elif seen:
                self.released_at = time.monotonic()
                return
            if self.proc.returncode is not None:
                return
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        """Its structlog events (JSON lines on stderr), timestamps on the monotonic clock."""
        offset = time.time() - time.monotonic()
        out = []
        for line in self.stderr.splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
                ts = datetime.datetime.fromisoformat(event["timestamp"]).timestamp()
            except (ValueError, KeyError, TypeError):
                continue
            event["mono"] = ts - offset
            out.append(event)
        return out

    def event_at(self, name: str) -> float | None:
        return next((e["mono"] for e in self.events() if e.get("event") == name), None)

    def finish(self, timeout: float = CLI_TIMEOUT) -> dict[str, Any]:
        try:
            stdout, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            stdout, _ = self.proc.communicate()
        self.exited_at = time.monotonic()
        self._watcher.join()
        try:
            report = json.loads(stdout) if stdout.strip() else None
        except ValueError:
            report = None
        return {
            "argv": self.args,
            "returncode": self.proc.returncode,
            "report": report,
            "stdout": None if report is not None else stdout[-4000:],
            "stderr": self.stderr[-12000:],
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr_path.unlink(missing_ok=True)


def wait_until(
    what: str, check: Callable[[], bool], cli: Cli, timeout: float = WAIT_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if cli.proc.poll() is not None:
            raise VmmError(
                f"waiting for {what}: the CLI exited ({cli.proc.returncode})\n{cli.stderr}"
            )
        if time.monotonic() > deadline:
            raise VmmError(f"waiting for {what}: not within {timeout:.0f} s\n{cli.stderr}")
        time.sleep(0.05)


def holds(pid: int, expected: ExpectedFiles) -> bool:
    try:
        return expected.held_by(vfio_files(pid))
    except VmmError:
        return False


def serial(bdf: str) -> str | None:
    """The PCIe Device Serial Number of `bdf` from its sysfs config (root sees the extended
    space), as hex; None without one. What tells identical functions apart by config."""
    try:
        ext = (SYSFS_PCI / bdf / "config").read_bytes()[0x100:0x1000]
    except OSError:
        return None
    off, seen = 0x100, 0
    while 0x100 <= off <= 0x100 + len(ext) - 12 and seen < 64:
        (hdr,) = struct.unpack_from("<I", ext, off - 0x100)
        if hdr in (0, 0xFFFFFFFF):
            return None
        if hdr & 0xFFFF == 3:  # PCI_EXT_CAP_ID_DSN
            lo, hi = struct.unpack_from("<II", ext, off - 0x100 + 4)
            return f"{hi << 32 | lo:016x}"
        off, seen = hdr >> 20, seen + 1
    return None


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def running(pid: int) -> bool:
    """Whether `pid` is alive (not exited, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 6)


def timing(
    signal_at: float | None,
    bus: list[dict[str, Any]],
    released_at: float | None,
    done_at: float | None,
) -> dict[str, Any]:
    """From the signal: to the first reset's start, the last reset's end, the last VFIO file
    closed, and the releasing process's end."""
    ends = [e["end"] for e in bus if e["end"] is not None]
    return {
        "signal_at": signal_at,
        "signal_to_first_reset_start_s": since(
            signal_at, min(e["start"] for e in bus) if bus else None
        ),
        "signal_to_last_reset_end_s": since(signal_at, max(ends) if ends else None),
        "signal_to_all_released_s": since(signal_at, released_at),
        "signal_to_done_s": since(signal_at, done_at),
    }


def exit_phase(out: dict[str, Any], nics: list[str], pair: list[str]) -> None:
    vmm = Vmm([*nics, pair])
    try:
        vmm.start()
        out["qemu_comm"] = comm(vmm.pid)
        out["files"] = vmm.vfio_files().to_json()
        guest_trace.clear()
        exit_ = vmm.terminate()
        out["returncode"] = exit_.returncode
        out["resets"] = resets(nics + pair)
        # QEMU is reaped after its exit closed every file: released and done at once
        out["timing"] = timing(
            exit_.signal_at, out["resets"]["bus"], exit_.exited_at, exit_.exited_at
        )
    finally:
        vmm.close()
    out["reopen"] = reopen(nics + pair)


def pid_phase(out: dict[str, Any], nics: list[str], pair: list[str]) -> None:
    vmm = Vmm([*nics, pair])
    cli: Cli | None = None
    try:
        vmm.start()
        out["qemu_pid"] = vmm.pid
        out["files"] = vmm.vfio_files().to_json()
        guest_trace.clear()
        out["qemu_comm"] = comm(vmm.pid)
        cli = Cli("--pid", str(vmm.pid))
        out["cli_comm"] = comm(cli.pid)
        out["cli"] = cli.finish()
        out["qemu_returncode"] = vmm.wait(60)
        out["resets"] = resets(nics + pair)
        signal_at = cli.event_at("release.signal")
        exited_at = cli.event_at("release.process_exited")
        out["timing"] = {
            **timing(signal_at, out["resets"]["bus"], cli.released_at, cli.exited_at),
            "start_to_signal_s": since(cli.started_at, signal_at),
            "signal_to_qemu_exit_s": since(signal_at, exited_at),
        }
    finally:
        if cli is not None:
            cli.close()
        vmm.close()
    out["reopen"] = reopen(nics + pair)


def let_go(cli: Cli, link: str) -> bool:
    return any(
        e.get("event") == "release.watch_let_go" and e.get("link") == link for e in cli.events()
    )


def guard_phase(out: dict[str, Any], nics: list[str], pair: list[str]) -> None:
    cold, hot = nics[:-1], nics[-1]
    vmm = Vmm([*cold, pair], hotplug_ports=1)
    cli: Cli | None = None
    try:
        vmm.start()
        out["qemu_pid"] = vmm.pid
        out["qemu_comm"] = comm(vmm.pid)
        out["files"] = vmm.vfio_files().to_json()
        cli = Cli("--pid", str(vmm.pid), "--watch")
        out["guardian_pid"] = cli.pid
        out["cli_comm"] = comm(cli.pid)
        marker = f"pid {vmm.pid}: "
        wait_until("the guardian's takeover", lambda: marker in cli.stderr, cli)
        wait_until("the guardian's files", lambda: holds(cli.pid, vmm.expected_files()), cli)
        out["guardian_start"] = vfio_files(cli.pid).counts()
        out["takeover_lines"] = [ln for ln in cli.stderr.splitlines() if not ln.startswith("{")]
        # hot-plug: QEMU opens the NIC's group and device; the guardian takes them
        vmm.device_add("hp0", hot, device_id="hot")
        out["qemu_added"] = vmm.vfio_files().counts()
        wait_until(
            "the guardian to take the hot NIC", lambda: holds(cli.pid, vmm.expected_files()), cli
        )
        out["guardian_added"] = vfio_files(cli.pid).counts()
        # hot-unplug: QEMU closes them; the guardian lets go and the NIC reaches the host
        guest_trace.clear()
        out["deleted"] = [e["data"]["device"] for e in vmm.device_del("hot")]
        out["qemu_deleted"] = vmm.vfio_files().counts()
        group_link = f"/dev/vfio/{iommu_group(hot)}"
        for link in ("anon_inode:[vfio-device]", group_link):
            wait_until(
                f"the guardian to let go of {link}", functools.partial(let_go, cli, link), cli
            )
        wait_until(
            "the guardian to drop the hot NIC", lambda: holds(cli.pid, vmm.expected_files()), cli
        )
        out["guardian_deleted"] = vfio_files(cli.pid).counts()
        out["unplug_resets"] = resets([hot])
        out["unplug_reopen"] = reopen([hot])
        out["qemu_running_at_reopen"] = running(vmm.pid)
        out["watch_lines"] = [
            ln for ln in cli.stderr.splitlines() if " let go " in ln or " taken " in ln
        ]
        # the crash: the guardian releases everything QEMU held
        guest_trace.clear()
        exit_ = vmm.stop(signal.SIGKILL)
        out["qemu_returncode"] = exit_.returncode
        out["qemu_reaped_s"] = exit_.seconds
        out["cli"] = cli.finish()
        out["resets"] = resets([*cold, *pair, hot])
        out["timing"] = {
            **timing(exit_.signal_at, out["resets"]["bus"], cli.released_at, cli.exited_at),
            # the guardian saw the exit (its watch loop ended; then it plans and releases)
            "signal_to_noticed_s": since(exit_.signal_at, cli.event_at("release.process_exited")),
        }
    finally:
        if cli is not None:
            cli.close()
        vmm.close()
    out["reopen"] = reopen(nics + pair)


def overlap(bus: list[dict[str, Any]]) -> int:
    """The most resets running at one instant (as vfiopy.release._report.max_overlap)."""
    edges = sorted(e for r in bus for e in ((r["start"], 1), (r["end"], -1)))
    best = cur = 0
    for _, step in edges:
        cur += step
        best = max(best, cur)
    return best


def bench(doc: dict[str, Any], nics: list[str], pair: list[str]) -> dict[str, Any]:
    """The measured numbers: per teardown, time from the signal, resets, their overlap."""

    def row(mode: str, phase: dict[str, Any], what: str) -> dict[str, Any]:
        bus = phase["resets"]["bus"]
        return {
            "mode": mode,
            "what": what,
            **{k: v for k, v in phase["timing"].items() if k != "signal_at"},
            "resets": len(bus),
            "reset_tasks": len({e["pid"] for e in bus}),
            "max_concurrent_resets": overlap(bus),
            "reset_durations_s": [round(e["end"] - e["start"], 6) for e in bus],
            "ok": all(v == 0 for v in phase["reopen"].values()),
        }

    g = doc["guard"]
    return {
        "schema": 1,
        "machine": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "qemu": "nested qemu-system-x86_64 under TCG, guest CPU stopped (-S)",
        },
        "devices": {"nics": nics, "pair": pair, "serials": doc["serials"]},
        "command": REPRODUCE,
        "notes": [
            "signal_to_all_released_s: until the last VFIO file (device, group, container) was "
            "closed: exit = QEMU reaped; pid / guard-kill = the release tool seen (every 10 ms) "
            "holding none",
            "signal_to_done_s: exit = QEMU reaped; pid / guard-kill = the release tool's process "
            "gone (JSON written, interpreter shut down)",
            "signal_to_last_reset_end_s: from the signal to the end of the last reset traced "
            "(kprobes, CLOCK_MONOTONIC); the --pid signal time is its release.signal log event",
            "guard-kill: QEMU held 5 NICs and the pair; the 6th NIC was hot-plugged and "
            "unplugged before (its one reset: unplug_resets)",
            "guard-kill signal_to_noticed_s: the guardian's watch loop saw the exit; from there to "
            "the first reset it plans the release (sysfs) and starts its workers",
            "one run in a TCG guest on a 2-CPU host shared with other work: the times vary by tens "
            "of percent from run to run (so do the overlap and the worker threads), the resets and "
            "the files do not",
        ],
        "runs": [
            row("exit", doc["exit"], "QEMU's own exit on SIGTERM, 6 NICs + pair"),
            row("pid", doc["pid"], "python -m vfiopy.release --pid, SIGTERM, 6 NICs + pair"),
            row("guard-kill", g, "--pid --watch guardian, QEMU killed (SIGKILL), 5 NICs + pair"),
        ],
        "unplug_resets": len(g["unplug_resets"]["bus"]),
    }


def main(argv: Sequence[str]) -> int:
    bench_only = "--bench" in argv
    argv = [a for a in argv if a != "--bench"]
    split = argv.index("--")
    nics, pair = list(argv[:split]), list(argv[split + 1 :])
    doc: dict[str, Any] = {"serials": {b: serial(b) for b in nics + pair}}
    guest_trace.start()
    try:
        for name, phase in (("exit", exit_phase), ("pid", pid_phase), ("guard", guard_phase)):
            doc[name] = {}
            try:
                phase(doc[name], nics, pair)
            except Exception:  # reported with what the phase saw so far; the next one runs
                doc[name]["error"] = traceback.format_exc()
    finally:
        guest_trace.stop()
    if not any("error" in doc[name] for name in ("exit", "pid", "guard")):
        doc["bench"] = bench(doc, nics, pair)
    if bench_only:
        print(json.dumps(doc.get("bench", doc), indent=1))
    else:
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
