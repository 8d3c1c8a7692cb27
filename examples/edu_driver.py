#!/usr/bin/env python3
"""A userspace driver for QEMU's ``edu`` device (PCI 1234:11e8) on vfiopy.

It walks the device through everything it can do, each step printed:

    open           session, device fd, BAR0 mmapped
    identify       0x00 reads 0xRRrr00ed (RR major, rr minor version)
    liveness       0x04 reads back the inverse of what was written
    factorial      0x08 computes n!, polling status 0x20 bit 0 until it clears
    setup          a DMA buffer below the device's 28-bit DMA mask, MSI on an eventfd,
                   bus mastering on (MSI is a memory write, so it needs it too)
    interrupt      0x60 raises an MSI, awaited; 0x24 says why; 0x64 acknowledges it
    factorial-irq  status 0x20 bit 7 asks for an MSI when the factorial is done
    dma            RAM -> device buffer (0x40000) -> another RAM page, compared
    shutdown       bus mastering off, MSI off, DMA unmapped, BAR unmapped, device
                   fd, group and container closed: the kernel's order

Usage:
    python examples/edu_driver.py [ADDR] [--simulate qemu-vmtest] [--backend container|iommufd]
                                  [--json] [--trio] [--timeout SECONDS] [--factorial N] [-v]

Without ADDR it drives the first edu bound to vfio-pci.  ``--simulate`` (or
``VFIOPY_SIMULATE``) runs it on the simulator in tools/mock_vfio.  Exit status:
0 every step passed, 1 the device or its setup failed, 2 usage error (bad
options, or an address that names no device or no edu).

Register map and behaviour: QEMU docs/specs/edu.rst and hw/misc/edu.c.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO, TypeVar

import anyio
import anyio.to_thread
import structlog

from vfiopy import (
    AddressError,
    Device,
    DmaBuffer,
    Irq,
    Kernel,
    Mapping,
    PciAddress,
    Region,
    Session,
    Sysfs,
)
from vfiopy._uapi import PciIrq, PciRegion
from vfiopy.kernel import default_kernel
from vfiopy.logsetup import configure_cli_logging, verbosity_level
from vfiopy.pci import Command, ConfigSpace
from vfiopy.session import Backend
from vfiopy.simulate import machine_of, simulated_kernel

SCHEMA = "vfiopy.examples.edu_driver/1"
EXIT_OK, EXIT_DEVICE, EXIT_USAGE = 0, 1, 2

EDU_VENDOR, EDU_DEVICE = 0x1234, 0x11E8

# BAR0 registers (edu.rst).  Below 0x80 only 4-byte accesses are decoded;
# from 0x80 on, 4 or 8 bytes.
REG_ID = 0x00
REG_LIVENESS = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98

REGISTER_NAMES = {
    REG_ID: "identification",
    REG_LIVENESS: "liveness",
    REG_FACTORIAL: "factorial",
    REG_STATUS: "status",
    REG_IRQ_STATUS: "interrupt status",
    REG_IRQ_RAISE: "interrupt raise",
    REG_IRQ_ACK: "interrupt acknowledge",
    REG_DMA_SRC: "DMA source",
    REG_DMA_DST: "DMA destination",
    REG_DMA_COUNT: "DMA count",
    REG_DMA_CMD: "DMA command",
}

ID_MAGIC, ID_MAGIC_MASK = 0x00ED, 0xFFFF
SUPPORTED_MAJOR = 1

STATUS_COMPUTING = 0x01
STATUS_IRQ_FACT = 0x80

IRQ_FACT = 0x0000_0001
IRQ_DMA = 0x0000_0100
# Any value may be raised; this one overlaps neither the factorial nor the DMA cause.
IRQ_SOFTWARE = 0x1234_0000

DMA_START = 0x1
DMA_TO_RAM = 0x2  # direction bit: clear = RAM -> device, set = device -> RAM
DMA_IRQ = 0x4
DEVICE_BUFFER = 0x40000  # the device's 4 KiB buffer, in its DMA address space only
DEVICE_BUFFER_SIZE = 4096
# QEMU's edu up to at least 7.2 (Debian 12's) stops the whole VM (hw_error) on
# a transfer that ends exactly at the end of its buffer, an off-by-one in its
# range check; newer ones accept it.  Half the buffer is safe on both.
DMA_BYTES = DEVICE_BUFFER_SIZE // 2
# The device keeps only the low 28 bits of a DMA address (its default dma_mask).
DMA_MASK = (1 << 28) - 1

MASK32 = 0xFFFF_FFFF
LIVENESS_VALUES = (0x1234_5678, 0xA5A5_F00F)
DEFAULT_FACTORIAL = 10
DEFAULT_TIMEOUT = 5.0
POLL_INTERVAL = 0.001

log = structlog.get_logger("edu_driver")
T = TypeVar("T")


class UsageError(Exception):
    """The command line asks for something that cannot be (exit 2)."""


class EduError(Exception):
    """The device misbehaved, or did not answer in time (exit 1)."""


def expected_factorial(n: int) -> int:
    """n! as the device computes it: in 32-bit unsigned arithmetic."""
    # 34! is the first factorial divisible by 2**32; from there on it wraps to 0.
    return 0 if n >= 34 else math.factorial(n) & MASK32


def dma_pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- the report --------------------------------------------------------------------------------


@dataclass
class Step:
    """One step's outcome: ``data`` holds the values read, for --json and the tests."""

    name: str
    ok: bool = False
    elapsed_s: float = 0.0
    summary: str = ""
    error: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "elapsed_s": round(self.elapsed_s, 6),
            "summary": self.summary,
            "error": self.error,
            **self.data,
        }


