"""Count the PCI_COMMAND_MEMORY transitions the guest kernel makes, per device.

Runs inside the vmtest guest like guest_trace.py (standard library only). Every config write
on x86 reaches the device through the raw accessors, ``pci_conf1_write`` (type 1, the first
256 bytes) or ``pci_mmcfg_write`` (ECAM): kernel writes (``pci_enable_device``, a reset's
``pci_dev_save_and_disable`` and restore) and the user's, which vfio-pci passes through
``pci_user_write_config_*``. Both are static functions called through ``struct pci_raw_ops``,
so never inlined; a kprobe on each records the writes that reach PCI_COMMAND (offset 4) with
their value. A transition is a write whose MEMORY bit differs from the device's last one.

    import guest_memtrace
    guest_memtrace.start()
    ... open, enable bus master, map BARs ...
    guest_memtrace.transitions(guest_memtrace.read(), "0000:01:00.0", initial_command)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from guest_trace import TraceError, _write, tracefs

GROUP = "vfiopy_mem"
# (event, function); both take (seg, bus, devfn, reg, len, value)
PROBES = (("conf1", "pci_conf1_write"), ("mmcfg", "pci_mmcfg_write"))
COMMAND = 0x04
MEMORY = 0x2
_LINE_RE = re.compile(r":\s+(?P<event>conf1|mmcfg):\s+\([^)]*\)\s*(?P<args>.*)$")
_ARG_RE = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class CommandWrite:
    bdf: str
    reg: int
    length: int
    value: int

    @property
    def command(self) -> int | None:
        """The 16-bit command value written, or None when the write does not cover it."""
        if self.reg == COMMAND:
            return self.value & 0xFFFF
        return None


def stop() -> None:
    root = tracefs()
    group = root / "events" / GROUP
    if (group / "enable").exists():
        _write(group / "enable", "0")
    for event, _ in PROBES:
        if (group / event).exists():
            _write(root / "kprobe_events", f"-:{GROUP}/{event}", append=True)


def start(*, buffer_kb: int = 4096) -> list[str]:
    """(Re)create the probes, clear the buffer, record; the probed functions are returned."""
    root = tracefs()
    stop()
    active = []
    for event, func in PROBES:
        try:
            _write(
                root / "kprobe_events",
                f"p:{GROUP}/{event} {func} bus=$arg2:u32 devfn=$arg3:u32 reg=$arg4:s32 "
                "len=$arg5:s32 val=$arg6:u32",
                append=True,
            )
            _write(root / "events" / GROUP / event / "filter", f"reg == {COMMAND}")
        except OSError:
            continue
        active.append(func)
    if not active:
        raise TraceError("cannot probe pci_conf1_write nor pci_mmcfg_write; see error_log")
    _write(root / "tracing_on", "0")
    _write(root / "buffer_size_kb", str(buffer_kb))
    _write(root / "trace", "")
    _write(root / "events" / GROUP / "enable", "1")
    _write(root / "tracing_on", "1")
    return active


def parse(lines: Iterable[str]) -> list[CommandWrite]:
    out = []
    for line in lines:
        m = _LINE_RE.search(line)
        if not m:
            continue
        a = dict(_ARG_RE.findall(m["args"]))
        try:
            bus, devfn = int(a["bus"], 0), int(a["devfn"], 0)
            reg, length, value = int(a["reg"], 0), int(a["len"], 0), int(a["val"], 0)
        except (KeyError, ValueError):
            continue
        bdf = f"0000:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"
        out.append(CommandWrite(bdf, reg, length, value))
    return out


def read() -> list[CommandWrite]:
    with open(tracefs() / "trace", encoding="ascii", errors="replace") as f:
        return parse(f)


def transitions(writes: Iterable[CommandWrite], bdf: str, initial_command: int) -> int:
    """How many writes to ``bdf``'s command register changed its MEMORY bit."""
    memory = bool(initial_command & MEMORY)
    count = 0
    for w in writes:
        if w.bdf != bdf or w.command is None:
            continue
        now = bool(w.command & MEMORY)
        if now != memory:
            count += 1
            memory = now
    return count


def command_of(bdf: str) -> int:
    """The command register as sysfs's config file reads it (the physical value)."""
    with open(f"/sys/bus/pci/devices/{bdf}/config", "rb") as f:
        f.seek(COMMAND)
        return int.from_bytes(f.read(2), "little")


if __name__ == "__main__":
    sys.exit("import guest_memtrace from a guest command")
