"""Parametric topologies: ``gpus:N``, ``vfs:N`` and ``nvme:N``."""

from __future__ import annotations

from mock_vfio.topology import Bar, BridgeSpec, FunctionSpec, Msix, Topology, make_addr


def gpus(n: int, per_switch: int = 4) -> Topology:
    """N GPUs (function 0) with HD audio (function 1), each alone on a bus behind a
    switch downstream port; bus reset only, both functions one group and one set."""
    t = Topology(name=f"gpus:{n}")
    bus = 1
    group = 0
    for sw in range((n + per_switch - 1) // per_switch):
        rp = make_addr(0, 1 + sw // 8, sw % 8)
        up_bus = bus
        count = min(per_switch, n - sw * per_switch)
        sub = up_bus + 1 + count
        t.bridges.append(
            BridgeSpec(rp, "root_port", up_bus, sub, 16.0, iommu_group=group, device=0x1901)
        )
        group += 1
        t.bridges.append(
            BridgeSpec(
                make_addr(up_bus, 0, 0),
                "upstream",
                up_bus + 1,
                sub,
                16.0,
                False,
                group,
                0x10B5,
                0x8747,
            )
        )
        group += 1
        for i in range(count):
            dbus = up_bus + 2 + i
            t.bridges.append(
                BridgeSpec(
                    make_addr(up_bus + 1, i, 0),
                    "downstream",
                    dbus,
                    dbus,
                    16.0,
                    False,
                    group,
                    0x10B5,
                    0x8747,
                )
            )
            group += 1
        bus = sub + 1
    gi = 0
    for b in list(t.bridges):
        if b.kind != "downstream" or gi >= n:
            continue
        gi += 1
        g = group
        group += 1
        gpu = FunctionSpec(
            addr=make_addr(b.secondary, 0, 0),
            vendor=0x10DE,
            device=0x2330,
            class_code=0x030200,
            subsystem_vendor=0x10DE,
            subsystem_device=0x16C1,
            bars=(
                Bar(0, 16 << 20, "mem32"),
                Bar(1, 256 << 20, "mem64", prefetch=True),
                Bar(3, 32 << 20, "mem64", prefetch=True),
            ),
            rom_size=512 << 10,
            msi=1,
            msix=Msix(6, 0, 0xB90000, 0, 0xBA0000),
            link_speed=16.0,
            aer=True,
            reset_methods=("bus",),
            iommu_group=g,
            native_driver="nvidia",
            multifunction=True,
        )
        audio = FunctionSpec(
            addr=make_addr(b.secondary, 0, 1),
            vendor=0x10DE,
            device=0x22A3,
            class_code=0x040300,
            subsystem_vendor=0x10DE,
            subsystem_device=0x16C1,
            bars=(Bar(0, 16 << 10, "mem32"),),
            msi=1,
            link_speed=16.0,
            reset_methods=("bus",),
            iommu_group=g,
            native_driver="snd_hda_intel",
            interrupt_pin=2,
            multifunction=True,
        )
        t.functions += [gpu, audio]
    return t


def vfs(n: int) -> Topology:
    """One NIC PF with N VFs (FLR, one group each) behind a root port."""
    t = Topology(name=f"vfs:{n}")
    t.bridges.append(
        BridgeSpec(
            make_addr(0, 1, 0),
            "root_port",
            1,
            1 + (n + 1) // 256 + 1,
            16.0,
            iommu_group=0,
            device=0x1901,
        )
    )
    pf = FunctionSpec(
        addr=make_addr(1, 0, 0),
        vendor=0x8086,
        device=0x1592,
        class_code=0x020000,
        subsystem_vendor=0x8086,
        subsystem_device=0x0002,
        bars=(Bar(0, 32 << 20, "mem64", True), Bar(3, 64 << 10, "mem64", True)),
        msix=Msix(64, 3, 0, 3, 0x8000),
        link_speed=16.0,
        flr=True,
        aer=True,
        iommu_group=1,
        driver="ice",
        native_driver="ice",
        sriov_total=max(n, 1),
        sriov_initial=n,
        vf_device=0x1889,
        vf_bars=(Bar(0, 64 << 10, "mem64", True), Bar(3, 16 << 10, "mem64", True)),
        vf_driver="vfio-pci",
        vf_native_driver="iavf",
        vf_msix=5,
    )
    t.functions.append(pf)
    return t


def nvme(n: int) -> Topology:
    """N NVMe drives with FLR, one per root port."""
    t = Topology(name=f"nvme:{n}")
    for i in range(n):
        bus = i + 1
        t.bridges.append(
            BridgeSpec(
                make_addr(0, 1 + i // 8, i % 8),
                "root_port",
                bus,
                bus,
                16.0,
                iommu_group=2 * i,
                device=0x1901,
            )
        )
        t.functions.append(
            FunctionSpec(
                addr=make_addr(bus, 0, 0),
                vendor=0x144D,
                device=0xA80A,
                class_code=0x010802,
                subsystem_vendor=0x144D,
                subsystem_device=0xA801,
                bars=(Bar(0, 16 << 10, "mem64"),),
                msi=1,
                msix=Msix(33, 0, 0x3000, 0, 0x2000),
                link_speed=16.0,
                link_width=4,
                flr=True,
                aer=True,
                iommu_group=2 * i + 1,
                native_driver="nvme",
            )
        )
    return t
