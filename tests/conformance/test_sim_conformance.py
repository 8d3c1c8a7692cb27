"""The conformance scenarios on the simulator (qemu-vmtest topology).

tests/vm/test_conformance.py runs the same scenarios on the real kernel and compares the two
key by key; here, without a guest, the simulator's answers are checked against what the real
kernel is known to answer (tools/vmtest/guest-facts.md), so a simulator change that breaks
conformance fails in the normal test run too.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

pytest.importorskip("mock_vfio")

# tests/conformance is not a package: pytest puts it on sys.path for this file.
import scenarios

NIC, NIC2, EDU = scenarios.NIC, scenarios.NIC2, scenarios.EDU
PAIR0, PAIR1 = scenarios.PAIR
NO_RESET = {"bus": 0, "function": 0}
BUS_ONLY = {"bus": 1, "function": 0}
BUS_AS_FUNCTION = {"bus": 1, "function": 1}  # reset_method `bus`: a function reset by SBR

# dotted key -> the real kernel's answer (Linux 6.1 in the vmtest guest)
EXPECTED: dict[tuple[str, str], Any] = {
    # ivshmem's root port (00:06.0, group 9) comes before the devices behind the ports
    ("open_close", f"groups.{NIC}"): 13,
    ("open_close", f"groups.{NIC2}"): 14,
    ("open_close", f"groups.{PAIR0}"): 19,
    ("open_close", f"groups.{PAIR1}"): 19,
    ("open_close", f"groups.{EDU}"): 8,
    ("open_close", "api_version"): 0,
    ("open_close", "extensions.TYPE1v2_IOMMU"): True,
    ("open_close", "extensions.DMA_CC_IOMMU"): False,
    ("open_close", "status_before"): 1,
    ("open_close", "status_attached"): 3,
    ("open_close", "set_iommu_without_group"): errno.EINVAL,
    ("open_close", "unset_container_with_device_open"): errno.EBUSY,
    ("open_close", "device.flags"): 3,
    ("open_close", "device.num_regions"): 9,
    ("open_close", "device.num_irqs"): 5,
    ("open_close", f"devices.{PAIR0}.flags"): 2,
    ("open_close", "iommu_info.iova_ranges"): [[0, 0xFEDFFFFF], [0xFEF00000, 0x7FFFFFFFFF]],
    ("errnos", "second_group_open"): errno.EBUSY,
    ("errnos", "get_device_fd_unknown_name"): errno.ENODEV,
    ("errnos", "group_status_short_argsz"): errno.EINVAL,
    ("errnos", "device_info_short_argsz"): errno.EINVAL,
    ("errnos", "set_container_twice"): errno.EINVAL,
    ("region_info", f"{NIC}.3.msix_mappable"): True,
    ("region_info", f"{NIC}.8.errno"): errno.EINVAL,
    ("region_info", f"{EDU}.0.size"): 0x100000,
    ("irq_info", f"{NIC}.2.count"): 5,
    ("irq_info", f"{EDU}.3.errno"): errno.EINVAL,
    ("irq_info", "msi_read_after_trigger"): 1,
    ("irq_info", "msix_while_msi"): errno.EINVAL,
    ("config_space", f"{NIC}.capabilities.PM"): 0xC8,
    ("config_space", f"{NIC}.capabilities.MSIX"): 0xA0,
    ("config_space", f"{NIC}.capabilities.ext_DSN"): 0x140,
    ("config_space", f"{NIC}.command"): 0x103,
    ("config_space", f"{PAIR1}.multifunction"): False,
    ("config_space", f"{EDU}.class"): 0x00FF00,
    ("bar_mmio", "id"): scenarios.EDU_ID,
    ("bar_mmio", "liveness"): ~0x12345678 & 0xFFFFFFFF,
    ("function_reset", f"{NIC}.errno"): 0,
    ("function_reset", f"{NIC}.resets.{NIC}"): BUS_AS_FUNCTION,
    ("function_reset", f"{PAIR0}.errno"): errno.EINVAL,
    ("function_reset", f"{PAIR0}.resets.{PAIR0}"): NO_RESET,
    ("hot_reset_owned", f"{NIC}_errno"): 0,
    ("hot_reset_owned", f"{NIC}_resets.{NIC}"): BUS_ONLY,
    ("hot_reset_owned", f"{PAIR0}_resets.{PAIR1}"): BUS_ONLY,
    ("hot_reset_not_owned", "other_group"): errno.EINVAL,
    ("hot_reset_not_owned", "eventfd"): errno.EINVAL,
    ("hot_reset_not_owned", f"resets.{NIC}"): NO_RESET,
    ("release_single", f"open.{NIC}"): BUS_AS_FUNCTION,
    ("release_single", f"close.{NIC}"): BUS_AS_FUNCTION,
    ("release_pair", f"open.{PAIR0}"): NO_RESET,
    ("release_pair", f"first_close.{PAIR1}"): NO_RESET,
    ("release_pair", f"last_close.{PAIR0}"): BUS_ONLY,
    ("release_pair", f"last_close.{PAIR1}"): BUS_ONLY,
    ("dma_map", "overlap"): errno.EEXIST,
    # BAR access with PCI_COMMAND_MEMORY off (abafbc551fdd, 5.8)
    ("bar_memory_off", "memory_at_open"): True,
    ("bar_memory_off", "load_on"): "ok",
    ("bar_memory_off", "memory_cleared"): True,
    ("bar_memory_off", "load_off"): "SIGBUS",
    ("bar_memory_off", "pread_off"): errno.EIO,
    ("bar_memory_off", "pwrite_off"): errno.EIO,
    ("bar_memory_off", "mapping_still_listed"): 1,
    ("bar_memory_off", "load_on_again"): "ok",
    ("bar_memory_off", "id_on_again"): scenarios.EDU_ID,
    ("bar_memory_off", "pread_on_again"): scenarios.EDU_ID,
    ("bar_reset_mapped", "reset"): 0,
    ("bar_reset_mapped", f"resets.{EDU}"): BUS_AS_FUNCTION,
    ("bar_reset_mapped", "memory_after"): True,
    ("bar_reset_mapped", "load_after"): "ok",
    ("bar_reset_mapped", "id_after"): scenarios.EDU_ID,
    # simulator only: memory_lock taken with down_write_trylock by the hot reset
    ("hot_reset_memory_lock", "during_device_reset"): errno.EBUSY,
    ("hot_reset_memory_lock", f"resets_during_device_reset.{NIC}"): NO_RESET,
    ("hot_reset_memory_lock", "device_reset"): 0,
    ("hot_reset_memory_lock", "during_sysfs_reset"): errno.EAGAIN,
    ("hot_reset_memory_lock", f"resets_during_sysfs_reset.{NIC}"): NO_RESET,
    ("hot_reset_memory_lock", "sysfs_reset"): 0,
    ("hot_reset_memory_lock", "after"): 0,
    ("hot_reset_memory_lock", f"resets_after.{NIC}"): BUS_ONLY,
    # simulator only: a hung reset is a D-state wait that SIGKILL does not end
    ("exit_during_hung_reset", "state_in_reset"): "D",
    ("exit_during_hung_reset", "exited_after_kill"): False,
    ("exit_during_hung_reset", "state_after_kill"): "D",
    ("exit_during_hung_reset", "exiting_after_kill"): False,
    ("exit_during_hung_reset", "fds_after_kill"): 3,  # container, group, device
    ("exit_during_hung_reset", "exited"): True,
    ("exit_during_hung_reset", "nic_open_after_exit"): 0,
    ("exit_during_hung_reset", "resets_after_hang"): ["ioctl", "release"],
}


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return dict(scenarios.simulate())


@pytest.mark.parametrize("name", [*scenarios.SCENARIOS, *scenarios.SIM_ONLY])
def test_scenario_runs(name: str, results: dict[str, Any]) -> None:
    assert "error" not in results[name], results[name].get("traceback")


def test_simulator_answers_as_the_kernel(results: dict[str, Any]) -> None:
    problems = []
    for (name, key), want in EXPECTED.items():
        got = scenarios.flatten(results[name]).get(key, "<absent>")
        if isinstance(want, dict):
            got = {k[len(key) + 1 :]: v for k, v in scenarios.flatten(results[name]).items()
                   if k.startswith(key + ".")}  # fmt: skip
        if got != want:
            problems.append(f"{name}: {key}: simulator {got!r}, kernel {want!r}")
    assert not problems, "\n".join(problems)


def test_known_differences_name_real_keys(results: dict[str, Any]) -> None:
    for (name, key), reason in scenarios.KNOWN_DIFFERENCES.items():
        assert reason
        assert key in scenarios.flatten(results[name]), (name, key)


def test_compare_names_scenario_and_key() -> None:
    sim = {"s": {"a": {"b": 1}, "c": [1, 2]}}
    real = {"s": {"a": {"b": 2}, "c": [1, 2]}}
    assert scenarios.compare(sim, real) == ["s: a.b: simulator 1, kernel 2"]
    assert scenarios.compare(sim, sim) == []
