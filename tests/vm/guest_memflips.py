"""In the vmtest guest: the PCI_COMMAND_MEMORY transitions of a plain open and of vfiopy's
bring-up (open, bus master, every BAR mapped, one MSI-X vector), from guest_memtrace."""

from __future__ import annotations

import contextlib
import json
import sys

import guest_memtrace as mt

from vfiopy import PciIrq
from vfiopy.errors import VfioError
from vfiopy.session import Session


def count(bdf: str, bring_up: bool) -> dict[str, object]:
    initial = mt.command_of(bdf)
    mt.start()
    with Session() as s:
        dev = s.open_device(bdf)
        if bring_up:
            dev.config.enable_bus_master()
            for r in dev.regions():
                if r.index <= 5 and r.areas:
                    r.mmap_all()
            with contextlib.suppress(VfioError):
                dev.irq(PciIrq.MSIX).enable(1)
        writes = mt.read()  # before the close: its release is not the bring-up's
        flips = mt.transitions(writes, bdf, initial)
        final = mt.command_of(bdf)
    mt.stop()
    mine = [w.command for w in writes if w.bdf == bdf and w.command is not None]
    return {"initial": initial, "flips": flips, "writes": mine, "final": final}


def main() -> None:
    bdf = sys.argv[1]
    out = {"open": count(bdf, False), "bringup": count(bdf, True)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
