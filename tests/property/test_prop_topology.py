"""Topology files at random: each loads as a Topology or is refused with one clean line
(TopologyError, a ValueError), never another exception; what loads runs in the simulator."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st
from mock_vfio import Machine
from mock_vfio.topology import Topology, TopologyError
from mock_vfio.topology_load import load_topology, parse_toml
from prop_helpers import budget

# --- a small TOML writer (tomllib only reads) -----------------------------------------------

BARE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def key(k: str) -> str:
    return k if k and set(k) <= BARE else value(k)


def value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        escaped = "".join(
            c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
            for c in v
            if ord(c) <= 0xFFFF and not 0xD800 <= ord(c) <= 0xDFFF
        )
        return f'"{escaped}"'
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"


def dumps(doc: dict[str, Any]) -> str:
    lines = [f"{key(k)} = {value(v)}" for k, v in doc.items() if k not in ("bridge", "device")]
    for section in ("bridge", "device"):
        tables = doc.get(section)
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            if section in doc:
                lines.insert(0, f"{section} = {value(tables)}")
            continue
        for t in tables:
            lines.append(f"[[{section}]]")
            lines += [f"{key(k)} = {value(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


# --- documents: mostly the shape of a topology, with wrong values and keys mixed in -------

SCALARS = st.one_of(
    st.integers(-(2**64), 2**64),
    st.integers(-2, 300),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
ANY = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def addrs(wrong: bool, buses: tuple[int, int] = (0, 0x1F)) -> st.SearchStrategy[str]:
    good = st.builds(
        lambda d, b, s, f: f"{d:04x}:{b:02x}:{s:02x}.{f}",
        st.sampled_from([0, 0, 1]),
        st.integers(*buses),  # few buses: addresses collide and bridges meet their devices
        st.integers(0, 0x1F),
        st.integers(0, 7),
    )
    short = good.map(lambda a: a[5:])
    bad = st.sampled_from(["", "3b:00", "0000:100:00.0", "0000:00:20.0", "0000:00:00.8", "x"])
    return st.one_of(good, good, short, bad) if wrong else st.one_of(good, short)


def documents(wrong: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A topology document; with ``wrong``, some values are anything at all and numbers
    leave their ranges."""

    def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(value, value, value, value, value, ANY) if wrong else value

    def ints(lo: int, hi: int, bad_lo: int, bad_hi: int) -> st.SearchStrategy[int]:
        return maybe(st.integers(bad_lo, bad_hi) if wrong else st.integers(lo, hi))

    bar = st.fixed_dictionaries(
        {"index": ints(0, 5, -1, 6), "size": ints(0, 2**40, -4096, 2**49)},
        optional={
            "type": maybe(st.sampled_from(["mem32", "mem64", "io", *(["bogus"] if wrong else [])])),
            "prefetch": maybe(st.booleans()),
        },
    )
    device = st.fixed_dictionaries(
        {"addr": maybe(addrs(wrong))},
        optional={
            "vendor": ints(0, 0xFFFF, -1, 0x10000),
            "device": ints(0, 0xFFFF, -1, 0x10000),
            "class": ints(0, 0xFFFFFF, -1, 2**32),
            "iommu_group": ints(-1, 8, -5, 2**31),
            "multifunction": maybe(st.booleans()),
            "flr": maybe(st.booleans()),
            "pcie": maybe(st.booleans()),
            "msi": ints(0, 32, -1, 64),
            "driver": maybe(st.sampled_from(["vfio-pci", "nvme", ""])),
            "reset_method": maybe(st.sampled_from(["flr", "bus", "pm bus", "", ["flr"]])),
            "link_speed": maybe(st.sampled_from([0.0, 2.5, 8.0, 16.0])),
            "bars": maybe(st.lists(bar, max_size=3)),
            "msix": maybe(
                st.fixed_dictionaries(
                    {"count": ints(1, 64, -1, 4096)},
                    optional={"table_bar": ints(0, 5, -1, 6)},
                )
            ),
            "sriov": maybe(
                st.fixed_dictionaries(
                    {"total_vfs": ints(0, 8, -1, 300)},
                    optional={
                        "num_vfs": ints(0, 0, -1, 300),
                        "offset": ints(1, 8, -1, 8),
                        "stride": ints(1, 4, -1, 4),
                    },
                )
            ),
            **({"bogus_key": ANY} if wrong else {}),
        },
    )
    bridge = st.fixed_dictionaries(
        {"addr": maybe(addrs(wrong, (0, 3))), "secondary": ints(4, 0x20, 0, 0x20)},
        optional={
            "kind": maybe(
                st.sampled_from(["root_port", "upstream", "downstream", "pci_bridge"])
                | st.sampled_from(["x"] if wrong else ["root_port"])
            ),
            "hotplug_slot": maybe(st.booleans()),
            "link_speed": maybe(st.sampled_from([0.0, 5.0, 8.0])),
        },
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "name": maybe(st.text(max_size=8)),
            "iommu_address_width": ints(32, 64, 0, 2**20),
            "iommu_coherent": maybe(st.booleans()),
            "bridge": maybe(st.lists(bridge, max_size=4)),
            "device": maybe(st.lists(device, max_size=6)),
        },
    )


DOCUMENTS = documents(wrong=False) | documents(wrong=True)


def load_text(text: str) -> Topology | TopologyError:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_topology(str(path))
        except TopologyError as exc:
            return exc


def check_refusal(exc: TopologyError) -> None:
    text = str(exc)
    assert text and "\n" not in text, repr(text)  # one line, as the CLI prints it


@given(DOCUMENTS)
@budget(1.0)
def test_a_topology_document_loads_or_is_refused_in_one_line(doc: dict[str, Any]) -> None:
    result = load_text(dumps(doc))
    if isinstance(result, TopologyError):
        event("refused")
        check_refusal(result)
        return
    assert isinstance(result, Topology)
    event(f"loaded, {min(len(result.functions), 3)}+ functions")
    # What loads runs: the simulator builds it, and every device answers in sysfs.
    with Machine(result, time_scale=0) as m:
        assert len(m.devices) >= len(result.functions)


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_text_loads_or_is_refused_in_one_line(text: str) -> None:
    result = load_text(text)
    if isinstance(result, TopologyError):
        check_refusal(result)


@given(DOCUMENTS)
def test_parse_toml_raises_only_topology_errors(doc: dict[str, Any]) -> None:
    try:
        parse_toml(dumps(doc))
    except TopologyError as exc:
        check_refusal(exc)
