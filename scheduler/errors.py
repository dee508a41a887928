"""Errors the scheduler raises on purpose, and the one table of the gRPC
status each becomes (the contract's InvalidArgument included). The error
interceptor applies `status_of`; anything else becomes INTERNAL and is
logged once."""

from __future__ import annotations

import grpc

from sdmesh.errors import InvalidArgument
from sdmesh.wire import retry_after_metadata, standby_metadata


class SchedulerError(Exception):
    pass


class NotFound(SchedulerError):
    pass


class AlreadyExists(SchedulerError):
    pass


class FailedPrecondition(SchedulerError):
    pass


class Unauthenticated(SchedulerError):
    """No credentials, or ones that are wrong, expired or revoked."""


class PermissionDenied(SchedulerError):
    """Known caller, not allowed: a user draining a node, say."""


class ResourceExhausted(SchedulerError):
    """Past a limit (a queue bound, a submit rate). The message names the
    limit and its flag; the caller may try again after
    `retry_after_seconds`, which travels as trailing metadata
    (`sdmesh.wire.retry_after`)."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Unavailable(SchedulerError):
    """The scheduler cannot serve this now (it is stopping, or lost the
    leader lease); the caller should retry, here or at another replica."""


class Standby(Unavailable):
    """This replica is a standby: only the leader serves. Callers read the
    trailing metadata (`sdmesh.wire.is_standby`), not this message."""

    def __init__(self, message: str, leader_address: str) -> None:
        super().__init__(message)
        self.leader_address = leader_address


_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_of(error: Exception) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]] | None:
    """The status code and trailing metadata for an error raised on purpose,
    or None for anything else."""
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code, _trailing(error)
    return None


def _trailing(error: Exception) -> tuple[tuple[str, str], ...]:
    if isinstance(error, Standby):
        return standby_metadata(error.leader_address)
    if isinstance(error, ResourceExhausted):
        return retry_after_metadata(error.retry_after_seconds)
    return ()
