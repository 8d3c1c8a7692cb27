"""``python -m vfiopy.bind`` (``vfiopy-bind``): bind devices to vfio-pci, restore them.

Exit status: 0 when every device asked for reached its target (or, with ``--dry-run``,
could); 1 when any was refused or failed (in use by the host or by a VFIO user, an IOMMU
group that would not be usable, a driver's probe failing, no state file); 2 for usage
errors (bad options, a malformed address, an address or driver that names nothing).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vfiopy._cliargs import JsonOut, Parser, finite, simulate_option, verbosity_options
from vfiopy.errors import AddressError
from vfiopy.release.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, configure_logging

if TYPE_CHECKING:
    from mock_vfio import Machine

    from vfiopy.bind._ops import BindReport
    from vfiopy.bind._state import BindState
    from vfiopy.kernel import Kernel

PROG = "python -m vfiopy.bind"
ACTIONS = ("bind", "restore", "status")


def build_parser() -> Parser:

    p = Parser(
        prog=PROG,
        description="Bind PCI devices to vfio-pci (per-device driver_override, whole IOMMU "
        "groups, never a device the host uses) and restore them to the drivers they had, "
        "in parallel.",
        epilog="Exit status: 0 all done, 1 any refused or failed, 2 usage error.",
    )
    p.add_argument(
        "action",
        choices=ACTIONS,
        help="bind: to vfio-pci; restore: back to the "
        "recorded drivers (all recorded devices when no ADDR); status: the state file",
    )
    p.add_argument(
        "addresses", nargs="*", metavar="ADDR", help="PCI address (0000:3b:00.0 or 3b:00.0)"
    )
    p.add_argument(
        "--driver",
        help="restore: bind ADDR... to this host driver whatever the state file says "
        "(for a lost state file)",
    )
    add_run_options(p, "devices")
    return p


def add_run_options(p: Parser, what: str) -> None:
    """The options vfiopy-bind and vfiopy-sriov share: the state file, --dry-run, --json,
    --max-parallel, -v/-q and the simulator's."""
    from vfiopy.bind._ops import DEFAULT_MAX_PARALLEL
    from vfiopy.bind._state import DEFAULT_STATE_PATH

    p.add_argument(
        "--state",
        metavar="PATH",
        help=f"the bind state file (default {DEFAULT_STATE_PATH}; with --simulate, one in the "
        "simulator's directory)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check and say what would be done; touch nothing"
    )
    p.add_argument("--json", action="store_true", help="write one JSON document on stdout")
    p.add_argument(
        "--max-parallel",
        type=int,
        default=DEFAULT_MAX_PARALLEL,
        help=f"{what} worked on at once (default {DEFAULT_MAX_PARALLEL}; 1: one at a time)",
    )
    verbosity_options(p, f"more log events on stderr (-v: every one of the {what}, -vv: debug)")
    sim = simulate_option(p, "vm-host", "; its bindings are kept between runs in --sim-dir")
    sim.add_argument(
        "--sim-dir",
        metavar="DIR",
        help="where the simulated host's state and the state file live between runs "
        "(default: a directory per topology under the temporary directory)",
    )
    sim.add_argument(
        "--time-scale", type=finite, help="time scale of the modelled delays (1: real time)"
    )


def sim_dir(topology: str) -> str:
    """The default directory of a simulated host's state between runs."""
    safe = re.sub(r"[^A-Za-z0-9_.:-]", "_", topology.split(",")[0])
    return os.path.join(tempfile.gettempdir(), f"vfiopy-sim-{os.getuid()}", safe)


class SimHost:
    """A simulated host whose bindings persist in ``directory`` across runs."""

    def __init__(self, spec: str, directory: str, time_scale: float | None) -> None:
        from mock_vfio.persist import load

        from vfiopy.simulate import machine_of, simulated_kernel

        if time_scale is not None:
            spec += f",scale={time_scale}"
        self.kernel = simulated_kernel(spec)
        machine = machine_of(self.kernel)
        assert machine is not None
        self.machine: Machine = machine
        self.directory = directory
        self.path = os.path.join(directory, "machine.json")
        load(self.machine, self.path)

    def save(self) -> None:
        from mock_vfio.persist import save

        save(self.machine, self.path)


