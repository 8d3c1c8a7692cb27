"""A child process that opens VFIO devices, waits for a word, and exits with them open.

Modes ``exit`` and ``procs`` of ``--real`` time how the kernel releases the
files of exiting processes, so the child must be a real process that leaves
its fds to the kernel. It runs as a script under any ``python3`` (the QEMU
guest's ``/usr/bin/python3``): standard library only, no vfiopy import. The
parent passes the ioctl numbers it compiled, so nothing here is hard-coded.

Protocol: argv[1] is a JSON object
``{"ioctls": {...}, "iommu_type": int, "groups": [{"group": "12", "devices": ["0000:01:00.0"]}]}``;
the child prints ``ready`` (or ``error <message>``) on stdout, then on any line
of stdin calls ``os._exit(0)``, so the kernel, not Python, closes every fd.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import sys
from typing import Any


def open_all(spec: dict[str, Any]) -> list[int]:
    """Container, groups, devices, in the order VFIO wants; returns every fd."""
    ioctls = spec["ioctls"]
    fds = [os.open("/dev/vfio/vfio", os.O_RDWR)]
    container = fds[0]
    iommu_set = False
    for entry in spec["groups"]:
        group = os.open("/dev/vfio/" + entry["group"], os.O_RDWR)
        fds.append(group)
        # GROUP_SET_CONTAINER takes a pointer to the container fd.
        fcntl.ioctl(group, ioctls["GROUP_SET_CONTAINER"], bytearray(struct.pack("i", container)))
        if not iommu_set:
            # The IOMMU type is set once, after the first group joins the container.
            fcntl.ioctl(container, ioctls["SET_IOMMU"], spec["iommu_type"])
            iommu_set = True
        for addr in entry["devices"]:
            # A mutable buffer makes fcntl return the ioctl's result: the new fd.
            name = bytearray(addr.encode() + b"\0")
            fds.append(fcntl.ioctl(group, ioctls["GROUP_GET_DEVICE_FD"], name, True))
    return fds


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    try:
        open_all(spec)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        sys.stdout.write(f"error {name}: {exc}\n")
        sys.stdout.flush()
        return 1
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    # _exit skips Python's teardown: the fds are released by the kernel's exit path,
    # one after another on this task, which is what the mode measures.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
