"""``python -m vfiopy.sriov`` (``vfiopy-sriov``): SR-IOV VFs on demand.

``enable PF --count N --bind LIST`` creates N VFs with autoprobe off and binds only the VFs
in LIST, concurrently (to vfio-pci, or ``--driver``); ``--vf-token UUID`` then sets the VF
token of a PF bound to vfio-pci.  ``disable PF`` removes the VFs.  ``bench`` (simulator)
times enabling ``--count`` VFs and bringing up ``--bind`` of them with autoprobe on (every VF
probed by its host driver, then the few rebound one after another) against vfiopy's way.

Exit status: 0 when everything asked for happened; 1 when anything was refused or failed
(a PF without SR-IOV, another VF count in place, no PF driver, a bind failing); 2 for usage
errors (bad options, an address or driver naming nothing, a count above sriov_totalvfs).
"""

from __future__ import annotations

import argparse
import errno
import sys
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vfiopy._cliargs import Parser
from vfiopy.bind import cli as bind_cli
from vfiopy.release.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, configure_logging

if TYPE_CHECKING:
    from vfiopy.kernel import Kernel
    from vfiopy.sriov._ops import SriovReport

PROG = "python -m vfiopy.sriov"
ACTIONS = ("enable", "disable", "bench")


def vf_list(text: str) -> list[int]:
    """``0-7,12``: VF numbers (argparse reports the ValueError as a usage error)."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        first = int(lo)
        last = int(hi) if sep else first
        if first < 0 or last < first:
            raise ValueError(text)
        out += range(first, last + 1)
    return out


vf_list.__name__ = "VF list (like 0-7,12)"


def build_parser() -> Parser:

    p = Parser(
        prog=PROG,
        description="SR-IOV on demand: create a PF's VFs with sriov_drivers_autoprobe off (no "
        "host driver probes them), bind only the VFs asked for, concurrently, and put "
        "autoprobe back; set the VF token of a PF bound to vfio-pci.",
        epilog="Exit status: 0 all done, 1 any refused or failed, 2 usage error.",
    )
    p.add_argument("action", choices=ACTIONS, help="enable, disable, or bench (simulator)")
    p.add_argument("pf", nargs="?", metavar="PF", help="the PF's PCI address")
    p.add_argument("--count", type=int, help="how many VFs to have (enable; bench: default 250)")
    p.add_argument(
        "--bind",
        type=vf_list,
        default=[],
        metavar="LIST",
        help="the VFs to bind, numbered from 0 (0-7,12); bench: how many (default 8)",
    )
    p.add_argument("--driver", default="vfio-pci", help="the VFs' driver (default vfio-pci)")
    p.add_argument(
        "--vf-token",
        type=uuid.UUID,
        metavar="UUID",
        help="enable: set this VF token on the PF (bound to vfio-pci); VFs open with vf_token=UUID",
    )
    bind_cli.add_run_options(p, "VFs")
    return p


def main(argv: Sequence[str] | None = None, kernel: Kernel | None = None) -> int:
    """Run the command line; ``kernel`` (a simulated process, in tests) replaces the system's."""
    bind_cli.out.reset()
    args = build_parser().parse_or_exit(
        argv, lambda m: bind_cli._json_error("?", m), intermixed=True
    )
    if isinstance(args, int):
        return args
    try:
        return _main(args, kernel)
    except Exception as exc:  # a bug: its traceback, and still one JSON document
        import traceback

        traceback.print_exc()
        if args.json and not bind_cli.out.written:
            bind_cli._json_error(args.action, f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED


def _usage(args: argparse.Namespace, message: str) -> int:
    return bind_cli._usage(args, message, build_parser())


def _main(args: argparse.Namespace, kernel: Kernel | None) -> int:
    import anyio

    from vfiopy.sriov._ops import disable_vfs, enable_vfs

    configure_logging(args.verbose, args.quiet, sys.stderr)
    bad = bind_cli.check_common(args, lambda message: _usage(args, message))
    if bad is not None:
        return bad
    if args.action == "bench":
        if not args.simulate:
            return _usage(args, "bench runs on the simulator: give --simulate TOPOLOGY")
        return _bench(args)
    if args.pf is None:
        return _usage(args, f"{args.action} needs the PF's address")
    if args.action == "enable" and args.count is None:
        return _usage(args, "enable needs --count N")
    if args.action == "disable" and (args.count is not None or args.bind or args.vf_token):
        return _usage(args, "disable takes only the PF")
    target = bind_cli.open_target(args, kernel)
    if isinstance(target, int):
        return target
    k, state = target.kernel, target.state

    def action() -> int:
        if args.action == "disable":
            return _emit(args, anyio.run(lambda: disable_vfs(args.pf, kernel=k, state=state)))
        if args.vf_token is not None:
            _check_token_pf(k, args.pf)
        report = anyio.run(
            lambda: enable_vfs(
                args.pf,
                args.count,
                args.bind,
                driver=args.driver,
                kernel=k,
                state=state,
                dry_run=args.dry_run,
                max_parallel=args.max_parallel,
            )
        )
        if args.vf_token is not None and not args.dry_run:
            set_vf_token(k, args.pf, args.vf_token)
        return _emit(args, report)

    return bind_cli.run_action(args, target, action)


def _check_token_pf(kernel: Kernel, pf: str) -> None:
    from vfiopy.bind._ops import BindUsageError
    from vfiopy.sysfs import VFIO_DRIVER, PciAddress, Sysfs

    a = PciAddress.parse(pf)
    driver = Sysfs(kernel).driver(a) if Sysfs(kernel).exists(a) else None
    if driver != VFIO_DRIVER:
        raise BindUsageError(
            errno.EINVAL,
            str(a),
            "check --vf-token",
            detail=f"the PF is bound to {driver or 'no driver'}; a VF token belongs to a PF on "
            "vfio-pci",
            advice="leave out --vf-token, or bind the PF to vfio-pci (enable_sriov=1) first",
        )


def set_vf_token(kernel: Kernel, pf: str, token: uuid.UUID) -> None:
    """Open the PF (the kernel resets it) and set its VF token; it stays with the PF's
    vfio-pci device after the fd is closed."""
    from vfiopy.session import Session

    with Session(kernel=kernel) as session:
        session.open_device(pf).set_vf_token(token)


def _emit(args: argparse.Namespace, report: SriovReport) -> int:
    if args.json:
        doc = report.to_json()
        if args.vf_token is not None:
            doc["vf_token_set"] = not args.dry_run
        bind_cli.out.write(doc)
    for d in report.devices:
        if d.error:
            sys.stderr.write(f"error: {d.error}\n")
    if not args.quiet:
        out = sys.stdout if report.dry_run and not args.json else sys.stderr
        if report.action == "enable":
            bound = sum(d.status in ("bound", "already", "planned") for d in report.devices)
            verb = "would have" if report.dry_run else "has"
            out.write(
                f"{report.pf}: {verb} {report.numvfs_after} VFs (was {report.numvfs_before}; "
                f"enabled in {report.enable_s:.3f} s with autoprobe off, back to "
                f"{'on' if report.autoprobe_after else 'off'}); {bound}/{len(report.devices)} "
                f"VFs on {report.driver} in {report.elapsed_s:.3f} s\n"
            )
            for d in report.devices:
                if not d.error:
                    out.write(f"  {d.address}: {d.driver_after} ({d.status})\n")
        else:
            out.write(
                f"{report.pf}: {report.numvfs_before} VFs removed in {report.elapsed_s:.3f} s\n"
            )
    return EXIT_OK if report.ok else EXIT_FAILED


# --- bench ------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    """Enable ``--count`` VFs and bring up ``--bind`` of them, both ways, on fresh machines."""
    from vfiopy.sriov._bench import compare

    count = args.count if args.count is not None else 250
    nbind = len(args.bind) if args.bind else 8
    if len(args.bind) == 1:
        nbind = args.bind[0]  # --bind 8: how many
    try:
        runs = compare(args.simulate, args.pf, count, nbind, args.time_scale)
    except ValueError as exc:
        return bind_cli._refuse(args, f"bench: {exc}", EXIT_USAGE, None)
    doc: dict[str, Any] = {
        "schema": 1,
        "action": "bench",
        "ok": all(r["ok"] for r in runs),
        "runs": runs,
    }
    if args.json:
        bind_cli.out.write(doc)
    if not args.quiet:
        out = sys.stderr if args.json else sys.stdout
        out.write("way        VFs  bound  wall s  bound s  VFs probed by a host driver\n")
        for r in runs:
            out.write(
                f"{r['way']:<9} {r['vfs']:>4} {r['bound']:>6} {r['wall_s']:>7.3f} "
                f"{r['bound_s']:>8.3f}  {r['host_probes']}\n"
            )
    return EXIT_OK if doc["ok"] else EXIT_FAILED


def run() -> None:
    """The ``vfiopy-sriov`` console script."""
    sys.exit(main())


__all__ = ["build_parser", "main", "run", "set_vf_token", "vf_list"]
