"""mock_vfio: a simulator of the kernel's VFIO side implementing ``vfiopy.kernel.Kernel``.

from mock_vfio import Machine, load_topology, spawn_qemu
m = Machine(load_topology("gpus:8"), kernel_model="devset", reset_model="pre-6.3")
p = m.spawn(name="vmm")          # a Kernel for one simulated process
q = spawn_qemu(m, ["0000:01:00.0"])  # a process holding a device as QEMU would
"""

from __future__ import annotations

from mock_vfio.machine import Machine as Machine
from mock_vfio.pci import Device as Device
from mock_vfio.process import SIM_FD_BASE as SIM_FD_BASE
from mock_vfio.process import SimProcess as SimProcess
from mock_vfio.topology import Topology as Topology
from mock_vfio.topology_load import available as available
from mock_vfio.topology_load import load_topology as load_topology
from mock_vfio.topology_load import parse_toml as parse_toml
from mock_vfio.trace import Event as Event
from mock_vfio.trace import Faults as Faults
from mock_vfio.vfio_pci_devset import DevSet as DevSet
from mock_vfio.vmm import spawn_qemu as spawn_qemu
from mock_vfio.vmm import unplug_qemu as unplug_qemu

__all__ = [
    "SIM_FD_BASE",
    "DevSet",
    "Device",
    "Event",
    "Faults",
    "Machine",
    "SimProcess",
    "Topology",
    "available",
    "load_topology",
    "parse_toml",
    "spawn_qemu",
    "unplug_qemu",
]
