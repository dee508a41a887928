"""The error the contract's own checks raise. It carries no gRPC status:
each server maps it to INVALID_ARGUMENT at its boundary, and pure code that
checks a spec never imports grpc."""

from __future__ import annotations

# How much of a bad value an error message repeats: enough to recognise it,
# never the megabyte someone sent.
QUOTE_CHARS = 40


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """The value as Python writes it, cut to its first `limit` characters
    with its length after: `quote("x" * 100, 3)` is `'xxx'…(100 chars)`."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}…({len(value)} chars)"


class InvalidArgument(ValueError):
    """A field is out of range. The message names the field and what is
    allowed; bad input in it is quoted with `quote`."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
