"""The nodes the simulated sysfs, devfs and procfs are built of: directories, symlinks,
attributes and device nodes (what kernfs and procfs entries are to the kernel)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mock_vfio.file import File
    from mock_vfio.process import SimProcess


class Dir:
    """A directory; a callable listing is computed only when someone lists it
    (path walks pass through directories far more often than they list them)."""

    def __init__(self, entries: list[str] | Callable[[], list[str]]) -> None:
        self._entries = entries

    @property
    def entries(self) -> list[str]:
        e = self._entries
        return e() if callable(e) else e


@dataclass
class Link:
    target: str


@dataclass
class Attr:
    read: Callable[[], str] | None = None
    write: Callable[[str], None] | None = None
    binary: bool = False


@dataclass
class DevNode:
    opener: Callable[[SimProcess], File]


Node = Dir | Link | Attr | DevNode


def up(depth: int) -> str:
    return "../" * depth


def const(text: str) -> Callable[[], str]:
    return lambda: text
