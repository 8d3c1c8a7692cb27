"""The terminal table and the PNG plot of a sweep."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from vfiopy.bench._results import TEARDOWN, MmioResult, RunResult, Sweep, machine_info

_COLUMNS = (
    ("mode", "<"),
    ("phase", "<"),
    ("N", ">"),
    ("fns", ">"),
    ("kernel", "<"),
    ("reset model", "<"),
    ("wall s", ">"),
    ("resets", ">"),
    ("bound s", ">"),
    ("ratio", ">"),
    ("overlap", ">"),
    ("cpu ms/dev", ">"),
    ("target", "<"),
)


def _row(r: RunResult) -> list[str]:
    ratio = r.ratio
    if not r.ok:
        target = "FAILED"
    elif r.target_s is None:
        target = ""
    else:
        target = f"{'met' if r.meets_target else 'MISSED'} (<= {r.target_s:.3f})"
    resets = str(r.resets) if r.resets >= 0 else "?"
    if r.expected_resets is not None and r.expected_resets != r.resets:
        resets += f" (exp {r.expected_resets})"
    return [
        r.mode,
        r.phase,
        str(r.n_devices),
        str(r.n_functions),
        r.kernel_model,
        r.reset_model,
        f"{r.wall_s:.3f}",
        resets,
        f"{r.lower_bound_s:.3f}",
        "-" if ratio is None else f"{ratio:.2f}",
        str(r.max_concurrent_resets) if r.resets >= 0 else "?",
        f"{r.cpu_per_device_ms:.3f}",
        target,
    ]


def format_table(runs: Sequence[RunResult]) -> str:
    """A fixed-width table, one line per run, in the order given."""
    rows = [[name for name, _ in _COLUMNS]] + [_row(r) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for row in rows:
        cells = [
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(row, _COLUMNS, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    errors = [f"  {r.mode} N={r.n_devices} {r.kernel_model}: {r.error}" for r in runs if r.error]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def format_mmio(m: MmioResult) -> str:
    lines = [
        f"mmio: read32 of {m.device} region {m.region} ({m.backend}): "
        f"{m.ns_per_call:.1f} ns per call over {m.calls} calls"
    ]
    if m.write_uncached_mbps is not None:
        wc = (
            f"write-combining (wc-sysfs) {m.write_wc_mbps:.0f} MB/s"
            if m.write_wc_mbps is not None
            else f"write-combining not measured: {m.write_wc_unavailable}"
        )
        lines.append(
            f"mmio: 4 KiB writes to {m.device} BAR{m.write_region}: "
            f"uncached {m.write_uncached_mbps:.0f} MB/s, {wc}"
        )
        if m.backend.startswith("simulator"):
            lines.append(
                "      (the simulator's BARs are ordinary memory either way: "
                "no write-combining speed-up to see)"
            )
    return "\n".join(lines)


def format_summary(sweep: Sweep) -> str:
    info = machine_info()
    parts = [format_table(sweep.runs)] if sweep.runs else []
    if sweep.mmio is not None:
        parts.append(format_mmio(sweep.mmio))
    parts.append(
        f"machine: {info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}, "
        f"{info['implementation']} {info['python']}"
    )
    return "\n\n".join(parts)


class PlotUnavailable(RuntimeError):
    """matplotlib (the ``plot`` extra) is not installed."""


PLOT_MISSING = (
    "--plot needs matplotlib, which is not installed; "
    "install the extra with `pip install 'vfiopy[plot]'` (or `pip install matplotlib`), "
    "or drop --plot"
)


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise PlotUnavailable(PLOT_MISSING) from exc
    # No display is needed: the plot only goes to a file.
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def check_plot_available() -> None:
    """Fail early (before a long sweep) when ``--plot`` cannot be honoured."""
    _pyplot()


def write_plot(sweep: Sweep, path: str) -> None:
    """Teardown wall time against N, one line per mode, one panel per kernel/reset model."""
    plt = _pyplot()
    runs = [r for r in sweep.runs if r.phase == TEARDOWN and r.ok]

    # gpus:1 ... gpus:64 are one family: a panel per family, not per N.
    def key(r: RunResult) -> tuple[str, str, float, str]:
        return (r.kernel_model, r.reset_model, r.time_scale, r.topology.split(":")[0])

    panels = sorted({key(r) for r in runs})
    if not panels:
        panels = [("", "", 1.0, "")]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.0 * len(panels), 4.5), squeeze=False, sharey=False
    )
    for ax, (kmodel, rmodel, scale, topo) in zip(axes[0], panels, strict=True):
        here = [r for r in runs if key(r) == (kmodel, rmodel, scale, topo)]
        modes = list(dict.fromkeys(r.mode for r in here))
        for mode in modes:
            pts = sorted((r.n_devices, r.wall_s) for r in here if r.mode == mode)
            ax.plot([n for n, _ in pts], [w for _, w in pts], marker="o", label=mode)
        bound = sorted({(r.n_devices, r.lower_bound_s) for r in here})
        if bound:
            ax.plot(
                [n for n, _ in bound],
                [b for _, b in bound],
                linestyle="--",
                color="black",
                label="modelled lower bound",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("devices (N)")
        ax.set_ylabel("teardown wall time (s)")
        ax.set_title(f"{topo}: kernel {kmodel}, resets {rmodel}, time scale {scale:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    info = machine_info()
    fig.suptitle(f"vfiopy teardown benchmark ({info['nproc']} CPUs, {info['cpu']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
