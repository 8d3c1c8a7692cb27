"""contrib/vfiopy-hook on the real kernel: a libvirt `started` guardian outlives a killed QEMU.

One guest command: the guest's QEMU (tests/vm/qemu_vmm.py) holds the six NICs and the pair; the
hook runs as libvirt runs it at `started`, with QEMU's pid file where libvirt keeps it (moved to a
temporary directory) and the setsid launcher (the guest has no systemd); once the guardian holds
every device file, QEMU gets SIGKILL, as libvirt's last resort; then the hook runs at `stopped`
and waits for the guardian. The guardian's JSON report and exit status come back.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import vmtest
from conftest import REPO, Guests

pytestmark = pytest.mark.vm

GUEST_CODE = r"""
import json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path
from qemu_vmm import Vmm, vfio_files

repo, args = Path(sys.argv[1]), sys.argv[2:]
cut = args.index("--")
nics, pair = args[:cut], tuple(args[cut + 1:])
hook = str(repo / "contrib" / "vfiopy-hook")
work = Path(tempfile.mkdtemp(prefix="vfiopy-hook-"))
(work / "libvirt").mkdir()
wrapper = work / "vfiopy-release"  # the guardian, its exit status kept
wrapper.write_text(
    f'#!/bin/sh\n{sys.executable} -m vfiopy.release "$@"\necho $? >{work}/status\n'
)
wrapper.chmod(0o755)
env = dict(
    os.environ,
    VFIOPY_CONFIG=str(work / "none"),
    VFIOPY_LAUNCHER="setsid",
    VFIOPY_RELEASE=str(wrapper),
    VFIOPY_RUN_DIR=str(work / "run"),
    VFIOPY_LIBVIRT_PID_DIR=str(work / "libvirt"),
    VFIOPY_HOOK_LOG=str(work / "hook.log"),
    VFIOPY_STOP_WAIT="240",
)
xml = "<domain type='kvm'>\n  <name>guest</name>\n  <devices>\n" + "".join(
    "    <hostdev mode='subsystem' type='pci' managed='yes'>\n"
    f"      <source><address domain='0x0000' bus='0x{a[5:7]}' slot='0x{a[8:10]}' "
    f"function='0x{a[11]}'/></source>\n    </hostdev>\n"
    for a in [*nics, *pair]
) + "  </devices>\n</domain>\n"


def hook_run(op):
    r = subprocess.run([hook, "guest", op, "begin" if op == "started" else "end", "-"],
                       input=xml, env=env, capture_output=True, text=True, timeout=300)
    return {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def guardian_pid():
    wrapper_pid = int((work / "run" / "libvirt-guest.pid").read_text().split()[0])
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(") ")[2].split()[1]) == wrapper_pid:
                return int(p.name)
    return None


out = {}
with Vmm([*nics, pair]) as vmm:
    (work / "libvirt" / "guest.pid").write_text(f"{vmm.pid}\n")
    out["qemu_files"] = vmm.vfio_files().counts()
    out["started"] = hook_run("started")
    held = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        pid = guardian_pid()
        try:
            held = vfio_files(pid).counts().get("device", 0) if pid else 0
        except OSError:
            held = 0
        if held == len(nics) + len(pair):
            break
        time.sleep(0.1)
    out["guardian_held"] = held
    vmm.send_signal(signal.SIGKILL)
    out["qemu_returncode"] = vmm.wait(240)
    out["stopped"] = hook_run("stopped")
run = work / "run"
out["report"] = json.loads((run / "libvirt-guest.json").read_text() or "null")
out["status"] = (work / "status").read_text().strip() if (work / "status").exists() else None
out["guardian_log"] = (run / "libvirt-guest.log").read_text()[-4000:]
out["hook_log"] = (work / "hook.log").read_text()
print(json.dumps(out))
"""


def test_started_guardian_releases_everything_after_sigkill(
    guests: Guests, layout: vmtest.Layout
) -> None:
    nics, pair = layout.bdfs("e1000e"), layout.bdfs("mf")
    result = guests.run_python(
        GUEST_CODE,
        str(REPO),
        *nics,
        "--",
        *pair,
        pythonpath=[REPO, REPO / "tests" / "vm"],
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.output
    r: dict[str, Any] = json.loads(result.stdout)
    assert r["started"]["returncode"] == 0 and r["started"]["stdout"] == "", r["started"]
    assert r["guardian_held"] == len(nics) + len(pair), r["guardian_log"]
    assert r["qemu_returncode"] == -9
    assert r["stopped"]["returncode"] == 0, r["stopped"]
    assert "has finished" in r["hook_log"], r["hook_log"]
    report = r["report"]
    assert r["status"] == "0", (r["status"], r["guardian_log"])
    assert report["ok"], report
    assert sorted(d["address"] for d in report["devices"]) == sorted(nics + pair)
    assert all(d["status"] == "released" for d in report["devices"]), report["devices"]
