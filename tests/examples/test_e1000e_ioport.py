"""examples/e1000e_ioport.py on the simulator's e1000e (qemu-vmtest topology)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from example_loader import load_example

mock_vfio = pytest.importorskip("mock_vfio")

NIC = "0000:01:00.0"
EDU = "0000:08:01.0"
example = load_example("e1000e_ioport.py", "e1000e_ioport_example")


@pytest.fixture
def machine() -> Iterator[Any]:
    m = mock_vfio.Machine(mock_vfio.load_topology("qemu-vmtest"), time_scale=0.01)
    yield m
    m.close()


def run_json(machine: Any, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = example.main([*argv, "--json"], kernel=machine.spawn(name="ioport"))
    out, _ = capsys.readouterr()
    return code, json.loads(out)


def test_status_agrees_through_window_and_bar0(
    machine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = run_json(machine, capsys, "--count", "20")
    assert code == 0 and doc["ok"] and doc["simulated"] and doc["device"] == NIC, doc
    assert doc["io_bar"]["config_bar"] & 1 and not doc["io_bar"]["mmap"]
    s = doc["status"]
    assert s["agree"] and s["io"] == s["mmio_before"] == s["mmio_after"] != 0
    assert doc["ioaddr_readback"] == example.STATUS
    assert doc["cost"]["count"] == 20
    assert machine.open_fds() == 0  # the session released everything


def test_window_reaches_bar0_both_ways(machine: Any) -> None:
    """A register written through IODATA is what BAR0 holds, and the other way round."""
    import vfiopy

    with vfiopy.Session(machine.spawn(name="w")) as session:
        dev = session.open_device(NIC)
        window = example.IoWindow(dev.region(example.IO_BAR))
        bar0 = dev.region(example.MMIO_BAR).mmap()
        window.out32(example.IOADDR, 0x5400)  # a receive-address register: plain storage
        window.out32(example.IODATA, 0x12345678)
        assert bar0.read32(0x5400) == 0x12345678
        bar0.write32(0x5404, 0x9ABC)
        assert window.read_register(0x5404) == 0x9ABC
        # one pread per port access: the window is not mmappable
        with pytest.raises(vfiopy.VfioError):
            dev.region(example.IO_BAR).mmap()


def test_refuses_a_device_that_is_not_an_e1000e(
    machine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = run_json(machine, capsys, EDU)
    assert code == example.EXIT_USAGE and not doc["ok"] and "not an e1000e" in doc["error"]
    code, doc = run_json(machine, capsys, "--count", "0")
    assert code == example.EXIT_USAGE
