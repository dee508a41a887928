"""How a setting is declared once. Each field of a server's config
dataclass, and of the job spec, carries its command-line flag, help and the
parser for the flag's text; `sdctl` builds its flags from the fields and the
value from the flags, so a setting, its default and its flag cannot drift
apart.

Parsers raise ValueError with a message that says what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def option(
    default: Any = MISSING,
    *,
    help: str,
    parse: Callable[[Any], Any] = str,
    flag: str = "",
    metavar: str | None = None,
    repeat: bool = False,
    choices: Sequence[str] | None = None,
    group: str = "",
) -> Any:
    """A field with its flag: `--name-with-dashes` unless `flag` is given.
    `parse` turns the flag's text (or, with `repeat`, the list of every use
    of it) into the field's value; `choices` lists the texts allowed;
    `metavar` is what the help shows for the value (by default from
    `parse`: N for an int, DURATION for a duration, ...); `group` is the
    heading the flag is listed under in the help."""
    metadata = {
        "help": help,
        "parse": parse,
        "flag": flag,
        "metavar": metavar,
        "repeat": repeat,
        "choices": choices,
        "group": group,
    }
    if isinstance(default, dict):  # each instance gets its own copy
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def pairs_option(*, help: str, flag: str = "", group: str = "") -> Any:
    """A KEY=VALUE flag, repeatable, collected into a dict (labels, node
    selectors)."""
    return option(
        {}, flag=flag, metavar="KEY=VALUE", parse=parse_pairs, repeat=True, help=help, group=group
    )


def flag_of(config_field: Field[Any]) -> str:
    return str(config_field.metadata.get("flag") or "--" + config_field.name.replace("_", "-"))


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '2d' or plain seconds."""
    try:
        if text and text[-1] in _UNITS:
            seconds = float(text[:-1]) * _UNITS[text[-1]]
        else:
            seconds = float(text)
    except ValueError:
        raise ValueError(f"expected a duration like 90s, 15m or 24h, got {text!r}") from None
    if seconds < 0:
        raise ValueError(f"expected a duration that is not negative, got {text!r}")
    return seconds


def parse_positive(text: str) -> int:
    """A whole number of at least 1: a count, a limit."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def parse_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE, once per use of the flag."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        found[key] = value
    return found


def parse_indexes(text: str) -> tuple[int, ...]:
    """Device indexes like 0,1."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected indexes like 0,1, got {text!r}") from None
