#!/usr/bin/env python3
"""A small userspace driver for QEMU's ``e1000e`` (an Intel 82574L, PCI 8086:10d3) on vfiopy.

It brings the NIC up as far as a driver's probe goes, then lets it go (the summary prints a
line for each of mac, link, interrupt and cost):

    open       session, device fd (the kernel resets the NIC); BAR0, the registers, mmapped;
               BAR2 checked to be the I/O window
    mac        the receive address RAL0/RAH0 (0x5400/0x5404) through BAR0 and through the I/O
               window, and EEPROM words 0-2 through EERD (0x14): one MAC, marked valid, from
               an EEPROM whose 64 words sum to 0xBABA (the 82574's checksum)
    link       STATUS (0x08): link up (bit 1), full duplex (bit 0), speed (bits 7:6), through
               BAR0 and through the window
    interrupt  MSI-X: IVAR (0xE4) routes the "other" causes to vector 2, IMS (0xD0) unmasks a
               link status change, ICS (0xC8) raises one, vector 2's eventfd is awaited, ICR
               (0xC0) says why, and writing the causes back to ICR clears them
    cost       the time of a port read (one pread), an indirect register read (pwrite of
               IOADDR + pread of IODATA) and a BAR0 read32, over --count accesses each
    shutdown   causes masked (IMC, 0xD8), bus mastering off, MSI-X off, BAR0 unmapped, the
               device and the session closed: the kernel's order

The registers are decoded twice: in BAR0 (memory, mmapped: one load or store per access) and
through BAR2, 32 bytes of I/O ports forming a window: write a register's offset to IOADDR (port
offset 0), then read or write it at IODATA (port offset 4).  VFIO gives an I/O BAR no mmap:
each port access is a pread or pwrite on the device fd, one ``in``/``out`` in the kernel.

MSI-X rather than MSI: the 82574 has five MSI-X vectors and a register, IVAR, that routes each
cause (receive queue 0 and 1, transmit queue 0 and 1, "other") to one of them, the way Linux's
e1000e driver sets it up (RX 0, TX 1, other 2).  A link status change is an "other" cause, so
under MSI-X the NIC sets ICR's OTHER bit (24) with it, and IMS must unmask both.  The message
is a memory write by the NIC, so bus mastering must be on.  (examples/edu_driver.py uses MSI.)
Register layout and behaviour: the 82574 datasheet, and QEMU hw/net/e1000e_core.c
(e1000e_update_interrupt_state, e1000e_msix_notify, e1000e_set_icr, e1000e_set_eerd).

Usage:
    python examples/e1000e_driver.py [ADDR] [--simulate qemu-vmtest] [--json] [--count N]
                                     [--timeout SECONDS]

Without ADDR it takes the first e1000e bound to vfio-pci.  Exit status: 0 every check passed,
1 the device failed a check or could not be used, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import anyio
import anyio.to_thread

from vfiopy import AddressError, Device, Irq, Kernel, Mapping, PciAddress, Region, Session, Sysfs
from vfiopy._uapi import PciIrq, PciRegion, RegionFlag
from vfiopy.kernel import default_kernel
from vfiopy.pci import Command
from vfiopy.simulate import machine_of, simulated_kernel

SCHEMA = "vfiopy.examples.e1000e_driver/1"
EXIT_OK, EXIT_DEVICE, EXIT_USAGE = 0, 1, 2

E1000E_VENDOR, E1000E_DEVICE = 0x8086, 0x10D3
MMIO_BAR, IO_BAR = PciRegion.BAR0, PciRegion.BAR2
IOADDR, IODATA = 0x00, 0x04  # port offsets in the I/O BAR
BAR_BASE = 0x10  # config space: the first Base Address Register

# BAR0 registers (82574 datasheet, section 10)
STATUS = 0x08
EERD = 0x14
ICR, ICS, IMS, IMC, IVAR = 0xC0, 0xC8, 0xD0, 0xD8, 0xE4
RAL0, RAH0 = 0x5400, 0x5404

STATUS_FD, STATUS_LU = 1 << 0, 1 << 1
STATUS_SPEED_SHIFT = 6
SPEED_MBPS = {0: 10, 1: 100, 2: 1000, 3: 1000}
RAH_AV = 1 << 31  # address valid
EERD_START, EERD_DONE = 1 << 0, 1 << 1
EERD_ADDR_SHIFT, EERD_DATA_SHIFT = 2, 16
EEPROM_WORDS, EEPROM_SUM = 64, 0xBABA
ICR_LSC = 1 << 2  # link status change
ICR_OTHER = 1 << 24  # under MSI-X: an "other" cause is set
ICR_ASSERTED = 1 << 31  # INT_ASSERTED: some cause is set
ALL_CAUSES = 0xFFFF_FFFF
# IVAR: a 4-bit field per cause, the vector in bits 2:0 and "valid" in bit 3
IVAR_VALID = 0x8
IVAR_RXQ0, IVAR_TXQ0, IVAR_OTHER = 0, 8, 16  # field shifts
VECTOR_RX, VECTOR_TX, VECTOR_OTHER = 0, 1, 2
VECTORS = 3
LINK_CAUSES = ICR_LSC | ICR_OTHER

DEFAULT_COUNT = 2000
DEFAULT_TIMEOUT = 5.0


class UsageError(Exception):
    """Bad arguments, or an address that names no e1000e: exit 2."""


class NicError(Exception):
    """The device is missing, not bound, or failed a check: exit 1."""


class Nic:
    """One open e1000e: its registers through the BAR0 mapping and through the I/O window."""

    def __init__(self, device: Device, regs: Region, bar0: Mapping, io: Region) -> None:
        self.name = device.name
        self.regs = regs
        self.bar0 = bar0
        self.io = io

    def read32(self, off: int) -> int:
        return self.bar0.read32(off)

    def write32(self, off: int, value: int) -> None:
        self.bar0.write32(off, value)
        self.flush()

    def flush(self) -> None:
        """Read STATUS through the device fd after a store.

        On hardware any read of the device flushes a posted write (Linux's e1000e reads
        STATUS); the simulator sees stores to a mapping only when it next looks, but at
        once on an access through the fd, so this read also makes it exact there.
        """
        self.regs.read(STATUS, 4)

    # The I/O window: one pwrite or pread per port access.
    def in32(self, port: int) -> int:
        return int.from_bytes(self.io.read(port, 4), "little")

    def out32(self, port: int, value: int) -> None:
        self.io.write(port, value.to_bytes(4, "little"))

    def read_indirect(self, off: int) -> int:
        """A BAR0 register through the window: IOADDR <- offset, then IODATA."""
        self.out32(IOADDR, off)
        return self.in32(IODATA)

    def eeprom_word(self, word: int, timeout: float) -> int:
        """EEPROM word ``word`` through EERD: start the read, poll for done."""
        self.write32(EERD, word << EERD_ADDR_SHIFT | EERD_START)
        deadline = time.monotonic() + timeout
        value = self.read32(EERD)
        while not value & EERD_DONE:
            if time.monotonic() > deadline:
                raise NicError(
                    f"{self.name}: EEPROM word {word:#x} not read after {timeout:g} s: EERD "
                    f"({EERD:#x}) reads {value:#010x}, done bit {EERD_DONE:#x} clear"
                )
            value = self.read32(EERD)
        return value >> EERD_DATA_SHIFT


def mac_text(mac: bytes) -> str:
    return mac.hex(":")


def receive_address(ral: int, rah: int) -> bytes:
    """The MAC in RAL/RAH: the first four bytes in RAL, the last two in RAH's low half."""
    return ral.to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little")