# --- output --------------------------------------------------------------------------------

out = JsonOut()  # also the SR-IOV command line's


def _json_error(action: str, message: str, state: str | None = None) -> None:
    out.write(
        {
            "schema": 1,
            "action": action,
            "ok": False,
            "dry_run": False,
            "elapsed_s": 0.0,
            "state_file": state,
            "devices": [],
            "error": message,
        }
    )


def _usage(args: argparse.Namespace, message: str, parser: Parser | None = None) -> int:
    p = parser if parser is not None else build_parser()
    p.print_usage(sys.stderr)
    sys.stderr.write(f"{p.prog}: error: {message}\n")
    if args.json:
        _json_error(args.action, message)
    return EXIT_USAGE


def _refuse(args: argparse.Namespace, exc: OSError | str, code: int, state: str | None) -> int:
    sys.stderr.write(f"error: {exc}\n")
    if args.json:
        _json_error(args.action, str(exc), state)
    return code


_DONE = {"bind": "bound to vfio-pci", "restore": "restored"}


def emit(args: argparse.Namespace, report: BindReport) -> int:
    """The report: JSON on stdout with --json; lines on stderr (the plan on stdout)."""
    if args.json:
        out.write(report.to_json())
    if not args.quiet or not report.ok:
        plan_out = sys.stdout if report.dry_run and not args.json else sys.stderr
        for d in report.devices:
            if d.error:
                sys.stderr.write(f"error: {d.error}\n")
            elif not args.quiet:
                arrow = f"{d.driver_before or 'none'} -> {d.driver_after or 'none'}"
                plan_out.write(
                    f"  {d.address}: {arrow} ({d.status}, done at {d.end_s:.3f} s)\n"
                    if not report.dry_run
                    else f"  {d.address}: {arrow} ({d.status})\n"
                )
        if not args.quiet:
            done = sum(
                d.status in ("bound", "restored", "already", "planned") for d in report.devices
            )
            what = "would be " + _DONE[report.action] if report.dry_run else _DONE[report.action]
            sys.stderr.write(
                f"{done}/{len(report.devices)} devices {what} in {report.elapsed_s:.3f} s; "
                f"state file {report.state_file}\n"
            )
    return EXIT_OK if report.ok else EXIT_FAILED


