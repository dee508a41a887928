"""Typed exceptions for gRPC errors. Each carries the sdctl exit code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from client._models import Job


class SdmeshError(Exception):
    """Base class; `exit_code` is what sdctl exits with."""

    exit_code = 1


class InvalidArgumentError(SdmeshError):
    """The request was refused before anything was queued."""

    exit_code = 2


class RejectedError(SdmeshError):
    """A well-formed request the scheduler cannot accept (FAILED_PRECONDITION,
    ALREADY_EXISTS)."""

    exit_code = 2


class NotFoundError(SdmeshError):
    exit_code = 1


class UnavailableError(SdmeshError):
    """The scheduler could not be reached."""

    exit_code = 3


class JobFailedError(SdmeshError):
    """The job ended FAILED or CANCELLED where images were expected."""

    exit_code = 1

    def __init__(self, job: Job) -> None:
        detail = f": {job.reason}" if job.reason else ""
        super().__init__(f"job {job.id} {job.state}{detail}")
        self.job = job


_BY_CODE: dict[grpc.StatusCode, type[SdmeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: RejectedError,
    grpc.StatusCode.ALREADY_EXISTS: RejectedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def from_rpc_error(error: grpc.RpcError, address: str) -> SdmeshError:
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    kind = _BY_CODE.get(code, SdmeshError)
    if kind is UnavailableError:
        if "Connection refused" in details:
            details = "connection refused"
        return UnavailableError(f"scheduler {address} unreachable: {details}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UnavailableError(f"scheduler {address} did not answer in time")
    return kind(details)
