"""How every sdctl command writes JSON and times for scripts: one compact
line per value when stdout is a pipe or a file, indented on a terminal (as
the GitHub CLI does), times in ISO 8601 with their UTC offset. The client's
commands and `sdctl admin` (which runs in the scheduler's package) both
write through here, so a script reads them all the same way."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO


def json_text(value: Any, *, indent: bool) -> str:
    # ensure_ascii escapes every control and non-ASCII character as \uXXXX,
    # so nothing from the network can act on a terminal.
    if indent:
        return json.dumps(value, indent=2, ensure_ascii=True)
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=True)


def write_json(value: Any, stream: TextIO | None = None) -> None:
    """`value` as JSON on stdout: indented for a person at a terminal, one
    line for a program reading a pipe."""
    stream = stream or sys.stdout
    stream.write(json_text(value, indent=stream.isatty()) + "\n")
    stream.flush()


def iso_time(stamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC, e.g. 2026-11-22T10:00:00+00:00."""
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).isoformat()
