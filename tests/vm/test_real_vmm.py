"""A real VMM: the guest's QEMU, nested under TCG, holds the test devices through vfio-pci.

One guest command (tests/vm/guest_vmm.py, standard library only) runs two QEMUs built by
tests/vm/qemu_vmm.py, one after another:

- the six NICs and the pair (one multifunction device): the VFIO files QEMU holds, QEMU's own
  exit on SIGTERM — the kernel releases the device files one after another on the exiting
  task, seven resets in a row, the baseline vfiopy.release improves on — and every device
  opening again afterwards;
- hot-plug through QMP with the guest CPU stopped: a NIC and the pair plugged into empty root
  ports and unplugged again at once (their slots were never powered on), their files closed and
  the devices free for another owner while QEMU runs; a device present at start-up stays.

Resets are counted in the guest kernel with guest_trace.
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

GUEST_VMM = Path(__file__).resolve().parent / "guest_vmm.py"


@pytest.fixture(scope="module")
def vmm_results(guests: Guests, layout: vmtest.Layout) -> dict[str, Any]:
    result = guests.run(
        [vmtest.GUEST_PYTHON, str(GUEST_VMM), *layout.bdfs("e1000e"), "--", *layout.bdfs("mf")],
        cwd=REPO,
        env=guest_env(),
        timeout=300,
        check=True,
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_qemu_holds_one_container_each_group_once_and_a_file_per_function(
    vmm_results: dict[str, Any], layout: vmtest.Layout
) -> None:
    r = vmm_results["exit"]
    files = r["files"]
    devices = layout.bdfs("e1000e") + layout.bdfs("mf")
    assert files["counts"] == {"container": 1, "group": 7, "device": len(devices)}, files
    assert sorted(files["groups"]) == sorted(set(r["groups"].values())), (files, r["groups"])
    assert all(len(fds) == 1 for fds in files["groups"].values()), files
    every_fd = [*files["container"], *files["devices"]]
    every_fd += [fd for fds in files["groups"].values() for fd in fds]
    assert len(set(every_fd)) == len(every_fd) == 1 + 7 + len(devices)
    # the pair is one multifunction device in the VMM
    assert "multifunction=on" in next(a for a in r["argv"] if f"host={layout.bdfs('mf')[0]}" in a)


def test_qemu_exit_on_sigterm_resets_every_device_once_one_after_another(
    vmm_results: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    r = vmm_results["exit"]
    nics, pair = layout.bdfs("e1000e"), layout.bdfs("mf")
    assert r["exit"]["returncode"] == 0, r["stderr"]
    # every device set's close resets, as the model says (5.15+: a bus reset per NIC, one for
    # the pair; before: PM resets, the pair's functions each their own)
    done = r["resets"]["methods"]
    assert performed_resets(done) == predicted_resets(model, [[a] for a in nics] + [pair]), done
    assert all(e["ret"] == 0 for e in done), done
    function = r["resets"]["function"]
    assert all(function[a] == close_counts(model, [a], a)["function"] for a in nics), function
    # the exiting task releases the files itself, one after another: never two at once
    assert len({e["pid"] for e in done}) == 1, done
    assert max_overlap((e["start"], e["end"]) for e in done) == 1, done


def test_every_device_opens_again_after_qemu_exits(
    vmm_results: dict[str, Any], layout: vmtest.Layout
) -> None:
    reopen = vmm_results["exit"]["reopen"]
    assert reopen == dict.fromkeys(layout.bdfs("e1000e") + layout.bdfs("mf"), 0)


def test_hot_plug_and_unplug_with_the_guest_cpu_stopped(
    vmm_results: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    h = vmm_results["hotplug"]
    nics, pair = layout.bdfs("e1000e"), layout.bdfs("mf")
    hot = nics[-1]
    assert h["start"] == {"container": 1, "group": 1, "device": 1}
    assert h["nic_added"] == {"container": 1, "group": 2, "device": 2}
    assert h["pair_added"] == {"container": 1, "group": 3, "device": 4}
    # the NIC: DEVICE_DELETED, its device and group files closed, one reset, free again
    assert h["nic_deleted"] == ["nic"]
    assert h["nic_files"]["counts"] == {"container": 1, "group": 2, "device": 3}
    assert performed_resets(h["nic_resets"]["methods"]) == predicted_resets(model, [[hot]])
    assert h["nic_reopen"] == {hot: 0}
    # the pair: unplugging function 0 unplugs both; its resets at the closes (5.15+: one bus
    # reset at the last)
    assert sorted(h["pair_deleted"]) == ["pair.0", "pair.1"]
    assert h["pair_files"]["counts"] == {"container": 1, "group": 1, "device": 1}
    assert performed_resets(h["pair_resets"]["methods"]) == predicted_resets(model, [pair])
    assert h["pair_reopen"] == dict.fromkeys(pair, 0)


def test_a_device_present_at_start_up_does_not_unplug_without_a_guest(
    vmm_results: dict[str, Any], layout: vmtest.Layout, model: KernelModel
) -> None:
    h = vmm_results["hotplug"]
    cold = layout.bdfs("e1000e")[0]
    assert h["cold_del"] == {}  # accepted: QEMU pressed the slot's attention button
    assert not h["cold_deleted"] and h["cold_files"]["device"] == 1
    assert h["exit"]["returncode"] == -9  # SIGKILL
    assert performed_resets(h["exit_resets"]["methods"]) == predicted_resets(model, [[cold]])
    assert h["reopen"] == dict.fromkeys([cold, layout.bdfs("e1000e")[-1], *layout.bdfs("mf")], 0)
