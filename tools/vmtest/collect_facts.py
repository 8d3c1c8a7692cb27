"""Record what the vmtest guest really looks like, for guest-facts.md and the simulator topology.

Host:  python3 tools/vmtest/collect_facts.py [--json OUT] [--markdown tools/vmtest/guest-facts.md]
       boots the guest, runs this file inside it with --guest, renders the result.
Guest: /usr/bin/python3 collect_facts.py --guest OUT.json
       reads sysfs and config space, opens every test device through raw VFIO ioctls
       (fcntl only: the library is not used here on purpose, so these facts stay independent
       of it), and times resets with guest_trace.

Standard library only; the guest half runs under the host's /usr/bin/python3 in the chroot.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from fcntl import ioctl
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import guest_trace  # noqa: E402

SYSFS_PCI = Path("/sys/bus/pci/devices")

# <linux/vfio.h>: _IO(VFIO_TYPE ';', VFIO_BASE 100 + n)
VFIO_GET_API_VERSION = 0x3B64
VFIO_CHECK_EXTENSION = 0x3B65
VFIO_SET_IOMMU = 0x3B66
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_SET_CONTAINER = 0x3B68
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
VFIO_DEVICE_GET_INFO = 0x3B6B
VFIO_DEVICE_GET_REGION_INFO = 0x3B6C
VFIO_DEVICE_GET_IRQ_INFO = 0x3B6D
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = 0x3B70
VFIO_DEVICE_PCI_HOT_RESET = 0x3B71
VFIO_IOMMU_GET_INFO = 0x3B70
VFIO_TYPE1v2_IOMMU = 3
EXTENSIONS = {1: "TYPE1", 2: "SPAPR_TCE", 3: "TYPE1v2", 4: "DMA_CC_IOMMU", 5: "EEH",
              6: "TYPE1_NESTING", 7: "SPAPR_TCE_v2", 8: "NOIOMMU", 9: "UNMAP_ALL",
              10: "UPDATE_VADDR"}  # fmt: skip
REGION_NAMES = ["BAR0", "BAR1", "BAR2", "BAR3", "BAR4", "BAR5", "ROM", "CONFIG", "VGA"]
IRQ_NAMES = ["INTX", "MSI", "MSIX", "ERR", "REQ"]
CAP_NAMES = {0x01: "PM", 0x05: "MSI", 0x09: "VNDR", 0x0D: "SSVID", 0x10: "EXP", 0x11: "MSIX",
             0x12: "SATA", 0x13: "AF"}  # fmt: skip
EXT_CAP_NAMES = {0x01: "AER", 0x02: "VC", 0x03: "DSN", 0x0B: "VNDR", 0x0D: "ACS", 0x0E: "ARI",
                 0x0F: "ATS", 0x10: "SRIOV", 0x13: "PRI", 0x15: "REBAR", 0x17: "TPH", 0x18: "LTR",
                 0x19: "SECPCI", 0x1B: "PASID", 0x1E: "L1SS"}  # fmt: skip
PCIE_TYPES = {0: "endpoint", 1: "legacy endpoint", 4: "root port", 5: "upstream port",
              6: "downstream port", 7: "PCIe-to-PCI bridge", 8: "PCI-to-PCIe bridge",
              9: "RC integrated endpoint", 10: "RC event collector"}  # fmt: skip

Json = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# sysfs and config space


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _link_name(path: Path) -> str:
    try:
        return os.readlink(path).rsplit("/", 1)[-1]
    except OSError:
        return ""


def resources(bdf: str) -> list[Json]:
    """The BARs and ROM of sysfs's ``resource`` file, a line each (``start end flags`` in
    hex); a line that is not three hex numbers (blank, cut short) is skipped, not fatal."""
    out = []
    for index, line in enumerate(_read(SYSFS_PCI / bdf / "resource").splitlines()):
        try:
            start, end, flags = (int(x, 16) for x in line.split())
        except ValueError:  # too few or too many fields, or not hex
            continue
        if not flags and not end:
            continue
        kind = "io" if flags & 0x100 else "mem" if flags & 0x200 else f"flags={flags:#x}"
        out.append({
            "index": index, "start": start, "size": end - start + 1 if end else 0, "type": kind,
            "mem64": bool(flags & 0x00100000), "prefetch": bool(flags & 0x2000), "flags": flags,
        })  # fmt: skip
    return out


def capabilities(cfg: bytes) -> list[Json]:
    """Standard and extended capabilities with the fields the simulator needs."""

    def u8(o: int) -> int:
        return cfg[o]

    def u16(o: int) -> int:
        return int.from_bytes(cfg[o : o + 2], "little")

    def u32(o: int) -> int:
        return int.from_bytes(cfg[o : o + 4], "little")

    caps: list[Json] = []
    if u16(0x06) & 0x10:  # status: capability list
        ptr, seen = u8(0x34) & 0xFC, set()
        while ptr and ptr not in seen and ptr + 2 <= len(cfg):
            seen.add(ptr)
            cid = u8(ptr)
            cap: Json = {"offset": ptr, "id": cid, "name": CAP_NAMES.get(cid, f"{cid:#04x}")}
            if cid == 0x01:
                pmc, pmcsr = u16(ptr + 2), u16(ptr + 4)
                cap.update(version=pmc & 7, d1=bool(pmc & 0x200), d2=bool(pmc & 0x400),
                           no_soft_reset=bool(pmcsr & 0x8), power_state=f"D{pmcsr & 3}")  # fmt: skip
            elif cid == 0x05:
                ctl = u16(ptr + 2)
                cap.update(vectors=1 << ((ctl >> 1) & 7), addr64=bool(ctl & 0x80),
                           per_vector_mask=bool(ctl & 0x100))  # fmt: skip
            elif cid == 0x11:
                ctl, table, pba = u16(ptr + 2), u32(ptr + 4), u32(ptr + 8)
                cap.update(vectors=(ctl & 0x7FF) + 1, table_bar=table & 7, table_offset=table & ~7,
                           pba_bar=pba & 7, pba_offset=pba & ~7)  # fmt: skip
            elif cid == 0x10:
                flags, devcap = u16(ptr + 2), u32(ptr + 4)
                linkcap, linksta = u32(ptr + 12), u16(ptr + 18)
                cap.update(
                    version=flags & 0xF, type=PCIE_TYPES.get((flags >> 4) & 0xF, str((flags >> 4) & 0xF)),
                    slot=bool(flags & 0x100), flr=bool(devcap & (1 << 28)),
                    max_payload=128 << (devcap & 7), link_speed_cap=linkcap & 0xF,
                    link_width_cap=(linkcap >> 4) & 0x3F, dll_active_reporting=bool(linkcap & (1 << 20)),
                    link_speed=linksta & 0xF, link_width=(linksta >> 4) & 0x3F,
                    dll_link_active=bool(linksta & (1 << 13)),
                )  # fmt: skip
                if flags & 0x100:
                    slotcap = u32(ptr + 20)
                    cap.update(slot_hotplug_capable=bool(slotcap & 0x40), slot_number=slotcap >> 19)
            caps.append(cap)
            ptr = u8(ptr + 1) & 0xFC
    ptr, seen = 0x100, set()
    while len(cfg) > 0x100 and ptr >= 0x100 and ptr not in seen and ptr + 4 <= len(cfg):
        seen.add(ptr)
        header = u32(ptr)
        if header in (0, 0xFFFFFFFF):
            break
        cid = header & 0xFFFF
        ext: Json = {"offset": ptr, "id": cid, "name": EXT_CAP_NAMES.get(cid, f"{cid:#06x}"),
                     "version": (header >> 16) & 0xF, "extended": True}  # fmt: skip
        if cid == 0x0D:
            ext.update(acs_cap=u16(ptr + 4), acs_ctrl=u16(ptr + 6))
        caps.append(ext)
        ptr = header >> 20
    return caps


def sysfs_facts(bdf: str) -> Json:
    dev = SYSFS_PCI / bdf
    try:
        cfg = (dev / "config").read_bytes()
    except OSError:
        cfg = b""
    header_type = cfg[0x0E] & 0x7F if len(cfg) > 0x0E else -1
    facts: Json = {
        "bdf": bdf,
        "vendor": _read(dev / "vendor"), "device": _read(dev / "device"),
        "subsystem_vendor": _read(dev / "subsystem_vendor"), "subsystem_device": _read(dev / "subsystem_device"),
        "class": _read(dev / "class"), "revision": _read(dev / "revision"),
        "header_type": header_type, "multifunction": bool(len(cfg) > 0x0E and cfg[0x0E] & 0x80),
        "driver": _link_name(dev / "driver"), "iommu_group": _link_name(dev / "iommu_group"),
        "reset_method": _read(dev / "reset_method"), "irq": _read(dev / "irq"),
        "interrupt_pin": cfg[0x3D] if len(cfg) > 0x3D else 0,
        "config_size": len(cfg), "resources": resources(bdf), "capabilities": capabilities(cfg),
        "current_link_speed": _read(dev / "current_link_speed"),
        "max_link_speed": _read(dev / "max_link_speed"),
        "d3cold_allowed": _read(dev / "d3cold_allowed"),
    }  # fmt: skip
    if header_type == 1 and len(cfg) > 0x1A:
        facts.update(primary_bus=cfg[0x18], secondary_bus=cfg[0x19], subordinate_bus=cfg[0x1A])
        facts["children"] = list(guest_trace.devices_below(bdf))
    return facts


# ---------------------------------------------------------------------------------------------
# raw VFIO


def _ioctl_buf(fd: int, req: int, buf: bytearray) -> int:
    # A mutable buffer with mutate_flag: the kernel's writes land in `buf`, the result is returned.
    return int(ioctl(fd, req, buf, True))


def _cap_chain(buf: bytes, first: int) -> list[tuple[int, int, int]]:
    """(id, version, offset) of a VFIO info capability chain."""
    out, off, seen = [], first, set()
    while off and off not in seen and off + 8 <= len(buf):
        seen.add(off)
        cid, ver, nxt = struct.unpack_from("<HHI", buf, off)
        out.append((cid, ver, off))
        off = nxt
    return out


class Vfio:
    """One type1v2 container holding every group the caller opens."""

    def __init__(self) -> None:
        self.container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        self.groups: dict[str, int] = {}
        self.iommu_set = False

    def group(self, group: str) -> int:
        if group not in self.groups:
            fd = os.open(f"/dev/vfio/{group}", os.O_RDWR | os.O_CLOEXEC)
            status = bytearray(struct.pack("<II", 8, 0))
            _ioctl_buf(fd, VFIO_GROUP_GET_STATUS, status)
            if not struct.unpack_from("<I", status, 4)[0] & 1:
                os.close(fd)
                raise OSError(16, f"group {group} is not viable (a device in it has a host driver)")
            _ioctl_buf(fd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", self.container)))
            if not self.iommu_set:
                ioctl(self.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
                self.iommu_set = True
            self.groups[group] = fd
        return self.groups[group]

    def device(self, bdf: str) -> int:
        group = _link_name(SYSFS_PCI / bdf / "iommu_group")
        return _ioctl_buf(
            self.group(group), VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0")
        )

    def close(self) -> None:
        for fd in self.groups.values():
            os.close(fd)
        os.close(self.container)

    def container_facts(self) -> Json:
        ext = {
            name: ioctl(self.container, VFIO_CHECK_EXTENSION, n) for n, name in EXTENSIONS.items()
        }
        facts: Json = {
            "api_version": ioctl(self.container, VFIO_GET_API_VERSION),
            "extensions": ext,
        }
        buf = bytearray(struct.pack("<IIQII", 4096, 0, 0, 0, 0) + bytes(4096 - 24))
        _ioctl_buf(self.container, VFIO_IOMMU_GET_INFO, buf)
        argsz, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", buf)
        facts.update(iommu_info_flags=flags, iova_pgsizes=pgsizes, iommu_info_argsz=argsz)
        for cid, ver, off in _cap_chain(bytes(buf), cap_offset if flags & 2 else 0):
            if cid == 1:  # IOVA ranges
                (n,) = struct.unpack_from("<I", buf, off + 8)
                ranges = [struct.unpack_from("<QQ", buf, off + 16 + 16 * i) for i in range(n)]
                facts["iova_ranges"] = [[hex(a), hex(b)] for a, b in ranges]
            elif cid == 3:  # DMA mappings still available
                facts["dma_avail"] = struct.unpack_from("<I", buf, off + 8)[0]
            else:
                facts.setdefault("other_caps", []).append([cid, ver])
        return facts


def device_facts(fd: int) -> Json:
    info = bytearray(struct.pack("<IIIIII", 24, 0, 0, 0, 0, 0))
    _ioctl_buf(fd, VFIO_DEVICE_GET_INFO, info)
    _, flags, num_regions, num_irqs = struct.unpack_from("<IIII", info)
    out: Json = {"flags": flags, "reset": bool(flags & 1), "num_regions": num_regions,
                 "num_irqs": num_irqs, "regions": [], "irqs": []}  # fmt: skip
    for index in range(num_regions):
        name = REGION_NAMES[index] if index < len(REGION_NAMES) else str(index)
        buf = bytearray(struct.pack("<IIIIQQ", 32, 0, index, 0, 0, 0))
        try:
            _ioctl_buf(fd, VFIO_DEVICE_GET_REGION_INFO, buf)
        except OSError as err:  # e.g. EINVAL for the VGA region of a non-VGA device
            out["regions"].append({"index": index, "name": name, "errno": err.errno})
            continue
        argsz, rflags, _, cap_offset, size, offset = struct.unpack_from("<IIIIQQ", buf)
        caps: list[list[int]] = []
        if rflags & 8 and argsz > 32:  # VFIO_REGION_INFO_FLAG_CAPS: ask again with room
            big = bytearray(struct.pack("<IIIIQQ", argsz, 0, index, 0, 0, 0) + bytes(argsz - 32))
            _ioctl_buf(fd, VFIO_DEVICE_GET_REGION_INFO, big)
            cap_offset = struct.unpack_from("<I", big, 12)[0]
            caps = [[cid, ver] for cid, ver, _ in _cap_chain(bytes(big), cap_offset)]
        out["regions"].append({"index": index, "name": name, "flags": rflags, "size": size,
                               "offset": hex(offset), "argsz": argsz, "caps": caps})  # fmt: skip
    for index in range(num_irqs):
        name = IRQ_NAMES[index] if index < len(IRQ_NAMES) else str(index)
        buf = bytearray(struct.pack("<IIII", 16, 0, index, 0))
        try:
            _ioctl_buf(fd, VFIO_DEVICE_GET_IRQ_INFO, buf)
        except OSError as err:  # e.g. EINVAL for ERR on a device without a PCIe capability
            out["irqs"].append({"index": index, "name": name, "errno": err.errno})
            continue
        _, iflags, _, count = struct.unpack_from("<IIII", buf)
        out["irqs"].append({"index": index, "name": name, "flags": iflags, "count": count})
    buf = bytearray(struct.pack("<III", 12 + 8 * 64, 0, 0) + bytes(8 * 64))
    try:
        _ioctl_buf(fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
        _, hflags, count = struct.unpack_from("<III", buf)
        devs = []
        for i in range(count):
            group_id, seg, bus, devfn = struct.unpack_from("<IHBB", buf, 12 + 8 * i)
            devs.append(
                {"group": group_id, "bdf": f"{seg:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"}
            )
        out["hot_reset"] = {"flags": hflags, "devices": devs}
    except OSError as err:
        out["hot_reset"] = {"errno": err.errno, "error": os.strerror(err.errno or 0)}
    return out


# ---------------------------------------------------------------------------------------------
# timings


def _events_since() -> list[Json]:
    events = guest_trace.read()
    guest_trace.clear()
    return guest_trace.to_json(events)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return round(time.monotonic() - t0, 4)


def timings(vfio: Vfio, singles: list[str], edu: str, pair: list[str]) -> Json:
    out: Json = {}
    guest_trace.clear()
    for label, bdf in (("e1000e", singles[0]), ("edu", edu)):
        t0 = time.monotonic()
        fd = vfio.device(bdf)
        t_open = round(time.monotonic() - t0, 4)
        t_close = _timed(functools.partial(os.close, fd))
        out[f"open_close_{label}"] = {"bdf": bdf, "open_s": t_open, "close_s": t_close,
                                      "events": _events_since()}  # fmt: skip

    fds = [vfio.device(b) for b in pair]
    opened = _events_since()
    first = _timed(lambda: os.close(fds[0]))
    ev_first = _events_since()
    last = _timed(lambda: os.close(fds[1]))
    out["multifunction_pair"] = {"bdfs": pair, "open_events": opened, "close_first_s": first,
                                 "close_first_events": ev_first, "close_last_s": last,
                                 "close_last_events": _events_since()}  # fmt: skip

    def open_all() -> list[int]:
        return [vfio.device(b) for b in singles]

    def close_all() -> None:
        for fd in fds:
            os.close(fd)

    fds = []
    t_open = _timed(lambda: fds.extend(open_all()))
    _events_since()
    t_seq = _timed(close_all)
    seq_events = _events_since()
    fds = open_all()
    _events_since()
    threads = [threading.Thread(target=os.close, args=(fd,)) for fd in fds]

    def close_threaded() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    t_thr = _timed(close_threaded)
    thr_events = _events_since()

    # Process exit: the exiting task releases its files one after another.
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            open_all()
            os.write(w, b"x")
            os.read(r2, 1)
        finally:
            os._exit(0)
    os.read(r, 1)
    _events_since()
    t0 = time.monotonic()
    os.write(w2, b"x")
    os.waitpid(pid, 0)
    t_exit = round(time.monotonic() - t0, 4)
    exit_events = _events_since()
    for fd in (r, w, r2, w2):
        os.close(fd)
    out["many"] = {
        "bdfs": singles, "open_all_s": t_open,
        "sequential_close_s": t_seq, "sequential_events": seq_events,
        "threaded_close_s": t_thr, "threaded_events": thr_events,
        "process_exit_s": t_exit, "exit_events": exit_events,
    }  # fmt: skip

    # A hot reset through the ioctl, on one NIC, with its own group as proof of ownership.
    bdf = singles[0]
    fd = vfio.device(bdf)
    _events_since()
    group = vfio.group(_link_name(SYSFS_PCI / bdf / "iommu_group"))
    arg = bytearray(struct.pack("<IIIi", 16, 0, 1, group))
    t_hot = _timed(lambda: _ioctl_buf(fd, VFIO_DEVICE_PCI_HOT_RESET, arg))
    out["hot_reset_ioctl"] = {"bdf": bdf, "seconds": t_hot, "events": _events_since()}
    os.close(fd)
    _events_since()
    return out


def guest_main(out_path: Path, roles: Json) -> int:
    facts: Json = {"kernel": os.uname().release, "cmdline": _read(Path("/proc/cmdline"))}
    facts["iommufd"] = os.path.exists("/dev/iommu")
    facts["trace_kinds"] = guest_trace.start()
    bdfs = sorted(p.name for p in SYSFS_PCI.iterdir())
    facts["pci"] = {bdf: sysfs_facts(bdf) for bdf in bdfs}
    groups: dict[str, list[str]] = {}
    for bdf, f in facts["pci"].items():
        groups.setdefault(f["iommu_group"], []).append(bdf)
    facts["iommu_groups"] = groups
    vfio = Vfio()
    facts["vfio_devices"] = {}
    for bdf in roles["all"]:
        try:
            fd = vfio.device(bdf)
        except OSError as err:
            facts["vfio_devices"][bdf] = {"open_errno": err.errno, "error": str(err)}
            continue
        try:
            facts["vfio_devices"][bdf] = device_facts(fd)
        finally:
            os.close(fd)
    facts["container"] = vfio.container_facts()
    facts["timings"] = timings(vfio, roles["e1000e"], roles["edu"][0], roles["mf"])
    vfio.close()
    guest_trace.stop()
    out_path.write_text(json.dumps(facts, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# host: boot, collect, render


def _fmt_events(events: Sequence[Json]) -> str:
    parts = []
    for ev in events:
        dur = f" {ev['duration'] * 1000:.0f} ms" if ev.get("duration") is not None else ""
        if ev.get("wait") is not None:
            dur += f" (wait {ev['wait'] * 1000:.0f})"
        ret = "" if ev.get("ret") == 0 else f" ret={ev.get('ret')}"
        parts.append(f"{ev['kind']} {ev['dev']}{dur}{ret}")
    return ", ".join(parts) or "none"


def _irq_summary(v: Json) -> str:
    counts = {i["name"]: i.get("count", f"errno {i.get('errno')}") for i in v.get("irqs", [])}
    return " / ".join(str(counts.get(n, "-")) for n in ("INTX", "MSI", "MSIX", "ERR", "REQ"))


def _signature(f: Json, v: Json) -> str:
    """What identical devices share: everything but their address, group and hot-reset peers."""
    v = {k: val for k, val in v.items() if k != "hot_reset"}
    res = [
        {k: r[k] for k in ("index", "size", "type", "mem64", "prefetch")} for r in f["resources"]
    ]
    keep = (
        "vendor",
        "device",
        "subsystem_vendor",
        "subsystem_device",
        "revision",
        "class",
        "config_size",
    )
    return json.dumps([{k: f[k] for k in keep}, res, f["capabilities"], v], sort_keys=True)


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2] * 1000:.0f} ms"


def _summary(facts: Json) -> list[str]:
    """The numbers a simulator topology of this guest must reproduce, derived from the data."""
    t = facts["timings"]
    m, p = t["many"], t["multifunction_pair"]
    nic_bus = [e for e in m["sequential_events"] if e["kind"] == "bus"]
    edu_bus = [e for e in t["open_close_edu"]["events"] if e["kind"] == "bus"]
    nic_open = [e["kind"] for e in t["open_close_e1000e"]["events"]]

    def count(events: Sequence[Json], kind: str) -> int:
        return sum(1 for e in events if e["kind"] == kind)

    return [
        "## Summary",
        "",
        f"- A single e1000e is reset at open and again at close ({nic_open.count('function')} "
        f"function resets for one open+close), each a secondary bus reset of its root port: "
        f"{_ms([e['duration'] for e in nic_bus])} (median), of which "
        f"{_ms([e['wait'] for e in nic_bus if e.get('wait') is not None])} is the kernel's wait for "
        "the link/device after the pulse.",
        f"- edu's bus reset (behind the PCIe-to-PCI bridge) takes {_ms([e['duration'] for e in edu_bus])}: "
        "the kernel's wait after the pulse returns at once (a PCIe-to-PCI bridge is not a PCIe "
        "downstream port, so no link to wait for).",
        f"- The multifunction pair: {count(p['open_events'], 'bus')} resets at open, "
        f"{count(p['close_first_events'], 'bus')} at its first close, "
        f"{count(p['close_last_events'], 'bus')} bus reset (through pci_reset_bus) at its last close.",
        f"- {len(m['bdfs'])} NICs released: sequentially {m['sequential_close_s']:.2f} s, from "
        f"{len(m['bdfs'])} threads {m['threaded_close_s']:.2f} s, by process exit "
        f"{m['process_exit_s']:.2f} s (exit releases them one by one, last opened first).",
        "",
    ]


def render(facts: Json, layout_rows: list[tuple[str, str, str, str]]) -> str:
    pci: dict[str, Json] = facts["pci"]
    vfio: dict[str, Json] = facts["vfio_devices"]
    roles = {bdf: role for bdf, role, _, _ in layout_rows}
    boot = facts.get("boot_seconds")
    lines = [
        "# vmtest guest: facts as measured",
        "",
        "Generated by `python3 tools/vmtest/collect_facts.py --markdown tools/vmtest/guest-facts.md`",
        "from a real boot (QEMU q35 + intel-iommu, TCG); rerun it after changing the layout in",
        "vmtest.py. Times are from one run on a loaded 2-core host; they vary by ~10-30 %.",
        "",
        f"- kernel {facts['kernel']}; command line `{facts['cmdline']}`",
        f"- boot: QEMU start to guest ready {boot:.1f} s (guest uptime then "
        f"{facts.get('ready_uptime') or 0:.1f} s; firmware and kernel load are the rest)"
        if boot
        else "- boot: not measured",
        f"- /dev/iommu (iommufd): {'present' if facts['iommufd'] else 'absent'}; VFIO through the "
        "legacy container/group API only",
        f"- reset kinds traced by guest_trace: {', '.join(facts['trace_kinds'])}",
        "",
        *_summary(facts),
        "## PCI devices",
        "",
        "| address | ids | class | role | driver | group | reset_method | pin/irq |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for bdf, f in pci.items():
        ids = f"{f['vendor'][2:]}:{f['device'][2:]}"
        pin = "ABCD"[f["interrupt_pin"] - 1] if 1 <= f["interrupt_pin"] <= 4 else "-"
        lines.append(
            f"| {bdf} | {ids} | {f['class']} | {roles.get(bdf, '')} | {f['driver'] or '-'} | {f['iommu_group']} "
            f"| {f['reset_method'] or '-'} | {pin}/{f['irq']} |"
        )
    if facts.get("qemu_devices"):
        lines += ["", "QEMU `-device` arguments of the test devices (vmtest.layout()):", "", "```"]
        lines += facts["qemu_devices"]
        lines += ["```"]
    lines += [
        "",
        "reset_method as vmtest leaves it: `bus` written on the single NICs (the kernel offers",
        "`pm bus`), all methods disabled on the pair (the kernel offers `pm`; `bus` is refused",
        "because the functions share a bus), edu left at the kernel's default. The PCIe-to-PCI",
        "bridge 00:05.0 is unbound from shpchp (its group would not be viable otherwise).",
        "",
        "## IOMMU groups",
        "",
    ]  # fmt: skip
    for group, members in sorted(facts["iommu_groups"].items(), key=lambda kv: int(kv[0] or -1)):
        lines.append(f"- group {group}: {', '.join(members)}")
    lines += ["", "## Bridges: bus numbers and what a secondary bus reset hits", ""]
    for bdf, f in pci.items():
        if "secondary_bus" not in f:
            continue
        exp = next((c for c in f["capabilities"] if c["name"] == "EXP"), None)
        link = ""
        if exp:
            link = (f"; {exp['type']}, link cap gen{exp['link_speed_cap']} x{exp['link_width_cap']} "
                    f"(now gen{exp['link_speed']} x{exp['link_width']}, DLL active {exp['dll_link_active']}), "
                    f"DLL-active reporting {exp['dll_active_reporting']}")  # fmt: skip
            if exp["slot"]:
                link += f", slot {exp.get('slot_number')} hotplug {exp.get('slot_hotplug_capable')}"
        acs = next((c for c in f["capabilities"] if c["name"] == "ACS"), None)
        link += f", ACS cap {acs['acs_cap']:#x} ctrl {acs['acs_ctrl']:#x}" if acs else ", no ACS"
        link += "; capabilities " + ", ".join(
            f"{c['name']}@{c['offset']:#x}" for c in f["capabilities"]
        )
        lines.append(
            f"- {bdf} ({f['driver'] or 'no driver'}): bus {f['secondary_bus']:02x}-{f['subordinate_bus']:02x}, "
            f"below: {', '.join(f['children']) or 'nothing'}{link}"
        )
    lines += [
        "",
        "## Test devices",
        "",
        "| address | role | group | multifunction bit | VFIO reset flag | IRQ counts INTX/MSI/MSIX/ERR/REQ | hot reset info lists |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for bdf, role, _, _ in layout_rows:
        v = vfio.get(bdf, {})
        if bdf not in pci:
            lines.append(f"| {bdf} | {role} | MISSING | | | | |")
            continue
        f = pci[bdf]
        hr = v.get("hot_reset", {})
        peers = (
            ", ".join(f"{d['bdf']} (g{d['group']})" for d in hr.get("devices", []))
            or f"errno {hr.get('errno')}"
        )
        lines.append(f"| {bdf} | {role} | {f['iommu_group']} | {f['multifunction']} | {v.get('reset')} "
                     f"| {_irq_summary(v)} | {peers} |")  # fmt: skip
    groups: dict[str, list[str]] = {}
    for bdf, _, _, _ in layout_rows:
        if bdf in pci:
            groups.setdefault(_signature(pci[bdf], vfio.get(bdf, {})), []).append(bdf)
    for members in groups.values():
        f, v = pci[members[0]], vfio.get(members[0], {})
        lines += ["", f"### {', '.join(members)}", ""]
        lines.append(f"{f['vendor'][2:]}:{f['device'][2:]} subsystem {f['subsystem_vendor'][2:]}:"
                     f"{f['subsystem_device'][2:]} rev {f['revision']} class {f['class']}, "
                     f"config space {f['config_size']} bytes")  # fmt: skip
        lines.append("")
        for r in f["resources"]:
            kind = r["type"] + (
                " 64-bit" if r["mem64"] else " 32-bit" if r["type"] == "mem" else ""
            )
            kind += " prefetchable" if r["prefetch"] else ""
            lines.append(f"- resource {r['index']}: {r['size']:#x} bytes, {kind}")
        for c in f["capabilities"]:
            extra = ", ".join(
                f"{k}={v}" for k, v in c.items() if k not in ("offset", "id", "name", "extended")
            )
            lines.append(
                f"- capability {c['name']} at {c['offset']:#x}" + (f": {extra}" if extra else "")
            )
        if "regions" in v:
            lines.append(
                f"- VFIO: device flags {v['flags']:#x}, {v['num_regions']} regions, {v['num_irqs']} IRQ indexes"
            )
            for r in v["regions"]:
                if "errno" in r:
                    lines.append(f"  - region {r['index']} {r['name']}: errno {r['errno']}")
                elif r["size"] or r["flags"]:
                    caps = f", info caps (id, version) {r['caps']}" if r["caps"] else ""
                    lines.append(f"  - region {r['index']} {r['name']}: size {r['size']:#x}, offset {r['offset']}, "
                                 f"flags {r['flags']:#x}{caps}")  # fmt: skip
            for i in v["irqs"]:
                what = (
                    f"errno {i['errno']}"
                    if "errno" in i
                    else f"count {i['count']}, flags {i['flags']:#x}"
                )
                lines.append(f"  - irq index {i['index']} {i['name']}: {what}")
        elif v:
            lines.append(f"- VFIO open failed: errno {v.get('open_errno')} {v.get('error')}")
    c = facts["container"]
    exts = ", ".join(k for k, val in c["extensions"].items() if val)
    lines += ["", "## Container (VFIO_TYPE1v2_IOMMU)", "",
              f"- VFIO_GET_API_VERSION {c['api_version']}; extensions: {exts}",
              f"- iova_pgsizes {c['iova_pgsizes']:#x}; IOVA ranges {c.get('iova_ranges')}; "
              f"dma_avail {c.get('dma_avail')}", ""]  # fmt: skip
    t = facts["timings"]
    lines += [
        "## Reset timings (guest clock)",
        "",
        "Events as `kind device duration (wait = readiness wait after the bus reset pulse)`;",
        "`function` is __pci_reset_function_locked, `reset_bus` is pci_reset_bus (vfio device-set",
        "and hot reset), `bus` is the secondary bus reset of the named bridge.",
        "",
    ]  # fmt: skip
    for key in ("open_close_e1000e", "open_close_edu"):
        x = t[key]
        lines.append(
            f"- one {x['bdf']}: open {x['open_s']:.3f} s, close {x['close_s']:.3f} s; {_fmt_events(x['events'])}"
        )
    p = t["multifunction_pair"]
    lines.append(f"- pair {', '.join(p['bdfs'])}: at open: {_fmt_events(p['open_events'])}; "
                 f"first close {p['close_first_s']:.3f} s: {_fmt_events(p['close_first_events'])}; "
                 f"last close {p['close_last_s']:.3f} s: {_fmt_events(p['close_last_events'])}")  # fmt: skip
    m = t["many"]
    lines.append(f"- {len(m['bdfs'])} single e1000e: open all {m['open_all_s']:.3f} s; sequential close "
                 f"{m['sequential_close_s']:.3f} s; threaded close {m['threaded_close_s']:.3f} s; "
                 f"process exit {m['process_exit_s']:.3f} s")  # fmt: skip
    lines.append(f"  - sequential: {_fmt_events(m['sequential_events'])}")
    lines.append(f"  - threaded: {_fmt_events(m['threaded_events'])}")
    lines.append(
        f"  - process exit (files released in reverse order): {_fmt_events(m['exit_events'])}"
    )
    h = t["hot_reset_ioctl"]
    lines.append(
        f"- VFIO_DEVICE_PCI_HOT_RESET on {h['bdf']}: {h['seconds']:.3f} s; {_fmt_events(h['events'])}"
    )
    lines.append("")
    return "\n".join(lines)


def host_main(args: argparse.Namespace) -> int:
    import vmtest

    missing = vmtest.missing_requirements()
    if missing:
        print("collect_facts: " + "; ".join(missing), file=sys.stderr)
        return 3
    lay = vmtest.layout()
    roles = {
        "all": lay.bdfs(),
        "e1000e": lay.bdfs("e1000e"),
        "edu": lay.bdfs("edu"),
        "mf": lay.bdfs("mf"),
    }
    with vmtest.Guest(echo_console=args.verbose) as guest:
        out = guest.results_dir / "facts.json"
        result = guest.run(
            [
                vmtest.GUEST_PYTHON,
                str(HERE / "collect_facts.py"),
                "--guest",
                str(out),
                "--roles",
                json.dumps(roles),
            ],
            timeout=600,
        )
        if result.returncode != 0:
            print(result.output, file=sys.stderr)
            return 1
        facts = json.loads(out.read_text())
        facts["boot_seconds"] = guest.boot_seconds
        facts["ready_uptime"] = guest.guest_ready_uptime
        pairs = zip(lay.qemu_args[::2], lay.qemu_args[1::2], strict=True)
        facts["qemu_devices"] = [v if f == "-device" else f"{f} {v}" for f, v in pairs]
    if args.json:
        Path(args.json).write_text(json.dumps(facts, indent=1))
    rows = [(d.bdf, d.role, d.ids, d.bridge) for d in lay.devices]
    text = render(facts, rows)
    if args.markdown:
        Path(args.markdown).write_text(text)
    else:
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--guest", metavar="OUT", help="(in the guest) collect into OUT.json")
    parser.add_argument("--roles", help="(in the guest) JSON: which devices play which role")
    parser.add_argument("--json", help="also keep the raw JSON here")
    parser.add_argument("--markdown", help="write the fact sheet here (default: stdout)")
    parser.add_argument("--from-json", help="render an earlier --json file instead of booting")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.guest:
        return guest_main(Path(args.guest), json.loads(args.roles))
    if args.from_json:
        import vmtest

        rows = [(d.bdf, d.role, d.ids, d.bridge) for d in vmtest.layout().devices]
        text = render(json.loads(Path(args.from_json).read_text()), rows)
        if args.markdown:
            Path(args.markdown).write_text(text)
        else:
            print(text)
        return 0
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
