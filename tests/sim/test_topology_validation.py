"""Topologies that no PCI hierarchy has, or too large to hold, are refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from mock_vfio.topology import MAX_FUNCTIONS, TopologyError, validate
from mock_vfio.topology_gen import gpus, nvme, vfs
from mock_vfio.topology_load import GENERATOR_MAX, MAX_FILE_BYTES, available, load_topology

from vfiopy.release.cli import main

GENERATORS = {"gpus": gpus, "vfs": vfs, "nvme": nvme}


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_generator_bound_is_the_largest_that_fits(kind: str) -> None:
    validate(GENERATORS[kind](GENERATOR_MAX[kind]))
    with pytest.raises(TopologyError):
        validate(GENERATORS[kind](GENERATOR_MAX[kind] + 1))


@pytest.mark.parametrize("spec", ["gpus:300", "nvme:300", "gpus:100000", "vfs:1000000"])
def test_generator_past_one_segment_is_refused_before_it_is_built(spec: str) -> None:
    with pytest.raises(TopologyError, match="fits one PCI segment") as e:
        load_topology(spec)
    assert "\n" not in str(e.value)


def test_every_ready_topology_is_valid() -> None:
    for name in available():
        if ":" not in name:
            load_topology(name)


def topology_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


DEVICE = '[[device]]\naddr = "{addr}"\n'
BAD = {
    "duplicate": (DEVICE.format(addr="0000:01:00.0") * 2, "has the address of device"),
    "bridge-duplicate": (
        '[[bridge]]\naddr = "0000:00:01.0"\nsecondary = 1\n' + DEVICE.format(addr="00:01.0"),
        "has the address of bridge",
    ),
    "negative-bar": (
        DEVICE.format(addr="0000:01:00.0") + "bars = [{ index = 0, size = -4096 }]\n",
        "BAR 0 size -4096 is not 0 to 2^48 bytes",
    ),
    "huge-bar": (
        DEVICE.format(addr="0000:01:00.0") + f"bars = [{{ index = 0, size = {1 << 62} }}]\n",
        "is not 0 to 2^48 bytes",
    ),
    "page-offset-of-a-page-bar": (
        DEVICE.format(addr="0000:01:00.0")
        + "bars = [{ index = 0, size = 0x1000, page_offset = 0x100 }]\n",
        "page_offset must be a multiple of a sub-page memory BAR's size",
    ),
    "page-offset-unaligned": (
        DEVICE.format(addr="0000:01:00.0")
        + "bars = [{ index = 0, size = 0x100, page_offset = 0x80 }]\n",
        "page_offset must be a multiple of a sub-page memory BAR's size",
    ),
    "huge-rom": (DEVICE.format(addr="0000:01:00.0") + "rom_size = -1\n", "rom_size size -1"),
    "slot": (DEVICE.format(addr="0000:01:20.0"), "outside a PCI segment"),
    "cycle": (
        '[[bridge]]\naddr = "0000:01:00.0"\nsecondary = 2\n'
        '[[bridge]]\naddr = "0000:02:00.0"\nsecondary = 1\n',
        "or bridges form a cycle",
    ),
    "self-loop": (
        '[[bridge]]\naddr = "0000:01:00.0"\nsecondary = 1\n',
        "or bridges form a cycle",
    ),
    "subordinate": (
        '[[bridge]]\naddr = "0000:00:01.0"\nsecondary = 2\nsubordinate = 1\n',
        "needs secondary 0x02 <= subordinate 0x01",
    ),
    "vf-offset-0": (
        DEVICE.format(addr="0000:01:00.0") + "[device.sriov]\ntotal_vfs = 2\noffset = 0\n",
        "SR-IOV offset 0",
    ),
    "vf-past-bus-ff": (
        DEVICE.format(addr="0000:ff:00.0") + "[device.sriov]\ntotal_vfs = 300\n",
        "300 VFs run past bus ff",
    ),
    "vf-on-a-device": (
        DEVICE.format(addr="0000:01:00.0")
        + "[device.sriov]\ntotal_vfs = 1\n"
        + DEVICE.format(addr="0000:01:00.1"),
        "has the address of",
    ),
    "too-many-vfs": (
        DEVICE.format(addr="0000:01:00.0") + f"[device.sriov]\ntotal_vfs = {MAX_FUNCTIONS}\n",
        f"at most {MAX_FUNCTIONS}",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_topology_file_is_refused(case: str, tmp_path: Path) -> None:
    text, says = BAD[case]
    with pytest.raises(TopologyError) as e:
        load_topology(str(topology_file(tmp_path, text)))
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    with path.open("w") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: not even valid TOML, never read
    with pytest.raises(TopologyError, match=f"at most {MAX_FUNCTIONS} functions"):
        load_topology(str(path))


def test_release_cli_refuses_them_as_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = topology_file(tmp_path, BAD["vf-offset-0"][0])
    for spec in ("gpus:300", str(path)):
        capsys.readouterr()
        assert main(["--simulate", spec, "--dry-run", "0000:01:00.0"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
