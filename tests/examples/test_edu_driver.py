"""examples/edu_driver.py on the simulator's edu (qemu-vmtest topology), both backends."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
import structlog

mock_vfio = pytest.importorskip("mock_vfio")

EDU = "0000:08:01.0"
NIC = "0000:01:00.0"
TIME_SCALE = 0.02
DRIVER_PATH = Path(__file__).resolve().parents[2] / "examples" / "edu_driver.py"


def _load_driver() -> ModuleType:
    # examples/ is not a package: load the script as a module once.
    name = "edu_driver_example"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DRIVER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


edu_driver = _load_driver()


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    # main() configures structlog as a CLI does; undo it for the next test.
    yield
    structlog.reset_defaults()


@pytest.fixture
def machine() -> Iterator[Any]:
    m = mock_vfio.Machine(mock_vfio.load_topology("qemu-vmtest"), time_scale=TIME_SCALE)
    yield m
    m.close()


def run_json(
    machine: Any, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, dict[str, Any], str]:
    """main() with --json on a fresh process of ``machine``: (exit code, document, stderr)."""
    code = edu_driver.main([*argv, "--json"], kernel=machine.spawn(name="edu"))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1, f"stdout must hold only the document: {out!r}"
    return code, json.loads(lines[0]), err


def steps(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in doc["steps"]}


@pytest.mark.parametrize("backend", ["container", "iommufd"])
def test_every_step_passes(machine: Any, capsys: pytest.CaptureFixture[str], backend: str) -> None:
    code, doc, err = run_json(machine, capsys, EDU, "--backend", backend)
    assert code == 0, err
    assert doc["schema"] == edu_driver.SCHEMA
    assert doc["ok"] and doc["error"] is None
    assert doc["device"] == EDU and doc["backend"] == backend and doc["simulated"]
    s = steps(doc)
    assert list(s) == [
        "open",
        "identify",
        "liveness",
        "factorial",
        "setup",
        "interrupt",
        "factorial-irq",
        "dma",
        "shutdown",
    ]
    assert all(step["ok"] for step in s.values())
    assert (s["identify"]["id"], s["identify"]["major"], s["identify"]["minor"]) == (
        0x010000ED,
        1,
        0,
    )
    assert s["liveness"]["read"] == [~v & 0xFFFFFFFF for v in s["liveness"]["written"]]
    assert s["factorial"]["n"] == 10 and s["factorial"]["result"] == 3628800
    assert s["factorial-irq"]["result"] == 3628800
    assert s["factorial-irq"]["irq_status"] & 0x1  # the factorial cause
    assert s["setup"]["iova"] + s["setup"]["dma_bytes"] <= 1 << 28
    assert s["interrupt"]["irq_status"] == edu_driver.IRQ_SOFTWARE
    assert s["interrupt"]["irq_status_after_ack"] == 0
    assert s["dma"]["match"] and s["dma"]["bytes"] == edu_driver.DMA_BYTES == 2048
    assert s["dma"]["irq_status"] & 0x100  # the DMA cause
    assert [s[n]["interrupts"] for n in ("interrupt", "factorial-irq", "dma")] == [1, 1, 1]
    assert doc["interrupts"] == 3
    assert doc["sim_open_files"] == 0
    assert machine.open_fds() == 0
    assert machine.counters["dma_transfers"] == 2
    assert machine.device(EDU).open_count == 0


def test_finds_the_edu_and_prints_steps(machine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = edu_driver.main(["--factorial", "12"], kernel=machine.spawn())
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"edu {EDU} (container backend" in out
    assert "id 0x010000ed: edu version 1.0" in out
    assert "12! = 479001600" in out
    assert "all steps passed, 3 interrupts" in out
    assert machine.open_fds() == 0


@pytest.mark.parametrize(
    "n",
    [0, 1, 3, 13, 40],
)
def test_factorial_wraps_like_the_device(
    machine: Any, capsys: pytest.CaptureFixture[str], n: int
) -> None:
    code, doc, err = run_json(machine, capsys, "--factorial", str(n), "--timeout", "5")
    assert code == 0, err
    for name in ("factorial", "factorial-irq"):
        assert steps(doc)[name]["result"] == edu_driver.expected_factorial(n)
    assert edu_driver.expected_factorial(n) == {0: 1, 1: 1, 3: 6, 13: 1932053504, 40: 0}[n]


def test_trio(machine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("trio")
    code, doc, err = run_json(machine, capsys, "--trio")
    assert code == 0, err
    assert doc["async_backend"] == "trio" and doc["interrupts"] == 3
    assert machine.open_fds() == 0


def test_simulate_option_builds_its_own_machine(capsys: pytest.CaptureFixture[str]) -> None:
    code = edu_driver.main(["--simulate", f"qemu-vmtest,scale={TIME_SCALE}", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["simulated"] and doc["device"] == EDU
    assert doc["sim_open_files"] == 0


def test_vfiopy_simulate_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vfiopy.kernel import default_kernel, set_default_kernel
    from vfiopy.simulate import machine_of

    monkeypatch.setenv("VFIOPY_SIMULATE", f"qemu-vmtest,scale={TIME_SCALE}")
    set_default_kernel(None)
    try:
        code = edu_driver.main(["--json", "--backend", "iommufd"])
        machine = machine_of(default_kernel())
    finally:
        set_default_kernel(None)
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["simulated"] and doc["backend"] == "iommufd"
    assert machine is not None and machine.open_fds() == 0


@pytest.mark.parametrize(
    ("address", "message"),
    [
        (
            NIC,
            f"{NIC}: find device failed: ENODEV (No such device); it is 8086:10d3, not 1234:11e8",
        ),
        (
            "0000:0a:00.0",
            "0000:0a:00.0: find device failed: ENODEV (No such device); no PCI device",
        ),
        ("not-an-address", "'not-an-address' is not a PCI address"),
    ],
)
def test_wrong_address_is_a_usage_error(
    machine: Any, capsys: pytest.CaptureFixture[str], address: str, message: str
) -> None:
    code, doc, err = run_json(machine, capsys, address)
    assert code == 2
    assert not doc["ok"] and message in doc["error"]
    assert message in err
    assert doc["steps"] == []  # nothing was opened
    assert machine.open_fds() == 0


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert edu_driver.main(["--backend", "vfio"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert edu_driver.main(["--timeout", "0", "--simulate", "qemu-vmtest"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
    assert edu_driver.main(["--simulate", "no-such-topology"]) == 2
    assert "no-such-topology" in capsys.readouterr().err


def test_edu_not_bound_to_vfio(machine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from mock_vfio.pci_driver import unbind

    unbind(machine, machine.device(EDU))
    code, doc, _ = run_json(machine, capsys, EDU)
    assert code == 1
    assert "bound to no driver, not vfio-pci" in doc["error"]
    assert steps(doc)["open"]["ok"] is False
    assert machine.open_fds() == 0
    # Without an address there is nothing to pick, and it says what it found.
    code, doc, _ = run_json(machine, capsys)
    assert code == 1
    assert (
        f"no 1234:11e8 (QEMU's edu) is bound to vfio-pci; found {EDU} (no driver)" in doc["error"]
    )


def test_no_edu_at_all(capsys: pytest.CaptureFixture[str]) -> None:
    with mock_vfio.Machine(mock_vfio.load_topology("gpus:1"), time_scale=TIME_SCALE) as m:
        code, doc, _ = run_json(m, capsys)
    assert code == 1
    assert "no 1234:11e8 (QEMU's edu) found - start QEMU with `-device edu`" in doc["error"]


def test_a_stuck_device_times_out_naming_register_and_device(
    machine: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mock_vfio.edu import EDU_STATUS, Edu

    service = Edu.service

    def never_done(self: Any) -> None:
        service(self)
        with self.lock:
            mem = self._mem()
            mem[EDU_STATUS] = mem[EDU_STATUS] | 0x01  # computing, forever

    monkeypatch.setattr(Edu, "service", never_done)
    code, doc, _ = run_json(machine, capsys, "--timeout", "0.2")
    assert code == 1
    s = steps(doc)
    assert s["liveness"]["ok"] and not s["factorial"]["ok"]
    assert doc["error"].startswith(f"{EDU}: timed out after 0.2 s waiting for")
    assert "status register 0x20 still reads 0x00000001" in doc["error"]
    assert s["shutdown"]["ok"]
    assert machine.open_fds() == 0


def test_a_lost_msi_times_out_and_says_the_device_raised_it(
    machine: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mock_vfio.pci import Device

    monkeypatch.setattr(Device, "raise_irq", lambda self, vector=0: False)
    code, doc, _ = run_json(machine, capsys, "--timeout", "0.2")
    assert code == 1
    s = steps(doc)
    assert not s["interrupt"]["ok"] and "dma" not in s
    assert f"{EDU}: no MSI within 0.2 s after writing 0x12340000 to 0x60" in doc["error"]
    assert "interrupt status register 0x24 reads 0x12340000" in doc["error"]
    assert "the device raised it" in doc["error"]
    assert s["shutdown"]["ok"]
    assert machine.open_fds() == 0


def test_dma_corruption_is_reported(
    machine: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mock_vfio.edu import EDU_DMA_BUF, Edu

    dma = Edu._dma

    def flip_a_byte(self: Any, mem: Any, cmd: int) -> None:
        dma(self, mem, cmd)
        if not cmd & 0x2:  # after RAM -> device, spoil the device buffer
            mem[EDU_DMA_BUF + 7] ^= 0xFF

    monkeypatch.setattr(Edu, "_dma", flip_a_byte)
    code, doc, _ = run_json(machine, capsys)
    assert code == 1
    assert steps(doc)["dma"]["match"] is False
    assert "differs at byte 7" in doc["error"]
    assert machine.open_fds() == 0


def test_shutdown_clears_bus_master_before_unmapping_dma(
    machine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's order: device quiet (no bus master, no MSI) before its DMA goes."""
    kernel = machine.spawn()
    dev = machine.device(EDU)
    seen: list[tuple[str, bool, bool]] = []
    session_cls = edu_driver.Session

    class Watching(session_cls):  # type: ignore[misc, valid-type]
        def free_dma_buffer(self, buf: Any) -> None:
            master = bool(dev.config.command() & 0x4)
            seen.append(("free_dma_buffer", master, dev.irq_type is not None))
            super().free_dma_buffer(buf)

    monkeypatch.setattr(edu_driver, "Session", Watching)
    report = edu_driver.Report(backend="container", async_backend="asyncio")
    address = edu_driver.PciAddress.parse(EDU)
    anyio.run(edu_driver._run, kernel, address, report, "container", 2.0, 5)
    assert report.step_named("dma").ok
    assert seen == [("free_dma_buffer", False, False)]
    assert machine.open_fds() == 0