# --- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, kernel: Kernel | None = None) -> int:
    """Run the command line; ``kernel`` (a simulated process, in tests) replaces the system's."""
    out.reset()
    args = build_parser().parse_or_exit(argv, lambda m: _json_error("?", m), intermixed=True)
    if isinstance(args, int):
        return args
    try:
        return _main(args, kernel)
    except Exception as exc:  # a bug: its traceback, and still one JSON document
        import traceback

        traceback.print_exc()
        if args.json and not out.written:
            _json_error(args.action, f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED


def check_common(args: argparse.Namespace, usage: Callable[[str], int]) -> int | None:
    """The usage errors every action shares; None when there is none."""
    if args.simulate is not None and not args.simulate.strip():
        from vfiopy.simulate import NO_TOPOLOGY

        return usage(NO_TOPOLOGY)
    if args.max_parallel < 1 or (args.time_scale is not None and not args.time_scale >= 0):
        return usage("--max-parallel must be >= 1 and --time-scale >= 0")
    return None


@dataclass
class Target:
    """What a run acts on: the kernel (a simulated host's with --simulate) and the state file."""

    kernel: Kernel
    state: BindState
    host: SimHost | None = None


def open_target(args: argparse.Namespace, kernel: Kernel | None) -> Target | int:
    """The run's :class:`Target`; an int is the exit status of a bad --simulate spec."""
    from vfiopy.bind._state import DEFAULT_STATE_PATH, BindState
    from vfiopy.kernel import default_kernel

    host: SimHost | None = None
    state_path = args.state
    if kernel is None and args.simulate:
        directory = args.sim_dir or sim_dir(args.simulate)
        try:
            host = SimHost(args.simulate, directory, args.time_scale)
        except ValueError as exc:  # a bad spec or topology: nothing was done
            return _refuse(args, f"--simulate: {exc}", EXIT_USAGE, None)
        kernel = host.kernel
        state_path = state_path or os.path.join(directory, "bind.json")
    return Target(
        kernel if kernel is not None else default_kernel(),
        BindState(state_path or DEFAULT_STATE_PATH),
        host,
    )


def run_action(args: argparse.Namespace, target: Target, action: Callable[[], int]) -> int:
    """``action``'s exit status; a request naming nothing is 2, a refusal or failure 1.
    A simulated host's new state is kept for the next run."""
    from vfiopy.bind._ops import BindUsageError
    from vfiopy.errors import VfioError

    try:
        return action()
    except (AddressError, BindUsageError) as exc:
        return _refuse(args, exc, EXIT_USAGE, target.state.path)
    except VfioError as exc:
        return _refuse(args, exc, EXIT_FAILED, target.state.path)
    finally:
        if target.host is not None and not args.dry_run:
            target.host.save()


def _main(args: argparse.Namespace, kernel: Kernel | None) -> int:
    import anyio

    from vfiopy.bind._ops import bind_devices, restore_devices

    configure_logging(args.verbose, args.quiet, sys.stderr)
    bad = check_common(args, lambda message: _usage(args, message))
    if bad is not None:
        return bad
    if args.action == "bind" and not args.addresses:
        return _usage(args, "bind needs the devices' addresses")
    if args.driver is not None and args.action != "restore":
        return _usage(args, "--driver goes with restore")
    if args.action == "status" and args.addresses:
        return _usage(args, "status takes no addresses")
    target = open_target(args, kernel)
    if isinstance(target, int):
        return target
    k, state = target.kernel, target.state

    def action() -> int:
        if args.action == "status":
            return _status(args, k, state)
        if args.action == "bind":
            report = anyio.run(
                lambda: bind_devices(
                    args.addresses,
                    kernel=k,
                    state=state,
                    dry_run=args.dry_run,
                    max_parallel=args.max_parallel,
                )
            )
        else:
            report = anyio.run(
                lambda: restore_devices(
                    args.addresses or None,
                    kernel=k,
                    state=state,
                    driver=args.driver,
                    dry_run=args.dry_run,
                    max_parallel=args.max_parallel,
                )
            )
        return emit(args, report)

    return run_action(args, target, action)


def _status(args: argparse.Namespace, kernel: Kernel, state: BindState) -> int:
    """What the state file records, next to each device's driver now."""
    from vfiopy.bind._ops import BindReport, DeviceResult
    from vfiopy.errors import VfioError
    from vfiopy.sysfs import Sysfs

    sysfs = Sysfs(kernel)
    report = BindReport("status", state.path)
    for addr, e in sorted(state.load().items()):
        r = DeviceResult(addr, e.group if e.group >= 0 else None, e.driver)
        try:
            r.driver_after = sysfs.driver(addr)
            r.status = "bound" if r.driver_after == "vfio-pci" else "changed"
        except VfioError as exc:
            r.status, r.error = "gone", str(exc)
        report.devices.append(r)
    if args.json:
        doc = report.to_json()
        doc["ok"] = True
        out.write(doc)
    elif not args.quiet:
        for d in report.devices:
            sys.stdout.write(
                f"{d.address}: recorded {d.driver_before or 'none'}, now {d.driver_after or 'none'}"
                f" ({d.status})\n"
            )
        sys.stdout.write(f"{len(report.devices)} devices in {state.path}\n")
    return EXIT_OK


def run() -> None:
    """The ``vfiopy-bind`` console script."""
    sys.exit(main())


__all__ = ["build_parser", "main", "run", "sim_dir"]
