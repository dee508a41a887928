"""sdctl's argument parser: argparse, with the habits of kubectl and the
GitHub CLI. A mistake is one line naming the command it belongs to and
where to read more, never the whole usage; a flag is only ever its whole
name (argparse's prefix matching would take `--step 4` as `--steps 4`,
and quietly change its meaning the day another flag starts the same way);
a mistyped flag is reported by the command it was given to, with the
nearest real flag."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from typing import Any, NoReturn

EXIT_USAGE = 2

_REQUIRED = re.compile(r"the following arguments are required: (.+)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without prefix matching.
    Subcommands made with `add_subparsers` are Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if found := _REQUIRED.fullmatch(message):
            names = found.group(1).split(", ")
            message = "missing " + " and ".join(
                name if name.startswith("-") else name.upper() for name in names
            )
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")

    def flags(self) -> list[str]:
        return [
            flag
            for action in self._actions
            if action.help != argparse.SUPPRESS
            for flag in action.option_strings
        ]


def innermost(parser: Parser, args: argparse.Namespace, dests: Sequence[str]) -> Parser:
    """The subcommand's parser the arguments ended in: for `sdctl admin
    create-key`, the create-key parser. `dests` are the attributes that
    name the chosen subcommand at each level."""
    for dest in dests:
        chosen = getattr(args, dest, None)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and chosen in action.choices:
                parser = action.choices[chosen]
                break
    return parser


def refuse_unknown(parser: Parser, unknown: list[str]) -> NoReturn:
    """One line for arguments nothing took, from the command they were
    given to, with the nearest flag it has when one is close."""
    first = unknown[0]
    message = f"no flag {first}" if first.startswith("-") else f"unexpected argument {first!r}"
    if first.startswith("-"):
        close = difflib.get_close_matches(first.split("=", 1)[0], parser.flags(), n=1, cutoff=0.75)
        if close:
            message += f"; did you mean {close[0]}?"
    parser.error(message)
