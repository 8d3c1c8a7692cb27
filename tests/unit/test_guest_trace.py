"""tools/vmtest/guest_trace.py picks its probes from what the running kernel has: each kind's first
function in kallsyms, and no `$retval` on a function BTF says returns void (a probe Linux 6.5+
refuses). Checked on a BTF blob built here, so no kernel is needed."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "vmtest"))

import guest_trace

INT, STRUCT, FUNC, FUNC_PROTO = 1, 4, 12, 13
ALL_FUNCS = {f for _, funcs, _ in guest_trace.PROBES for f in funcs}
VOID_FUNCS = {"pcibios_reset_secondary_bus", "pci_reset_secondary_bus"}


def btf_blob() -> bytes:
    """Types: int; struct pci_dev {dev at byte 200}; per probed function a FUNC_PROTO returning
    void or int (one `struct pci_dev *`-like parameter) and its FUNC."""
    strings = bytearray(b"\0")

    def name(text: str) -> int:
        off = len(strings)
        strings.extend(text.encode() + b"\0")
        return off

    types = bytearray()

    def add(name_off: int, kind: int, vlen: int, size_or_type: int, extra: bytes = b"") -> int:
        types.extend(struct.pack("<III", name_off, (kind << 24) | vlen, size_or_type) + extra)
        return len(ids) + 1

    ids: list[int] = []
    ids.append(add(name("int"), INT, 0, 4, struct.pack("<I", 32)))
    int_id = ids[-1]
    ids.append(
        add(name("pci_dev"), STRUCT, 1, 4096, struct.pack("<III", name("dev"), int_id, 1600))
    )
    for func in sorted(ALL_FUNCS):
        ret = 0 if func in VOID_FUNCS else int_id
        ids.append(add(0, FUNC_PROTO, 1, ret, struct.pack("<II", 0, int_id)))
        ids.append(add(name(func), FUNC, 0, ids[-1]))
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + bytes(types) + bytes(strings)


def test_btf_names_the_void_functions_and_struct_offsets() -> None:
    blob = btf_blob()
    assert guest_trace._btf_void_functions(blob, ALL_FUNCS | {"absent"}) == VOID_FUNCS
    assert guest_trace._btf_member_offsets(blob, {"pci_dev": "dev"}) == {("pci_dev", "dev"): 200}


def test_every_kind_probes_its_first_function_the_kernel_has() -> None:
    probes, missing = guest_trace.choose_probes(btf_blob(), ALL_FUNCS)
    assert missing == ()
    assert [p.kind for p in probes] == [kind for kind, _, _ in guest_trace.PROBES]
    assert {p.kind: p.func for p in probes}["bus"] == "pcibios_reset_secondary_bus"
    assert {p.func for p in probes if p.void} == {"pcibios_reset_secondary_bus"}


def test_the_bus_kind_falls_back_when_the_hook_is_absent() -> None:
    present = ALL_FUNCS - {"pcibios_reset_secondary_bus", "pci_af_flr", "pci_dev_wait"}
    probes, missing = guest_trace.choose_probes(btf_blob(), present)
    assert missing == ("af_flr",)
    bus = next(p for p in probes if p.kind == "bus")
    assert (bus.func, bus.void) == ("pci_reset_secondary_bus", True)


def test_a_bus_reset_inside_a_hotplug_slot_reset_is_a_slot_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(guest_trace, "SYSFS_PCI", Path("/nonexistent"))
    bus = (
        '  python3-{pid} [000] ..... {ts}: bus: (pcibios_reset_secondary_bus+0x0/0x10) dev="{dev}"'
    )
    bus_ret = (
        "  python3-{pid} [000] ..... {ts}: bus_ret: (x+0x1/0x2 <- pcibios_reset_secondary_bus)"
    )
    slot = "  python3-9 [000] ..... {ts}: slot: (pciehp_reset_slot+0x0/0x10) probe=0x{probe}"
    slot_ret = "  python3-9 [000] ..... {ts}: slot_ret: (x+0x1/0x2 <- pciehp_reset_slot) ret=0"
    lines = [
        slot.format(ts="1.0", probe=1),  # a probe: resets nothing, opens no scope
        slot_ret.format(ts="1.1"),
        slot.format(ts="2.0", probe=0),
        bus.format(pid=9, ts="2.1", dev="0000:00:02.0"),
        bus.format(pid=8, ts="2.2", dev="0000:00:03.0"),  # another task, not in the slot reset
        bus_ret.format(pid=9, ts="2.3"),
        bus_ret.format(pid=8, ts="2.4"),
        slot_ret.format(ts="2.5"),
        bus.format(pid=9, ts="3.0", dev="0000:00:02.0"),  # after it: a plain bus reset
        bus_ret.format(pid=9, ts="3.1"),
    ]
    events = guest_trace.parse(lines)
    assert [(e.kind, e.dev, e.via) for e in events] == [
        ("bus", "0000:00:02.0", "slot"),
        ("bus", "0000:00:03.0", None),
        ("bus", "0000:00:02.0", None),
    ]
    assert [m for m, _ in guest_trace.performed(events)] == ["slot", "bus", "bus"]
    assert guest_trace.bus_resets_of(events, "0000:00:02.0") == 0  # nothing is below it here


def test_a_void_function_gets_no_retval_fetch() -> None:
    probes, _ = guest_trace.choose_probes(btf_blob(), ALL_FUNCS)
    facts = guest_trace.KernelFacts(200, probes, ())
    defs = {kind: ret for kind, _, ret in guest_trace._probe_defs(facts)}
    assert defs["bus"] == "r64:vfiopy/bus_ret pcibios_reset_secondary_bus"
    assert defs["flr"].endswith(" pcie_flr ret=$retval:s32")
    assert all("$retval" in ret for kind, ret in defs.items() if kind != "bus")
    entry = {kind: e for kind, e, _ in guest_trace._probe_defs(facts)}
    assert entry["slot"] == "p:vfiopy/slot pciehp_reset_slot probe=$arg2:u8"


def test_a_void_return_is_a_completed_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [
        '  python3-9 [000] ..... 1.000000: bus: (pcibios_reset_secondary_bus+0x0/0x10) dev="0000:00:04.0"',
        "  python3-9 [000] ..... 1.100000: bus_ret: (pci_bridge_secondary_bus_reset+0x1/0x2 <- pcibios_reset_secondary_bus)",
        '  python3-9 [000] ..... 1.100001: bus_wait: (pci_bridge_wait_for_secondary_bus+0x0/0x10) dev="0000:00:04.0"',
        "  python3-9 [000] ..... 1.200000: bus_wait_ret: (x+0x1/0x2 <- pci_bridge_wait_for_secondary_bus) ret=0",
    ]  # fmt: skip
    # no sysfs here: the bridge has no devices below it
    monkeypatch.setattr(guest_trace, "SYSFS_PCI", Path("/nonexistent"))
    (ev,) = guest_trace.parse(lines)
    assert (ev.kind, ev.dev, ev.ret, ev.ok) == ("bus", "0000:00:04.0", 0, True)
    assert ev.wait is not None and abs(ev.wait - 0.099999) < 1e-9


def test_a_method_answering_enotty_reset_nothing() -> None:
    """Before 5.15 a function reset calls pcie_flr, pci_af_flr and pci_pm_reset in turn until
    one applies: the calls that answered -ENOTTY are not resets."""
    entry = '  python3-9 [000] ..... {ts}: {kind}: ({kind}+0x0/0x10) dev="0000:07:00.0" probe=0x0'
    ret = "  python3-9 [000] ..... {ts}: {kind}_ret: (x+0x1/0x2 <- {kind}) ret={ret}"
    lines = [
        entry.format(ts="1.0", kind="function"),
        entry.format(ts="1.1", kind="af_flr"),
        ret.format(ts="1.2", kind="af_flr", ret=-25),
        entry.format(ts="1.3", kind="pm"),
        ret.format(ts="1.4", kind="pm", ret=0),
        ret.format(ts="1.5", kind="function", ret=0),
    ]
    events = guest_trace.parse(lines)
    assert [(e.kind, e.ret) for e in events] == [("function", 0), ("pm", 0)]
    assert guest_trace.performed(events) == [("pm", ("0000:07:00.0",))]


def test_an_inlined_method_is_seen_at_its_readiness_wait() -> None:
    """Debian's 5.10 inlines pci_pm_reset everywhere: the pm kind probes pci_dev_wait and keeps
    the waits whose reset_type is the PM reset's."""
    probes, missing = guest_trace.choose_probes(btf_blob(), ALL_FUNCS - {"pci_pm_reset"})
    assert missing == ()
    pm = next(p for p in probes if p.kind == "pm")
    assert (pm.func, pm.probe_arg, pm.reset_type) == ("pci_dev_wait", False, "PM D3hot->D0")
    facts = guest_trace.KernelFacts(200, probes, ())
    entry = {kind: e for kind, e, _ in guest_trace._probe_defs(facts)}
    assert entry["pm"] == (
        "p:vfiopy/pm pci_dev_wait dev=+0(+200($arg1)):string type=+0($arg2):string"
    )
    wait = '  python3-9 [000] ..... {ts}: pm: (pci_dev_wait+0x0/0xd0) dev="{dev}" type="{type}"'
    ret = "  python3-9 [000] ..... {ts}: pm_ret: (x+0x1/0x2 <- pci_dev_wait) ret=0"
    fn = (
        '  python3-9 [000] ..... {ts}: function: (__pci_reset_function_locked+0x0/0x10) dev="{dev}"'
    )
    fn_ret = "  python3-9 [000] ..... {ts}: function_ret: (x+0x1/0x2 <- __pci_reset_function_locked) ret=0"
    lines = [
        fn.format(ts="0.98", dev="0000:01:00.0"),
        wait.format(ts="1.0", dev="0000:01:00.0", type="PM D3hot->D0"),
        ret.format(ts="1.1"),
        fn_ret.format(ts="1.2"),
        wait.format(ts="2.0", dev="0000:02:00.0", type="bus reset"),  # not a PM reset
        ret.format(ts="2.1"),
    ]  # fmt: skip
    events = guest_trace.parse(lines)
    assert guest_trace.performed(events) == [("pm", ("0000:01:00.0",))]
    # the PM reset's interval: from the function reset's start to the end of its wait
    (pm,) = [e for e in events if e.kind == "pm"]
    assert (pm.start, pm.end) == (0.98, 1.1)