def check_mac(nic: Nic, timeout: float) -> dict[str, Any]:
    ral, rah = nic.read32(RAL0), nic.read32(RAH0)
    io = receive_address(nic.read_indirect(RAL0), nic.read_indirect(RAH0))
    words = [nic.eeprom_word(i, timeout) for i in range(EEPROM_WORDS)]
    checksum = sum(words) & 0xFFFF
    mmio = receive_address(ral, rah)
    eeprom = b"".join(w.to_bytes(2, "little") for w in words[:3])
    out = {
        "mac": mac_text(mmio),
        "ral": ral,
        "rah": rah,
        "address_valid": bool(rah & RAH_AV),
        "io": mac_text(io),
        "eeprom": mac_text(eeprom),
        "eeprom_checksum": checksum,
    }
    if not rah & RAH_AV:
        raise NicError(f"{nic.name}: RAH0 ({RAH0:#x}) reads {rah:#010x}: address-valid bit clear")
    if io != mmio or eeprom != mmio:
        raise NicError(
            f"{nic.name}: the MAC differs: {mac_text(mmio)} in RAL0/RAH0 through BAR0, "
            f"{mac_text(io)} through the I/O window, {mac_text(eeprom)} in the EEPROM"
        )
    if checksum != EEPROM_SUM:
        raise NicError(
            f"{nic.name}: EEPROM words 0x00-0x3f sum to {checksum:#06x}, not {EEPROM_SUM:#06x}: "
            "the EEPROM is corrupt"
        )
    return out