@dataclass
class Report:
    backend: str
    async_backend: str
    device: str | None = None
    simulated: bool = False
    steps: list[Step] = field(default_factory=list)
    error: str | None = None
    exit_code: int = EXIT_OK
    sim_open_files: int | None = None
    on_step: Callable[[Step], None] | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    @property
    def interrupts(self) -> int:
        return sum(int(s.data.get("interrupts", 0)) for s in self.steps)

    def step_named(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def fail(self, code: int, message: str) -> None:
        """Record the first failure; a later one (say, in cleanup) is only logged."""
        if self.error is None:
            self.error, self.exit_code = message, code
        elif message != self.error:
            log.warning("further failure", error=message)

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        s = Step(name)
        self.steps.append(s)
        t0 = time.monotonic()
        try:
            yield s
        except Exception as exc:
            # Recorded here, not where it is caught: a failing cleanup must not
            # replace the step failure that led to it.
            s.error = str(exc)
            self.fail(EXIT_DEVICE, s.error)
            raise
        except BaseException as exc:  # cancelled, or interrupted from the keyboard
            s.error = f"interrupted ({type(exc).__name__})"
            self.fail(EXIT_DEVICE, s.error)
            raise
        else:
            s.ok = True
        finally:
            s.elapsed_s = time.monotonic() - t0
            if self.on_step is not None:
                self.on_step(s)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "device": self.device,
            "backend": self.backend,
            "async_backend": self.async_backend,
            "simulated": self.simulated,
            "interrupts": self.interrupts,
            "sim_open_files": self.sim_open_files,
            "error": self.error,
            "steps": [s.to_json() for s in self.steps],
        }


# --- the device ---------------------------------------------------------------------------------


class Edu:
    """Register access and waits for one open edu: BAR0 mapped, timeouts everywhere."""

    def __init__(self, device: Device, region: Region, bar: Mapping, timeout: float) -> None:
        self.device = device
        self.name = device.name
        self.region = region
        self.bar = bar
        self.timeout = timeout

    @staticmethod
    def reg(off: int) -> str:
        return f"{REGISTER_NAMES.get(off, 'register')} register {off:#04x}"

    def read32(self, off: int) -> int:
        return self.bar.read32(off)

    def write32(self, off: int, value: int) -> None:
        self.bar.write32(off, value & MASK32)
        self.flush()

    def write64(self, off: int, value: int) -> None:
        self.bar.write64(off, value)
        self.flush()

    def flush(self) -> None:
        """Read the ID register back through the device fd after every store.

        On hardware this is the usual read-back that flushes a posted write
        (any read of the device would do).  The simulator sees stores to a
        mapping only when it next scans the registers, but services them at
        once on an access through the fd, so the read also makes it exact.
        """
        self.region.read(REG_ID, 4)

    async def wait_clear(self, off: int, bits: int, what: str) -> int:
        """Poll register ``off`` until ``bits`` read as 0; its last value."""
        value = self.read32(off)
        with anyio.move_on_after(self.timeout):
            while value & bits:
                await anyio.sleep(POLL_INTERVAL)
                value = self.read32(off)
            return value
        raise EduError(
            f"{self.name}: timed out after {self.timeout:g} s waiting for {what}: "
            f"{self.reg(off)} still reads {value:#010x} (bits {bits:#x} set)"
        )

    async def wait_irq(self, irq: Irq, cause: int, what: str) -> int:
        """Await the MSI announcing ``cause``; how many interrupts the eventfd counted."""
        with anyio.move_on_after(self.timeout):
            return await irq.wait(0)
        status = self.read32(REG_IRQ_STATUS)
        hint = (
            "the device raised it, but no message arrived: check MSI and bus mastering"
            if status & cause
            else f"the device did not raise it (cause {cause:#010x} not set)"
        )
        raise EduError(
            f"{self.name}: no MSI within {self.timeout:g} s after {what}; "
            f"{self.reg(REG_IRQ_STATUS)} reads {status:#010x}: {hint}"
        )

    def acknowledge(self, cause: int) -> int:
        """Clear ``cause`` at 0x64, as an ISR must; the interrupt status left."""
        self.write32(REG_IRQ_ACK, cause)
        left = self.read32(REG_IRQ_STATUS)
        if left & cause:
            raise EduError(
                f"{self.name}: writing {cause:#010x} to {self.reg(REG_IRQ_ACK)} left "
                f"{self.reg(REG_IRQ_STATUS)} at {left:#010x}"
            )
        return left


