"""Re-exports imported at first use (PEP 562), for a package's ``__init__``.

A command-line tool that needs none of a package's names (``python -m
vfiopy.release --help``) should not pay for importing them all: vfiopy's
modules load the cffi extension, and its loggers structlog, which imports
asyncio.  The package lists its names twice, under ``if TYPE_CHECKING:`` for
type checkers and in the map given here for the interpreter;
tests/unit/test_lazy.py checks that the two agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for the package whose ``globals()`` is
    ``namespace``; ``exports`` maps a module to the names it gives."""
    package = namespace["__name__"]
    source = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = source.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # the next look-up finds it without this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *source})

    return __getattr__, __dir__, list(source)
