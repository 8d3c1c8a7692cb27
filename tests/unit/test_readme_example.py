"""The README's driver example runs as written, on the simulator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
