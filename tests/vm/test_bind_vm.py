"""vfiopy-bind on the real kernel: the guest's e1000e NICs between e1000e and vfio-pci."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import vmtest
from conftest import REPO, Guests, guest_env

GUEST_BIND = Path(__file__).resolve().parent / "guest_bind.py"


@pytest.fixture(scope="module")
def bind_results(guests: Guests, layout: vmtest.Layout) -> dict[str, Any]:
    nics = layout.bdfs("e1000e")[:2]
    # The booted kernel's e1000e (and what it needs), decompressed where the guest reads it:
    # the host root the guest runs in has the host's modules, not those of another kernel.
    kernel = vmtest.find_kernel()
    shared = guests.get().results_dir
    modules = []
    for path in vmtest.resolve_modules(kernel.modules_dir, ["e1000e"]):
        ko = shared / (vmtest.module_name(str(path)) + ".ko")
        ko.write_bytes(vmtest.module_bytes(path))
        modules.append(str(ko))
    result = guests.run(
        [vmtest.GUEST_PYTHON, str(GUEST_BIND), *modules, "--", *nics],
        cwd=REPO,
        env=guest_env(),
        timeout=600,
        check=True,
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_bind_and_restore_e1000e(bind_results: dict[str, Any]) -> None:
    r = bind_results
    assert r["insmod"]["rc"] == 0, r["insmod"]
    assert r["to_e1000e"]["rc"] == 0, r["to_e1000e"]
    assert r["drivers_host"] == ["e1000e", "e1000e"]
    bind = r["bind"]
    assert bind["rc"] == 0 and bind["stdout_lines"] == 1, bind
    assert [d["status"] for d in bind["doc"]["devices"]] == ["bound", "bound"]
    assert [d["driver_before"] for d in bind["doc"]["devices"]] == ["e1000e", "e1000e"]
    assert r["drivers_bound"] == ["vfio-pci", "vfio-pci"]
    restore = r["restore"]
    assert restore["rc"] == 0, restore
    assert [d["status"] for d in restore["doc"]["devices"]] == ["restored", "restored"]
    assert r["drivers_restored"] == ["e1000e", "e1000e"]


def test_interface_up_is_refused(bind_results: dict[str, Any]) -> None:
    r = bind_results
    assert r["ifname"], r
    assert r["ip_up"] == 0
    refused = r["refused"]
    assert refused["rc"] == 1 and refused["stdout_lines"] == 1, refused
    statuses = [d["status"] for d in refused["doc"]["devices"]]
    assert statuses == ["refused", "skipped"], refused["doc"]
    assert f"network interface {r['ifname']} is up" in refused["doc"]["devices"][0]["error"]
    assert r["drivers_after_refusal"] == ["e1000e", "e1000e"]  # nothing touched


def test_left_as_found(bind_results: dict[str, Any]) -> None:
    r = bind_results
    assert r["bind_again"]["rc"] == 0, r["bind_again"]
    assert r["drivers_end"] == ["vfio-pci", "vfio-pci"]
    assert r["drivers_final"] == ["vfio-pci", "vfio-pci"] and r["rmmod"] == 0