def check_link(nic: Nic) -> dict[str, Any]:
    before = nic.read32(STATUS)
    through_io = nic.read_indirect(STATUS)
    after = nic.read32(STATUS)
    ioaddr = nic.in32(IOADDR)
    out = {
        "mmio_before": before,
        "io": through_io,
        "mmio_after": after,
        "agree": through_io in (before, after),  # the link bits may move between reads
        "ioaddr_readback": ioaddr,
        "up": bool(through_io & STATUS_LU),
        "full_duplex": bool(through_io & STATUS_FD),
        "speed_mbps": SPEED_MBPS[through_io >> STATUS_SPEED_SHIFT & 0x3],
    }
    if not out["agree"]:
        raise NicError(
            f"{nic.name}: STATUS through the I/O window {through_io:#010x} is neither BAR0 "
            f"read ({before:#010x}, {after:#010x})"
        )
    if ioaddr != STATUS:
        raise NicError(f"{nic.name}: IOADDR reads {ioaddr:#x}, not the {STATUS:#x} written")
    return out


async def take_interrupt(nic: Nic, msix: Irq, timeout: float) -> dict[str, Any]:
    """Route, unmask, raise and clear a link status change on MSI-X vector VECTOR_OTHER."""
    ivar = (
        (IVAR_VALID | VECTOR_RX) << IVAR_RXQ0
        | (IVAR_VALID | VECTOR_TX) << IVAR_TXQ0
        | (IVAR_VALID | VECTOR_OTHER) << IVAR_OTHER
    )
    nic.write32(IVAR, ivar)
    nic.write32(IMS, LINK_CAUSES)
    for v in range(VECTORS):
        msix.read(v)  # drop counts from before
    nic.write32(ICS, LINK_CAUSES)
    count = 0
    with anyio.move_on_after(timeout) as waited:
        count = await msix.wait(VECTOR_OTHER)
    if waited.cancelled_caught:
        icr, ims = nic.read32(ICR), nic.read32(IMS)
        hint = (
            "the NIC raised it, but no message arrived: check MSI-X and bus mastering"
            if icr & LINK_CAUSES
            else "the NIC did not set the cause"
        )
        raise NicError(
            f"{nic.name}: no MSI-X on vector {VECTOR_OTHER} within {timeout:g} s after writing "
            f"{LINK_CAUSES:#010x} to ICS ({ICS:#x}); ICR reads {icr:#010x}, IMS {ims:#010x}, "
            f"IVAR {ivar:#010x}: {hint}"
        )
    icr = nic.read32(ICR)
    others = [msix.read(v) for v in range(VECTORS) if v != VECTOR_OTHER]
    # Clear the causes handled by writing them to ICR; INT_ASSERTED goes with the last one.
    nic.write32(ICR, icr & ~ICR_ASSERTED)
    left = nic.read32(ICR)
    out = {
        "kind": "msix",
        "vectors": msix.count,
        "enabled": VECTORS,
        "vector": VECTOR_OTHER,
        "ivar": ivar,
        "ims": LINK_CAUSES,
        "raised": LINK_CAUSES,
        "interrupts": count,
        "other_vectors": others,
        "icr": icr,
        "icr_after_clear": left,
    }
    if icr & LINK_CAUSES != LINK_CAUSES:
        raise NicError(
            f"{nic.name}: MSI-X on vector {VECTOR_OTHER}, but ICR reads {icr:#010x}, without "
            f"the causes {LINK_CAUSES:#010x} raised"
        )
    if any(others):
        raise NicError(
            f"{nic.name}: IVAR {ivar:#010x} routes the other causes to vector {VECTOR_OTHER} "
            f"only, yet vectors 0 and 1 counted {others}"
        )
    if left & LINK_CAUSES:
        raise NicError(f"{nic.name}: writing {icr & ~ICR_ASSERTED:#010x} to ICR left {left:#010x}")
    return out


