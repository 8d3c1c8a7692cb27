"""`python -m vfiopy.release --pid` and its `--watch` guardian against a real VMM.

One guest command (tests/vm/guest_vmm_teardown.py) runs three nested QEMUs
(tests/vm/qemu_vmm.py) one after another, resets counted in the guest kernel with guest_trace:

- exit: QEMU holding the six NICs and the pair exits on SIGTERM by itself (the baseline:
  seven resets in a row on the exiting task);
- pid: the same QEMU torn down by `--pid`: every VFIO file taken (on Debian's 6.1 no fdinfo
  names a device: hot-reset info, the groups held and config identity do), QEMU signalled, the
  seven device sets released from worker threads, groups and container after;
- guard: QEMU with five NICs, the pair and an empty root port under a `--watch` guardian; the
  sixth NIC hot-plugged (taken) and unplugged (let go: it opens again while QEMU runs); QEMU
  killed with SIGKILL and the guardian releasing the rest.

Every device opens again after each teardown. The times are recorded (the `bench` section of
the document, docs/bench/real-qemu-vmm.json), never asserted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import vmtest
from conftest import REPO, Guests, close_counts, guest_env, performed_resets, predicted_resets

from vfiopy.kmodel import KernelModel
from vfiopy.release._report import max_overlap

pytestmark = pytest.mark.vm

GUEST_TEARDOWN = Path(__file__).resolve().parent / "guest_vmm_teardown.py"
PAIR_DOMAIN = "0000:07"


@pytest.fixture(scope="module")
def teardown(guests: Guests, layout: vmtest.Layout) -> dict[str, Any]:
    argv = [*layout.bdfs("e1000e"), "--", *layout.bdfs("mf")]
    result = guests.run(
        [vmtest.GUEST_PYTHON, str(GUEST_TEARDOWN), *argv],
        cwd=REPO,
        env=guest_env(),
        timeout=600,
        check=True,
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def phase(doc: dict[str, Any], name: str) -> dict[str, Any]:
    p: dict[str, Any] = doc[name]
    assert "error" not in p, p["error"] + "\n" + json.dumps(p.get("cli", {}), indent=1)
    return p


def parallel_by_the_tool(p: dict[str, Any]) -> None:
    """The resets ran in the release tool (not in the exiting QEMU), on several of its worker
    threads, some at the same time.

    Not one thread per set: a worker that is done takes the next set from the queue, so when
    thread start-up is slow (a loaded host) two sets can share one. How many overlap is a
    timing; that at least two do is what releasing in parallel means (the measured overlap
    is in docs/bench/real-qemu-vmm.json)."""
    done = p["resets"]["methods"]
    assert {e["comm"] for e in done} == {p["cli_comm"]} != {p["qemu_comm"]}, done
    assert len({e["pid"] for e in done}) >= 2, done
    assert max_overlap((e["start"], e["end"]) for e in done) >= 2, done


def resets_as_predicted(
    p: dict[str, Any], model: KernelModel, nics: list[str], pair: list[str]
) -> None:
    """Each device set's resets at its closes are the model's: one bus reset per set where
    reset_method leaves the NICs `bus` and the pair nothing (5.15+), the PM resets of the
    kernel's fixed order before; every one succeeded, each NIC's by one function reset."""
    done = p["resets"]["methods"]
    assert performed_resets(done) == predicted_resets(model, [[a] for a in nics] + [pair]), done
    assert all(e["ret"] == 0 for e in done), done
    function = p["resets"]["function"]
    assert all(function[a] == close_counts(model, [a], a)["function"] for a in nics), function


def files_released(report: dict[str, Any], qemu_files: dict[str, Any]) -> None:
    """Every group and the container QEMU held, taken and released (each file once)."""
    groups = sorted(f"/dev/vfio/{g}" for g in qemu_files["groups"])
    files = report["files"]
    assert sorted(f["link"] for f in files if f["kind"] == "group") == groups, files
    assert [f["link"] for f in files if f["kind"] == "container"] == ["/dev/vfio/vfio"], files
    assert len(files) == len(groups) + 1 and all(f["status"] == "released" for f in files), files


def devices_accounted_for(
    report: dict[str, Any],
    singles: list[str],
    pair: list[str],
    serials: dict[str, Any],
    model: KernelModel,
) -> None:
    """One entry per device file, all released; the single NICs identified, each once; the
    pair's two files in its domain, told apart where their config differs (the PCIe serial
    number), else both listed as `pid P fd N` with the pair as candidates."""
    devices = report["devices"]
    assert len(devices) == len(singles) + len(pair), devices
    assert all(d["status"] == "released" and d["error"] is None for d in devices), devices
    assert all(len(d["fds"]) == 1 for d in devices), devices
    by_domain = {d["address"]: d for d in devices if d["domain"] != PAIR_DOMAIN}
    assert sorted(by_domain) == sorted(singles), devices
    assert all(d["candidates"] == [] and d["identified_by"] for d in by_domain.values())
    twins = [d for d in devices if d["domain"] == PAIR_DOMAIN]
    assert len(twins) == len(pair), devices
    if serials[pair[0]] is not None and serials[pair[0]] != serials[pair[1]]:
        assert sorted(d["address"] for d in twins) == pair, twins
        assert all("config" in d["identified_by"] and d["candidates"] == [] for d in twins)
        # QEMU realizes function 0 first and opens its device file first
        assert [d["address"] for d in sorted(twins, key=lambda d: d["fds"][0])] == pair, twins
    else:
        assert all(d["address"].startswith(f"pid {report['pid']} fd ") for d in twins), twins
        assert all(d["candidates"] == pair for d in twins), twins
    domains = {d["id"]: d for d in report["domains"]}
    assert len(domains) == len(singles) + 1, report["domains"]
    pair_resets = len(predicted_resets(model, [pair]))  # one bus reset (5.15+), else 2 PM
    assert domains[PAIR_DOMAIN]["resets"] == pair_resets
    assert len(domains[PAIR_DOMAIN]["devices"]) == 2
    assert all("also_reset" not in d for d in report["domains"]), report["domains"]


# --- the baseline: QEMU's own exit ---------------------------------------------------------


def test_qemu_own_exit_is_the_serial_baseline(
    teardown: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    p = phase(teardown, "exit")
    nics, pair = layout.bdfs("e1000e"), layout.bdfs("mf")
    assert p["returncode"] == 0
    resets_as_predicted(p, model, nics, pair)
    done = p["resets"]["methods"]
    assert len({e["pid"] for e in done}) == 1 and {e["comm"] for e in done} == {p["qemu_comm"]}
    assert max_overlap((e["start"], e["end"]) for e in done) == 1, done
    assert p["reopen"] == dict.fromkeys(nics + pair, 0)


# --- --pid ----------------------------------------------------------------------------------


def test_pid_takes_and_releases_every_vfio_file_of_qemu(
    teardown: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    p = phase(teardown, "pid")
    nics, pair = layout.bdfs("e1000e"), layout.bdfs("mf")
    cli = p["cli"]
    assert cli["returncode"] == 0, cli["stderr"]
    report = cli["report"]
    assert report["schema"] == 1 and report["ok"] and report["pid"] == p["qemu_pid"], report
    assert p["files"]["counts"] == {"container": 1, "group": 7, "device": 8}
    assert sorted(fd for d in report["devices"] for fd in d["fds"]) == p["files"]["devices"]
    devices_accounted_for(report, nics, pair, teardown["serials"], model)
    files_released(report, p["files"])
    assert p["qemu_returncode"] == 0  # QEMU exits 0 on SIGTERM, --pid's default signal


def test_pid_resets_each_device_set_from_parallel_workers(
    teardown: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    p = phase(teardown, "pid")
    resets_as_predicted(p, model, layout.bdfs("e1000e"), layout.bdfs("mf"))
    parallel_by_the_tool(p)


def test_every_device_opens_again_after_pid(
    teardown: dict[str, Any], layout: vmtest.Layout
) -> None:
    p = phase(teardown, "pid")
    assert p["reopen"] == dict.fromkeys(layout.bdfs("e1000e") + layout.bdfs("mf"), 0)


# --- --pid --watch ---------------------------------------------------------------------------


def test_guardian_takes_a_hot_plugged_nic_and_lets_go_of_it_when_unplugged(
    teardown: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    g = phase(teardown, "guard")
    hot = layout.bdfs("e1000e")[-1]
    assert g["guardian_start"] == {"container": 1, "group": 6, "device": 7}
    assert g["takeover_lines"] == [
        f"pid {g['qemu_pid']}: 7 VFIO device files, 7 other VFIO files "
        "(groups, container, iommufd); 7 identified"
    ]
    assert g["qemu_added"] == g["guardian_added"] == {"container": 1, "group": 7, "device": 8}
    assert g["deleted"] == ["hot"]
    assert g["qemu_deleted"] == g["guardian_deleted"] == g["guardian_start"]
    marker = f"pid {g['qemu_pid']}: "
    assert f"{marker}taken {hot} (anon_inode:[vfio-device])" in g["watch_lines"]
    assert f"{marker}let go {hot} (anon_inode:[vfio-device])" in g["watch_lines"]
    # the last reference was the guardian's: the NIC's one reset ran in it, and the NIC is
    # free for another process while QEMU still runs
    done = g["unplug_resets"]["methods"]
    assert performed_resets(done) == predicted_resets(model, [[hot]]), done
    assert done[0]["ret"] == 0 and done[0]["comm"] == g["cli_comm"] != g["qemu_comm"], done
    assert g["unplug_reopen"] == {hot: 0} and g["qemu_running_at_reopen"]


def test_guardian_releases_everything_after_qemu_is_killed(
    teardown: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    g = phase(teardown, "guard")
    nics, pair = layout.bdfs("e1000e"), layout.bdfs("mf")
    cold = nics[:-1]
    assert g["qemu_returncode"] == -9
    cli = g["cli"]
    assert cli["returncode"] == 0, cli["stderr"]
    report = cli["report"]
    assert report["ok"] and report["pid"] == g["qemu_pid"], report
    devices_accounted_for(report, cold, pair, teardown["serials"], model)
    files_released(report, g["files"])  # those QEMU held before the hot-plug
    resets_as_predicted(g, model, cold, pair)  # the unplugged NIC: not again
    parallel_by_the_tool(g)
    assert g["reopen"] == dict.fromkeys(nics + pair, 0)
