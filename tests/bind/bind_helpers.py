"""Shared by the bind tests: the vm-host topology's devices and their host drivers."""

from __future__ import annotations

from mock_vfio import Machine

NIC0, NIC1 = "0000:01:00.0", "0000:02:00.0"
NVME = "0000:03:00.0"
GPU, AUDIO = "0000:04:00.0", "0000:04:00.1"
SERIAL = "0000:05:00.0"
PF = "0000:06:00.0"
HOST_DRIVERS = {
    NIC0: "e1000e",
    NIC1: "e1000e",
    NVME: "nvme",
    GPU: "nvidia",
    AUDIO: "snd_hda_intel",
    SERIAL: "serial",
}


def drivers(m: Machine, addrs: list[str]) -> dict[str, str | None]:
    return {a: m.devices[a].driver for a in addrs}


def statuses(report: object) -> dict[str, str]:
    return {d.address: d.status for d in report.devices}  # type: ignore[attr-defined]
