"""BAR caching on one device with a prefetchable BAR: prints one JSON document.

Usage: python3 guest_bar_caching.py IVSHMEM NIC [--runs N] [--bursts N]

IVSHMEM is QEMU's ivshmem-plain (BAR0 registers, BAR2 shared RAM, 64-bit prefetchable);
NIC an e1000e (no prefetchable BAR).  In the guest the kernel is real; with
VFIOPY_SIMULATE=qemu-vmtest the same steps run on the simulator.  Each step records what
happened, never a verdict on timing:

  wc          BAR2 mapped through resource2_wc: the caching obtained, 4 KiB write bandwidth
              (``runs`` medians), pattern A written through it
  reset       Device.reset: the WC mapping retired before it, the error an access then gets
  wc_to_uc    mapped WC again (pattern A still there), pattern B written through it; then
              BAR2 mapped uncached: vfio-pci claims it, vfiopy retired the WC mapping first,
              the uncached mapping reads B; uncached bandwidth; pattern C written uncached
  claimed     resource2_wc refused while vfio-pci holds BAR2 (CONFIG_IO_STRICT_DEVMEM)
  uc_to_wc    device closed (the claim goes with the last close) and opened again: WC reads C;
              WC bandwidth again (after the uncached runs, so that drift shows)
  memory      a config write clearing PCI_COMMAND_MEMORY retires the WC mapping
  hot_reset   Device.hot_reset retires it too
  refused     write-combining on ivshmem's BAR0 and the NIC's BAR0 (not prefetchable), and
              through VFIO (no kernel feature): the errors
"""

from __future__ import annotations

import argparse
import errno
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

from vfiopy import Session, VfioError
from vfiopy.bench._mmio import write_mbps
from vfiopy.device import Device
from vfiopy.kernel import default_kernel
from vfiopy.pci import Command
from vfiopy.region import Caching, Mapping

A, B, C = (bytes([i]) * 64 for i in (0xA5, 0x5B, 0xC3))
OFF_A, OFF_B, OFF_C = 0x1000, 0x2000, 0x3000  # past the 4 KiB the bandwidth bursts use


def error_of(call: Callable[[], object]) -> dict[str, Any]:
    try:
        call()
    except VfioError as exc:
        return {"errno": exc.errno, "type": type(exc).__name__, "text": str(exc)}
    return {"errno": 0}


def bandwidth(m: Mapping, runs: int, bursts: int) -> dict[str, Any]:
    rates = [write_mbps(m, bursts) for _ in range(runs)]
    return {"runs_mbps": [round(r, 1) for r in rates], "median_mbps": statistics.median(rates)}


def retired(m: Mapping) -> dict[str, Any]:
    return {"closed": m.closed, "access": error_of(lambda: m.read32(OFF_A))}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ivshmem")
    ap.add_argument("nic")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bursts", type=int, default=1000)
    args = ap.parse_args(argv)
    kernel = default_kernel()
    out: dict[str, Any] = {}
    with Session(kernel) as session:
        dev = session.open_device(args.ivshmem)
        bar2 = dev.region(2)
        out["prefetchable"] = {"bar0": dev.region(0).prefetchable, "bar2": bar2.prefetchable}

        wc = bar2.mmap(caching="wc-sysfs")
        out["wc"] = {"caching": wc.caching.value, **bandwidth(wc, args.runs, args.bursts)}
        wc.write_bytes(OFF_A, A)

        dev.reset()
        out["reset"] = retired(wc)

        wc = bar2.mmap(caching=Caching.WC_SYSFS)
        step: dict[str, Any] = {"a_after_reset": wc.read_bytes(OFF_A, len(A)) == A}
        wc.write_bytes(OFF_B, B)
        uc = bar2.mmap()
        step |= {"wc": retired(wc), "caching": uc.caching.value}
        step["b_read_uncached"] = uc.read_bytes(OFF_B, len(B)) == B
        step |= bandwidth(uc, args.runs, args.bursts)
        uc.write_bytes(OFF_C, C)
        out["wc_to_uc"] = step

        out["claimed"] = error_of(lambda: bar2.mmap(caching="wc-sysfs"))
        session.close_device(dev)

        dev = session.open_device(args.ivshmem)
        bar2 = dev.region(2)
        wc = bar2.mmap(caching="wc-sysfs")
        out["uc_to_wc"] = {"c_read_wc": wc.read_bytes(OFF_C, len(C)) == C}
        # Measured again after the uncached runs, so drift over time shows.
        out["uc_to_wc"] |= bandwidth(wc, args.runs, args.bursts)

        cmd = dev.config.command
        dev.config.command = cmd & ~Command.MEMORY
        out["memory"] = retired(wc)
        dev.config.command = cmd

        wc = bar2.mmap(caching="wc-sysfs")
        dev.hot_reset()
        out["hot_reset"] = retired(wc)

        nic: Device = session.open_device(args.nic)
        out["refused"] = {
            "ivshmem_bar0": error_of(lambda: dev.region(0).mmap(caching="wc-sysfs")),
            "nic_bar0": error_of(lambda: nic.region(0).mmap(caching="wc-sysfs")),
            "nic_bar0_vfio": error_of(lambda: nic.region(0).mmap(caching="wc")),
            "vfio": error_of(lambda: dev.region(2).mmap(caching="wc")),
        }
    out["einval"] = errno.EINVAL
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
