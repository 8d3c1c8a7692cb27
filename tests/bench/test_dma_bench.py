"""`python -m vfiopy.bench --dma`: what it reports, never how fast anything was."""

from __future__ import annotations

import io
import json
from pathlib import Path

from vfiopy._uapi import PAGE_SIZE
from vfiopy.bench import _cli

MB = 1 << 20


def test_dma_rows_map_and_unmap_every_page_each_round(tmp_path: Path) -> None:
    out, path = io.StringIO(), tmp_path / "dma.json"
    argv = ["--simulate", "gpus:1", "--dma", "2", "--dma-bytes", str(8 * MB), "--json", str(path)]
    assert _cli.run(argv, out=out) == 0
    doc = json.loads(path.read_text())
    assert doc["schema"] == 1 and "machine" in doc
    part = doc["dma"]
    assert part["backend"] == "simulator gpus:1"
    rows = part["rows"]
    assert [(r["page"], r["maps"], r["bytes"]) for r in rows] == [
        (PAGE_SIZE, 8 * MB // PAGE_SIZE, 8 * MB),
        (2 * MB, 4, 8 * MB),
    ]
    for r in rows:
        assert len(r["map_s"]) == len(r["unmap_s"]) == 2
        assert r["map_median_s"] > 0 and r["unmap_median_s"] > 0
        assert len(r["map_cpu_s"]) == len(r["unmap_cpu_s"]) == 2
        # The simulated host has no hugepages reserved for the bench: it says so.
        assert r["memory"] in ("4 KiB pages", "2 MiB hugepages")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("dma: map then unmap 8 MiB on iommufd (simulator gpus:1)")
    assert len(lines) == 3 and "2048 mappings" in lines[1] and "4 mappings" in lines[2]


def test_dma_size_must_be_whole_large_pages(tmp_path: Path) -> None:
    err = io.StringIO()
    path = tmp_path / "dma.json"
    argv = ["--simulate", "gpus:1", "--dma", "1", "--dma-bytes", "4096", "--json", str(path)]
    assert _cli.run(argv, out=err) == 2
    doc = json.loads(path.read_text())
    assert doc["ok"] is False and "not a positive multiple of 0x200000" in doc["error"]
