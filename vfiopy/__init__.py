"""vfiopy: userspace VFIO for Python."""

from __future__ import annotations

from vfiopy.errors import VfioError as VfioError
from vfiopy.kernel import Kernel as Kernel
from vfiopy.kernel import LinuxKernel as LinuxKernel

__version__ = "0.1.0"
