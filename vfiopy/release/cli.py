"""``python -m vfiopy.release``: reset and release devices, or tear down a VMM's, concurrently.

Exit status: 0 when every device asked for was released (or, with
``--dry-run``, could be); 1 when any failed or was refused (in use, wrong
driver, non-viable group, a reset domain shared with a device not ours, no
permission on the pid); 2 for usage errors (bad options, a malformed
address, an address or pid that names nothing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from vfiopy._cliargs import Parser, finite
from vfiopy.release._constants import DEFAULT_MAX_PARALLEL, SCHEMA

# Only the usage is here: the run (vfiopy.release._clirun, with anyio, structlog, the
# kernel's door and the release machinery) is imported once the arguments are read, so that
# --help and argparse's usage errors start without it (README: start-up).
if TYPE_CHECKING:
    from vfiopy.kernel import Kernel

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_TIMEOUT = 90.0  # a bus reset may poll up to 60 s for the device to come back


PID_MAX = 1 << 22  # PID_MAX_LIMIT: Linux pids are at most this


def _pid(text: str) -> int:
    """``--pid``: a process id, 1 to PID_MAX (argparse reports the ValueError as a usage error)."""
    pid = int(text)
    if not 0 < pid <= PID_MAX:
        raise ValueError(text)
    return pid


_pid.__name__ = f"process id (1 to {PID_MAX})"


def build_parser() -> Parser:
    # argparse's own usage errors exit 2, as EXIT_USAGE says.
    p = Parser(
        prog="python -m vfiopy.release",
        description="Reset and release VFIO devices concurrently, one reset per reset domain "
        "and domains in parallel; or tear down a VMM (--pid) so its devices' resets run in "
        "parallel instead of one by one in its exit.",
        epilog="Exit status: 0 all released, 1 any failed or refused, 2 usage error.",
    )
    p.add_argument(
        "addresses",
        nargs="*",
        metavar="ADDR",
        help="PCI address (0000:3b:00.0 or 3b:00.0) of a device bound to vfio-pci and not in use",
    )
    p.add_argument(
        "--pid",
        type=_pid,
        help="tear down this VMM process: take its VFIO device "
        "fds, signal it, wait for its exit, release the devices concurrently",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="with --pid: a guardian; signal nothing, follow the VMM (let go of devices it "
        "hot-unplugs, take those it hot-plugs) and release everything concurrently when it "
        "exits, whatever the reason",
    )
    p.add_argument("--signal", default="TERM", help="signal for --pid (default TERM)")
    p.add_argument(
        "--grace",
        type=finite,
        default=10.0,
        help="seconds to wait after --signal before SIGKILL (default 10)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (domains, devices, expected resets) and touch nothing",
    )
    p.add_argument(
        "--json", action="store_true", help=f"write one JSON document (schema {SCHEMA}) on stdout"
    )
    p.add_argument(
        "--timeout",
        type=finite,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per reset domain before it is reported failed and abandoned "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--max-parallel",
        type=int,
        default=DEFAULT_MAX_PARALLEL,
        help=f"worker threads at most (default {DEFAULT_MAX_PARALLEL}); the run "
        "uses one per reset domain up to this",
    )
    p.add_argument(
        "--backend",
        choices=["container", "iommufd"],
        default="container",
        help="how ADDR devices are opened (default container)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log events on stderr (-v: every device, -vv: debug)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="errors only on stderr")
    sim = p.add_argument_group("simulator (no hardware needed)")
    sim.add_argument(
        "--simulate",
        metavar="TOPOLOGY",
        default=os.environ.get("VFIOPY_SIMULATE") or None,
        help="run against the kernel simulator with this topology, e.g. gpus:8 "
        "(default: $VFIOPY_SIMULATE)",
    )
    sim.add_argument(
        "--kernel-model",
        choices=["devset", "legacy"],
        help="devset: Linux >= 5.0, device sets release in parallel (default); "
        "legacy: one driver lock serialises every release",
    )
    sim.add_argument(
        "--reset-model",
        choices=["current", "pre-6.3"],
        help="bus reset delays of Linux >= 6.3 (link-speed dependent) or before (1 s); "
        "default pre-6.3",
    )
    sim.add_argument(
        "--time-scale",
        type=finite,
        help="simulated delays times this (default 1: real reset times)",
    )
    sim.add_argument(
        "--simulate-vmm",
        action="store_true",
        help="spawn a simulated VMM process holding the ADDR devices (all vfio-pci "
        "devices when none are given) and use it as --pid",
    )
    return p


# --- output ------------------------------------------------------------------------------


def configure_logging(verbose: int, quiet: bool, stream: TextIO, defer: bool = False) -> None:
    """Events on ``stream`` (stderr); JSON lines carry the per-device events when not on a TTY.
    ``defer``: structlog is set up at the first event kept (the caller forgets it at its end)."""
    import logging  # here: --help need not import logging (nor structlog)

    from vfiopy.logsetup import configure_cli_logging, defer_cli_logging, verbosity_level

    # On a TTY the progress line says what the per-device events would.
    default = logging.WARNING if stream.isatty() else logging.INFO
    setup = defer_cli_logging if defer else configure_cli_logging
    setup(verbosity_level(verbose, quiet, default), stream)


# --- main ---------------------------------------------------------------------------------


def _json_error(message: str) -> None:
    from vfiopy.release._clirun import json_error  # only for a usage error: --help stays light

    json_error(message)


def main(argv: Sequence[str] | None = None, kernel: Kernel | None = None) -> int:
    """Run the CLI; ``kernel`` (a simulated process, in tests) replaces the system's."""
    args = build_parser().parse_or_exit(argv, _json_error)
    if isinstance(args, int):
        return args
    from vfiopy.release._clirun import run

    return run(args, kernel)
