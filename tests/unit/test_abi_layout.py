"""The binding's layouts and numbers against the C compiler's reading of <linux/vfio.h>.

The expected values are printed by a C program generated from the binding's
own declarations and compiled against the installed headers (plus the same
fallbacks for newer UAPI), so nothing here is a hand-copied table.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vfiopy import _ioctl_build
from vfiopy._uapi import ffi, lib


def _structs() -> list[str]:
    return sorted(ffi.list_types()[1])


def _constants() -> list[str]:
    return sorted(n for n in dir(lib) if isinstance(getattr(lib, n), int))


def _c_program() -> str:
    lines = [
        _ioctl_build.FALLBACKS,
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <sys/mman.h>",
        "int main(void) {",
    ]
    for s in _structs():
        lines.append(f'printf("size struct {s} %zu\\n", sizeof(struct {s}));')
        for field, _ in ffi.typeof(f"struct {s}").fields:
            lines.append(
                f'printf("offset struct {s}.{field} %zu\\n", offsetof(struct {s}, {field}));'
            )
    for c in _constants():
        lines.append(f'printf("const {c} %lld\\n", (long long)({c}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler: install gcc (the binding itself needs one to build)")
    d: Path = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text(_c_program())
    subprocess.run([cc, "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, val = line.rpartition(" ")
        values[key] = int(val)
    return values


def test_every_struct_and_field_matches(c_values: dict[str, int]) -> None:
    structs = _structs()
    assert len(structs) >= 30  # the whole VFIO + iommufd UAPI is declared
    mismatches = []
    for s in structs:
        if c_values[f"size struct {s}"] != ffi.sizeof(f"struct {s}"):
            mismatches.append(f"sizeof {s}")
        for field, f in ffi.typeof(f"struct {s}").fields:
            if c_values[f"offset struct {s}.{field}"] != f.offset:
                mismatches.append(f"{s}.{field}")
    assert mismatches == []


def test_every_ioctl_number_and_flag_matches(c_values: dict[str, int]) -> None:
    consts = _constants()
    assert "VFIO_DEVICE_PCI_HOT_RESET" in consts and "IOMMU_IOAS_MAP" in consts
    mismatches = [c for c in consts if c_values[f"const {c}"] != getattr(lib, c)]
    assert mismatches == []


def test_ioctl_numbers_follow_the_io_encoding() -> None:
    # _IO(';', 100 + n): no direction or size bits, type ';' in bits 8..15.
    assert (ord(";") << 8) | 100 == lib.VFIO_GET_API_VERSION
    assert (ord(";") << 8) | 0x80 == lib.IOMMU_DESTROY
