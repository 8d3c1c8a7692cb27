"""examples/e1000e_driver.py on the simulator's e1000e NICs (qemu-vmtest topology)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from example_loader import load_example

mock_vfio = pytest.importorskip("mock_vfio")

NIC = "0000:01:00.0"
NIC2 = "0000:02:00.0"
EDU = "0000:08:01.0"
example = load_example("e1000e_driver.py", "e1000e_driver_example")


@pytest.fixture
def machine() -> Iterator[Any]:
    m = mock_vfio.Machine(mock_vfio.load_topology("qemu-vmtest"), time_scale=0.01)
    yield m
    m.close()


def run_json(machine: Any, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = example.main([*argv, "--json"], kernel=machine.spawn(name="e1000e"))
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1, f"stdout must hold only the document: {out!r}"
    return code, json.loads(lines[0])


@pytest.mark.parametrize("address", [NIC, NIC2])
def test_every_check_passes(machine: Any, capsys: pytest.CaptureFixture[str], address: str) -> None:
    code, doc = run_json(machine, capsys, address, "--count", "20")
    assert code == 0 and doc["ok"] and doc["simulated"] and doc["device"] == address, doc
    assert doc["schema"] == example.SCHEMA and "error" not in doc
    assert doc["io_bar"]["config_bar"] & 1 and not doc["io_bar"]["mmap"]
    # The MAC QEMU gives its first NICs (the guest's too), the same three ways.
    mac = {NIC: "52:54:00:12:34:56", NIC2: "52:54:00:12:34:57"}[address]
    m = doc["mac"]
    assert m["mac"] == m["io"] == m["eeprom"] == mac
    assert m["address_valid"] and m["eeprom_checksum"] == 0xBABA
    s = doc["link"]
    assert s["agree"] and s["io"] == s["mmio_before"] == s["mmio_after"] != 0
    assert (s["up"], s["full_duplex"], s["speed_mbps"]) == (True, True, 1000)
    assert s["ioaddr_readback"] == example.STATUS
    i = doc["interrupt"]
    assert (i["kind"], i["vectors"], i["enabled"], i["vector"]) == ("msix", 5, 3, 2)
    assert i["interrupts"] == 1 and i["other_vectors"] == [0, 0]
    assert i["icr"] == example.LINK_CAUSES | example.ICR_ASSERTED
    assert i["icr_after_clear"] == 0
    assert doc["cost"]["count"] == 20
    assert machine.counters["irqs"] == 1
    assert machine.open_fds() == 0  # the session released everything
    assert machine.device(address).open_count == 0


def test_summary_names_each_check(machine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = example.main(["--count", "5"], kernel=machine.spawn())
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"e1000e {NIC} (simulated)"
    assert [line.split()[0] for line in lines[1:5]] == ["mac", "link", "interrupt", "port"]
    assert "52:54:00:12:34:56" in lines[1] and "up, full duplex, 1000 Mb/s" in lines[2]
    assert "MSI-X vector 2 x1" in lines[3]
    assert lines[-1] == f"e1000e {NIC}: every check passed"


def test_window_reaches_bar0_both_ways(machine: Any) -> None:
    """A register written through IODATA is what BAR0 holds, and the other way round."""
    import vfiopy

    with vfiopy.Session(machine.spawn(name="w")) as session:
        dev = session.open_device(NIC)
        regs = dev.region(example.MMIO_BAR)
        nic = example.Nic(dev, regs, regs.mmap(), dev.region(example.IO_BAR))
        nic.out32(example.IOADDR, 0x5408)  # the second receive address: plain storage
        nic.out32(example.IODATA, 0x12345678)
        assert nic.read32(0x5408) == 0x12345678
        nic.write32(0x540C, 0x9ABC)
        assert nic.read_indirect(0x540C) == 0x9ABC
        # Interrupt registers through the window act as through BAR0: ICS sets, ICR clears.
        nic.out32(example.IOADDR, example.ICS)
        nic.out32(example.IODATA, example.ICR_LSC)
        assert nic.read32(example.ICR) == example.ICR_LSC | example.ICR_ASSERTED
        nic.out32(example.IOADDR, example.ICR)
        nic.out32(example.IODATA, example.ICR_LSC)
        assert nic.read32(example.ICR) == 0
        # one pread per port access: the window is not mmappable
        with pytest.raises(vfiopy.VfioError):
            dev.region(example.IO_BAR).mmap()


def test_no_bus_master_no_message(
    machine: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MSI-X is a memory write: without bus mastering the cause is set and nothing arrives."""
    from vfiopy.pci import ConfigSpace

    monkeypatch.setattr(ConfigSpace, "enable_bus_master", lambda self: False)
    code, doc = run_json(machine, capsys, "--count", "5", "--timeout", "0.3")
    assert code == example.EXIT_DEVICE and not doc["ok"]
    assert "no MSI-X on vector 2 within 0.3 s" in doc["error"]
    assert "ICR reads 0x81000004" in doc["error"]
    assert "the NIC raised it, but no message arrived" in doc["error"]
    assert machine.counters["msi_dropped"] == 1
    assert machine.open_fds() == 0


def test_unrouted_cause_is_reported(
    machine: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """IVAR's OTHER field without its valid bit: the NIC sends nothing, and the error says so."""
    monkeypatch.setattr(example, "IVAR_VALID", 0)
    code, doc = run_json(machine, capsys, "--count", "5", "--timeout", "0.3")
    assert code == example.EXIT_DEVICE
    assert "IVAR 0x00020100" in doc["error"] and "no MSI-X on vector 2" in doc["error"]
    assert machine.counters["irqs"] == 0
    assert machine.open_fds() == 0


def test_a_corrupt_eeprom_is_refused(machine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    model = machine.device(NIC).model
    model.eeprom = (model.eeprom[0] ^ 1, *model.eeprom[1:])
    code, doc = run_json(machine, capsys, NIC, "--count", "5")
    assert code == example.EXIT_DEVICE
    assert f"{NIC}: the MAC differs" in doc["error"] and "52:54:00:12:34:56" in doc["error"]
    model.eeprom = (model.eeprom[0] ^ 1, model.eeprom[1] ^ 0x100, *model.eeprom[2:])
    code, doc = run_json(machine, capsys, NIC, "--count", "5")
    assert code == example.EXIT_DEVICE and "the MAC differs" in doc["error"]
    assert machine.open_fds() == 0


def test_refuses_what_is_not_an_e1000e(machine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(machine, capsys, EDU)
    assert code == example.EXIT_USAGE and not doc["ok"]
    assert f"{EDU}: find device failed" in doc["error"]
    assert "it is 1234:11e8, not 8086:10d3 (e1000e)" in doc["error"]
    for argv in (["--count", "0"], ["--timeout", "0"], ["nonsense"]):
        code, doc = run_json(machine, capsys, *argv)
        assert code == example.EXIT_USAGE, argv
    assert machine.open_fds() == 0


def test_none_bound_to_vfio(machine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from mock_vfio.pci_driver import unbind

    for dev in machine.devices.values():
        if dev.spec.device == example.E1000E_DEVICE:
            unbind(machine, dev)
    code, doc = run_json(machine, capsys)
    assert code == example.EXIT_DEVICE
    assert (
        "no 8086:10d3 (e1000e) is bound to vfio-pci; found 0000:01:00.0 (no driver)"
        in (doc["error"])
    )
