"""``python -m vfiopy.bench``: concurrent release versus close loops and process exit.

Exit status: 0 when every run did what it measures, 1 when any run failed
(a device did not open or release), 2 for usage errors (bad arguments, an
unknown topology, ``--plot`` without matplotlib, ``--real`` without access).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from vfiopy._cliargs import Parser, finite, json_option
from vfiopy.bench._modenames import HOST_MODES, SWEEP_MODES

if TYPE_CHECKING:
    from vfiopy.bench._results import MmioResult
    from vfiopy.bench._sweep import SystemFactory

# The modes, the sweep and its report are imported once the arguments are read: `--help`
# needs only the modes' names, and importing the modes brings in the release machinery.

KERNEL_MODELS = ("legacy", "devset")
RESET_MODELS = ("pre-6.3", "current")
DEFAULT_TOPOLOGY = "gpus:16"
_PARAMETRIC = ("gpus", "vfs", "nvme")


class UsageError(Exception):
    """Arguments that cannot be run; exit status 2."""


class _JsonOut:
    """``--json``'s one document: on stdout (``-``) or in PATH, which is opened (not
    truncated) before anything runs, so that an unwritable PATH is a usage error before a
    sweep of minutes, not after it. Whatever the exit, one document is written."""

    def __init__(self, dest: str | None) -> None:
        self.dest = dest
        self.fd: int | None = None
        self.written = False

    def open(self) -> None:
        if self.dest is not None and self.dest != "-" and self.fd is None:
            try:
                self.fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                self.dest = None  # nowhere to write, not even the error
                raise UsageError(f"--json {exc.filename}: {exc.strerror}") from exc

    def write(self, doc: dict[str, Any]) -> None:
        if self.written or self.dest is None:
            return
        text = json.dumps(doc, indent=2) + "\n"
        self.written = True
        if self.dest == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        self.open()
        assert self.fd is not None
        with contextlib.suppress(OSError):  # a pipe or a terminal: nothing to truncate
            os.ftruncate(self.fd, 0)
        with open(self.fd, "w", encoding="utf-8", closefd=False) as f:
            f.write(text)

    def error(self, message: str) -> None:
        """The document of a run that did not happen or did not finish."""
        from vfiopy.bench._results import SCHEMA

        doc = {
            "schema": SCHEMA,
            "ok": False,
            "error": message,
            "args": {},
            "runs": [],
            "mmio": None,
        }
        with contextlib.suppress(OSError, UsageError):  # stderr has said it already
            self.write(doc)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive.__name__ = "whole number >= 1"


def _parser() -> Parser:
    modes = "; ".join(
        f"{name} ({letter}): {about}"
        for name, (letter, about) in (*SWEEP_MODES.items(), *HOST_MODES.items())
    )
    p = Parser(
        prog="python -m vfiopy.bench",
        description="Time how long N VFIO devices take to release (and to open): "
        "vfiopy's release manager against process exit, a close loop, a thread per fd "
        "and a process per device. Runs on the kernel simulator unless --real is given.",
        epilog=f"modes: {modes}. Exit status: 0 all runs ok, 1 a run failed, 2 usage error.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--simulate",
        metavar="TOPOLOGY",
        default=None,
        help=f"simulator topology: gpus:N, vfs:N, nvme:N, a ready name or a TOML path "
        f"(default {DEFAULT_TOPOLOGY}); with gpus/vfs/nvme, each N of --devices builds "
        "that many",
    )
    where.add_argument(
        "--real",
        metavar="ADDR",
        nargs="+",
        help="real devices bound to vfio-pci (needs root); --devices takes the first N "
        "IOMMU groups of them",
    )
    p.add_argument("--devices", metavar="N", type=int, nargs="+", help="device counts to sweep")
    p.add_argument(
        "--modes",
        metavar="MODE",
        nargs="+",
        default=list(SWEEP_MODES),
        help="modes to run, by name or letter (default: all)",
    )
    p.add_argument(
        "--kernel-model",
        nargs="+",
        choices=KERNEL_MODELS,
        default=["devset"],
        help="simulated kernel: legacy (< 5.0, one global lock) or devset (>= 5.15)",
    )
    p.add_argument(
        "--reset-model",
        nargs="+",
        choices=RESET_MODELS,
        default=["pre-6.3"],
        help="simulated bus reset delay: pre-6.3 (fixed 1 s) or current (link dependent)",
    )
    p.add_argument(
        "--time-scale",
        type=finite,
        default=1.0,
        metavar="F",
        help="multiply every simulated delay by F (default 1)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON ('-': stdout); whatever the exit, one document "
        '(an error: "ok": false and "error"); PATH is checked before anything runs',
    )
    p.add_argument("--plot", metavar="PATH", help="write a PNG of teardown time against N")
    p.add_argument(
        "--mmio", action="store_true", help="also time a mapped-BAR read32 (ns per call)"
    )
    p.add_argument(
        "--mmio-calls", type=_positive, default=200_000, metavar="N", help=argparse.SUPPRESS
    )
    p.add_argument(
        "--startup",
        nargs="?",
        type=int,
        const=20,
        metavar="ROUNDS",
        help="instead of a sweep, time the start-up of `python -m vfiopy.release --help` and "
        "`python -m vfiopy.bench --help` against `python -c pass`, as whole processes in "
        "turn, ROUNDS rounds (default 20); target: 60 ms over the bare interpreter",
    )
    p.add_argument(
        "--dma",
        nargs="?",
        type=_positive,
        const=3,
        metavar="ROUNDS",
        help="instead of a sweep, time mapping and unmapping 1 GiB for DMA in 4 KiB and in "
        "2 MiB pages on iommufd, ROUNDS rounds (default 3); on the simulator this is "
        "vfiopy's and the simulator's cost only",
    )
    p.add_argument(
        "--dma-bytes", type=_positive, default=1 << 30, metavar="N", help=argparse.SUPPRESS
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every device event")
    p.set_defaults(kernel_version=None)  # the spec's version=X.Y, when it has one
    return p


def _real_group_count(addresses: list[str]) -> int:
    """How many IOMMU groups (the unit a run takes) the given real devices span."""
    from vfiopy.errors import VfioError
    from vfiopy.kernel import LinuxKernel
    from vfiopy.sysfs import Sysfs

    sysfs = Sysfs(LinuxKernel())
    try:
        return len({sysfs.iommu_group(a) for a in addresses})
    except VfioError as exc:
        raise ValueError(str(exc)) from exc


def _apply_spec_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``gpus:16,kernel=legacy,reset=current,scale=0.1``: the VFIOPY_SIMULATE form.

    Options written in the spec replace the matching flags, so a spec copied
    from the environment variable runs the same machine here.
    """
    from mock_vfio.version import is_version

    from vfiopy.simulate import parse_spec

    try:
        spec = parse_spec(args.simulate)
    except ValueError as exc:
        parser.error(str(exc))
    opts = {k.strip(): v for k, _, v in (o.partition("=") for o in args.simulate.split(",")[1:])}
    given = set(opts)
    # a version in the spec (version=X.Y or kernel=X.Y) is the machine's, and chooses the
    # models it implies
    if "version" in given or is_version(opts.get("kernel", "")):
        args.kernel_version = spec.kernel_version
    if "kernel" in given or "version" in given:
        if spec.kernel_model not in KERNEL_MODELS:
            parser.error(f"kernel={spec.kernel_model}: choose from {', '.join(KERNEL_MODELS)}")
        args.kernel_model = [spec.kernel_model]
    if "reset" in given or "version" in given:
        if spec.reset_model not in RESET_MODELS:
            parser.error(f"reset={spec.reset_model}: choose from {', '.join(RESET_MODELS)}")
        args.reset_model = [spec.reset_model]
    if "scale" in given:
        args.time_scale = spec.time_scale
    args.simulate = spec.topology


