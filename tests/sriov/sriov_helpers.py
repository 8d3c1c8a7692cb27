"""Shared by the SR-IOV tests: the vm-host topology's E810 PF and a NIC without SR-IOV."""

from __future__ import annotations

PF = "0000:06:00.0"  # 256 VFs, iavf
NIC = "0000:01:00.0"  # an e1000e: no SR-IOV
