"""vfiopy: userspace VFIO for Python."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vfiopy._uapi import PciIrq as PciIrq
    from vfiopy._uapi import PciRegion as PciRegion
    from vfiopy.container import Container as Container
    from vfiopy.device import DependentDevice as DependentDevice
    from vfiopy.device import Device as Device
    from vfiopy.device import DeviceInfo as DeviceInfo
    from vfiopy.dma import DmaBuffer as DmaBuffer
    from vfiopy.dma import DmaSpace as DmaSpace
    from vfiopy.dma import IoasSpace as IoasSpace
    from vfiopy.dma import IovaAllocator as IovaAllocator
    from vfiopy.dma import IovaRange as IovaRange
    from vfiopy.errors import AddressError as AddressError
    from vfiopy.errors import BindIommufdError as BindIommufdError
    from vfiopy.errors import DeviceInfoError as DeviceInfoError
    from vfiopy.errors import DmaMapError as DmaMapError
    from vfiopy.errors import FeatureError as FeatureError
    from vfiopy.errors import GroupNotViableError as GroupNotViableError
    from vfiopy.errors import HotResetError as HotResetError
    from vfiopy.errors import IrqError as IrqError
    from vfiopy.errors import OpenContainerError as OpenContainerError
    from vfiopy.errors import OpenDeviceError as OpenDeviceError
    from vfiopy.errors import OpenGroupError as OpenGroupError
    from vfiopy.errors import OpenIommufdError as OpenIommufdError
    from vfiopy.errors import RegionError as RegionError
    from vfiopy.errors import ReleaseError as ReleaseError
    from vfiopy.errors import ResetError as ResetError
    from vfiopy.errors import SetContainerError as SetContainerError
    from vfiopy.errors import SetIommuError as SetIommuError
    from vfiopy.errors import SysfsError as SysfsError
    from vfiopy.errors import VfioError as VfioError
    from vfiopy.group import Group as Group
    from vfiopy.iommufd import Iommufd as Iommufd
    from vfiopy.irq import Irq as Irq
    from vfiopy.kernel import Kernel as Kernel
    from vfiopy.kernel import LinuxKernel as LinuxKernel
    from vfiopy.pci import Capability as Capability
    from vfiopy.pci import ConfigSpace as ConfigSpace
    from vfiopy.region import Caching as Caching
    from vfiopy.region import Mapping as Mapping
    from vfiopy.region import Region as Region
    from vfiopy.session import Backend as Backend
    from vfiopy.session import Session as Session
    from vfiopy.sysfs import PciAddress as PciAddress
    from vfiopy.sysfs import Sysfs as Sysfs
else:
    # The same names, imported at first use (see vfiopy._lazy): `python -m vfiopy.release
    # --help` and `import vfiopy.errors` do not load the cffi extension and structlog.
    from vfiopy._lazy import lazy_exports

    __getattr__, __dir__, __all__ = lazy_exports(
        globals(),
        {
            "vfiopy._uapi": ("PciIrq", "PciRegion"),
            "vfiopy.container": ("Container",),
            "vfiopy.device": ("DependentDevice", "Device", "DeviceInfo"),
            "vfiopy.dma": ("DmaBuffer", "DmaSpace", "IoasSpace", "IovaAllocator", "IovaRange"),
            "vfiopy.errors": (
                "AddressError",
                "BindIommufdError",
                "DeviceInfoError",
                "DmaMapError",
                "FeatureError",
                "GroupNotViableError",
                "HotResetError",
                "IrqError",
                "OpenContainerError",
                "OpenDeviceError",
                "OpenGroupError",
                "OpenIommufdError",
                "RegionError",
                "ReleaseError",
                "ResetError",
                "SetContainerError",
                "SetIommuError",
                "SysfsError",
                "VfioError",
            ),
            "vfiopy.group": ("Group",),
            "vfiopy.iommufd": ("Iommufd",),
            "vfiopy.irq": ("Irq",),
            "vfiopy.kernel": ("Kernel", "LinuxKernel"),
            "vfiopy.pci": ("Capability", "ConfigSpace"),
            "vfiopy.region": ("Caching", "Mapping", "Region"),
            "vfiopy.session": ("Backend", "Session"),
            "vfiopy.sysfs": ("PciAddress", "Sysfs"),
        },
    )

__version__ = "0.1.0"