def _sweep_counts(args: argparse.Namespace, topology: str) -> list[int]:
    if args.devices:
        bad = [n for n in args.devices if n < 1]
        if bad:
            raise UsageError(f"--devices must be positive, got {bad}")
        return list(dict.fromkeys(args.devices))
    kind, _, num = topology.partition(":")
    if kind in _PARAMETRIC and num.isdigit():
        return [int(num)]
    return [0]  # 0: every device the topology has


def _factory(args: argparse.Namespace) -> tuple[SystemFactory, str]:
    if args.real:
        from vfiopy.bench._real import RealFactory

        return RealFactory(args.real), "real"
    from vfiopy.bench._sim import SimFactory

    topology = args.simulate or DEFAULT_TOPOLOGY
    return SimFactory(topology, args.kernel_version), topology


def _startup(
    args: argparse.Namespace, parser: argparse.ArgumentParser, out: TextIO | None, sink: _JsonOut
) -> int:
    """``--startup``: the tools' start-up as whole processes, instead of a sweep."""
    from vfiopy.bench._startup import measure

    if args.startup < 1:
        parser.error("--startup needs at least 1 round")
    startup = measure(args.startup)
    table_out = out if out is not None else (sys.stderr if args.json == "-" else sys.stdout)
    print("\n".join(startup.lines()), file=table_out)
    sink.write(startup.to_json())
    return 0


