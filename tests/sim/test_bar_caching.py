"""BAR caching on the simulator: Region.mmap(caching=) and each of its branches.

The qemu-vmtest topology's ivshmem (0000:09:00.0) has a 64-bit prefetchable BAR2, so the
simulated sysfs offers resource2_wc for it (and for no BAR of an e1000e).  The simulated
kernel, like Debian's, is built with CONFIG_IO_STRICT_DEVMEM: vfio-pci's first access of a
BAR claims it, a claim revokes the resourceN_wc mappings already made (counted as
``wc_revoked``) and a claimed BAR cannot be mapped through sysfs (EINVAL).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator

import pytest
from mock_vfio import Machine, SimProcess, load_topology
from structlog.testing import capture_logs

import vfiopy
from vfiopy._uapi import PciRegion
from vfiopy.errors import RegionError
from vfiopy.features import (
    DMA_BUF,
    FeatureNotSupportedError,
    enter_low_power,
    enter_low_power_with_wakeup,
    exit_low_power,
)
from vfiopy.pci import COMMAND, Command
from vfiopy.region import Caching, Mapping, write_combined_devices

from .conftest import NICS, SCALE

IVSHMEM = "0000:09:00.0"
BAR2 = int(PciRegion.BAR2)


def wc_maps(p: SimProcess) -> int:
    """The live resourceN_wc mappings of the process's machine."""
    return sum(f.maps for d in p.machine.devices.values() for f in d.wc_files)


@pytest.fixture
def session(qemu: Machine) -> Iterator[tuple[vfiopy.Session, SimProcess]]:
    p = qemu.spawn()
    with vfiopy.Session(p) as s:
        yield s, p
    assert not write_combined_devices()  # the session's close retired every one


def test_sysfs_offers_wc_only_for_prefetchable_memory_bars(qemu: Machine) -> None:
    p = qemu.spawn()
    listing = p.listdir(f"/sys/bus/pci/devices/{IVSHMEM}")
    assert [n for n in listing if n.endswith("_wc")] == ["resource2_wc"]
    assert not [n for n in p.listdir(f"/sys/bus/pci/devices/{NICS[0]}") if n.endswith("_wc")]
    assert not p.exists(f"/sys/bus/pci/devices/{IVSHMEM}/resource0_wc")


def test_uncached_is_the_default(session: tuple[vfiopy.Session, SimProcess]) -> None:
    s, _ = session
    dev = s.open_device(IVSHMEM)
    nic = s.open_device(NICS[0])
    for m in (dev.region(BAR2).mmap(), nic.region(0).mmap(caching="uncached")):
        assert m.caching is Caching.UNCACHED


def test_unknown_caching_is_refused(session: tuple[vfiopy.Session, SimProcess]) -> None:
    s, _ = session
    region = s.open_device(IVSHMEM).region(BAR2)
    with pytest.raises(RegionError) as exc:
        region.mmap(caching="write-back")
    assert exc.value.errno == errno.EINVAL and IVSHMEM in str(exc.value)
    assert "'wc-sysfs'" in str(exc.value) and not region.mappings


def test_vfio_write_combining_is_probed_and_refused(
    session: tuple[vfiopy.Session, SimProcess],
) -> None:
    s, p = session
    dev = s.open_device(IVSHMEM)
    fds = p.listdir(f"/proc/{p.pid}/fd")
    with pytest.raises(FeatureNotSupportedError) as exc:
        dev.region(BAR2).mmap(caching=Caching.WC)
    text = str(exc.value)
    assert exc.value.errno == errno.ENOTTY
    assert IVSHMEM in text and "BAR2" in text and "caching='wc-sysfs'" in text
    assert "neither a write-combining VFIO feature nor DMA-BUF" in text
    assert not dev.region(BAR2).mappings and p.listdir(f"/proc/{p.pid}/fd") == fds


def test_vfio_write_combining_names_a_dma_buf_without_the_attribute(
    session: tuple[vfiopy.Session, SimProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, _ = session
    dev = s.open_device(IVSHMEM)
    asked: list[int] = []

    def probe(feature: int, *, get: bool = False, put: bool = False) -> bool:
        asked.append(feature)
        return feature == DMA_BUF  # a 6.19 kernel: the export, no write-combining attribute

    monkeypatch.setattr(dev, "feature_probe", probe)
    with pytest.raises(FeatureNotSupportedError) as exc:
        dev.region(BAR2).mmap(caching="wc")
    assert asked == [DMA_BUF]
    assert "exports BAR slices as DMA-BUFs" in str(exc.value)


@pytest.mark.parametrize("caching", [Caching.WC, Caching.WC_SYSFS])
@pytest.mark.parametrize(
    ("addr", "bar", "why"),
    [
        (IVSHMEM, 0, "is not prefetchable"),
        (NICS[0], 0, "is not prefetchable"),  # e1000e's registers
        (NICS[0], 3, "is not prefetchable"),  # its MSI-X BAR
    ],
)
def test_write_combining_refused_for_a_non_prefetchable_bar(
    session: tuple[vfiopy.Session, SimProcess], caching: Caching, addr: str, bar: int, why: str
) -> None:
    s, p = session
    dev = s.open_device(addr)
    with pytest.raises(RegionError) as exc:
        dev.region(bar).mmap(caching=caching)
    text = str(exc.value)
    assert exc.value.errno == errno.EINVAL and addr in text and f"BAR{bar} {why}" in text
    assert "caching='uncached'" in text
    assert not dev.region(bar).mappings and wc_maps(p) == 0


def test_write_combining_refused_for_an_io_bar(session: tuple[vfiopy.Session, SimProcess]) -> None:
    s, _ = session
    dev = s.open_device(NICS[0])
    with pytest.raises(RegionError) as exc:
        dev.region(2).mmap(caching=Caching.WC_SYSFS)  # e1000e's I/O BAR
    assert exc.value.errno == errno.EINVAL and "BAR2 is an I/O-port BAR" in str(exc.value)


def test_wc_sysfs_maps_the_same_memory(
    qemu: Machine, session: tuple[vfiopy.Session, SimProcess]
) -> None:
    s, p = session
    dev = s.open_device(IVSHMEM)
    region = dev.region(BAR2)
    with capture_logs() as logs:
        wc = region.mmap(caching="wc-sysfs")
    assert wc.caching is Caching.WC_SYSFS and wc.revocable
    warned = [e for e in logs if e["event"] == "region.wc_sysfs_mapped"]
    assert len(warned) == 1 and warned[0]["bdf"] == IVSHMEM and warned[0]["bar"] == BAR2
    assert "does not unmap" in warned[0]["note"]
    # The resource file's fd is closed at once; the mapping holds the file.
    assert not any("resource2_wc" in p.readlink(f"/proc/{p.pid}/fd/{fd}")
                   for fd in p.listdir(f"/proc/{p.pid}/fd"))  # fmt: skip
    assert wc_maps(p) == 1 and write_combined_devices() == {IVSHMEM}
    wc.write_bytes(0x100, b"written write-combined")
    wc.write32(0x200, 0x12345678)
    uc = region.mmap()  # vfio-pci claims BAR2 here: vfiopy retires the WC mapping first
    assert wc.closed and wc_maps(p) == 0 and qemu.counters["wc_revoked"] == 0
    assert uc.read_bytes(0x100, 22) == b"written write-combined"
    assert uc.read32(0x200) == 0x12345678
    with pytest.raises(RegionError) as exc:
        wc.read32(0x200)
    assert exc.value.errno == errno.EBADF and "first uncached access of BAR2" in str(exc.value)
    # The claim stands until the device's last close: a strict kernel refuses a new one.
    with pytest.raises(RegionError) as refused:
        region.mmap(caching="wc-sysfs")
    assert refused.value.errno == errno.EINVAL
    assert "CONFIG_IO_STRICT_DEVMEM" in str(refused.value) and "resource2_wc" in str(refused.value)
    assert wc_maps(p) == 0 and uc.caching is Caching.UNCACHED


def test_a_pread_of_the_bar_claims_it_too(
    qemu: Machine, session: tuple[vfiopy.Session, SimProcess]
) -> None:
    s, p = session
    region = s.open_device(IVSHMEM).region(BAR2)
    wc = region.mmap(caching=Caching.WC_SYSFS)
    wc.write32(0, 0xCAFE)
    assert region.read(0, 4) == (0xCAFE).to_bytes(4, "little")
    assert wc.closed and wc_maps(p) == 0 and qemu.counters["wc_revoked"] == 0


def test_the_kernel_revokes_an_unretired_mapping_at_the_claim(qemu: Machine) -> None:
    """The model vfiopy guards against: a raw resource2_wc mapping, then a VFIO mmap."""
    from .conftest import open_device

    p = qemu.spawn()
    _, _, d = open_device(p, IVSHMEM)
    fd = p.open(f"/sys/bus/pci/devices/{IVSHMEM}/resource2_wc", vfiopy.kernel.O_RDWR)
    p.mmap(fd, 4096, 0, 3, 1)
    p.close(fd)
    p.mmap(d, 4096, BAR2 << 40, 3, 1)
    assert qemu.counters["wc_revoked"] == 1


def test_a_lax_kernel_keeps_claimed_bars_mappable() -> None:
    m = Machine(load_topology("qemu-vmtest"), time_scale=SCALE, io_strict_devmem=False)
    try:
        with vfiopy.Session(m.spawn()) as s:
            region = s.open_device(IVSHMEM).region(BAR2)
            uc = region.mmap()
            wc = region.mmap(caching="wc-sysfs")  # after the claim: nothing to retire later
            assert not wc.revocable
            uc.write32(8, 7)
            assert region.read(8, 4) == (7).to_bytes(4, "little") and wc.read32(8) == 7
            assert not wc.closed
    finally:
        m.close()


def test_reset_retires_the_mapping_before_the_kernel_resets(
    qemu: Machine, session: tuple[vfiopy.Session, SimProcess]
) -> None:
    s, p = session
    dev = s.open_device(IVSHMEM)
    wc = dev.region(BAR2).mmap(caching="wc-sysfs")
    gate = qemu.faults.hang_reset(IVSHMEM)
    seen: dict[str, object] = {}
    resets = len(qemu.resets(device=IVSHMEM))

    def reset() -> None:
        dev.reset()

    t = threading.Thread(target=reset)
    t.start()
    try:
        # Wait until the reset has started (its event is recorded once it ends, so poll
        # the model's lock): the mapping must be gone before the kernel resets.
        while not qemu.devices[IVSHMEM].reset_lock.locked():
            t.join(0.01)
        seen["closed"], seen["maps"] = wc.closed, wc_maps(p)
    finally:
        gate.set()
        t.join()
    assert seen == {"closed": True, "maps": 0}
    assert len(qemu.resets(device=IVSHMEM)) == resets + 1
    with pytest.raises(RegionError) as exc:
        wc.write32(0, 1)
    assert exc.value.errno == errno.EBADF and "VFIO_DEVICE_RESET" in str(exc.value)
    assert "map it again" in str(exc.value)
    again = dev.region(BAR2).mmap(caching="wc-sysfs")
    again.write32(0, 5)
    assert again.read32(0) == 5


@pytest.fixture
def gpu() -> Iterator[tuple[Machine, str]]:
    """A GPU (BAR1 and BAR3 prefetchable) with its audio function on one bus."""
    m = Machine(load_topology("gpus:1"), time_scale=SCALE)
    yield m, next(a for a, d in m.devices.items() if d.spec.device == 0x2330)
    m.close()


def test_hot_reset_retires_every_affected_device_mapping(gpu: tuple[Machine, str]) -> None:
    """GPU and audio share a bus: a hot reset asked through the audio function retires the
    GPU's WC mapping too, though another Device object made it."""
    m, addr = gpu
    p = m.spawn()
    with vfiopy.Session(p) as s:
        g, audio = s.open_device(addr), s.open_device(addr[:-1] + "1")
        wc = g.region(3).mmap(caching=Caching.WC_SYSFS)
        uc = g.region(1).mmap()  # another BAR: not retired, and the kernel zaps it itself
        audio.hot_reset()
        assert wc.closed and wc_maps(p) == 0 and not uc.closed
        with pytest.raises(RegionError) as exc:
            wc.read32(0)
        assert "VFIO_DEVICE_PCI_HOT_RESET" in str(exc.value)


def test_memory_disable_retires_the_mapping(session: tuple[vfiopy.Session, SimProcess]) -> None:
    s, p = session
    dev = s.open_device(IVSHMEM)
    wc = dev.region(BAR2).mmap(caching="wc-sysfs")
    cmd = dev.config.command
    dev.config.command = cmd | Command.MASTER  # MEMORY kept: nothing retired
    assert not wc.closed
    dev.config.command = cmd & ~Command.MEMORY
    assert wc.closed and wc_maps(p) == 0
    with pytest.raises(RegionError) as exc:
        wc.read32(0)
    assert "clearing PCI_COMMAND_MEMORY" in str(exc.value)
    dev.config.command = cmd


def test_memory_disable_refused_under_a_vfio_mapping_touches_nothing(
    gpu: tuple[Machine, str],
) -> None:
    m, addr = gpu
    p = m.spawn()
    with vfiopy.Session(p) as s:
        dev = s.open_device(addr)
        wc = dev.region(3).mmap(caching="wc-sysfs")
        dev.region(1).mmap()  # BAR1 uncached: vfio-pci would zap it
        cmd = dev.config.command
        with pytest.raises(RegionError) as exc:
            dev.config.write16(COMMAND, cmd & ~Command.MEMORY)
        assert exc.value.errno == errno.EBUSY and "BAR1" in str(exc.value)
        assert "BAR3" not in str(exc.value)
        assert not wc.closed and wc_maps(p) == 1 and dev.config.command == cmd


@pytest.mark.parametrize("wakeup", [False, True])
def test_low_power_entry_retires_the_mapping(
    session: tuple[vfiopy.Session, SimProcess], wakeup: bool
) -> None:
    s, _ = session
    dev = s.open_device(IVSHMEM)
    wc = dev.region(BAR2).mmap(caching="wc-sysfs")
    if wakeup:
        enter_low_power_with_wakeup(dev).close()
    else:
        enter_low_power(dev)
    assert wc.closed
    with pytest.raises(RegionError) as exc:
        wc.read32(0)
    assert "low-power entry" in str(exc.value)
    exit_low_power(dev)
    again = dev.region(BAR2).mmap(caching="wc-sysfs")
    assert not again.closed


def test_close_releases_the_resource_file(
    qemu: Machine, session: tuple[vfiopy.Session, SimProcess]
) -> None:
    s, p = session
    dev = s.open_device(IVSHMEM)
    wc = dev.region(BAR2).mmap(caching="wc-sysfs")
    assert len(qemu.devices[IVSHMEM].wc_files) == 1
    s.close_device(dev)
    assert wc.closed and wc_maps(p) == 0 and not qemu.devices[IVSHMEM].wc_files
    assert not write_combined_devices()


@pytest.mark.parametrize(
    ("err", "advice"), [(errno.EACCES, "run as root"), (errno.ENOENT, "no resourceN_wc")]
)
def test_open_errors_are_explained(
    qemu: Machine, session: tuple[vfiopy.Session, SimProcess], err: int, advice: str
) -> None:
    s, p = session
    dev = s.open_device(IVSHMEM)
    qemu.faults.fail("open", err, device=IVSHMEM)
    with pytest.raises(RegionError) as exc:
        dev.region(BAR2).mmap(caching="wc-sysfs")
    assert exc.value.errno == err and "open resource2_wc" in str(exc.value)
    assert advice in str(exc.value) and IVSHMEM in str(exc.value)
    assert not dev.region(BAR2).mappings and wc_maps(p) == 0


def test_mmap_error_closes_the_resource_fd(
    qemu: Machine, session: tuple[vfiopy.Session, SimProcess]
) -> None:
    s, p = session
    dev = s.open_device(IVSHMEM)
    fds = p.listdir(f"/proc/{p.pid}/fd")
    qemu.faults.fail("mmap", errno.ENOMEM, device=IVSHMEM)
    with pytest.raises(RegionError) as exc:
        dev.region(BAR2).mmap(caching="wc-sysfs")
    assert exc.value.errno == errno.ENOMEM and "mmap resource2_wc" in str(exc.value)
    assert p.listdir(f"/proc/{p.pid}/fd") == fds and not qemu.devices[IVSHMEM].wc_files


def test_repr_names_the_caching(session: tuple[vfiopy.Session, SimProcess]) -> None:
    s, _ = session
    m: Mapping = s.open_device(IVSHMEM).region(BAR2).mmap(caching="wc-sysfs")
    assert "caching=wc-sysfs" in repr(m)


def test_the_guest_script_on_the_simulator(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/vm/guest_bar_caching.py, the guest's steps, against the simulated guest."""
    import importlib.util
    import json
    from pathlib import Path

    from vfiopy.kernel import set_default_kernel

    path = Path(__file__).resolve().parents[1] / "vm" / "guest_bar_caching.py"
    spec = importlib.util.spec_from_file_location("guest_bar_caching", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("VFIOPY_SIMULATE", f"qemu-vmtest,scale={SCALE}")
    set_default_kernel(None)
    try:
        assert script.main([IVSHMEM, NICS[0], "--runs", "2", "--bursts", "20"]) == 0
    finally:
        set_default_kernel(None)
    d = json.loads(capsys.readouterr().out)
    assert d["wc_to_uc"]["b_read_uncached"] and d["uc_to_wc"]["c_read_wc"]
    for step in (d["reset"], d["hot_reset"], d["memory"], d["wc_to_uc"]["wc"]):
        assert step["closed"] and step["access"]["errno"] == errno.EBADF
    assert d["claimed"]["errno"] == errno.EINVAL
    assert {k: v["errno"] for k, v in d["refused"].items()} == {
        "ivshmem_bar0": errno.EINVAL,
        "nic_bar0": errno.EINVAL,
        "nic_bar0_vfio": errno.EINVAL,
        "vfio": errno.ENOTTY,
    }
