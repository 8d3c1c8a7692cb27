"""Runs in the guest: vfiopy.release on the real kernel, resets counted with guest_trace.

One process does all of it, to pay the guest's slow interpreter start-up few times:

1. the release manager's API: acquire the six NICs and the pair, reset them, release them;
2. `python -m vfiopy.release ADDR...` resets and releases the pair and edu;
3. a VMM-like child opens the six NICs through vfiopy and sleeps, and
   `python -m vfiopy.release --pid <child>` tears it down and releases its NICs.

The phases run one after another: with the interpreter start-ups of the child and of a CLI
overlapping, the TCG guest once stalled (an RCU stall on a vCPU), so nothing here overlaps.

Prints one JSON document: per phase, the reports and the resets (guest_trace events) seen.
Usage: python3 guest_release.py NIC... -- PAIR... -- EDU
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import guest_trace
import structlog

from vfiopy.release import ObservedReset, Report, acquire, release, reset
from vfiopy.session import Session

VMM_CODE = """
import sys, time
import structlog
from vfiopy import Session
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
session = Session()
devices = [session.open_device(a) for a in sys.argv[1:]]
print("ready", flush=True)
time.sleep(600)
"""


def resets(events: Sequence[guest_trace.ResetEvent], bdfs: Sequence[str]) -> dict[str, Any]:
    """Per device: bus resets that hit it and function resets of it; and the bus and the
    function reset events."""
    out: dict[str, Any] = {
        "counts": {
            bdf: {
                "bus": guest_trace.bus_resets_of(events, bdf, only_ok=False),
                "function": sum(1 for e in events if e.kind == "function" and e.dev == bdf),
            }
            for bdf in bdfs
        },
    }
    for kind in ("bus", "function"):
        mine = [e for e in events if e.kind == kind and set(e.affected) & set(bdfs)]
        out[kind] = guest_trace.to_json(mine)
    return out


def observed(report: Report, events: Sequence[guest_trace.ResetEvent]) -> dict[str, Any]:
    """The report's JSON, with the resets the tracer saw set beside the model's prediction."""
    report.observe("guest kprobes", [ObservedReset(m, t) for m, t in guest_trace.performed(events)])
    return report.to_json()


def api_phase(nics: list[str], pair: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wanted = nics + pair
    with Session() as session:
        guest_trace.clear()
        devices = anyio.run(acquire, session, wanted)
        out["acquired"] = [str(d.address) for d in devices]
        out["acquire"] = resets(guest_trace.read(), wanted)
        guest_trace.clear()
        report = anyio.run(reset, session)
        events = guest_trace.read()
        out["reset_report"] = observed(report, events)
        out["reset"] = resets(events, wanted)
        guest_trace.clear()
        report = anyio.run(release, session)
        events = guest_trace.read()
        out["release_report"] = observed(report, events)
        out["release"] = resets(events, wanted)
        out["open_after_release"] = [str(d.address) for d in session.devices]
    return out


def cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vfiopy.release", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=timeout)
    try:
        doc = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        doc = None
    return {"returncode": proc.returncode, "report": doc, "stderr": stderr[-4000:]}


def process_phases(nics: list[str], pair: list[str], edu: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    guest_trace.clear()
    out["addr"] = finish(cli(*pair, *edu))
    out["addr"]["resets"] = resets(guest_trace.read(), pair + edu)
    guest_trace.clear()
    vmm = subprocess.Popen(
        [sys.executable, "-c", VMM_CODE, *nics],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert vmm.stdout is not None
    ready = ""
    while ready != "ready":
        line = vmm.stdout.readline()
        if not line:
            break
        ready = line.strip()
    out["vmm_ready"] = ready == "ready"
    events = guest_trace.read()
    out["vmm_open"] = resets(events, nics)
    if ready != "ready":
        vmm.kill()
        out["vmm_stderr"] = vmm.communicate(timeout=30)[1][-4000:]
        return out
    guest_trace.clear()
    t0 = time.monotonic()
    out["pid"] = finish(cli("--pid", str(vmm.pid)))
    out["pid"]["wall_s"] = time.monotonic() - t0
    out["pid"]["resets"] = resets(guest_trace.read(), nics)
    try:
        out["vmm_returncode"] = vmm.wait(timeout=30)
    except subprocess.TimeoutExpired:
        vmm.kill()
        out["vmm_returncode"] = None
    return out


def main(argv: Sequence[str]) -> int:
    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            groups.append([])
        else:
            groups[-1].append(arg)
    nics, pair, edu = groups
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    guest_trace.start()
    try:
        doc = {"api": api_phase(nics, pair), **process_phases(nics, pair, edu)}
    finally:
        guest_trace.stop()
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
