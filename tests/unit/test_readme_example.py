"""The README's driver examples run as written, on the simulator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_driver_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    start = text.index("```python\nimport anyio\n") + len("```python\n")
    script = tmp_path / "example.py"
    script.write_text(text[start : text.index("```", start)])
    env = {**os.environ, "VFIOPY_SIMULATE": "nvme:1,scale=0.01"}
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("0000:01:00.0 0x")
    assert "interrupts: 1" in lines
    assert any(line.startswith("DMA buffer at IOVA 0x") for line in lines)
    assert out.stderr == ""  # the example routes vfiopy's events to stderr, warnings only


def test_readme_dma_example_runs() -> None:
    """The hugepage and map_dma block, on a simulated host with 2 MiB pages to spare."""
    pytest.importorskip("numpy")
    mock_vfio = pytest.importorskip("mock_vfio")
    from vfiopy.kernel import set_default_kernel

    text = README.read_text()
    start = text.index("```python\nimport mmap\n") + len("```python\n")
    code = text[start : text.index("```", start)]
    m = mock_vfio.Machine(
        mock_vfio.load_topology("nvme:1"), time_scale=0.01, hugepages={2 << 20: 2}
    )
    set_default_kernel(m.spawn("readme"))
    try:
        exec(compile(code, "README.md", "exec"), {})
        assert m.counters["dma_maps"] == m.counters["dma_unmaps"] == 2
    finally:
        set_default_kernel(None)
        m.close()
