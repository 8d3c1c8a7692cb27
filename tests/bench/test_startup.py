"""`python -m vfiopy.bench --startup`: what it reports, never how fast anything was."""

from __future__ import annotations

import io
import json
from pathlib import Path

from vfiopy.bench import _cli
from vfiopy.bench._startup import BARE, TARGET_S, TOOLS, Command, Startup


def test_startup_times_each_command_every_round(tmp_path: Path) -> None:
    out, path = io.StringIO(), tmp_path / "startup.json"
    assert _cli.run(["--startup", "2", "--json", str(path)], out=out) == 0
    doc = json.loads(path.read_text())
    assert doc["schema"] == 1 and "machine" in doc
    part = doc["startup"]
    assert part["rounds"] == 2 and part["target_over_bare_s"] == TARGET_S
    assert part["bare"]["command"] == "python -c pass"
    assert [t["command"] for t in part["tools"]] == [
        "python -m vfiopy.release --help",
        "python -m vfiopy.bench --help",
    ]
    for c in [part["bare"], *part["tools"]]:
        assert 0 < c["min_s"] <= c["median_s"] <= c["max_s"]
    for t in part["tools"]:
        assert t["over_bare_s"] == t["median_s"] - part["bare"]["median_s"]
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 1 + len(TOOLS)
    assert all("ms over bare" in line and "60 ms target" in line for line in lines[2:])


def test_the_verdict_follows_the_target() -> None:
    bare = Command(BARE, [0.030, 0.040, 0.050])
    fast = Command(TOOLS[0], [0.080, 0.090, 0.100])
    slow = Command(TOOLS[1], [0.120, 0.130, 0.140])
    lines = Startup(bare, [fast, slow]).lines()
    assert "+50.0 ms over bare: within" in lines[2]
    assert "+90.0 ms over bare: OVER" in lines[3]
