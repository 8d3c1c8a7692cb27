"""``/dev`` as a simulated process sees it: ``/dev/vfio/vfio``, ``/dev/vfio/<group>``,
``/dev/vfio/devices/vfioN`` and ``/dev/iommu``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mock_vfio.kernfs import DevNode, Dir, Node

if TYPE_CHECKING:
    from mock_vfio.machine import Machine


def lookup(m: Machine, p: list[str]) -> Node | None:
    n = len(p)
    if n == 0:
        return Dir(["iommu", "vfio"] if m.iommufd else ["vfio"])
    if p[0] == "iommu" and n == 1 and m.iommufd:
        return DevNode(lambda proc: proc.open_iommufd())
    if p[0] != "vfio":
        return None
    # Only listings walk every group or device; opening one node looks up just that one
    # (a 2048-VF machine opens 2048 groups).
    if n == 1:

        def listing() -> list[str]:
            groups = sorted(g for g in list(m.groups) if m.group_has_vfio(g))
            return ["vfio", *(str(g) for g in groups), *(["devices"] if m.cdev else [])]

        return Dir(listing)
    if n == 2 and p[1] == "vfio":
        return DevNode(lambda proc: proc.open_container())
    if n == 2 and p[1].isdigit() and m.group_has_vfio(int(p[1])):
        gid = int(p[1])
        return DevNode(lambda proc: proc.open_group(gid))
    if p[1] == "devices" and m.cdev:
        if n == 2:
            return Dir(
                lambda: [
                    f"vfio{i}"
                    for i in sorted(d.minor for d in list(m.devices.values()) if d.vfio_pci)
                ]
            )
        if n == 3 and p[2].startswith("vfio") and p[2][4:].isdigit():
            minor = int(p[2][4:])
            if any(d.minor == minor and d.vfio_pci for d in list(m.devices.values())):
                return DevNode(lambda proc: proc.open_cdev(minor))
    return None