def _dma(
    args: argparse.Namespace, parser: argparse.ArgumentParser, out: TextIO | None, sink: _JsonOut
) -> int:
    """``--dma``: map and unmap 1 GiB in 4 KiB and 2 MiB pages, instead of a sweep."""
    from vfiopy.bench._dma import measure

    try:
        make, topology = _factory(args)
        system = make(1, args.kernel_model[0], args.reset_model[0], args.time_scale)
    except (UsageError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        sink.error(str(exc))
        return 2
    try:
        address = system.groups[0].devices[0]
        backend = f"real device {address}" if args.real else f"simulator {topology}"
        bench = measure(system.kernel, address, args.dma, backend, args.dma_bytes)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        sink.error(str(exc))
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"{parser.prog}: dma benchmark failed: {exc}", file=sys.stderr)
        sink.error(f"dma benchmark failed: {exc}")
        return 1
    finally:
        system.discard()
    table_out = out if out is not None else (sys.stderr if args.json == "-" else sys.stdout)
    print("\n".join(bench.lines()), file=table_out)
    sink.write(bench.to_json())
    return 0


def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The bench; its exit status. With ``--json``, whatever the exit, one document."""
    parser = _parser()
    dest = json_option(argv, takes_path=True)
    sink = _JsonOut(dest if isinstance(dest, str) else None)
    try:
        return _run(parser, argv, out, sink)
    except SystemExit as exc:  # --help, or argparse's usage error (parser.error)
        code = exc.code if isinstance(exc.code, int) else 2
        if code == 2:
            sink.error(parser.message)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sink.error("interrupted")
        return 130
    except Exception as exc:  # a bug: its traceback, and still one JSON document
        import traceback

        traceback.print_exc()
        sink.error(f"internal error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        sink.close()


def _run(parser: Parser, argv: Sequence[str] | None, out: TextIO | None, sink: _JsonOut) -> int:
    args = parser.parse_args(argv)
    sink.dest = args.json
    try:
        sink.open()
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    import logging  # not above: --help imports neither logging nor structlog

    from vfiopy.logsetup import configure_cli_logging

    configure_cli_logging(logging.INFO if args.verbose else logging.WARNING)
    if args.startup is not None:
        return _startup(args, parser, out, sink)
    if args.dma is not None:
        return _dma(args, parser, out, sink)
    from vfiopy.bench._modes import Mode, parse_mode
    from vfiopy.bench._progress import Progress
    from vfiopy.bench._report import (
        PlotUnavailable,
        check_plot_available,
        format_summary,
        write_plot,
    )
    from vfiopy.bench._results import Sweep
    from vfiopy.bench._sweep import plan, run_sweep

    try:
        modes: list[Mode] = [parse_mode(m) for m in dict.fromkeys(args.modes)]
    except ValueError as exc:
        parser.error(str(exc))
    if args.simulate is not None and not args.simulate.strip():
        from vfiopy.simulate import NO_TOPOLOGY

        parser.error(NO_TOPOLOGY)
    if args.simulate and "," in args.simulate:
        _apply_spec_options(args, parser)
    if args.time_scale < 0:
        parser.error("--time-scale must be >= 0")
    if args.real:
        args.time_scale = 1.0  # real resets take the time they take
    try:
        if args.plot:
            check_plot_available()
        make, topology = _factory(args)
        counts = (
            [_real_group_count(args.real)]
            if args.real and not args.devices
            else _sweep_counts(args, topology)
        )
        kernel_models = ["real"] if args.real else args.kernel_model
        reset_models = ["real"] if args.real else args.reset_model
        # Build the first system now: a bad topology or missing access is a usage
        # error, found before a sweep that may take minutes.
        make(counts[0], kernel_models[0], reset_models[0], args.time_scale).discard()
    except (PlotUnavailable, UsageError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        sink.error(str(exc))
        return 2

    points = plan(counts, kernel_models, reset_models, modes)
    sweep = Sweep(
        args={
            "topology": topology,
            "real": args.real,
            "devices": counts,
            "modes": [m.name for m in modes],
            "kernel_models": kernel_models,
            "reset_models": reset_models,
            "time_scale": args.time_scale,
        }
    )
    mmio_failed = False
    with Progress(len(points)) as progress:
        sweep.runs = run_sweep(make, points, args.time_scale, progress)
        if args.mmio:
            try:
                sweep.mmio = make_mmio(make, args, kernel_models[0], reset_models[0])
            except (OSError, RuntimeError) as exc:
                print(f"{parser.prog}: mmio benchmark failed: {exc}", file=sys.stderr)
                mmio_failed = True

    # The table goes to stdout unless the JSON document does.
    table_out = out if out is not None else (sys.stderr if args.json == "-" else sys.stdout)
    print(format_summary(sweep), file=table_out)
    sink.write(sweep.to_json())
    if args.plot:
        write_plot(sweep, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0 if sweep.ok and not mmio_failed else 1


def make_mmio(
    make: SystemFactory, args: argparse.Namespace, kernel_model: str, reset_model: str
) -> MmioResult:
    from vfiopy.bench._mmio import measure

    system = make(1, kernel_model, reset_model, args.time_scale)
    try:
        address = system.groups[0].devices[0]
        backend = "real device" if args.real else "simulator (BAR is plain memory)"
        return measure(system.kernel, address, args.mmio_calls, backend)
    finally:
        system.discard()


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)
