"""vfiopy.kmodel's predictions, each checked against the simulator's trace of the same run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mock_vfio import Machine, load_topology
from mock_vfio.topology_load import parse_toml

from vfiopy.kernel import Kernel
from vfiopy.kmodel import KernelModel, fixed_reset_order, label
from vfiopy.release import release
from vfiopy.release._plan import make_plan
from vfiopy.session import Session
from vfiopy.sysfs import Sysfs

from .conftest import SCALE, open_device

pytestmark = pytest.mark.anyio

BRIDGE = """
[[bridge]]
addr = "0000:00:01.0"
secondary = 1
subordinate = {sub}
link_speed = 16.0
"""

# Two functions of one multifunction device, each with FLR.
MULTIFUNCTION_FLR = (
    BRIDGE.format(sub=1)
    + """
[[device]]
addr = "0000:01:00.0"
flr = true
[[device]]
addr = "0000:01:00.1"
flr = true
"""
)

# A function with only a bus reset, beside a bridge whose bus holds an FLR device.
BRIDGE_BELOW_A_BUS = (
    BRIDGE.format(sub=2)
    + """
[[bridge]]
addr = "0000:01:01.0"
secondary = 2
kind = "downstream"
[[device]]
addr = "0000:01:00.0"
reset_method = ["bus"]
[[device]]
addr = "0000:02:00.0"
flr = true
"""
)


@pytest.fixture
def machine() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def _machine(made: list[Machine], toml: str, version: tuple[int, int] = (6, 1)) -> Machine:
    topology = parse_toml(toml, "t")
    topology.assign_groups()
    m = Machine(topology, time_scale=SCALE, kernel_version=version)
    made.append(m)
    return m


def _machine_of(made: list[Machine], spec: str, version: tuple[int, int]) -> Machine:
    m = Machine(load_topology(spec), time_scale=SCALE, kernel_version=version)
    made.append(m)
    return m


def _model(kernel: Kernel) -> KernelModel:
    return KernelModel(Sysfs(kernel))  # the version the machine reports in osrelease


async def _traced_release(m: Machine, addrs: list[str]) -> list[list[str]]:
    """Open ``addrs``, release them in order with vfiopy, and the traced resets per close."""
    p = m.spawn(name="t")
    session = Session(kernel=p)
    devs = [session.open_device(a) for a in addrs]
    per_close: list[list[str]] = []
    for dev in devs:
        before = len(m.trace)
        await release(session, [dev], close_session=False)
        per_close.append(sorted({e.method or "?" for e in m.trace[before:] if e.kind == "reset"}))
    session.close()
    return per_close


async def test_multifunction_flr_is_one_flr_per_close_and_no_bus_reset(
    machine: list[Machine],
) -> None:
    m = _machine(machine, MULTIFUNCTION_FLR)
    addrs = ["0000:01:00.0", "0000:01:00.1"]
    model = _model(m.spawn())
    (p,) = model.closes(addrs)
    assert p.set.kind == "bus" and p.set.resettable
    assert [label(s) for s in p.steps] == ["flr", "flr"]
    assert p.seconds == pytest.approx(0.2)
    plan = make_plan(m.spawn(), addrs)
    assert [d.release_resets for d in plan.domains] == [2]
    assert await _traced_release(m, addrs) == [["flr"], ["flr"]]


async def test_bus_only_functions_get_one_bus_reset_at_the_last_close(
    machine: list[Machine],
) -> None:
    m = _machine(machine, MULTIFUNCTION_FLR.replace("flr = true", 'reset_method = ["bus"]'))
    addrs = ["0000:01:00.0", "0000:01:00.1"]
    (p,) = _model(m.spawn()).closes(addrs)
    assert [label(s) for s in p.steps] == [None, "bus"]
    assert p.seconds == pytest.approx(1.0)  # 6.1: the fixed second after a bus reset
    assert await _traced_release(m, addrs) == [[], ["bus"]]


async def test_a_bridge_below_the_bus_blocks_the_bus_reset(machine: list[Machine]) -> None:
    m = _machine(machine, BRIDGE_BELOW_A_BUS)
    model = _model(m.spawn())
    ds = model.device_set("0000:01:00.0")
    assert [str(a) for a in ds.members] == ["0000:01:00.0"]
    assert [str(a) for a in ds.reach] == ["0000:01:00.0", "0000:01:01.0", "0000:02:00.0"]
    assert not ds.resettable  # the bridge is in no vfio device set
    assert model.function_reset("0000:01:00.0") is None  # not alone on its bus
    assert model.open_reset("0000:01:00.0") is None
    (p,) = model.closes(["0000:01:00.0"])
    assert p.steps == [[]]
    assert await _traced_release(m, ["0000:01:00.0"]) == [[]]
    # The device below the bridge is a set of its own bus and resets by FLR.
    assert await _traced_release(m, ["0000:02:00.0"]) == [["flr"]]
    assert [label(s) for s in model.closes(["0000:02:00.0"])[0].steps] == ["flr"]


def test_version_comes_from_the_machine(machine: list[Machine]) -> None:
    m = _machine(machine, MULTIFUNCTION_FLR, (6, 18))
    assert _model(m.spawn()).version == (6, 18)
    assert not _model(m.spawn()).serialised
    assert KernelModel(Sysfs(m.spawn()), (4, 19)).serialised


def test_bus_reset_cost_follows_the_version_and_the_link(machine: list[Machine]) -> None:
    toml = MULTIFUNCTION_FLR.replace("flr = true", 'reset_method = ["bus"]')
    k = _machine(machine, toml).spawn()
    addrs = ["0000:01:00.0", "0000:01:00.1"]
    assert KernelModel(Sysfs(k), (6, 2)).closes(addrs)[0].seconds == pytest.approx(1.0)
    # 6.3+: 16 GT/s waits for the link, then 100 ms; 5 GT/s only the 100 ms.
    assert KernelModel(Sysfs(k), (6, 3)).closes(addrs)[0].seconds == pytest.approx(0.2)
    slow = _machine(machine, toml.replace("link_speed = 16.0", "link_speed = 5.0")).spawn()
    assert KernelModel(Sysfs(slow), (6, 3)).closes(addrs)[0].seconds == pytest.approx(0.1)


@pytest.mark.parametrize(("version", "shared"), [((6, 16), True), ((6, 17), False)])
def test_vfs_share_the_bus_set_before_6_17(
    machine: list[Machine], version: tuple[int, int], shared: bool
) -> None:
    m = _machine_of(machine, "vfs:4", version)
    p = m.spawn()
    vfs = [f"0000:01:00.{i}" for i in range(1, 5)]
    sets = _model(p).closes(vfs)
    assert len(sets) == (1 if shared else 4)
    assert all(label(s) == "flr" for pr in sets for s in pr.steps)  # never a bus reset
    assert sum(pr.count for pr in sets) == 4
    for a in vfs:
        open_device(p, a)
    p.exit()  # the releases, one after another, each under its set's lock
    released = {e.device: e.devset for e in m.events("release")}
    assert len(set(released.values())) == len(sets)
    assert [e.method for e in m.resets(cause="release")] == ["flr"] * 4
    assert not m.resets(kind="bus")


@pytest.mark.parametrize("version", [(5, 10), (6, 1)], ids=["5.10", "6.1"])
async def test_before_5_15_the_fixed_order_resets_what_reset_method_disabled(
    machine: list[Machine], version: tuple[int, int]
) -> None:
    """The guest's pair: reset_method "" (no function reset) from 5.15; before, no attribute,
    and the kernel's fixed order gives each function its PM reset, so the set's bus reset is
    never needed."""
    m = _machine_of(machine, "qemu-vmtest", version)
    pair = ["0000:07:00.0", "0000:07:00.1"]
    old = version < (5, 15)
    assert m.spawn().exists("/sys/bus/pci/devices/0000:01:00.0/reset_method") != old
    model = _model(m.spawn())
    assert model.function("0000:01:00.0").methods == (("pm", "bus") if old else ("bus",))
    assert model.function_reset(pair[0]) == ("pm" if old else None)
    (p,) = model.closes(pair)
    assert [label(s) for s in p.steps] == (["pm", "pm"] if old else [None, "bus"])
    assert await _traced_release(m, pair) == ([["pm"], ["pm"]] if old else [[], ["bus"]])
    assert await _traced_release(m, ["0000:01:00.0"]) == [["pm" if old else "bus"]]


def test_fixed_order_reads_the_capabilities() -> None:
    """FLR in PCIe DevCap, AF with TP and FLR, PM without No_Soft_Reset, then the bus; a
    64-byte image (what a non-root user reads) shows no capability."""
    cfg = bytearray(256)
    cfg[0x06] = 0x10  # status: capability list
    cfg[0x34] = 0x40
    cfg[0x40:0x42] = bytes([0x01, 0x50])  # PM, next 0x50
    cfg[0x50:0x52] = bytes([0x13, 0x60])  # AF, next 0x60
    cfg[0x53] = 0x3  # TP | FLR
    cfg[0x60:0x62] = bytes([0x10, 0x00])  # PCIe, last
    cfg[0x64:0x68] = (1 << 28).to_bytes(4, "little")
    assert fixed_reset_order(bytes(cfg)) == ("flr", "af_flr", "pm", "bus")
    cfg[0x44] = 0x08  # PMCSR No_Soft_Reset
    cfg[0x53] = 0x1  # TP without FLR
    cfg[0x64:0x68] = bytes(4)
    assert fixed_reset_order(bytes(cfg)) == ("bus",)
    cfg[0x44] = 0
    assert fixed_reset_order(bytes(cfg[:64])) == ("bus",)
    assert fixed_reset_order(bytes(cfg)) == ("pm", "bus")
