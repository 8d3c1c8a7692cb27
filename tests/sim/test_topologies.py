"""Topology files: the TOML writer round trip and the ready files."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from mock_vfio import Machine, Topology, available, load_topology, parse_toml
from mock_vfio.topology import FunctionSpec
from mock_vfio.topology_dump import describe, dump_toml, main
from mock_vfio.topology_gen import gpus, nvme, vfs

from .conftest import SCALE, open_device

GENERATED: list[tuple[Callable[[int], Topology], int]] = [
    (gpus, 1),
    (gpus, 8),
    (gpus, 64),
    (vfs, 4),
    (vfs, 64),
    (nvme, 3),
]
READY = ["gpu-server-8", "nvme-shelf-24", "nic-sriov-64"]


@pytest.mark.parametrize("full", [False, True], ids=["compact", "full"])
@pytest.mark.parametrize(("gen", "n"), GENERATED, ids=[f"{g.__name__}:{n}" for g, n in GENERATED])
def test_generator_round_trip(gen: Callable[[int], Topology], n: int, full: bool) -> None:
    t = gen(n)
    back = parse_toml(dump_toml(t, full=full))
    assert back == t
    assert back.name == f"{gen.__name__}:{n}"


@pytest.mark.parametrize("name", [*READY, "qemu-vmtest"])
def test_file_round_trip(name: str) -> None:
    t = load_topology(name)
    assert parse_toml(dump_toml(t)) == t
    assert parse_toml(dump_toml(t, full=True)) == t


def test_writer_keeps_odd_values() -> None:
    t = nvme(1)
    f = t.functions[0]
    f.driver = None
    f.command = 0x0
    f.reset_methods = ()
    f.reset_method_set = ("flr", "bus")
    f.cap_offsets = {"PM": 0x40, "EXP": 0x70}
    f.iommu_group = -1
    f.model = 'quote " and \\ back\tslash'
    t.iommu_coherent = False
    t.iommu_address_width = 39
    t.bridges[0].kind = "pci_bridge"
    t.bridges[0].link_speed = 0.0
    assert parse_toml(dump_toml(t)) == t
    assert parse_toml(dump_toml(t, full=True)) == t


def test_sriov_without_vfs_round_trips() -> None:
    t = vfs(0)
    t.functions[0].vf_bars = ()
    t.functions[0].vf_driver = None
    assert parse_toml(dump_toml(t)) == t


def test_vf_specs_are_refused() -> None:
    t = vfs(1)
    t.functions.append(FunctionSpec(addr="0000:01:00.1", physfn="0000:01:00.0"))
    with pytest.raises(ValueError, match="VF"):
        dump_toml(t)


def test_available_lists_ready_files() -> None:
    names = available()
    for name in READY:
        assert name in names
        assert describe(name)
    assert all(describe(n) for n in names)


def test_gpu_server_shape() -> None:
    t = load_topology("gpu-server-8")
    assert t.name == "gpu-server-8"
    kinds = [b.kind for b in t.bridges]
    assert kinds.count("root_port") == 2
    assert kinds.count("upstream") == 2
    assert kinds.count("downstream") == 8
    gpu_fns = [f for f in t.functions if f.class_code == 0x030200]
    audio = [f for f in t.functions if f.class_code == 0x040300]
    assert len(gpu_fns) == len(audio) == 8
    for g, a in zip(gpu_fns, audio, strict=True):
        assert a.addr == g.addr[:-1] + "1"
        assert g.iommu_group == a.iommu_group
        assert g.reset_methods == a.reset_methods == ("bus",)
        assert not g.flr
    assert len({g.iommu_group for g in gpu_fns}) == 8


def test_nvme_shelf_shape() -> None:
    t = load_topology("nvme-shelf-24")
    assert len(t.functions) == 24
    assert all(f.flr and f.class_code == 0x010802 for f in t.functions)
    assert len({f.iommu_group for f in t.functions}) == 24
    assert len({f.addr[:7] for f in t.functions}) == 24  # one bus each


def test_nic_shape() -> None:
    t = load_topology("nic-sriov-64")
    (pf,) = t.functions
    assert pf.sriov_total == pf.sriov_initial == 64
    m = Machine(t, time_scale=SCALE, kernel_version=(6, 18))
    try:
        vf_devs = m.devices[pf.addr].vfs
        assert len(vf_devs) == 64
        assert len({d.group_id for d in vf_devs}) == 64
        assert len({id(d.devset) for d in vf_devs}) == 64  # 6.17+: a set per VF
        assert all(d.driver == "vfio-pci" for d in vf_devs)
    finally:
        m.close()
    with Machine(t, time_scale=SCALE, kernel_version=(6, 16)) as old:
        assert len({id(d.devset) for d in old.devices[pf.addr].vfs}) == 1  # the bus's set


def _open_close(m: Machine, addr: str) -> None:
    p = m.spawn(name="vmm")
    fds = open_device(p, addr)
    for fd in reversed(fds):
        p.close(fd)
    assert m.open_fds() == 0


@pytest.mark.parametrize("addr", ["0000:03:00.0", "0000:0c:00.1"])
def test_gpu_server_opens_and_closes_with_a_bus_reset(addr: str) -> None:
    # The bus holds GPU and audio: no function-level bus reset at open; the device
    # set's bus reset at the last release hits both functions.
    m = Machine(load_topology("gpu-server-8"), time_scale=SCALE)
    try:
        _open_close(m, addr)
        assert m.resets(cause="open") == []
        hits = m.resets(cause="devset")
        assert {e.method for e in hits} == {"bus"}
        assert sorted(str(e.device) for e in hits) == [addr[:-1] + "0", addr[:-1] + "1"]
    finally:
        m.close()


@pytest.mark.parametrize(
    ("name", "addr"),
    [
        ("nvme-shelf-24", "0000:01:00.0"),
        ("nvme-shelf-24", "0000:18:00.0"),
        ("nic-sriov-64", "0000:01:00.1"),
        ("nic-sriov-64", "0000:01:08.0"),
    ],
)
def test_flr_file_opens_and_closes_with_flr(name: str, addr: str) -> None:
    m = Machine(load_topology(name), time_scale=SCALE)
    try:
        _open_close(m, addr)
        assert [(e.device, e.method) for e in m.resets(cause="open")] == [(addr, "flr")]
        assert [(e.device, e.method) for e in m.resets(cause="release")] == [(addr, "flr")]
        assert {e.method for e in m.resets()} == {"flr"}
    finally:
        m.close()


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == available()


def test_cli_dump(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dump", "gpus:8"]) == 0
    assert parse_toml(capsys.readouterr().out) == load_topology("gpus:8")
    assert main(["dump", "--full", "nic-sriov-64"]) == 0
    assert parse_toml(capsys.readouterr().out) == load_topology("nic-sriov-64")
    with pytest.raises(SystemExit):
        main(["dump", "no-such-topology"])
