"""KEY=VALUE flags (--label, --selector)."""

from __future__ import annotations

from client._errors import InvalidArgumentError


def parse_labels(pairs: list[str], flag: str = "--label") -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"{flag}: expected KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels
