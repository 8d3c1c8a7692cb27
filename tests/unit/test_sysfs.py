"""PCI address parsing and the sysfs reader, on a fake tree."""

from __future__ import annotations

import errno

import pytest
from fakekernel import FakeKernel

from vfiopy.errors import AddressError, SysfsError
from vfiopy.sysfs import PciAddress, Sysfs


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("0000:3b:00.0", (0, 0x3B, 0, 0)),
        ("3b:00.0", (0, 0x3B, 0, 0)),
        ("0001:FF:1f.7", (1, 0xFF, 0x1F, 7)),
        ("10000:e1:00.0", (0x10000, 0xE1, 0, 0)),  # VMD domain
    ],
)
def test_parse_good(text: str, parts: tuple[int, int, int, int]) -> None:
    a = PciAddress.parse(text)
    assert (a.domain, a.bus, a.slot, a.function) == parts
    assert PciAddress.parse(str(a)) == a


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3b:00",
        "3b:0.0",
        "0000:3b:00.8",
        "0000:3b:20.0",  # slot > 0x1f
        "000:3b:00.0",
        " 0000:3b:00.0",
        "0000:3b:00.0 ",
        "0000:3b:00.0\n",
        "0000:3b:00.0/../x",
        "../0000:3b:00.0",
        "..",
        "0000:3b:00.0/",
        "0000:3b:00.0\x00",
        "0000-3b-00.0",
        "0000:3g:00.0",
        "\u0661\u0661:00.0",  # non-ASCII digits
    ],
)
def test_parse_bad(text: str) -> None:
    with pytest.raises(AddressError) as info:
        PciAddress.parse(text)
    assert info.value.errno == errno.EINVAL
    assert "0000:3b:00.0" in str(info.value)  # says what a good one looks like


def test_address_fields() -> None:
    a = PciAddress.parse("3b:02.3")
    assert str(a) == "0000:3b:02.3"
    assert a.devfn == 0x13
    assert PciAddress.from_devfn(0, 0x3B, 0x13) == a
    assert sorted([PciAddress.parse("01:00.1"), PciAddress.parse("01:00.0")])[0].function == 0
    with pytest.raises(AddressError):
        PciAddress(0, 0x100, 0, 0)


def _tree() -> FakeKernel:
    k = FakeKernel()
    k.pci_device("0000:00:01.0", 1, driver="pcieport", class_code=0x060400)
    k.pci_device("0000:01:00.0", 12, parent="pci0000:00/0000:00:01.0")
    k.pci_device("0000:01:00.1", 12, driver="snd_hda_intel", parent="pci0000:00/0000:00:01.0")
    k.pci_device("0000:02:00.0", 13, parent="pci0000:00/0000:00:02.0", reset_method="flr")
    k.pci_device("0000:03:00.0", 14, parent="pci0000:00/0000:00:03.0", reset_method="bus")
    k.pci_device("0000:04:00.0", 15, driver=None, reset_method=None)
    k.links["/sys/bus/pci/devices/0000:04:00.0/vfio-dev/vfio3"] = "x"
    # A bridge with a device below it on the same bus as 05:00.0.
    k.pci_device("0000:05:00.0", 16, parent="pci0000:00/0000:00:04.0")
    k.pci_device(
        "0000:05:01.0", 17, driver="pcieport", parent="pci0000:00/0000:00:04.0", class_code=0x060400
    )
    k.pci_device("0000:06:00.0", 18, parent="pci0000:00/0000:00:04.0/0000:05:01.0")
    # Odd entries a real tree can hold: a non-PCI member of a group.
    k.links["/sys/kernel/iommu_groups/12/devices/platform-thing"] = "../x"
    k.links["/sys/bus/pci/devices/garbage"] = "../x"
    return k


