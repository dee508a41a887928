"""What a failed dial to a scheduler means, in a few words, and what to do
about it. gRPC reports a refused port, a name that does not resolve, a TLS
handshake one side refused and a connection the other side closed in its
own long words; the SDK (`client._errors`) and the agent (`gpu_node`) both
say them through here, so that a mistake reads the same from either.

`FirstContact` is the agent's rule for giving up: an agent that has never
got through gives up on a mistake that waiting cannot mend (a TLS mismatch,
a name that does not resolve) after its reconnect window; one that got
through once keeps dialing for as long as it runs, since agents outlive
their scheduler."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import grpc

# What gRPC says when the connection closed while it was being set up: on a
# TLS channel, most often a scheduler that wants a client certificate it
# can trust; on a plain one, a scheduler that speaks only TLS.
CLOSED_WHILE_CONNECTING = "closed while connecting"
DOES_NOT_RESOLVE = "the name does not resolve"
_TLS_FAILURE = re.compile(
    r"(tls|ssl) handshake failed|hostname verification|certificate_verify_failed", re.I
)
_RESOLVE_FAILURE = re.compile(r"DNS resolution failed|errors resolving|hostname lookup", re.I)


def _details(error: grpc.RpcError) -> str:
    return str(error.details() or "")


def is_tls_failure(error: grpc.RpcError) -> bool:
    """Whether this side refused the other in the TLS handshake: an
    untrusted or expired certificate, one for another host name, or a
    server without TLS. (A server that refuses this side's certificate only
    closes the connection: see CLOSED_WHILE_CONNECTING.)"""
    return error.code() is grpc.StatusCode.UNAVAILABLE and bool(
        _TLS_FAILURE.search(_details(error))
    )


def does_not_resolve(error: grpc.RpcError) -> bool:
    return error.code() is grpc.StatusCode.UNAVAILABLE and bool(
        _RESOLVE_FAILURE.search(_details(error))
    )


def nobody_there(error: grpc.RpcError) -> bool:
    """Nothing listens at the address (or its name does not resolve), as
    opposed to a server that answered, dropped the call or is a standby."""
    return "failed to connect" in _details(error) or does_not_resolve(error)


def tls_reason(details: str) -> str:
    if "WRONG_VERSION_NUMBER" in details:
        return "the scheduler does not speak TLS here"
    if "Hostname Verification" in details:
        return "its certificate is not for this host name or address"
    if "expired" in details:
        return "its certificate has expired"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return "its certificate is not signed by the CA in --ca-cert"
    return details.rsplit("OPENSSL_internal:", 1)[-1].removesuffix(": OK")


def transport_detail(error: grpc.RpcError) -> str:
    """What went wrong, in a few words: the server's details, or the gist of
    what the transport said."""
    code: grpc.StatusCode = error.code()
    details = _details(error) or code.name
    if "Connection refused" in details:
        return "connection refused"
    if does_not_resolve(error):
        return DOES_NOT_RESOLVE
    if is_tls_failure(error):
        return f"TLS handshake failed: {tls_reason(details)}"
    if "Socket closed" in details or "Connection reset" in details:
        return CLOSED_WHILE_CONNECTING if "failed to connect" in details else "connection lost"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "did not answer in time"
    return details


def hint(detail: str, *, tls: bool, cert_flags: str) -> str:
    """What to do about a `transport_detail`, or "" when it says enough.
    `tls`: whether this side dialed with TLS; `cert_flags`: the flags of
    this side's own certificate (--client-cert for a client, --tls-cert for
    a node)."""
    if detail == CLOSED_WHILE_CONNECTING:
        if tls:
            return (
                "a scheduler with mutual TLS closes connections without a certificate "
                f"from its CA: check {cert_flags}"
            )
        return "a scheduler with TLS closes plain-text connections: pass --ca-cert"
    if detail.startswith("TLS handshake failed"):
        return "check --ca-cert"
    if detail == DOES_NOT_RESOLVE:
        return "check the host name"
    return ""


def cannot_mend(detail: str) -> bool:
    """Whether waiting cannot mend this failure, as it can a scheduler that
    is still starting (connection refused) or a dropped connection."""
    return detail in (CLOSED_WHILE_CONNECTING, DOES_NOT_RESOLVE) or detail.startswith(
        "TLS handshake failed"
    )


class GaveUp(Exception):
    """An agent that never got through stops: the message says why and what
    to do, in one line."""


class FirstContact:
    """An agent's dials until it first gets through (see the module's
    docstring). `failed()` gives the line to log for each failure, and
    raises GaveUp once every address has failed in a way waiting cannot
    mend for `window` seconds."""

    def __init__(
        self,
        addresses: list[str],
        window: float,
        *,
        tls: bool,
        cert_flags: str = "--tls-cert and --tls-key",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addresses = addresses
        self.window = window
        self.tls = tls
        self.cert_flags = cert_flags
        self.clock = clock
        self.ever_reached = False
        self._since: float | None = None
        self._last: dict[str, str] = {}

    def reached(self) -> None:
        self.ever_reached = True
        self._since = None
        self._last.clear()

    def failed(self, address: str, error: grpc.RpcError) -> str:
        detail = transport_detail(error)
        advice = hint(detail, tls=self.tls, cert_flags=self.cert_flags)
        line = f"scheduler {address}: {detail}" + (f"; {advice}" if advice else "")
        if self.ever_reached:
            return line
        self._last[address] = detail
        if not all(cannot_mend(self._last.get(a, "")) for a in self.addresses):
            self._since = None
            return line
        now = self.clock()
        if self._since is None:
            self._since = now
        if now - self._since >= self.window:
            raise GaveUp(f"{line} (gave up after {self.window:g}s; see --reconnect-timeout)")
        return line
