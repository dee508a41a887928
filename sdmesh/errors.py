"""The error the contract's own checks raise. It carries no gRPC status:
each server maps it to INVALID_ARGUMENT at its boundary, and pure code that
checks a spec never imports grpc."""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A field is out of range. The message names the field and what is
    allowed."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