def test_group_and_driver() -> None:
    s = Sysfs(_tree())
    a = PciAddress.parse("01:00.0")
    assert s.iommu_group(a) == 12
    assert [str(d) for d in s.group_devices(12)] == ["0000:01:00.0", "0000:01:00.1"]
    assert s.driver("01:00.1") == "snd_hda_intel"
    assert s.driver("04:00.0") is None
    assert s.vendor(a) == 0x8086 and s.device(a) == 0x10D3 and s.class_code(a) == 0x020000
    assert s.ids(a) == (0x8086, 0x10D3)
    assert s.cdev("04:00.0") == "/dev/vfio/devices/vfio3"
    assert s.cdev(a) is None


def test_find_device_for_a_driver() -> None:
    s = Sysfs(_tree())
    nic = (0x8086, 0x10D3)
    # the first one bound to vfio-pci, skipping the one on another driver
    assert str(s.find_device(*nic, name="nic")) == "0000:01:00.0"
    assert str(s.find_device(*nic, "04:00.0", name="nic")) == "0000:04:00.0"
    with pytest.raises(AddressError) as info:
        s.find_device(*nic, "09:00.0", name="nic")
    assert info.value.errno == errno.ENODEV and "no PCI device at this address" in str(info.value)
    with pytest.raises(AddressError) as info:
        s.find_device(0x1234, 0x11E8, "01:00.0", name="edu")
    assert "0000:01:00.0: find device failed" in str(info.value)
    assert "it is 8086:10d3, not 1234:11e8 (edu)" in str(info.value)
    with pytest.raises(AddressError):
        s.find_device(*nic, "nonsense", name="nic")
    with pytest.raises(SysfsError) as info:
        s.find_device(0x1234, 0x11E8, name="edu", hint="start QEMU with -device edu")
    assert info.value.errno == errno.ENODEV
    assert str(info.value).endswith("no 1234:11e8 (edu) found - start QEMU with -device edu")
    k = _tree()
    k.pci_device("0000:07:00.0", 19, driver=None)
    k.files["/sys/bus/pci/devices/0000:07:00.0/vendor"] = "0x1af4\n"
    k.files["/sys/bus/pci/devices/0000:07:00.0/device"] = "0x1000\n"
    with pytest.raises(SysfsError) as info:
        Sysfs(k).find_device(0x1AF4, 0x1000, name="virtio-net")
    assert "no 1af4:1000 (virtio-net) is bound to vfio-pci; found 0000:07:00.0 (no driver)" in str(
        info.value
    )
    assert "driverctl set-override 0000:07:00.0 vfio-pci" in str(info.value)


def test_topology_and_reset_domains() -> None:
    s = Sysfs(_tree())
    assert s.parent_bridge("01:00.0") == PciAddress.parse("00:01.0")
    assert s.parent_bridge("00:01.0") is None
    assert [str(d) for d in s.bus_devices("01:00.1")] == ["0000:01:00.0", "0000:01:00.1"]
    assert s.slot_devices("01:00.0") == s.bus_devices("01:00.0")
    assert s.reset_methods("01:00.0") == ["flr", "bus"]
    assert s.reset_methods("04:00.0") == []  # attribute hidden: no reset method
    # Alone on its bus with FLR: resets alone.
    assert [str(d) for d in s.reset_domain("02:00.0")] == ["0000:02:00.0"]
    # Only a bus reset: the bus.
    assert [str(d) for d in s.reset_domain("03:00.0")] == ["0000:03:00.0"]
    # Shares the bus: both functions.
    assert len(s.reset_domain("01:00.0")) == 2
    # Root-bus devices have device sets of their own; VFs too from Linux 6.17, and
    # before that they share their bus's set (and its lock) with the PF.
    assert [str(d) for d in s.reset_domain("00:01.0")] == ["0000:00:01.0"]
    k = _tree()
    k.links["/sys/bus/pci/devices/0000:01:00.1/physfn"] = "../0000:01:00.0"
    assert [str(d) for d in Sysfs(k).reset_domain("01:00.1", (6, 17))] == ["0000:01:00.1"]
    assert len(Sysfs(k).reset_domain("01:00.1", (6, 16))) == 2
    # A bridge on the bus: what sits below it is reset too.
    assert [str(d) for d in s.reset_domain("05:00.0")] == [
        "0000:05:00.0",
        "0000:05:01.0",
        "0000:06:00.0",
    ]


