"""Count the PCI resets the guest kernel performs, per kind and per device.

Runs inside the vmtest guest (chroot of the host root, `/usr/bin/python3`, standard library
only). It places kprobes and kretprobes through tracefs on the kernel's reset entry points, so a
test can assert what the real kernel did, e.g. "the multifunction pair was bus-reset once, at
its last close", and how long each reset took.

Why kprobes: Debian's 6.1 kernel has no tracepoints on PCI resets and logs nothing when vfio-pci
resets a device. Why these functions: a probe on a function the compiler inlined into some
callers silently misses those calls (pci_bridge_secondary_bus_reset is inlined into
pci_parent_bus_reset, so a `bus` function reset of a device behind a plain bridge never reaches
its out-of-line copy); pcibios_reset_secondary_bus is a weak symbol, which no caller can inline.
The device name is read from `pci_dev->dev.kobj.name`; the offset of `dev` inside `struct
pci_dev` comes from the kernel's own BTF (/sys/kernel/btf/vmlinux), so no offsets are guessed.

Which probes: chosen from what the running kernel has (see `choose_probes`). A function missing
from /proc/kallsyms falls back to the next name for its kind (a reset method inlined everywhere,
as pci_pm_reset is in Debian's 5.10, is seen at the pci_dev_wait it ends with, whose reset_type
argument names it), and a function that BTF says
returns void gets a return probe without `$retval`: since Linux 6.5 (fd26290ec89d, "tracing/probes:
Add BTF retval type support") the kernel refuses such a probe ("This function returns 'void'
type" in error_log), which is why Debian's 6.12 could not trace pcibios_reset_secondary_bus (void
in every version); 6.1 took it and recorded whatever rax held. A void function cannot fail: its
return is recorded as 0 (the bus reset's failure, if any, is the readiness wait's return).

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
  pci_pm_reset                    "pm"        probe calls are dropped; so are calls answering
                                              -ENOTTY (before 5.15 a function reset tries
                                              flr, af_flr and pm in turn on any device)
  pciehp_reset_slot               "slot"      no event: marks the "bus" resets it runs (`via`),
                                              which `performed` reports as slot resets

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
import errno
import json
import os
import re
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

GROUP = "vfiopy"
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
OFFSET_CACHE = Path("/tmp/vfiopy-guest-trace-offsets.json")
SYSFS_PCI = Path("/sys/bus/pci/devices")

# A method whose function the compiler inlined everywhere (Debian's 5.10 has no out-of-line
# pci_pm_reset) is seen at its end instead: each method ends in pci_dev_wait(dev, reset_type,
# timeout), whose reset_type string names it; the event then starts with the function reset
# (__pci_reset_function_locked) that ran it in the same task.
DEV_WAIT = "pci_dev_wait"
WAIT_TYPES = {"flr": "FLR", "af_flr": "AF_FLR", "pm": "PM D3hot->D0"}
# (kind, kernel functions in order of preference, whose first has a `bool probe` second
# argument). The bus kind falls back to pci_reset_secondary_bus, which the weak pcibios_ hook
# calls on x86, for a kernel that has no out-of-line copy of the hook.
PROBES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("bus", ("pcibios_reset_secondary_bus", "pci_reset_secondary_bus"), False),
    ("bus_wait", ("pci_bridge_wait_for_secondary_bus",), False),
    ("function", ("__pci_reset_function_locked",), False),
    ("reset_bus", ("pci_reset_bus",), False),
    ("flr", ("pcie_flr", DEV_WAIT), False),
    ("af_flr", ("pci_af_flr", DEV_WAIT), True),
    ("pm", ("pci_pm_reset", DEV_WAIT), True),
    ("slot", ("pciehp_reset_slot",), True),
)
# Kinds whose function takes no pci_dev first (pciehp_reset_slot takes the hotplug slot): no
# event of their own; a "bus" reset inside one in the same task is the slot's reset (pciehp
# resets its port's secondary bus), which `performed` reports as "slot".
SCOPE_KINDS = ("slot",)
# Before 5.15 a function reset calls every method of its fixed order in turn, without a probe
# call first, until one does not answer -ENOTTY (e20afa06244e, "PCI: Add array to track reset
# method ordering", made it call only the device's methods): such a call reset nothing.
TRIED_KINDS = ("flr", "af_flr", "pm")
KALLSYMS = Path("/proc/kallsyms")
KINDS = tuple(kind for kind, _, _ in PROBES if kind != "bus_wait" and kind not in SCOPE_KINDS)
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
    via: str | None = None  # "slot": a bus reset a hotplug driver's slot reset performed

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def ok(self) -> bool:
        return self.ret == 0


# ---------------------------------------------------------------------------------------------
# BTF: offsetof(struct pci_dev, dev.kobj.name)


# bytes following struct btf_type, per kind: fixed part and per-vlen part
_BTF_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0),
              15: (0, 12), 17: (4, 0), 19: (0, 12)}  # fmt: skip
_BTF_STRUCT, _BTF_FUNC, _BTF_FUNC_PROTO = 4, 12, 13


@dataclasses.dataclass(frozen=True)
class _BtfType:
    id: int  # type ids count from 1 in the order of the type section
    kind: int
    name_off: int
    info: int
    size_or_type: int
    body: int  # offset of what follows struct btf_type


def _btf_types(blob: bytes) -> tuple[Iterable[_BtfType], Callable[[int], str]]:
    """The BTF blob's types in order, and its string-table lookup."""
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
    if magic != 0xEB9F:
        raise TraceError(f"{BTF_PATH}: not little-endian BTF (magic {magic:#x})")
    type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", blob, 8)
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name_at(off: int) -> str:
        end = blob.index(b"\0", strings + off)
        return blob[strings + off : end].decode()

    def walk() -> Iterable[_BtfType]:
        pos, end, type_id = types, types + type_len, 1
        while pos < end:
            name_off, info, size_or_type = struct.unpack_from("<III", blob, pos)
            kind = (info >> 24) & 0x1F
            fixed, per = _BTF_EXTRA.get(kind, (0, 0))
            yield _BtfType(type_id, kind, name_off, info, size_or_type, pos + 12)
            pos += 12 + fixed + per * (info & 0xFFFF)
            type_id += 1

    return walk(), name_at


