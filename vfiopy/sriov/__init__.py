"""SR-IOV on demand: VFs created without host drivers probing them, only the requested ones
bound, concurrently; VF tokens for a PF on vfio-pci.

``python -m vfiopy.sriov`` (``vfiopy-sriov``) is the command line; from Python::

    from vfiopy.sriov import enable_vfs

    report = await enable_vfs("0000:3b:00.0", 64, bind=range(8))  # 64 VFs, 8 on vfio-pci
    assert report.ok

See :mod:`vfiopy.sriov._ops` for the steps, checks and kernel sources.
"""

from __future__ import annotations

from vfiopy.sriov._ops import SriovReport, check_pf, disable_vfs, enable_vfs

__all__ = ["SriovReport", "check_pf", "disable_vfs", "enable_vfs"]
