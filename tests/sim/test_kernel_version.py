"""The modelled kernel version: spec parsing, the models it implies, what it gates."""

from __future__ import annotations

import pytest
from mock_vfio import Machine, load_topology

from vfiopy import Session
from vfiopy._uapi import Extension
from vfiopy.simulate import SimSpec, machine_of, parse_spec, simulated_kernel

from .conftest import NICS, SCALE, open_device

_ENV = (
    "VFIOPY_SIM_KERNEL_VERSION",
    "VFIOPY_SIM_KERNEL_MODEL",
    "VFIOPY_SIM_RESET_MODEL",
    "VFIOPY_SIM_TIME_SCALE",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


def test_default_is_debian_12() -> None:
    assert parse_spec("gpus:4") == SimSpec("gpus:4", "devset", "pre-6.3", 1.0, (6, 1))


@pytest.mark.parametrize(
    ("version", "kernel", "reset"),
    [
        ("4.19", "legacy", "pre-6.3"),
        ("5.0", "devset", "pre-6.3"),
        ("6.2", "devset", "pre-6.3"),
        ("6.3", "devset", "current"),
        ("6.18", "devset", "current"),
        ("10.0", "devset", "current"),
    ],
)
def test_version_implies_models(version: str, kernel: str, reset: str) -> None:
    s = parse_spec(f"gpus:4,version={version},scale=0.5")
    major, minor = (int(v) for v in version.split("."))
    assert (s.kernel_version, s.kernel_model, s.reset_model) == ((major, minor), kernel, reset)
    assert s.time_scale == 0.5


def test_explicit_models_win() -> None:
    s = parse_spec("gpus:4,version=4.19,kernel=devset,reset=current")
    assert (s.kernel_version, s.kernel_model, s.reset_model) == ((4, 19), "devset", "current")
    s = parse_spec("gpus:4,reset=current,version=6.1")
    assert (s.kernel_model, s.reset_model) == ("devset", "current")


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFIOPY_SIM_KERNEL_VERSION", "6.6")
    assert parse_spec("gpus:1").reset_model == "current"
    monkeypatch.setenv("VFIOPY_SIM_RESET_MODEL", "pre-6.3")
    assert parse_spec("gpus:1") == SimSpec("gpus:1", "devset", "pre-6.3", 1.0, (6, 6))
    # the spec's version overrides the environment, models it implies included
    s = parse_spec("gpus:1,version=4.19")
    assert (s.kernel_version, s.kernel_model, s.reset_model) == ((4, 19), "legacy", "pre-6.3")
    monkeypatch.setenv("VFIOPY_SIM_KERNEL_VERSION", "six")
    with pytest.raises(ValueError, match="VFIOPY_SIM_KERNEL_VERSION"):
        parse_spec("gpus:1")


@pytest.mark.parametrize("bad", ["6", "6.1.2", "v6.1", "6.x", "", "-1.0"])
def test_bad_version_names_the_spec(bad: str) -> None:
    spec = f"gpus:2,version={bad}"
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR") as e:
        parse_spec(spec)
    assert repr(spec) in str(e.value)


def test_unknown_option() -> None:
    with pytest.raises(ValueError, match=r"unknown simulation option 'kver=6\.1'"):
        parse_spec("gpus:2,kver=6.1")


def test_machine_derives_models() -> None:
    m = Machine(load_topology("gpus:1"), time_scale=0, kernel_version=(4, 19))
    assert (m.kernel_model, m.reset_model) == ("legacy", "pre-6.3")
    m = Machine(load_topology("gpus:1"), "devset", time_scale=0, kernel_version=(4, 19))
    assert (m.kernel_model, m.reset_model) == ("devset", "pre-6.3")
    m = Machine(load_topology("gpus:1"), time_scale=0)
    assert (m.kernel_version, m.kernel_model, m.reset_model) == ((6, 1), "devset", "pre-6.3")
    with pytest.raises(ValueError, match="kernel_version"):
        Machine(load_topology("gpus:1"), time_scale=0, kernel_version=(6,))  # type: ignore[arg-type]


def test_simulated_kernel_models_the_version() -> None:
    m = machine_of(simulated_kernel("gpus:1,version=6.6,scale=0"))
    assert m is not None
    assert (m.kernel_version, m.kernel_model, m.reset_model) == ((6, 6), "devset", "current")
    m.close()


@pytest.mark.parametrize(("version", "has_syspath"), [((6, 1), False), ((6, 18), True)])
def test_fdinfo_syspath_from_6_18(version: tuple[int, int], has_syspath: bool) -> None:
    m = Machine(load_topology("qemu-vmtest"), time_scale=SCALE, kernel_version=version)
    try:
        p = m.spawn()
        _, g, d = open_device(p, NICS[0])
        info = p.read_text(f"/proc/{p.pid}/fdinfo/{d}")
        line = f"vfio-device-syspath: /sys/devices/pci0000:00/0000:00:02.0/{NICS[0]}"
        assert (line in info) is has_syspath
        assert "vfio-device-syspath" not in p.read_text(f"/proc/{p.pid}/fdinfo/{g}")
        # the generic fdinfo lines are there either way
        assert info.startswith("pos:")
    finally:
        m.close()


def test_kernel_option_takes_a_version_or_a_model() -> None:
    assert parse_spec("vfs:4,kernel=6.18") == SimSpec("vfs:4", "devset", "current", 1.0, (6, 18))
    assert parse_spec("vfs:4,kernel=4.19").kernel_model == "legacy"
    assert parse_spec("vfs:4,kernel=legacy").kernel_version == (6, 1)  # a model, as before
    m = machine_of(simulated_kernel("vfs:4,kernel=6.16"))
    assert m is not None and not m.vf_own_devset
    m.close()


@pytest.mark.parametrize("version", [(5, 10), (6, 1)], ids=["5.10", "6.1"])
def test_type1_unmap_all_and_page_sizes_by_version(version: tuple[int, int]) -> None:
    """VFIO_UNMAP_ALL and VFIO_UPDATE_VADDR from 5.12; intel-iommu's real page sizes from
    5.15 (before, every power of two from 4 KiB): as the guest's 5.10 and 6.1 answer."""
    m = Machine(load_topology("qemu-vmtest"), time_scale=SCALE, kernel_version=version)
    try:
        with Session(m.spawn()) as session:
            session.open_device(NICS[0])
            c = session.container
            assert c is not None
            new = version >= (5, 12)
            assert c.check_extension(Extension.UNMAP_ALL) is new
            assert c.check_extension(Extension.UPDATE_VADDR) is new
            old_pgsizes = 0xFFFF_FFFF_FFFF_F000
            assert c.info().pgsizes == (0x40201000 if version >= (5, 15) else old_pgsizes)
            c.map_dma(0x1000_0000, 0, 0x1000)
            c.map_dma(0x1000_1000, 1 << 20, 0x1000)
            assert c.unmap_all() == 0x2000  # one ioctl from 5.12, else one per mapping
    finally:
        m.close()
