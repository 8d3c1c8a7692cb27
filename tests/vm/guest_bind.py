"""In the vmtest guest: vfiopy-bind on two e1000e NICs with the real e1000e driver.

Loads e1000e (the guest blacklists nothing, but loads it only here) from the module files the
host gives (those of the kernel the guest booted: it need not be the host root's), puts the NICs on it
(``restore --driver``), binds them to vfio-pci, restores them from the state file, brings one
interface up and checks the refusal, then leaves both NICs on vfio-pci again and unloads
e1000e, as the other tests expect. Prints one JSON document: each step's exit status, its
JSON report, and the drivers seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any

STATE = "/tmp/vfiopy-bind-test.json"


def bind_cli(*argv: str) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "vfiopy.bind", *argv, "--state", STATE, "--json", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = p.stdout.splitlines()
    return {
        "rc": p.returncode,
        "doc": json.loads(lines[0]) if len(lines) == 1 else None,
        "stdout_lines": len(lines),
        "stderr": p.stderr[-2000:],
    }


def driver(addr: str) -> str | None:
    link = f"/sys/bus/pci/devices/{addr}/driver"
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def interface(addr: str) -> str | None:
    with contextlib.suppress(OSError):
        names = os.listdir(f"/sys/bus/pci/devices/{addr}/net")
        return names[0] if names else None
    return None


def main() -> None:
    """Usage: guest_bind.py MODULE.ko... -- NIC NIC (the modules in load order)."""
    split = sys.argv.index("--")
    modules, nics = sys.argv[1:split], sys.argv[split + 1 : split + 3]
    out: dict[str, Any] = {"nics": nics}
    for ko in modules:
        ins = subprocess.run(["insmod", ko], capture_output=True, text=True, check=False)
        out["insmod"] = {"rc": ins.returncode, "stderr": ins.stderr, "module": ko}
        if ins.returncode:
            break
    try:
        out["to_e1000e"] = bind_cli("restore", "--driver", "e1000e", *nics)
        out["drivers_host"] = [driver(a) for a in nics]
        out["bind"] = bind_cli("bind", *nics)
        out["drivers_bound"] = [driver(a) for a in nics]
        out["restore"] = bind_cli("restore")
        out["drivers_restored"] = [driver(a) for a in nics]
        ifname = interface(nics[0])
        out["ifname"] = ifname
        if ifname:
            up = subprocess.run(["ip", "link", "set", ifname, "up"], capture_output=True, text=True)
            out["ip_up"] = up.returncode
            out["refused"] = bind_cli("bind", *nics)
            out["drivers_after_refusal"] = [driver(a) for a in nics]
            subprocess.run(["ip", "link", "set", ifname, "down"], capture_output=True, check=False)
        out["bind_again"] = bind_cli("bind", *nics)
        out["drivers_end"] = [driver(a) for a in nics]
    finally:
        # Whatever happened: the NICs back on vfio-pci, e1000e gone.
        for a in nics:
            if driver(a) != "vfio-pci":
                with contextlib.suppress(OSError):
                    with open(f"/sys/bus/pci/devices/{a}/driver_override", "w") as f:
                        f.write("vfio-pci")
                    if driver(a):
                        with open(f"/sys/bus/pci/devices/{a}/driver/unbind", "w") as f:
                            f.write(a)
                    with open("/sys/bus/pci/drivers_probe", "w") as f:
                        f.write(a)
        rm = subprocess.run(["rmmod", "e1000e"], capture_output=True, text=True, check=False)
        out["rmmod"] = rm.returncode
        out["drivers_final"] = [driver(a) for a in nics]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