def _btf_member_offsets(blob: bytes, wanted: dict[str, str]) -> dict[tuple[str, str], int]:
    """Byte offsets of struct members, e.g. {"pci_dev": "dev"} -> {("pci_dev", "dev"): 184}."""
    types, name_at = _btf_types(blob)
    found: dict[tuple[str, str], int] = {}
    for t in types:
        vlen = t.info & 0xFFFF
        if t.kind != _BTF_STRUCT or not vlen:  # not a struct with members
            continue
        struct_name = name_at(t.name_off)
        member = wanted.get(struct_name)
        if member is None:
            continue
        kflag = t.info >> 31
        for i in range(vlen):
            m_name, _m_type, m_off = struct.unpack_from("<III", blob, t.body + 12 * i)
            if name_at(m_name) == member:
                bits = m_off & 0xFFFFFF if kflag else m_off
                found[(struct_name, member)] = bits // 8
        if len(found) == len(wanted):
            break
    missing = [f"{s}.{m}" for s, m in wanted.items() if (s, m) not in found]
    if missing:
        raise TraceError(f"{BTF_PATH}: members not found: {', '.join(missing)}")
    return found


def _btf_void_functions(blob: bytes, names: Iterable[str]) -> set[str]:
    """Those of `names` that BTF knows as functions returning void (return type id 0)."""
    types, name_at = _btf_types(blob)
    wanted = set(names)
    proto_of: dict[str, int] = {}  # function name -> its FUNC_PROTO's id
    returns: dict[int, int] = {}  # FUNC_PROTO id -> return type id
    for t in types:
        if t.kind == _BTF_FUNC_PROTO:
            returns[t.id] = t.size_or_type
        elif t.kind == _BTF_FUNC and (name := name_at(t.name_off)) in wanted:
            proto_of[name] = t.size_or_type
    return {name for name, proto in proto_of.items() if returns.get(proto) == 0}


