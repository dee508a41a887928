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


def rpc_detail(error: grpc.RpcError) -> str:
    """What went wrong, in a few words: the server's details, or the gist of
    what the transport said."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    if "Connection refused" in details:
        return "connection refused"
    if "Socket closed" in details or "Connection reset" in details:
        return "connection lost"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "did not answer in time"
    return details


def from_rpc_error(error: grpc.RpcError, address: str) -> SdmeshError:
    code: grpc.StatusCode = error.code()
    kind = _BY_CODE.get(code, SdmeshError)
    if kind is UnavailableError:
        return UnavailableError(f"scheduler {address} unreachable: {rpc_detail(error)}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UnavailableError(f"scheduler {address} did not answer in time")
    return kind(error.details() or code.name)


def unreachable(failures: dict[str, str], waited: float | None = None) -> UnavailableError:
    """Giving up: every address tried, with what each last said."""
    if len(failures) == 1:
        [(address, detail)] = failures.items()
        message = f"scheduler {address} unreachable: {detail}"
    else:
        each = "; ".join(f"{address}: {detail}" for address, detail in failures.items())
        message = f"schedulers {', '.join(failures)} unreachable: {each}"
    if waited is not None:
        message += f" (retried for {round(waited, 1):g}s)"
    return UnavailableError(message)


def nobody_there(error: grpc.RpcError) -> bool:
    """Nothing listens at the address (or its name does not resolve), as
    opposed to a server that answered, dropped the call or is a standby."""
    details = error.details() or ""
    return "failed to connect" in details or "DNS resolution failed" in details


class EndedEarly(grpc.RpcError):
    """A watch stream that ended cleanly before its job did: as good as the
    UNAVAILABLE of a dropped connection, and retried the same way."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details
