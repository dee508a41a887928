"""Typed exceptions for gRPC errors. Each carries the sdctl exit code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from sdmesh.dialing import (
    DOES_NOT_RESOLVE,
    hint,
    is_tls_failure,
    tls_reason,
    transport_detail,
)
from sdmesh.wire import retry_after

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


class TlsError(UnavailableError):
    """The TLS handshake failed: a certificate the other side does not
    trust, or one side without TLS. Retrying does not help."""


class AuthenticationError(SdmeshError):
    """The scheduler did not accept the caller's credential, or got none
    (UNAUTHENTICATED)."""

    exit_code = 4


class PermissionDeniedError(SdmeshError):
    """The caller is known but may not do this: another user's job, or an
    admin's command (PERMISSION_DENIED)."""

    exit_code = 4


class ResourceExhaustedError(SdmeshError):
    """A limit was hit: the scheduler's message names it. `retry_after` is
    how many seconds it asked the caller to wait, if it said."""

    exit_code = 5

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        when = "later" if retry_after is None else f"in {round(retry_after, 2):g}s"
        # The scheduler's own message may say when already; once is enough.
        hint = "" if "retry" in detail else f"; retry {when}"
        super().__init__(f"limit reached: {detail}{hint}")
        self.detail = detail
        self.retry_after = retry_after


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
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
}
# gRPC's own RESOURCE_EXHAUSTED for a message over the size limit: no retry
# helps that.
_TOO_LARGE = "larger than max"
CLIENT_CERT_FLAGS = "--client-cert and --client-key"


def from_rpc_error(error: grpc.RpcError, address: str) -> SdmeshError:
    code: grpc.StatusCode = error.code()
    kind = _BY_CODE.get(code, SdmeshError)
    details: str = error.details() or code.name
    if kind is UnavailableError:
        if is_tls_failure(error):
            return tls_error(address, details)
        return UnavailableError(f"scheduler {address} unreachable: {transport_detail(error)}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UnavailableError(f"scheduler {address} did not answer in time")
    if kind is AuthenticationError:
        # The scheduler's message may say what to do already; once is enough.
        advice = "" if "SDMESH_API_KEY" in details else "; pass --api-key or set SDMESH_API_KEY"
        return AuthenticationError(f"not authenticated: {details}{advice}")
    if kind is PermissionDeniedError:
        return PermissionDeniedError(f"not allowed: {details}")
    if kind is ResourceExhaustedError:
        if _TOO_LARGE in details:
            return SdmeshError(f"message too large: {details}")
        return ResourceExhaustedError(details, retry_after(error))
    return kind(details)


def tls_error(address: str, details: str) -> TlsError:
    return TlsError(
        f"TLS handshake with {address} failed ({tls_reason(details)}): "
        "check --ca-cert (and --client-cert for mutual TLS)"
    )


def unreachable(
    failures: dict[str, str], waited: float | None = None, *, tls: bool | None = None
) -> UnavailableError:
    """Giving up: every address tried, with what each last said. `tls`:
    whether the client dialed with TLS, for a hint when every connection
    closed while it was being set up (None: no hint)."""
    if len(failures) == 1:
        [(address, detail)] = failures.items()
        message = f"scheduler {address} unreachable: {detail}"
    else:
        each = "; ".join(f"{address}: {detail}" for address, detail in failures.items())
        message = f"schedulers {', '.join(failures)} unreachable: {each}"
    if waited is not None:
        message += f" (retried for {round(waited, 1):g}s)"
    details = set(failures.values())
    if len(details) == 1 and (tls is not None or DOES_NOT_RESOLVE in details):
        [detail] = details
        if advice := hint(detail, tls=bool(tls), cert_flags=CLIENT_CERT_FLAGS):
            message += f"; {advice}"
    return UnavailableError(message)


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
