#!/usr/bin/env python3
"""Port I/O through VFIO: the e1000e's I/O BAR, an indirect window onto its registers.

An Intel 82574L (PCI 8086:10d3, QEMU's ``e1000e``) decodes its registers twice: in BAR0
(memory, mmapped here, one load per read) and through BAR2, 32 bytes of I/O ports that
form a window: write a register's offset to IOADDR (port offset 0), then read or write
the register at IODATA (port offset 4).  VFIO gives an I/O BAR no mmap: each port access
is a ``pread`` or ``pwrite`` on the device fd, which vfio-pci turns into one ``in`` or
``out`` instruction (``vfio_pci_bar_rw``).

The steps, each printed:

    open       session, device fd; BAR0 mmapped; BAR2 checked to be an I/O BAR in config
    status     STATUS (0x08) read through BAR0, through the window, through BAR0 again:
               the window's value is one of the two memory reads (the link bits may move)
    ioaddr     IOADDR reads back the offset written to it
    cost       the time of an IODATA read (one pread), of an indirect register read
               (pwrite of IOADDR + pread of IODATA) and of a BAR0 read32, averaged over
               --count accesses each

Usage:
    python examples/e1000e_ioport.py [ADDR] [--simulate qemu-vmtest] [--json] [--count N]

Without ADDR it takes the first e1000e bound to vfio-pci.  Exit status: 0 every check
passed, 1 the device failed a check or could not be used, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from vfiopy import AddressError, Kernel, PciAddress, Session, Sysfs
from vfiopy._uapi import PciRegion, RegionFlag
from vfiopy.kernel import default_kernel
from vfiopy.simulate import machine_of, simulated_kernel

SCHEMA = "vfiopy.examples.e1000e_ioport/1"
EXIT_OK, EXIT_DEVICE, EXIT_USAGE = 0, 1, 2

E1000E_VENDOR, E1000E_DEVICE = 0x8086, 0x10D3
MMIO_BAR, IO_BAR = PciRegion.BAR0, PciRegion.BAR2
IOADDR, IODATA = 0x00, 0x04  # port offsets in the I/O BAR
STATUS = 0x08  # device status register (link up, duplex, speed)
BAR_BASE = 0x10  # config space: the first Base Address Register
DEFAULT_COUNT = 2000


class UsageError(Exception):
    """Bad arguments: exit 2."""


class DeviceCheckError(Exception):
    """The device is missing, not bound, or failed a check: exit 1."""


class IoWindow:
    """The e1000e's register window in its I/O BAR: one pwrite/pread per port access."""

    def __init__(self, region: Any) -> None:
        self.region = region

    def in32(self, port: int) -> int:
        return int.from_bytes(self.region.read(port, 4), "little")

    def out32(self, port: int, value: int) -> None:
        self.region.write(port, value.to_bytes(4, "little"))

    def read_register(self, offset: int) -> int:
        """A BAR0 register through the window: IOADDR <- offset, then IODATA."""
        self.out32(IOADDR, offset)
        return self.in32(IODATA)


def resolve(sysfs: Sysfs, text: str | None) -> PciAddress:
    """``text``, checked to be an e1000e, or the first e1000e bound to vfio-pci."""
    ids = (E1000E_VENDOR, E1000E_DEVICE)
    if text is not None:
        try:
            addr = PciAddress.parse(text)
        except AddressError as exc:
            raise UsageError(str(exc)) from None
        if not sysfs.exists(addr):
            raise UsageError(f"no PCI device at {addr} (see lspci -D)")
        found = tuple(sysfs.ids(addr))[:2]
        if found != ids:
            raise UsageError(f"{addr} is {found[0]:04x}:{found[1]:04x}, not an e1000e (8086:10d3)")
        return addr
    nics = [a for a in sysfs.devices() if tuple(sysfs.ids(a))[:2] == ids]
    for a in nics:
        if sysfs.driver(a) == "vfio-pci":
            return a
    if nics:
        raise DeviceCheckError(
            f"no e1000e bound to vfio-pci (found {', '.join(map(str, nics))}); bind one with "
            f"`driverctl set-override {nics[0]} vfio-pci`"
        )
    raise DeviceCheckError("no e1000e (8086:10d3) found; give its address")


def per_access_ns(fn: Callable[[], object], count: int) -> float:
    """Mean wall time of one call of ``fn`` over ``count`` calls, in nanoseconds."""
    t0 = time.perf_counter_ns()
    for _ in range(count):
        fn()
    return (time.perf_counter_ns() - t0) / count


