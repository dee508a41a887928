"""sdctl's flags, built from the declarations they belong to (`sdmesh.flags`):
`sdctl submit`'s from the job spec's fields, the server subcommands' from
their config dataclasses. A flag left out is left out of the result too, so
the declared default applies; nothing here repeats a default."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Mapping
from dataclasses import Field, fields
from pathlib import Path
from typing import Any, TypeVar

from client._errors import InvalidArgumentError
from sdmesh.flags import flag_of, parse_duration

T = TypeVar("T")


def _declared(
    cls: type[Any], only: Collection[str] | None, skip: Collection[str]
) -> list[Field[Any]]:
    return [
        f
        for f in fields(cls)
        if "help" in f.metadata and f.name not in skip and (only is None or f.name in only)
    ]


def text_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: a parser's ValueError becomes argparse's own
    one-line usage error."""

    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parsed.__name__ = getattr(parse, "__name__", "value")
    return parsed


# What the help shows for a value, by the parser of its text, where the
# field does not say.
_METAVARS: dict[Any, str] = {int: "N", float: "NUMBER", parse_duration: "DURATION", Path: "PATH"}


def add_options(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    *,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
) -> None:
    """One flag per declared field of `cls`, under the heading of its group
    (fields without one go with the command's own options)."""
    groups: dict[str, Any] = {}
    for f in _declared(cls, only, skip):
        meta = f.metadata
        group = meta.get("group") or ""
        if group and group not in groups:
            groups[group] = parser.add_argument_group(group)
        target = groups[group] if group else parser
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": meta["help"],
            "metavar": meta["metavar"] or _METAVARS.get(meta["parse"]),
        }
        if isinstance(f.default, bool):  # a switch: given means True
            kwargs["action"] = "store_true"
            del kwargs["metavar"]
        elif meta["repeat"]:
            kwargs["action"] = "append"
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["type"] = text_type(meta["parse"])
        target.add_argument(flag_of(f), **kwargs)


def options_from(
    cls: type[Any],
    args: argparse.Namespace,
    *,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """The values of the flags given for `cls`'s declared fields, parsed."""
    values: dict[str, Any] = {}
    for f in _declared(cls, only, skip):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata["repeat"] or f.metadata["choices"]:
            try:
                value = f.metadata["parse"](value)
            except ValueError as exc:
                raise InvalidArgumentError(f"{flag_of(f)}: {exc}") from None
        values[f.name] = value
    return values


def config_from(
    cls: type[T], args: argparse.Namespace, *, defaults: Mapping[str, Any], **given: Any
) -> T:
    """A config from its flags. `defaults` fill in for flags left out whose
    default is not the dataclass's own (a data dir under the user's home);
    `given` supplies what no flag does."""
    return cls(**{**defaults, **options_from(cls, args), **given})