@dataclasses.dataclass(frozen=True)
class Probe:
    kind: str
    func: str
    probe_arg: bool  # the function's second argument is `bool probe`
    void: bool  # returns nothing: no `$retval` to fetch
    reset_type: str | None = None  # a pci_dev_wait fallback: the reset_type its kind waits with


@dataclasses.dataclass(frozen=True)
class KernelFacts:
    """What the tracer needs to know of the running kernel, read once per release."""

    name_offset: int  # offsetof(struct pci_dev, dev) + offsetof(device, kobj) + ...(kobject, name)
    probes: tuple[Probe, ...]
    missing: tuple[str, ...]  # kinds with none of their functions in /proc/kallsyms


def _kallsyms_functions(names: Iterable[str]) -> set[str]:
    """Those of `names` that are text symbols of the running kernel (inlined ones are absent)."""
    wanted = set(names)
    found: set[str] = set()
    try:
        with KALLSYMS.open() as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tTwW" and parts[2] in wanted:
                    found.add(parts[2])
    except OSError as err:
        raise TraceError(f"cannot read {KALLSYMS}: {err}") from err
    return found


def choose_probes(blob: bytes, present: set[str]) -> tuple[tuple[Probe, ...], tuple[str, ...]]:
    """Per kind, the first of its functions the kernel has, and whether it returns void."""
    void = _btf_void_functions(blob, (f for _, funcs, _ in PROBES for f in funcs))
    probes: list[Probe] = []
    missing: list[str] = []
    for kind, funcs, probe_arg in PROBES:
        func = next((f for f in funcs if f in present), None)
        if func is None:
            missing.append(kind)
        else:
            wait = func == DEV_WAIT
            probes.append(
                Probe(
                    kind,
                    func,
                    probe_arg and not wait,
                    func in void,
                    WAIT_TYPES[kind] if wait else None,
                )
            )
    return tuple(probes), tuple(missing)


def kernel_facts() -> KernelFacts:
    """The running kernel's offsets and probes, from its BTF and kallsyms (cached per release)."""
    release = os.uname().release
    try:
        cached = json.loads(OFFSET_CACHE.read_text())
        if cached.get("release") == release:
            return KernelFacts(
                int(cached["offset"]),
                tuple(Probe(**p) for p in cached["probes"]),
                tuple(cached["missing"]),
            )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        blob = BTF_PATH.read_bytes()
    except OSError as err:
        raise TraceError(f"cannot read {BTF_PATH} (kernel without BTF?): {err}") from err
    wanted = {"pci_dev": "dev", "device": "kobj", "kobject": "name"}
    offs = _btf_member_offsets(blob, wanted)
    present = _kallsyms_functions(f for _, funcs, _ in PROBES for f in funcs)
    probes, missing = choose_probes(blob, present)
    facts = KernelFacts(sum(offs[(s, m)] for s, m in wanted.items()), probes, missing)
    cache = {"release": release, "offset": facts.name_offset, "missing": list(missing),
             "probes": [dataclasses.asdict(p) for p in probes]}  # fmt: skip
    with contextlib.suppress(OSError):  # a read-only /tmp only costs a re-parse next time
        OFFSET_CACHE.write_text(json.dumps(cache))
    return facts


def pci_dev_name_offset() -> int:
    """offsetof(struct pci_dev, dev) + offsetof(device, kobj) + offsetof(kobject, name)."""
    return kernel_facts().name_offset


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


