"""What the command lines share about their arguments and output: finite numbers, usage
errors that are a JSON document too with ``--json``, and that document written once."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


def finite(text: str) -> float:
    """A finite number (``nan`` and ``inf`` would never fire, never end, or not be JSON)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


finite.__name__ = "finite number"  # argparse: "invalid finite number value: 'nan'"


class JsonOut:
    """A run's one JSON document on stdout; ``written`` once it is out, so that an error
    after the report never adds a second one (``reset`` at each run's start)."""

    def __init__(self) -> None:
        self.written = False

    def reset(self) -> None:
        self.written = False

    def write(self, doc: dict[str, object]) -> None:
        self.written = True
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()


class Parser(argparse.ArgumentParser):
    """argparse's parser, keeping its usage error's message for the JSON document."""

    message = ""

    def error(self, message: str) -> NoReturn:
        self.message = message
        super().error(message)  # usage and message on stderr, exit 2

    def parse_or_exit(
        self,
        argv: Sequence[str] | None,
        json_error: Callable[[str], None],
        *,
        intermixed: bool = False,
    ) -> argparse.Namespace | int:
        """The arguments, or the exit status of ``--help`` (0) or a usage error (2); a usage
        error of a command line with ``--json`` is also a document, ``json_error(message)``."""
        try:
            return self.parse_intermixed_args(argv) if intermixed else self.parse_args(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
            if code == 2 and json_option(argv):
                json_error(self.message)
            return code


class _NotParsed(Exception):
    pass


class _JsonOnly(argparse.ArgumentParser):
    def __init__(self, takes_path: bool) -> None:
        super().__init__(add_help=False)
        if takes_path:
            self.add_argument("--json")
        else:
            self.add_argument("--json", action="store_true")

    def error(self, message: str) -> NoReturn:
        raise _NotParsed(message)


def json_option(argv: Sequence[str] | None, takes_path: bool = False) -> str | bool | None:
    """``--json`` (abbreviated as the whole parser allows) in a command line that the whole
    parser refused: whether, or where, its usage error is to be a document too. None when
    it is not there or has no value."""
    try:
        value: str | bool | None = _JsonOnly(takes_path).parse_known_args(argv)[0].json
    except _NotParsed:
        return None
    return value


def verbosity_options(p: argparse.ArgumentParser, verbose_help: str) -> None:
    """``-v`` (counted) and ``-q``: the log events on stderr."""
    p.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    p.add_argument("-q", "--quiet", action="store_true", help="errors only on stderr")


def simulate_option(
    p: argparse.ArgumentParser, example: str, more: str = ""
) -> argparse._ArgumentGroup:
    """The simulator's group with ``--simulate TOPOLOGY`` (default ``$VFIOPY_SIMULATE``)."""
    import os

    sim = p.add_argument_group("simulator (no hardware needed)")
    sim.add_argument(
        "--simulate",
        metavar="TOPOLOGY",
        default=os.environ.get("VFIOPY_SIMULATE") or None,
        help=f"run against the kernel simulator with this topology, e.g. {example} "
        f"(default: $VFIOPY_SIMULATE){more}",
    )
    return sim
