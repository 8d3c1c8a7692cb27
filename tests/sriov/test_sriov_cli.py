"""``python -m vfiopy.sriov`` end to end on the simulator: exit codes, one JSON document."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sriov_helpers import NIC, PF

from vfiopy.bind.cli import main as bind_main
from vfiopy.sriov.cli import main, vf_list

SIM = ["--simulate", "vm-host", "--time-scale", "0.01"]


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> tuple[int, dict]:
    code = main([*argv, *SIM, "--sim-dir", str(tmp_path), "--json"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    return code, json.loads(out[0])


def test_enable_then_disable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, doc = run(capsys, tmp_path, "enable", PF, "--count", "16", "--bind", "0-2,7")
    assert code == 0 and doc["ok"]
    assert doc["numvfs_after"] == 16 and doc["autoprobe_after"] is True
    assert [d["status"] for d in doc["devices"]] == ["bound"] * 4
    # the next run sees the VFs (the simulated host is kept): another count is refused
    code, doc = run(capsys, tmp_path, "enable", PF, "--count", "8")
    assert code == 1 and "16 VFs exist" in doc["error"]
    code, doc = run(capsys, tmp_path, "disable", PF)
    assert code == 0 and doc["numvfs_before"] == 16 and doc["numvfs_after"] == 0


@pytest.mark.parametrize(
    ("argv", "status", "words"),
    [
        (["enable", PF, "--count", "300"], 2, "sriov_totalvfs is 256"),
        (["enable", NIC, "--count", "2"], 1, "no SR-IOV capability"),
        (["enable", PF, "--count", "4", "--bind", "4"], 2, "numbered 0 to 3"),
        (["enable", PF, "--count", "4", "--driver", "nope"], 2, "no PCI driver 'nope'"),
        (["enable", PF], 2, "--count"),
        (["enable", PF, "--count", "4", "--bind", "3-1"], 2, "VF list"),
        (["enable", "0000:77:00.0", "--count", "4"], 2, "does not exist"),
        (["enable", PF, "--count", "4", "--vf-token", str(uuid.uuid4())], 2, "vfio-pci"),
    ],
)
def test_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], status: int, words: str
) -> None:
    code, doc = run(capsys, tmp_path, *argv)
    assert code == status and doc["ok"] is False and words in doc["error"]


def test_vf_token_on_a_vfio_pf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert bind_main(["bind", PF, *SIM, "--sim-dir", str(tmp_path), "-q"]) == 0
    capsys.readouterr()
    code, doc = run(capsys, tmp_path, "enable", PF, "--count", "2")
    assert code == 1 and "enable_sriov" in doc["error"]
    state = json.loads((tmp_path / "machine.json").read_text())
    state["vfio_enable_sriov"] = True  # modprobe vfio-pci enable_sriov=1
    (tmp_path / "machine.json").write_text(json.dumps(state))
    token = uuid.uuid4()
    code, doc = run(
        capsys, tmp_path, "enable", PF, "--count", "2", "--bind", "0", "--vf-token", str(token)
    )
    assert code == 0 and doc["vf_token_set"] is True
    saved = json.loads((tmp_path / "machine.json").read_text())
    assert saved["vf_tokens"][PF] == str(token)


def test_bench_both_ways(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, doc = run(capsys, tmp_path, "bench", "--count", "20", "--bind", "3", "--time-scale", "0")
    assert code == 0 and doc["ok"]
    ways = {r["way"]: r for r in doc["runs"]}
    assert ways["autoprobe"]["host_probes"] == 20 and ways["vfiopy"]["host_probes"] == 0
    assert ways["autoprobe"]["bound"] == ways["vfiopy"]["bound"] == 3
    assert ways["vfiopy"]["bound_s"] < ways["autoprobe"]["bound_s"]


def test_vf_list() -> None:
    assert vf_list("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ValueError):
        vf_list("2-1")