def drive(kernel: Kernel, address: PciAddress, count: int, out: dict[str, Any]) -> None:
    with Session(kernel) as session:
        dev = session.open_device(address)
        io = dev.region(IO_BAR)
        bar_cfg = dev.config.read32(BAR_BASE + 4 * IO_BAR)
        out["io_bar"] = {
            "size": io.size,
            "mmap": bool(io.flags & RegionFlag.MMAP),
            "config_bar": bar_cfg,
        }
        if not bar_cfg & 1 or io.flags & RegionFlag.MMAP or io.size < IODATA + 4:
            raise DeviceCheckError(
                f"BAR2 is not the I/O window: config {bar_cfg:#x}, region {io!r}"
            )
        window = IoWindow(io)
        bar0 = dev.region(MMIO_BAR).mmap()

        before = bar0.read32(STATUS)
        through_io = window.read_register(STATUS)
        after = bar0.read32(STATUS)
        out["status"] = {
            "mmio_before": before,
            "io": through_io,
            "mmio_after": after,
            "agree": through_io in (before, after),
        }
        out["ioaddr_readback"] = window.in32(IOADDR)
        if not out["status"]["agree"]:
            raise DeviceCheckError(
                f"STATUS through the I/O window {through_io:#010x} is neither memory read "
                f"({before:#010x}, {after:#010x})"
            )
        if out["ioaddr_readback"] != STATUS:
            raise DeviceCheckError(f"IOADDR reads {out['ioaddr_readback']:#x}, not {STATUS:#x}")

        window.out32(IOADDR, STATUS)
        out["cost"] = {
            "count": count,
            "io_read_ns": round(per_access_ns(lambda: window.in32(IODATA), count)),
            "io_indirect_read_ns": round(
                per_access_ns(lambda: window.read_register(STATUS), count)
            ),
            "mmio_read32_ns": round(per_access_ns(lambda: bar0.read32(STATUS), count)),
        }


# --- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # usage errors exit 2 (EXIT_USAGE)
        prog="e1000e_ioport.py",
        description="Read an e1000e's STATUS through its I/O-port BAR and its memory BAR "
        "through VFIO, and time port I/O (a pread or pwrite per access).",
        epilog="Exit status: 0 every check passed, 1 the device failed, 2 usage error.",
    )
    p.add_argument("address", nargs="?", help="PCI address (default: the first e1000e on vfio-pci)")
    p.add_argument(
        "--simulate",
        metavar="TOPOLOGY",
        help="run on the simulator, e.g. qemu-vmtest (default: $VFIOPY_SIMULATE, else the "
        "real kernel)",
    )
    p.add_argument("--json", action="store_true", help="print one result document on stdout")
    p.add_argument(
        "--count",
        type=int,
        default=DEFAULT_COUNT,
        metavar="N",
        help=f"accesses timed per kind (default {DEFAULT_COUNT})",
    )
    return p


def _kernel(spec: str | None) -> Kernel:
    try:
        return simulated_kernel(spec) if spec else default_kernel()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None, kernel: Kernel | None = None) -> int:
    """Run the checks; ``kernel`` (a simulated process, in tests) replaces the system's."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    doc: dict[str, Any] = {"schema": SCHEMA, "ok": False, "device": None, "simulated": False}
    code = EXIT_OK
    try:
        if args.count < 1:
            raise UsageError("--count must be >= 1")
        if kernel is None:
            kernel = _kernel(args.simulate)
        doc["simulated"] = machine_of(kernel) is not None
        address = resolve(Sysfs(kernel), args.address)
        doc["device"] = str(address)
        drive(kernel, address, args.count, doc)
        doc["ok"] = True
    except UsageError as exc:
        code, doc["error"] = EXIT_USAGE, str(exc)
    except (DeviceCheckError, OSError) as exc:  # OSError: a VfioError, or the kernel's own
        code, doc["error"] = EXIT_DEVICE, str(exc)
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
    elif doc["ok"]:
        s, c = doc["status"], doc["cost"]
        print(f"e1000e {doc['device']}: STATUS {s['io']:#010x} through the I/O window,")
        print(f"  {s['mmio_before']:#010x} / {s['mmio_after']:#010x} through BAR0")
        print(
            f"  per access: IODATA read {c['io_read_ns']} ns (one pread), indirect read "
            f"{c['io_indirect_read_ns']} ns (pwrite + pread), BAR0 read32 "
            f"{c['mmio_read32_ns']} ns"
        )
    if "error" in doc:
        sys.stderr.write(f"e1000e_ioport: error: {doc['error']}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
