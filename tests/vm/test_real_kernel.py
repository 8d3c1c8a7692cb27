"""vfiopy's scenarios on the real vfio-pci driver, in the session's QEMU guest.

Three guest commands (the guest's interpreter takes seconds to import anyio, structlog and
cffi, so each batches many checks): the conformance scenarios (shared with
test_conformance.py through the `conformance_results` fixture), examples/edu_driver.py, and
tests/vm/guest_release.py (the release manager's API, `python -m vfiopy.release ADDR...` and
`--pid` on a VMM-like child).  Resets are counted in the guest kernel with guest_trace.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import vmtest
from conftest import REPO, Guests, close_counts, guest_env, open_counts, summed

from vfiopy.kmodel import KernelModel

pytestmark = pytest.mark.vm

NIC = "0000:01:00.0"
PAIR = ["0000:07:00.0", "0000:07:00.1"]
EDU = "0000:08:01.0"
EDU_ID = 0x010000ED
GUEST_RELEASE = Path(__file__).resolve().parent / "guest_release.py"


def one_reset(bus: int, function: int) -> dict[str, int]:
    return {"bus": bus, "function": function}


# --- the conformance run's observations, asserted against what the kernel must do ----------


def test_container_group_device_open(
    conformance_results: dict[str, Any], model: KernelModel
) -> None:
    r = conformance_results["open_close"]
    assert r["api_version"] == 0
    assert r["extensions"]["TYPE1v2_IOMMU"] and r["iommu_type"] == "TYPE1v2"
    assert r["status_before"] == 1  # VIABLE
    assert r["status_attached"] == 3  # VIABLE | CONTAINER_SET
    assert r["set_iommu_without_group"] == errno.EINVAL
    assert r["unset_container_with_device_open"] == errno.EBUSY
    assert r["device"] == {"flags": 3, "num_regions": 9, "num_irqs": 5}  # RESET | PCI
    # PCI, and RESET where the function has a reset: the pair has none where reset_method can
    # disable it (5.15+); before, its PM reset is what the kernel's fixed order picks.
    pair_reset = 1 if model.function_reset(PAIR[0]) else 0
    assert r["devices"][PAIR[0]]["flags"] == 2 | pair_reset
    assert r["iommu_info"]["dma_avail"] > 0 and r["iommu_info"]["pgsizes"] & 0x1000


def test_region_info(conformance_results: dict[str, Any]) -> None:
    nic = conformance_results["region_info"][NIC]
    assert (nic["0"]["size"], nic["0"]["flags"]) == (0x20000, 0x7)  # READ | WRITE | MMAP
    assert (nic["2"]["size"], nic["2"]["flags"]) == (0x20, 0x3)  # I/O BAR: no mmap
    assert nic["3"]["msix_mappable"] and nic["3"]["sparse"] is None
    assert nic["7"]["size"] == 0x1000
    assert nic["8"] == {"errno": errno.EINVAL}  # no VGA region
    edu = conformance_results["region_info"][EDU]
    assert (edu["0"]["size"], edu["7"]["size"]) == (0x100000, 0x100)
    for index in range(9):
        if "offset" in nic[str(index)]:
            assert nic[str(index)]["offset"] == index << 40


def test_irq_info_and_msi_loopback(conformance_results: dict[str, Any]) -> None:
    r = conformance_results["irq_info"]
    assert [r[NIC][str(i)]["count"] for i in range(5)] == [1, 1, 5, 1, 1]
    assert r[EDU]["2"]["count"] == 0 and r[EDU]["3"] == {"errno": errno.EINVAL}
    assert (r["msi_read_before"], r["msi_read_after_trigger"]) == (0, 1)
    assert r["msix_while_msi"] == errno.EINVAL and r["msix_after_msi_off"] == 0


def test_config_space(conformance_results: dict[str, Any]) -> None:
    nic = conformance_results["config_space"][NIC]
    assert (nic["vendor"], nic["device"]) == (0x8086, 0x10D3)
    assert nic["capabilities"]["MSIX"] == 0xA0 and nic["capabilities"]["EXP"] == 0xE0
    assert nic["command"] & 0x2  # memory decoding on after open
    edu = conformance_results["config_space"][EDU]
    assert (edu["vendor"], edu["device"], edu["config_size"]) == (0x1234, 0x11E8, 0x100)
    assert conformance_results["config_space"][PAIR[0]]["multifunction"]


def test_bar_mmap_exact_width_register(conformance_results: dict[str, Any]) -> None:
    r = conformance_results["bar_mmio"]
    assert r["id"] == EDU_ID, hex(r["id"])
    assert r["liveness"] == ~0x12345678 & 0xFFFFFFFF


def test_function_reset(conformance_results: dict[str, Any], model: KernelModel) -> None:
    r = conformance_results["function_reset"]
    # With reset_method (5.15+) the NIC's and edu's function reset is a secondary bus reset of
    # their port and the pair has none (EINVAL); before, the fixed order gives the NICs and the
    # pair their PM reset.  VFIO_DEVICE_RESET runs the same reset as the open.
    for addr in (NIC, EDU, PAIR[0]):
        want = 0 if model.function_reset(addr) else errno.EINVAL
        assert r[addr]["errno"] == want and r[addr]["resets"][addr] == open_counts(model, addr)


def test_hot_reset(conformance_results: dict[str, Any]) -> None:
    r = conformance_results["hot_reset_owned"]
    assert r[f"{NIC}_errno"] == 0 and r[f"{NIC}_resets"][NIC] == one_reset(1, 0)
    assert r[f"{PAIR[0]}_errno"] == 0
    assert [r[f"{PAIR[0]}_resets"][a] for a in PAIR] == [one_reset(1, 0)] * 2
    assert r["pair_one_open_errno"] == 0
    n = conformance_results["hot_reset_not_owned"]
    assert n["other_group"] == n["no_groups"] == n["container_fd"] == errno.EINVAL
    assert all(v == one_reset(0, 0) for v in n["resets"].values())


def test_release_reset_counts(conformance_results: dict[str, Any], model: KernelModel) -> None:
    single = conformance_results["release_single"]
    want = {"open": open_counts(model, NIC), "close": close_counts(model, [NIC], NIC)}
    assert single == {k: {NIC: v} for k, v in want.items()}
    # 5.15+: nothing at open or first close, one bus reset at the last; before: PM resets
    pair = conformance_results["release_pair"]
    assert pair["open"] == {a: open_counts(model, a) for a in PAIR}
    assert pair["first_close"] == {a: close_counts(model, PAIR, a, steps=slice(0, 1)) for a in PAIR}
    assert pair["last_close"] == {a: close_counts(model, PAIR, a, steps=slice(1, 2)) for a in PAIR}


# --- the edu driver: MMIO, MSI on an eventfd, DMA through the IOMMU --------------------------


def test_edu_driver(guest: Guests) -> None:
    result = guest.run(
        [vmtest.GUEST_PYTHON, str(REPO / "examples" / "edu_driver.py"), "--json"],
        cwd=REPO,
        env=guest_env(),
        timeout=180,
    )
    assert result.returncode == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["device"] == EDU and not doc["simulated"], doc
    steps = {s["name"]: s for s in doc["steps"]}
    assert all(s["ok"] for s in steps.values()), doc["steps"]
    assert steps["identify"]["id"] == EDU_ID
    assert steps["interrupt"]["interrupts"] >= 1  # a real MSI, delivered to the eventfd
    assert steps["dma"]["match"] and steps["dma"]["bytes"] > 0  # through the IOMMU and back
    assert {"factorial-irq", "shutdown"} <= set(steps)
    assert doc["interrupts"] >= 2


# --- the release manager: API, ADDR form, --pid form -------------------------------------------


@pytest.fixture(scope="module")
def release_results(guests: Guests, layout: vmtest.Layout) -> dict[str, Any]:
    argv = [*layout.bdfs("e1000e"), "--", *layout.bdfs("mf"), "--", *layout.bdfs("edu")]
    result = guests.run(
        [vmtest.GUEST_PYTHON, str(GUEST_RELEASE), *argv],
        cwd=REPO,
        env=guest_env(),
        timeout=300,
        check=True,
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def concurrent(bus: list[dict[str, Any]]) -> bool:
    """Whether the resets ran on more than one kernel task: released by worker threads.

    A close loop or a process exit runs them all on one task, one after another. Neither
    "one thread per reset" nor "two at once" is a property: the workers start one after
    another (the guest's Python takes about 30 ms a device under TCG, far more on a loaded
    host, where the guest's CPU has stalled for minutes), a worker that finished its domain
    takes the next one, and on a slow host the first reset may end before the next starts.
    The README reports the measured overlap.
    """
    return len({e["pid"] for e in bus}) >= 2


def close_events(resets: dict[str, Any], model: KernelModel, nics: list[str]) -> list[Any]:
    """The reset events of the NICs' closes, of the kind the model says they are: bus resets
    (reset_method `bus`, 5.15+) or function resets (PM before 5.15), one per NIC."""
    method = model.function_reset(nics[0])
    kind = "bus" if method in ("bus", "slot") else "function"
    return [e for e in resets[kind] if set(e["affected"]) & set(nics)]


def test_release_api_acquire_reset_release(
    release_results: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    api = release_results["api"]
    nics, pair = layout.bdfs("e1000e"), layout.bdfs("mf")
    assert api["acquired"] == nics + pair
    counts = api["acquire"]["counts"]
    assert all(counts[a] == open_counts(model, a) for a in nics + pair), counts
    # reset(): a function reset per lone NIC, one hot reset for the pair
    assert api["reset_report"]["ok"], api["reset_report"]
    counts = api["reset"]["counts"]
    assert all(counts[a] == open_counts(model, a) for a in nics), counts
    assert all(counts[a] == one_reset(1, 0) for a in pair), counts
    # release(): the six NICs' resets at once, and the pair's at its closes
    assert api["release_report"]["ok"] and api["open_after_release"] == []
    counts = api["release"]["counts"]
    assert all(counts[a] == close_counts(model, [a], a) for a in nics), counts
    assert all(counts[a] == close_counts(model, pair, a) for a in pair), counts
    nic_resets = close_events(api["release"], model, nics)
    assert len(nic_resets) == 6 and all(e["ret"] == 0 for e in nic_resets)
    assert concurrent(nic_resets), nic_resets
    # The model's prediction is what the real kernel did, domain by domain, method by method.
    release, reset_ = api["release_report"], api["reset_report"]
    assert release["observed_by"] == reset_["observed_by"] == "guest kprobes"
    assert all(d["observed"] == d["predicted"] for d in release["domains"]), release["domains"]
    assert all(sum(d["observed"].values()) == d["resets"] for d in reset_["domains"]), reset_


def test_release_cli_addresses(
    release_results: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    addr = release_results["addr"]
    assert addr["returncode"] == 0, addr["stderr"]
    report = addr["report"]
    assert report["schema"] == 1 and report["ok"]
    assert {d["address"] for d in report["devices"]} == set(layout.bdfs("mf") + layout.bdfs("edu"))
    assert all(d["status"] == "released" for d in report["devices"])
    counts = addr["resets"]["counts"]
    # the pair opened and closed: one bus reset at the last close (5.15+), PM resets before;
    # edu (its only reset is the bus's): reset at open and at close
    pair, edu = layout.bdfs("mf"), layout.bdfs("edu")
    for a in pair:
        assert counts[a] == summed(open_counts(model, a), close_counts(model, pair, a)), counts
    for a in edu:
        assert counts[a] == summed(open_counts(model, a), close_counts(model, edu, a)), counts


def test_release_cli_pid(
    release_results: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    nics = layout.bdfs("e1000e")
    assert release_results["vmm_ready"], release_results.get("vmm_stderr")
    opened = release_results["vmm_open"]["counts"]
    assert all(v == open_counts(model, a) for a, v in opened.items()), opened
    pid = release_results["pid"]
    assert pid["returncode"] == 0, pid["stderr"]
    report = pid["report"]
    assert report["ok"] and sorted(d["address"] for d in report["devices"]) == nics
    assert all(d["status"] == "released" for d in report["devices"])
    assert release_results["vmm_returncode"] == -15  # SIGTERM, the default --signal
    counts = pid["resets"]["counts"]
    assert all(counts[a] == close_counts(model, [a], a) for a in nics), counts
    nic_resets = close_events(pid["resets"], model, nics)
    assert len(nic_resets) == 6 and all(e["ret"] == 0 for e in nic_resets)
    assert concurrent(nic_resets), nic_resets  # released from worker threads, not at exit
