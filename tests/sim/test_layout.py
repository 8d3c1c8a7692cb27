"""The simulator stays laid out like the kernel: small files, each saying what it mirrors."""

from __future__ import annotations

import ast
from pathlib import Path

import mock_vfio

# About 400 lines: a file that grows past this is split along the kernel's own files.
MAX_LINES = 420
SOURCES = sorted(Path(mock_vfio.__file__).parent.glob("*.py"))


def test_the_package_has_its_modules() -> None:
    names = {p.stem for p in SOURCES}
    assert {"vfio_pci_core", "vfio_group", "vfio_container", "iommufd", "pci_reset", "iov"} <= names


def test_every_simulator_file_is_short() -> None:
    long = {p.name: n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along the kernel's files: {long}"


def test_every_simulator_file_says_what_it_mirrors() -> None:
    missing = [p.name for p in SOURCES if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing
