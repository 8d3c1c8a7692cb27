"""Count the PCI resets the guest kernel performs, per kind and per device.

Runs inside the vmtest guest (chroot of the host root, `/usr/bin/python3`, standard library
only). It places kprobes and kretprobes through tracefs on the kernel's reset entry points, so a
test can assert what the real kernel did, e.g. "the multifunction pair was bus-reset once, at
its last close", and how long each reset took.

Why kprobes: Debian's 6.1 kernel has no tracepoints on PCI resets and logs nothing when vfio-pci
resets a device. Why these functions: a probe on a function the compiler inlined into some
callers silently misses those calls (pci_bridge_secondary_bus_reset is inlined into
pci_parent_bus_reset, so a `bus` function reset of a device behind a plain bridge never reaches
its out-of-line copy); pcibios_reset_secondary_bus is a weak symbol, which no caller can inline. The device name is read from `pci_dev->dev.kobj.name`; the offset of `dev`
inside `struct pci_dev` comes from the kernel's own BTF (/sys/kernel/btf/vmlinux), so no
offsets are guessed.

Kinds (probed function -> kind):
  pcibios_reset_secondary_bus     "bus"       dev is the bridge; `affected` lists the devices
                                              below it. Every secondary bus reset goes through
                                              it: hot reset, vfio's device-set reset, a function
                                              reset by reset_method `bus`, pciehp slot reset.
                                              The readiness wait that follows
                                              (pci_bridge_wait_for_secondary_bus) is merged in:
                                              `end` is after it and `wait` is its length.
  __pci_reset_function_locked     "function"  any function reset (vfio open/close, sysfs reset)
  pci_reset_bus                   "reset_bus" a slot/bus reset request (vfio device set, hot reset)
  pcie_flr                        "flr"
  pci_af_flr                      "af_flr"    probe calls are dropped
  pci_pm_reset                    "pm"        probe calls are dropped

Use from a test command in the guest:
    import guest_trace
    guest_trace.start()            # clears earlier events
    ... open and close devices ...
    events = guest_trace.read()
    guest_trace.bus_resets_of(events, "0000:07:00.0")  -> number of bus resets that hit it
or from a shell: `python3 guest_trace.py start|read|stop` (read prints JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

GROUP = "vfiopy"
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
OFFSET_CACHE = Path("/tmp/vfiopy-guest-trace-offsets.json")
SYSFS_PCI = Path("/sys/bus/pci/devices")

# (kind, kernel function, has a `bool probe` second argument)
PROBES: tuple[tuple[str, str, bool], ...] = (
    ("bus", "pcibios_reset_secondary_bus", False),
    ("bus_wait", "pci_bridge_wait_for_secondary_bus", False),
    ("function", "__pci_reset_function_locked", False),
    ("reset_bus", "pci_reset_bus", False),
    ("flr", "pcie_flr", False),
    ("af_flr", "pci_af_flr", True),
    ("pm", "pci_pm_reset", True),
)
KINDS = tuple(kind for kind, _, _ in PROBES if kind != "bus_wait")
_ALL_KINDS = tuple(kind for kind, _, _ in PROBES)

_BDF_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# e.g. `python3-212 [001] ..... 41.123456: bus: (pci_bridge_...+0x0/0x50) dev="0000:00:02.0"`
_LINE_RE = re.compile(
    r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+\S+\s+"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s+\((?P<loc>[^)]*)\)\s*(?P<args>.*)$"
)
_ARG_RE = re.compile(r'(\w+)=("(?:[^"]*)"|\S+)')


class TraceError(RuntimeError):
    """Tracing could not be set up or read in the guest."""


@dataclasses.dataclass(frozen=True)
class ResetEvent:
    kind: str
    dev: str
    start: float  # CLOCK_MONOTONIC seconds (trace_clock "mono"), comparable to time.monotonic()
    end: float | None  # None while the reset is still running (or the return was lost)
    ret: int | None  # kernel return code; 0 is success, negative errno otherwise
    pid: int
    comm: str
    affected: tuple[str, ...]  # for "bus": devices below the bridge; otherwise (dev,)
    wait: float | None = None  # "bus": seconds spent waiting for the secondary bus afterwards

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def ok(self) -> bool:
        return self.ret == 0


# ---------------------------------------------------------------------------------------------
# BTF: offsetof(struct pci_dev, dev.kobj.name)


def _btf_member_offsets(blob: bytes, wanted: dict[str, str]) -> dict[tuple[str, str], int]:
    """Byte offsets of struct members, e.g. {"pci_dev": "dev"} -> {("pci_dev", "dev"): 184}."""
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
    if magic != 0xEB9F:
        raise TraceError(f"{BTF_PATH}: not little-endian BTF (magic {magic:#x})")
    type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", blob, 8)
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name_at(off: int) -> str:
        end = blob.index(b"\0", strings + off)
        return blob[strings + off : end].decode()

    # bytes following struct btf_type, per kind: fixed part and per-vlen part
    extra = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0),
             15: (0, 12), 17: (4, 0), 19: (0, 12)}  # fmt: skip
    targets = {name.encode() for name in wanted}
    found: dict[tuple[str, str], int] = {}
    pos = types
    end = types + type_len
    while pos < end and len(found) < len(wanted):
        name_off, info, _size = struct.unpack_from("<III", blob, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        fixed, per = extra.get(kind, (0, 0))
        body = pos + 12
        if kind == 4 and vlen:  # STRUCT with members (not a forward declaration)
            start = strings + name_off
            if blob[start : blob.index(b"\0", start)] in targets:
                struct_name = name_at(name_off)
                member = wanted[struct_name]
                kflag = info >> 31
                for i in range(vlen):
                    m_name, _m_type, m_off = struct.unpack_from("<III", blob, body + 12 * i)
                    if name_at(m_name) == member:
                        bits = m_off & 0xFFFFFF if kflag else m_off
                        found[(struct_name, member)] = bits // 8
        pos = body + fixed + per * vlen
    missing = [f"{s}.{m}" for s, m in wanted.items() if (s, m) not in found]
    if missing:
        raise TraceError(f"{BTF_PATH}: members not found: {', '.join(missing)}")
    return found


def pci_dev_name_offset() -> int:
    """offsetof(struct pci_dev, dev) + offsetof(device, kobj) + offsetof(kobject, name)."""
    release = os.uname().release
    try:
        cached = json.loads(OFFSET_CACHE.read_text())
        if cached.get("release") == release:
            return int(cached["offset"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        blob = BTF_PATH.read_bytes()
    except OSError as err:
        raise TraceError(f"cannot read {BTF_PATH} (kernel without BTF?): {err}") from err
    wanted = {"pci_dev": "dev", "device": "kobj", "kobject": "name"}
    offs = _btf_member_offsets(blob, wanted)
    offset = sum(offs[(s, m)] for s, m in wanted.items())
    with contextlib.suppress(OSError):  # a read-only /tmp only costs a re-parse next time
        OFFSET_CACHE.write_text(json.dumps({"release": release, "offset": offset}))
    return offset


# ---------------------------------------------------------------------------------------------
# tracefs


def tracefs() -> Path:
    for path in TRACEFS_CANDIDATES:
        if (path / "kprobe_events").exists():
            return path
    # Not mounted in this namespace yet: mount it where the kernel expects it.
    target = TRACEFS_CANDIDATES[0]
    proc = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(target)], capture_output=True, text=True
    )
    if proc.returncode != 0 or not (target / "kprobe_events").exists():
        raise TraceError(
            f"tracefs unavailable at {target}: {proc.stderr.strip() or 'no kprobe_events'}"
        )
    return target


def _write(path: Path, text: str, *, append: bool = False) -> None:
    # tracefs wants one write per command; O_APPEND is how kprobe_events adds a probe.
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _probe_defs(name_offset: int) -> list[tuple[str, str, str]]:
    """(kind, entry definition, return definition) for each probe."""
    dev = f"dev=+0(+{name_offset}($arg1)):string"
    defs = []
    for kind, func, has_probe_arg in PROBES:
        args = dev + (" probe=$arg2:u8" if has_probe_arg else "")
        defs.append(
            (
                kind,
                f"p:{GROUP}/{kind} {func} {args}",
                # r64: up to 64 tasks inside the function at once (the default is
                # max(10, 2 * CPUs)); a task beyond that would lose its return event.
                f"r64:{GROUP}/{kind}_ret {func} ret=$retval:s32",
            )
        )
    return defs


def stop() -> None:
    """Disable and delete this module's probes (others' probes are left alone)."""
    root = tracefs()
    group_dir = root / "events" / GROUP
    if (group_dir / "enable").exists():
        _write(group_dir / "enable", "0")
    for kind in _ALL_KINDS:
        for event in (f"{kind}_ret", kind):
            if (group_dir / event).exists():
                try:
                    _write(root / "kprobe_events", f"-:{GROUP}/{event}", append=True)
                except OSError as err:
                    raise TraceError(f"cannot delete probe {GROUP}/{event}: {err}") from err


def start(*, buffer_kb: int = 4096) -> list[str]:
    """(Re)create the probes, clear the trace buffer and start recording.

    Returns the kinds that could be probed; a function the kernel inlined cannot be probed,
    which is reported rather than fatal (check `"bus" in start()` if you rely on it).
    """
    root = tracefs()
    stop()
    offset = pci_dev_name_offset()
    active = []
    for kind, entry, ret in _probe_defs(offset):
        try:
            _write(root / "kprobe_events", entry, append=True)
            _write(root / "kprobe_events", ret, append=True)
        except OSError:
            continue
        active.append(kind)
    if "bus" not in active:
        raise TraceError(
            "cannot probe pcibios_reset_secondary_bus; see /sys/kernel/tracing/error_log"
        )
    _write(root / "tracing_on", "0")
    _write(root / "trace_clock", "mono")
    _write(root / "buffer_size_kb", str(buffer_kb))
    _write(root / "trace", "")  # opening with O_TRUNC clears the ring buffer
    _write(root / "events" / GROUP / "enable", "1")
    _write(root / "tracing_on", "1")
    return active


def clear() -> None:
    """Forget the events recorded so far; keep recording."""
    _write(tracefs() / "trace", "")


# ---------------------------------------------------------------------------------------------
# reading


def devices_below(bridge: str) -> tuple[str, ...]:
    """All PCI functions in the hierarchy below a bridge, from sysfs (children are subdirs)."""
    found: list[str] = []
    stack = [SYSFS_PCI / bridge]
    while stack:
        node = stack.pop()
        try:
            children = sorted(p for p in node.iterdir() if _BDF_RE.match(p.name))
        except OSError:
            continue  # a device can vanish mid-walk
        for child in children:
            found.append(child.name)
            stack.append(child)
    return tuple(sorted(found))


def parse(lines: Iterable[str]) -> list[ResetEvent]:
    """Pair entry and return lines (per task and kind) into events."""
    events: list[ResetEvent] = []
    pending: dict[tuple[int, str], tuple[int, float]] = {}  # (pid, kind) -> (event index, start)
    last_bus: dict[int, int] = {}  # pid -> index of its latest "bus" event
    below: dict[str, tuple[str, ...]] = {}
    for line in lines:
        m = _LINE_RE.match(line)
        if not m:
            continue
        name = m["event"]
        kind = name[: -len("_ret")] if name.endswith("_ret") else name
        if kind not in _ALL_KINDS:
            continue
        pid = int(m["pid"])
        ts = float(m["ts"])
        args = {k: v.strip('"') for k, v in _ARG_RE.findall(m["args"])}
        if name.endswith("_ret"):
            idx, start = pending.pop((pid, kind), (-1, 0.0))
            if idx < 0:
                continue
            ret = int(args["ret"]) if "ret" in args else None
            ev = events[idx]
            if kind == "bus_wait":
                failed = ret if ret else ev.ret
                events[idx] = dataclasses.replace(ev, end=ts, wait=ts - start, ret=failed)
            else:
                events[idx] = dataclasses.replace(ev, end=ts, ret=ret)
            continue
        if args.get("probe", "0") not in ("0", "0x0"):
            continue  # a capability probe, not a reset
        dev = args.get("dev", "?")
        if kind == "bus_wait":
            # Only the wait right after this task's reset of the same bridge belongs to it.
            idx = last_bus.get(pid, -1)
            if idx >= 0 and events[idx].dev == dev and events[idx].wait is None:
                pending[(pid, kind)] = (idx, ts)
            continue
        if kind == "bus":
            affected = below.get(dev)
            if affected is None:
                affected = below[dev] = devices_below(dev)
            last_bus[pid] = len(events)
        else:
            affected = (dev,)
        pending[(pid, kind)] = (len(events), ts)
        events.append(ResetEvent(kind, dev, ts, None, None, pid, m["comm"].strip(), affected))
    return events


def read() -> list[ResetEvent]:
    """Events recorded since start() or clear(), oldest first."""
    text = (tracefs() / "trace").read_text(errors="replace")
    return parse(text.splitlines())


def counts(events: Iterable[ResetEvent], *, only_ok: bool = False) -> dict[str, dict[str, int]]:
    """{kind: {device: n}}; for "bus" each affected device is counted, not the bridge."""
    out: dict[str, Counter[str]] = {}
    for ev in events:
        if only_ok and not ev.ok:
            continue
        out.setdefault(ev.kind, Counter()).update(ev.affected)
    return {kind: dict(c) for kind, c in out.items()}


def bus_resets_of(events: Iterable[ResetEvent], bdf: str, *, only_ok: bool = True) -> int:
    """How many secondary bus resets hit `bdf`."""
    return sum(
        1 for ev in events if ev.kind == "bus" and bdf in ev.affected and (ev.ok or not only_ok)
    )


def to_json(events: Sequence[ResetEvent]) -> list[dict[str, object]]:
    return [dict(dataclasses.asdict(ev), duration=ev.duration) for ev in events]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("action", choices=["start", "read", "clear", "stop"])
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(json.dumps({"active": start()}))
        elif args.action == "read":
            events = read()
            print(json.dumps({"events": to_json(events), "counts": counts(events)}, indent=1))
        elif args.action == "clear":
            clear()
        else:
            stop()
    except (TraceError, OSError) as err:
        print(f"guest_trace: {args.action}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
