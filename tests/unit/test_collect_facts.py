"""tools/vmtest/collect_facts.py reads sysfs as the guest's kernel writes it, and survives
what it does not expect."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "vmtest"))

import collect_facts

BAR0 = "0x00000000fe000000 0x00000000feffffff 0x0000000000040200"
BAR2 = "0x000000000000c000 0x000000000000c03f 0x0000000000040101"
UNUSED = "0x0000000000000000 0x0000000000000000 0x0000000000000000"


def resources(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    dev = tmp_path / "0000:01:00.0"
    dev.mkdir()
    (dev / "resource").write_text(text)
    monkeypatch.setattr(collect_facts, "SYSFS_PCI", tmp_path)
    result: list[Any] = collect_facts.resources("0000:01:00.0")
    return result


def test_resource_lines_are_bars_by_line_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = resources(f"{BAR0}\n{UNUSED}\n{BAR2}\n", tmp_path, monkeypatch)
    assert [(r["index"], r["type"], r["size"]) for r in out] == [(0, "mem", 1 << 24), (2, "io", 64)]


@pytest.mark.parametrize("bad", ["", "   ", "0x0 0x1", "0x0 0x1 0x200 0x4", "zz 0x1 0x200", "\t"])
def test_a_blank_or_malformed_resource_line_is_skipped(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = resources(f"{BAR0}\n{bad}\n{BAR2}\n", tmp_path, monkeypatch)
    assert [(r["index"], r["type"]) for r in out] == [(0, "mem"), (2, "io")]