def _probe_defs(facts: KernelFacts) -> list[tuple[str, str, str]]:
    """(kind, entry definition, return definition) for each probe the kernel allows."""
    dev = f"dev=+0(+{facts.name_offset}($arg1)):string"
    defs = []
    for p in facts.probes:
        args = [] if p.kind in SCOPE_KINDS else [dev]
        args += ["probe=$arg2:u8"] if p.probe_arg else []
        args += ["type=+0($arg2):string"] if p.reset_type else []
        # r64: up to 64 tasks inside the function at once (the default is max(10, 2 * CPUs));
        # a task beyond that would lose its return event.
        ret = f"r64:{GROUP}/{p.kind}_ret {p.func}" + ("" if p.void else " ret=$retval:s32")
        defs.append((p.kind, " ".join([f"p:{GROUP}/{p.kind}", p.func, *args]), ret))
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
    facts = kernel_facts()
    active = []
    for kind, entry, ret in _probe_defs(facts):
        try:
            _write(root / "kprobe_events", entry, append=True)
            _write(root / "kprobe_events", ret, append=True)
        except OSError:
            continue
        active.append(kind)
    if "bus" not in active:
        tried = next(funcs for kind, funcs, _ in PROBES if kind == "bus")
        raise TraceError(
            f"cannot probe {' or '.join(tried)} (kinds without a function in {KALLSYMS}: "
            f"{', '.join(facts.missing) or 'none'}); see {root / 'error_log'}"
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
    scopes: dict[tuple[int, str], int] = {}  # (pid, scope kind) -> calls open in that task
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
        if kind in SCOPE_KINDS:
            if args.get("probe", "0") in ("0", "0x0") or name.endswith("_ret"):
                step = -1 if name.endswith("_ret") else 1
                scopes[(pid, kind)] = max(0, scopes.get((pid, kind), 0) + step)
            continue
        if name.endswith("_ret"):
            idx, start = pending.pop((pid, kind), (-1, 0.0))
            if idx < 0:
                continue
            # A void function's return probe fetches nothing: it returned, so it succeeded.
            ret = int(args["ret"]) if "ret" in args else 0
            ev = events[idx]
            if kind == "bus_wait":
                failed = ret if ret else ev.ret
                events[idx] = dataclasses.replace(ev, end=ts, wait=ts - start, ret=failed)
            else:
                events[idx] = dataclasses.replace(ev, end=ts, ret=ret)
            continue
        if args.get("probe", "0") not in ("0", "0x0"):
            continue  # a capability probe, not a reset
        if "type" in args and args["type"] != WAIT_TYPES.get(kind):
            continue  # pci_dev_wait after another kind of reset
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
        via = next((k for k in SCOPE_KINDS if kind == "bus" and scopes.get((pid, k))), None)
        start = ts
        if "type" in args:
            # Seen at its closing wait: it started with the function reset running it.
            outer, _ = pending.get((pid, "function"), (-1, 0.0))
            if outer >= 0 and events[outer].dev == dev:
                start = events[outer].start
        pending[(pid, kind)] = (len(events), start)
        events.append(
            ResetEvent(kind, dev, start, None, None, pid, m["comm"].strip(), affected, via=via)
        )
    return [e for e in events if not (e.kind in TRIED_KINDS and e.ret == -errno.ENOTTY)]


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


# The kinds that are one reset each, named as sysfs reset_method and vfiopy.kmodel name them;
# "function" and "reset_bus" wrap one of them.
METHOD_KINDS = ("flr", "af_flr", "pm", "bus")


def performed(events: Iterable[ResetEvent]) -> list[tuple[str, tuple[str, ...]]]:
    """(method, devices it hit) for each reset the kernel performed; a bus reset a slot
    reset ran is "slot"."""
    return [(ev.via or ev.kind, ev.affected) for ev in events if ev.kind in METHOD_KINDS]


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
