"""Errors the scheduler raises on purpose, and the one table of the gRPC
status each becomes (the contract's InvalidArgument included). The error
interceptor applies `status_of`; anything else becomes INTERNAL and is
logged once."""

from __future__ import annotations

import grpc

from sdmesh.errors import InvalidArgument
from sdmesh.wire import standby_metadata


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
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_of(error: Exception) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]] | None:
    """The status code and trailing metadata for an error raised on purpose,
    or None for anything else."""
    for kind, code in _STATUS:
        if isinstance(error, kind):
            trailing = standby_metadata(error.leader_address) if isinstance(error, Standby) else ()
            return code, trailing
    return None