def per_access_ns(fn: Callable[[], object], count: int) -> float:
    """Mean wall time of one call of ``fn`` over ``count`` calls, in nanoseconds."""
    t0 = time.perf_counter_ns()
    for _ in range(count):
        fn()
    return (time.perf_counter_ns() - t0) / count


def measure(nic: Nic, count: int) -> dict[str, Any]:
    nic.out32(IOADDR, STATUS)
    return {
        "count": count,
        "io_read_ns": round(per_access_ns(lambda: nic.in32(IODATA), count)),
        "io_indirect_read_ns": round(per_access_ns(lambda: nic.read_indirect(STATUS), count)),
        "mmio_read32_ns": round(per_access_ns(lambda: nic.read32(STATUS), count)),
    }


def _clear_bus_master(dev: Device) -> None:
    dev.config.command = dev.config.command & ~Command.MASTER


async def drive(
    kernel: Kernel, address: PciAddress, count: int, timeout: float, out: dict[str, Any]
) -> None:
    """Every check on the e1000e at ``address``; ``out`` collects what was read."""
    # Undone in reverse: causes masked, bus master off, MSI-X off, BAR0 unmapped, device
    # closed (the kernel resets it), session closed.
    with ExitStack() as stack:
        session = stack.enter_context(Session(kernel))
        # Opening resets the NIC (up to a second): keep the event loop free meanwhile.
        dev = await anyio.to_thread.run_sync(session.open_device, address)
        io = dev.region(IO_BAR)
        bar_cfg = dev.config.read32(BAR_BASE + 4 * IO_BAR)
        out["io_bar"] = {
            "size": io.size,
            "mmap": bool(io.flags & RegionFlag.MMAP),
            "config_bar": bar_cfg,
        }
        if not bar_cfg & 1 or io.flags & RegionFlag.MMAP or io.size < IODATA + 4:
            raise NicError(f"{dev.name}: BAR2 is not the I/O window: config {bar_cfg:#x}, {io!r}")
        regs = dev.region(MMIO_BAR)
        bar0 = stack.enter_context(regs.mmap())
        nic = Nic(dev, regs, bar0, io)

        out["mac"] = check_mac(nic, timeout)
        out["link"] = check_link(nic)

        msix = dev.irq(PciIrq.MSIX)
        if msix.count < VECTORS:
            raise NicError(
                f"{dev.name}: {msix.count} MSI-X vectors; this driver routes causes to {VECTORS}"
            )
        # The NIC's state from before (the kernel's reset clears it, a previous user may not):
        # nothing unmasked, no cause set.  With IMS 0, reading ICR clears it as well.
        nic.write32(IMC, ALL_CAUSES)
        nic.write32(ICR, nic.read32(ICR) & ~ICR_ASSERTED)
        msix.enable(VECTORS)
        stack.callback(msix.close)
        if dev.config.enable_bus_master():  # MSI-X is a memory write by the NIC
            stack.callback(_clear_bus_master, dev)
        stack.callback(nic.write32, IMC, ALL_CAUSES)  # quiet before its interrupts go
        out["interrupt"] = await take_interrupt(nic, msix, timeout)

        out["cost"] = measure(nic, count)


