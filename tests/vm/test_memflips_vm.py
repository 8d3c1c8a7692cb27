"""PCI_COMMAND_MEMORY on the real kernel: vfiopy's bring-up adds no transition to the
kernel's own at open (counted by kprobes on the raw config accessors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import vmtest
from conftest import REPO, Guests, guest_env

GUEST = Path(__file__).resolve().parent / "guest_memflips.py"


def test_bringup_adds_no_memory_transition(guest: Guests, layout: vmtest.Layout) -> None:
    nic = layout.bdfs("e1000e")[0]
    result = guest.run(
        [vmtest.GUEST_PYTHON, str(GUEST), nic], cwd=REPO, env=guest_env(), timeout=300
    )
    assert result.returncode == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    plain, bringup = doc["open"], doc["bringup"]
    assert plain["writes"], doc  # the probes saw the kernel's own writes at open
    assert bringup["flips"] == plain["flips"], doc  # none of vfiopy's
    assert bringup["flips"] <= 3, doc  # the enable, and two around the reset at open
    assert bringup["final"] & 0x6 == 0x6, doc  # MEMORY and MASTER set
