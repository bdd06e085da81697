"""What the workbook's command line tools share besides tsr.errors' error style and flag
types: strict booleans, flags generated from a dataclass, the flags a user actually typed."""

from __future__ import annotations

import argparse
import inspect
import re
import typing
from collections.abc import Callable

from tsr.errors import ArgumentParser


def strict_bool(text: str) -> bool:
    """'true'/'false' (also 1/0, yes/no, on/off); anything else is an error, never False."""
    value = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}.get(text.lower())  # fmt: skip
    if value is None:
        raise argparse.ArgumentTypeError(f"got {text!r}, need true or false -> pass true or false")
    return value


def field_comments(cls: type) -> dict[str, str]:
    """The why-comment after each dataclass field in the source, to serve as --help."""
    field_line = re.compile(r"^\s+(\w+): [^#]*#\s*(.+)$")
    lines = inspect.getsource(cls).splitlines()
    return {m.group(1): m.group(2) for line in lines if (m := field_line.match(line))}


def flag_type(cls: type, name: str) -> Callable[[str], object]:
    """The parser of a dataclass field's flag, from its annotation: `float | None` parses a
    float (the flag's default stays None), bool parses strictly."""
    kind = typing.get_type_hints(cls)[name]
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None -> X
    return strict_bool if kind is bool else kind


def given_flags(parser: ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags on the command line, as opposed to defaults: a resumed
    run takes the rest from its checkpoint."""
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]