# --- command line -----------------------------------------------------------------------------


def resolve(sysfs: Sysfs, text: str | None) -> PciAddress:
    """``text``, checked to be an e1000e, or the first e1000e bound to vfio-pci."""
    try:
        return sysfs.find_device(E1000E_VENDOR, E1000E_DEVICE, text, name="e1000e")
    except AddressError as exc:  # the address names no e1000e: a usage error
        raise UsageError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # usage errors exit 2 (EXIT_USAGE)
        prog="e1000e_driver.py",
        description="Probe an e1000e (8086:10d3) from userspace through VFIO: its MAC and "
        "link status over MMIO and port I/O, an MSI-X interrupt, the cost of port I/O.",
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
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"limit of every wait on the NIC (default {DEFAULT_TIMEOUT:g})",
    )
    return p


def _kernel(spec: str | None) -> Kernel:
    try:
        return simulated_kernel(spec) if spec else default_kernel()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def summary(doc: dict[str, Any]) -> str:
    m, s, i, c = doc["mac"], doc["link"], doc["interrupt"], doc["cost"]
    link = (
        f"up, {'full' if s['full_duplex'] else 'half'} duplex, {s['speed_mbps']} Mb/s"
        if s["up"]
        else "down"
    )
    return "\n".join(
        [
            f"e1000e {doc['device']}{' (simulated)' if doc['simulated'] else ''}",
            f"  mac        {m['mac']} (RAL0/RAH0 through BAR0 and the I/O window, EEPROM words "
            f"0-2; EEPROM checksum {m['eeprom_checksum']:#06x})",
            f"  link       {link} (STATUS {s['io']:#010x}, the same through the I/O window)",
            f"  interrupt  MSI-X vector {i['vector']} x{i['interrupts']} after ICS "
            f"{i['raised']:#010x} (IVAR {i['ivar']:#010x}); ICR {i['icr']:#010x}, cleared "
            f"-> {i['icr_after_clear']:#010x}",
            f"  port I/O   IODATA read {c['io_read_ns'] / 1000:.1f} us (one pread), indirect "
            f"read {c['io_indirect_read_ns'] / 1000:.1f} us (pwrite + pread), BAR0 read32 "
            f"{c['mmio_read32_ns'] / 1000:.1f} us",
            f"e1000e {doc['device']}: every check passed",
        ]
    )


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
        if args.timeout <= 0:
            raise UsageError("--timeout must be > 0")
        if kernel is None:
            kernel = _kernel(args.simulate)
        doc["simulated"] = machine_of(kernel) is not None
        address = resolve(Sysfs(kernel), args.address)
        doc["device"] = str(address)
        anyio.run(drive, kernel, address, args.count, args.timeout, doc)
        doc["ok"] = True
    except UsageError as exc:
        code, doc["error"] = EXIT_USAGE, str(exc)
    except (NicError, OSError) as exc:  # OSError: a VfioError, or the kernel's own
        code, doc["error"] = EXIT_DEVICE, str(exc)
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
    elif doc["ok"]:
        print(summary(doc))
    if "error" in doc:
        sys.stderr.write(f"e1000e_driver: error: {doc['error']}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