# --- the steps ------------------------------------------------------------------------------------


class Teardown(ExitStack):
    """An ExitStack that also names what it will undo, for the report."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def add(self, name: str, fn: Callable[..., object], *args: Any) -> None:
        self.callback(fn, *args)
        self.names.append(name)


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    # Opening and closing a device resets it (up to ~1 s): keep the event loop free.
    return await anyio.to_thread.run_sync(fn, *args)


def identify(edu: Edu, st: Step) -> None:
    ident = edu.read32(REG_ID)
    major, minor = ident >> 24, (ident >> 16) & 0xFF
    st.data.update(id=ident, major=major, minor=minor)
    if ident == MASK32:
        raise EduError(
            f"{edu.name}: {edu.reg(REG_ID)} reads all ones: the device does not answer "
            "(memory decoding off, or the device is gone)"
        )
    if ident & ID_MAGIC_MASK != ID_MAGIC:
        raise EduError(
            f"{edu.name}: {edu.reg(REG_ID)} reads {ident:#010x}, not 0xRRrr00ed: not an edu"
        )
    if major != SUPPORTED_MAJOR:
        raise EduError(
            f"{edu.name}: edu version {major}.{minor} ({ident:#010x}); this driver knows "
            f"version {SUPPORTED_MAJOR}.x"
        )
    st.summary = f"id {ident:#010x}: edu version {major}.{minor}"


def liveness(edu: Edu, st: Step) -> None:
    got = []
    for value in LIVENESS_VALUES:
        edu.write32(REG_LIVENESS, value)
        back = edu.read32(REG_LIVENESS)
        got.append(back)
        if back != ~value & MASK32:
            raise EduError(
                f"{edu.name}: wrote {value:#010x} to {edu.reg(REG_LIVENESS)}, read back "
                f"{back:#010x} instead of {~value & MASK32:#010x}"
            )
    st.data.update(written=list(LIVENESS_VALUES), read=got)
    st.summary = ", ".join(
        f"{w:#010x} -> {r:#010x}" for w, r in zip(LIVENESS_VALUES, got, strict=True)
    )


async def factorial(edu: Edu, n: int, irq: Irq | None, st: Step) -> None:
    """n! by polling status bit 0; with ``irq``, awaiting the MSI that bit 7 asks for."""
    # A store to 0x08 while the device computes is ignored: start from idle.
    await edu.wait_clear(REG_STATUS, STATUS_COMPUTING, "a factorial in progress to end")
    if irq is not None:
        irq.read(0)  # drop any stale count
        edu.write32(REG_STATUS, STATUS_IRQ_FACT)
    try:
        edu.write32(REG_FACTORIAL, n)
        if irq is not None:
            count = await edu.wait_irq(irq, IRQ_FACT, f"computing {n}! with status bit 7 set")
            status = edu.read32(REG_IRQ_STATUS)
            st.data.update(interrupts=count, irq_status=status)
            if not status & IRQ_FACT:
                raise EduError(
                    f"{edu.name}: MSI after {n}! but {edu.reg(REG_IRQ_STATUS)} reads "
                    f"{status:#010x}, without the factorial cause {IRQ_FACT:#x}"
                )
            edu.acknowledge(IRQ_FACT)
        await edu.wait_clear(REG_STATUS, STATUS_COMPUTING, f"{n}! to finish")
    finally:
        if irq is not None:
            edu.write32(REG_STATUS, 0)  # no interrupt for later factorials
    result, expected = edu.read32(REG_FACTORIAL), expected_factorial(n)
    st.data.update(n=n, result=result, expected=expected)
    if result != expected:
        raise EduError(
            f"{edu.name}: {n}! read {result} from {edu.reg(REG_FACTORIAL)}, expected {expected}"
        )
    how = f"MSI x{st.data['interrupts']}" if irq is not None else "polled status bit 0"
    st.summary = f"{n}! = {result} ({how})"


def setup(session: Session, edu: Edu, stack: Teardown, st: Step) -> tuple[Irq, DmaBuffer]:
    """A DMA buffer, MSI and bus mastering, each undone by ``stack`` in reverse."""
    dev = edu.device
    # edu's DMA engine keeps only the low 28 bits of an address.
    buf = session.alloc_dma_buffer(2 * DEVICE_BUFFER_SIZE, limit=DMA_MASK + 1)
    stack.add("DMA buffer", session.free_dma_buffer, buf)
    irq = dev.irq(PciIrq.MSI)
    if irq.count < 1:
        raise EduError(f"{edu.name}: the device reports no MSI vector (VFIO irq index MSI)")
    irq.enable(1)
    stack.add("MSI", irq.close)
    cfg = dev.config
    before = cfg.command
    if not before & Command.MASTER:
        cfg.command = before | Command.MASTER
    # Registered last, undone first: no DMA (nor MSI write) after the buffer goes.
    stack.add("bus master", _clear_bus_master, cfg)
    if not cfg.command & Command.MASTER:
        raise EduError(f"{edu.name}: bus mastering did not stick in the command register")
    st.data.update(
        iova=buf.iova,
        dma_bytes=buf.size,
        msi_vectors=irq.count,
        bus_master_was_on=bool(before & Command.MASTER),
    )
    st.summary = (
        f"DMA buffer {buf.size // 1024} KiB at IOVA {buf.iova:#x}, MSI on eventfd "
        f"{irq.eventfds[0]}, bus mastering on"
    )
    return irq, buf


def _clear_bus_master(cfg: ConfigSpace) -> None:
    cfg.command = cfg.command & ~Command.MASTER


async def interrupt(edu: Edu, irq: Irq, st: Step) -> None:
    irq.read(0)
    edu.write32(REG_IRQ_RAISE, IRQ_SOFTWARE)
    count = await edu.wait_irq(irq, IRQ_SOFTWARE, f"writing {IRQ_SOFTWARE:#010x} to 0x60")
    status = edu.read32(REG_IRQ_STATUS)
    st.data.update(interrupts=count, raised=IRQ_SOFTWARE, irq_status=status)
    if status & IRQ_SOFTWARE != IRQ_SOFTWARE:
        raise EduError(
            f"{edu.name}: raised {IRQ_SOFTWARE:#010x} but {edu.reg(REG_IRQ_STATUS)} reads "
            f"{status:#010x}"
        )
    left = edu.acknowledge(IRQ_SOFTWARE)
    st.data.update(irq_status_after_ack=left)
    st.summary = f"MSI x{count}, status {status:#010x}, acknowledged -> {left:#010x}"


async def dma(edu: Edu, irq: Irq, buf: DmaBuffer, st: Step) -> None:
    """Pattern: page 0 -> device buffer (polled) -> page 1 (with its MSI), then compare."""
    size, page = DMA_BYTES, DEVICE_BUFFER_SIZE
    src, dst = buf.iova, buf.iova + page
    pattern = dma_pattern(size, seed=buf.iova)
    buf.write(0, pattern)
    buf.write(page, bytes(size))
    idle = "the DMA engine to be idle"
    await edu.wait_clear(REG_DMA_CMD, DMA_START, idle)  # it ignores stores while running
    edu.write64(REG_DMA_SRC, src)
    edu.write64(REG_DMA_DST, DEVICE_BUFFER)
    edu.write64(REG_DMA_COUNT, size)
    edu.write64(REG_DMA_CMD, DMA_START)
    await edu.wait_clear(REG_DMA_CMD, DMA_START, f"DMA of {size} bytes RAM -> device")
    irq.read(0)
    edu.write64(REG_DMA_SRC, DEVICE_BUFFER)
    edu.write64(REG_DMA_DST, dst)
    edu.write64(REG_DMA_COUNT, size)
    edu.write64(REG_DMA_CMD, DMA_START | DMA_TO_RAM | DMA_IRQ)
    count = await edu.wait_irq(irq, IRQ_DMA, f"DMA of {size} bytes device -> RAM")
    status = edu.read32(REG_IRQ_STATUS)
    await edu.wait_clear(REG_DMA_CMD, DMA_START, idle)
    edu.acknowledge(IRQ_DMA)
    back = buf.read(page, size)
    mismatch = next((i for i in range(size) if back[i] != pattern[i]), None)
    st.data.update(
        interrupts=count,
        irq_status=status,
        src_iova=src,
        dst_iova=dst,
        bytes=size,
        match=mismatch is None,
    )
    if mismatch is not None:
        raise EduError(
            f"{edu.name}: DMA round trip via device buffer {DEVICE_BUFFER:#x} differs at "
            f"byte {mismatch}: wrote {pattern[mismatch]:#04x}, got {back[mismatch]:#04x}"
        )
    st.summary = (
        f"{size} bytes IOVA {src:#x} -> device {DEVICE_BUFFER:#x} -> IOVA {dst:#x}, "
        f"identical (MSI x{count})"
    )


async def drive(
    kernel: Kernel,
    address: PciAddress,
    report: Report,
    *,
    backend: Backend = "container",
    timeout: float = DEFAULT_TIMEOUT,
    n: int = DEFAULT_FACTORIAL,
) -> None:
    """Run every step on the edu at ``address``; raises on the first failure."""
    report.device = str(address)
    # Undone in reverse: bus master off, MSI off, DMA buffer freed, BAR
    # unmapped, device fd closed (the kernel resets it), session closed.
    stack = Teardown()
    try:
        with report.step("open") as st:
            session = await _in_thread(Session, kernel, backend)
            stack.add("session", session.close)
            dev = await _in_thread(session.open_device, address)
            stack.add("device", session.close_device, dev)
            ids = (dev.config.vendor_id, dev.config.device_id)
            if ids != (EDU_VENDOR, EDU_DEVICE):
                raise EduError(
                    f"{dev.name}: config space says {ids[0]:04x}:{ids[1]:04x}, "
                    f"not {EDU_VENDOR:04x}:{EDU_DEVICE:04x}"
                )
            region = dev.region(PciRegion.BAR0)
            bar = region.mmap()
            stack.add("BAR0 mapping", bar.close)
            edu = Edu(dev, region, bar, timeout)
            group = dev.group.number if dev.group is not None else None
            st.data.update(iommu_group=group, bar0_size=region.size, backend=backend)
            via = f"group {group}" if group is not None else f"iommufd devid {dev.devid}"
            st.summary = f"{dev.name} via {via}, BAR0 {region.size // 1024} KiB mmapped"
        with report.step("identify") as st:
            identify(edu, st)
        with report.step("liveness") as st:
            liveness(edu, st)
        with report.step("factorial") as st:
            await factorial(edu, n, None, st)
        with report.step("setup") as st:
            irq, buf = setup(session, edu, stack, st)
        with report.step("interrupt") as st:
            await interrupt(edu, irq, st)
        with report.step("factorial-irq") as st:
            await factorial(edu, n, irq, st)
        with report.step("dma") as st:
            await dma(edu, irq, buf, st)
    finally:
        with anyio.CancelScope(shield=True), report.step("shutdown") as st:
            undone = ", ".join(reversed(stack.names)) or "nothing"
            await _in_thread(stack.close)
            st.summary = f"released {undone}"


# --- finding the device ------------------------------------------------------------------------


def resolve(sysfs: Sysfs, text: str | None) -> PciAddress:
    """The edu to drive: ``text``, checked, or the first edu bound to vfio-pci."""
    try:
        return sysfs.find_device(
            EDU_VENDOR, EDU_DEVICE, text, name="QEMU's edu", hint="start QEMU with `-device edu`"
        )
    except AddressError as exc:  # the address names no edu: a usage error
        raise UsageError(str(exc)) from None


# --- command line ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="edu_driver.py",
        description="Drive QEMU's edu device (1234:11e8) from userspace through VFIO: "
        "identification, liveness, factorial, MSI, DMA.",
        epilog="Exit status: 0 all steps passed, 1 the device or its setup failed, 2 usage error.",
    )
    p.add_argument(
        "address", nargs="?", help="PCI address (default: the first edu bound to vfio-pci)"
    )
    p.add_argument(
        "--simulate",
        metavar="TOPOLOGY",
        help="run on the simulator, e.g. qemu-vmtest or qemu-vmtest,scale=0.01 "
        "(default: $VFIOPY_SIMULATE, else the real kernel)",
    )
    p.add_argument("--backend", choices=("container", "iommufd"), default="container")
    p.add_argument("--json", action="store_true", help="print one result document on stdout")
    p.add_argument("--trio", action="store_true", help="run on trio instead of asyncio")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"limit of every wait on the device (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--factorial",
        type=int,
        default=DEFAULT_FACTORIAL,
        metavar="N",
        help=f"compute N! (default {DEFAULT_FACTORIAL})",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    return p


def configure_logging(verbose: int, stream: TextIO) -> None:
    """Library events on ``stream`` (stderr): console on a TTY, JSON lines otherwise."""
    configure_cli_logging(verbosity_level(verbose), stream)


def _human(out: TextIO) -> Callable[[Step], None]:
    def show(s: Step) -> None:
        state = "ok" if s.ok else "FAILED"
        text = s.summary if s.ok or not s.error else s.error
        out.write(f"  {s.name:<14}{state:<8}{text} [{s.elapsed_s * 1000:.1f} ms]\n")
        out.flush()

    return show


def main(argv: Sequence[str] | None = None, kernel: Kernel | None = None) -> int:
    """Run the driver; ``kernel`` (a simulated process, in tests) replaces the system's."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    configure_logging(args.verbose, sys.stderr)
    # With --json, stdout carries only the document; the step lines move to stderr.
    human = sys.stderr if args.json else sys.stdout
    async_backend = "trio" if args.trio else "asyncio"
    report = Report(backend=args.backend, async_backend=async_backend, on_step=_human(human))
    try:
        if args.timeout <= 0:
            raise UsageError("--timeout must be > 0")
        if not 0 <= args.factorial <= MASK32:
            raise UsageError("--factorial must be in 0..4294967295 (a 32-bit register)")
        if args.trio and importlib.util.find_spec("trio") is None:
            raise UsageError("--trio needs the trio package (pip install trio)")
        if kernel is None:
            kernel = _kernel(args.simulate)
        report.simulated = _machine(kernel) is not None
        address = resolve(Sysfs(kernel), args.address)
        sim = ", simulated" if report.simulated else ""
        human.write(f"edu {address} ({args.backend} backend, {async_backend}{sim})\n")
        backend: Backend = "iommufd" if args.backend == "iommufd" else "container"
        anyio.run(
            _run,
            kernel,
            address,
            report,
            backend,
            args.timeout,
            args.factorial,
            backend=async_backend,
        )
    except UsageError as exc:
        report.fail(EXIT_USAGE, str(exc))
    except (EduError, OSError) as exc:  # OSError: a VfioError, or a bare one from the kernel
        report.fail(EXIT_DEVICE, str(exc))
    except KeyboardInterrupt:  # the device is closed by now: the cleanup is shielded
        report.fail(EXIT_DEVICE, "interrupted")
    finally:
        machine = _machine(kernel) if kernel is not None else None
        if machine is not None:
            report.sim_open_files = machine.open_fds()
    if report.error is not None:
        sys.stderr.write(f"edu_driver: error: {report.error}\n")
    else:
        human.write(f"edu {report.device}: all steps passed, {report.interrupts} interrupts\n")
    if report.sim_open_files:
        sys.stderr.write(f"simulator: {report.sim_open_files} files still open\n")
    if args.json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
        sys.stdout.flush()
    return report.exit_code


def _kernel(spec: str | None) -> Kernel:
    """The simulator for ``spec``, else the default (itself simulated under $VFIOPY_SIMULATE)."""
    try:
        return simulated_kernel(spec) if spec else default_kernel()
    except ValueError as exc:  # an unknown topology or option
        raise UsageError(str(exc)) from None
    except ImportError as exc:
        raise UsageError(
            f"the simulator is not importable ({exc}): pip install -e . in the repository, "
            "or put its tools/ directory on PYTHONPATH"
        ) from None


def _machine(kernel: Kernel) -> Any:
    """The simulated machine behind ``kernel``; None on a real kernel."""
    return machine_of(kernel)


async def _run(
    kernel: Kernel,
    address: PciAddress,
    report: Report,
    backend: Backend,
    timeout: float,
    n: int,
) -> None:
    await drive(kernel, address, report, backend=backend, timeout=timeout, n=n)


if __name__ == "__main__":
    sys.exit(main())
