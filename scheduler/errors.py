"""Errors the scheduler raises on purpose. The error interceptor turns each
into its gRPC status; anything else becomes INTERNAL and is logged once."""

from __future__ import annotations

import grpc


class SchedulerError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SchedulerError, ValueError):
    """A request field is out of range. The message names the field and what
    is allowed."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(SchedulerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SchedulerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SchedulerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(SchedulerError):
    """The scheduler is shutting down; the client should retry."""

    code = grpc.StatusCode.UNAVAILABLE