def test_vanished_device_is_reported_as_gone() -> None:
    k = _tree()
    s = Sysfs(k)
    k.remove("/sys/bus/pci/devices/0000:01:00.0")
    with pytest.raises(SysfsError) as info:
        s.vendor("01:00.0")
    assert info.value.errno == errno.ENODEV
    assert "0000:01:00.0" in str(info.value) and "gone" in str(info.value)
    with pytest.raises(SysfsError) as info:
        s.iommu_group("01:00.0")
    assert info.value.errno == errno.ENODEV


def test_missing_iommu_group_says_enable_the_iommu() -> None:
    k = _tree()
    del k.links["/sys/bus/pci/devices/0000:02:00.0/iommu_group"]
    with pytest.raises(SysfsError) as info:
        Sysfs(k).iommu_group("02:00.0")
    assert "intel_iommu=on" in str(info.value)


def test_odd_values_are_rejected_clearly() -> None:
    k = _tree()
    k.files["/sys/bus/pci/devices/0000:02:00.0/vendor"] = "banana\n"
    k.links["/sys/bus/pci/devices/0000:02:00.0/iommu_group"] = "../iommu_groups/12x"
    s = Sysfs(k)
    with pytest.raises(SysfsError, match="banana"):
        s.vendor("02:00.0")
    with pytest.raises(SysfsError, match="12x"):
        s.iommu_group("02:00.0")


def test_bind_vfio_writes_override_unbind_probe() -> None:
    k = _tree()
    s = Sysfs(k)
    k.files["/sys/bus/pci/devices/0000:01:00.1/driver_override"] = "(null)\n"

    def probe_binds(path: str, data: str) -> None:
        k.writes.append((path, data))
        if path.endswith("drivers_probe"):
            k.links["/sys/bus/pci/devices/0000:01:00.1/driver"] = "../drivers/vfio-pci"

    k.write_text = probe_binds  # type: ignore[method-assign]
    s.bind_vfio("01:00.1")
    assert k.writes == [
        ("/sys/bus/pci/devices/0000:01:00.1/driver_override", "vfio-pci"),
        ("/sys/bus/pci/devices/0000:01:00.1/driver/unbind", "0000:01:00.1"),
        ("/sys/bus/pci/drivers_probe", "0000:01:00.1"),
    ]


def test_bind_vfio_failure_says_what_to_do() -> None:
    k = _tree()
    k.files["/sys/bus/pci/devices/0000:04:00.0/driver_override"] = "(null)\n"
    with pytest.raises(SysfsError, match="modprobe vfio-pci"):
        Sysfs(k).bind_vfio("04:00.0")


def test_set_reset_methods_and_sriov() -> None:
    k = _tree()
    s = Sysfs(k)
    s.set_reset_methods("02:00.0", ["flr"])
    s.set_reset_methods("02:00.0", [])
    assert k.writes[-2:] == [
        ("/sys/bus/pci/devices/0000:02:00.0/reset_method", "flr"),
        ("/sys/bus/pci/devices/0000:02:00.0/reset_method", "\n"),
    ]
    with pytest.raises(SysfsError):
        s.set_reset_methods("02:00.0", ["flr; reboot"])
    k.files["/sys/bus/pci/devices/0000:02:00.0/sriov_numvfs"] = "4\n"
    k.writes.clear()
    s.set_sriov_numvfs("02:00.0", 8)
    # A non-zero count changes through 0 (the kernel answers EBUSY otherwise).
    assert [d for _, d in k.writes] == ["0", "8"]
