"""What a failed dial means and what to do about it (`sdmesh.dialing`), the
addresses sdctl and agents accept (`sdmesh.wire.check_address`), database
URLs (`scheduler.config.parse_database_url`), and a port a server cannot
share."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from grpc import aio

from client._errors import from_rpc_error, unreachable
from scheduler.config import parse_database_url
from sdmesh.dialing import (
    CLOSED_WHILE_CONNECTING,
    DOES_NOT_RESOLVE,
    FirstContact,
    GaveUp,
    cannot_mend,
    transport_detail,
)
from sdmesh.wire import check_address, port_taken, server_options


class Failed(grpc.RpcError):
    """An RpcError as grpc raises one, with the details its transport gives."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(details)
        self._details, self._code = details, code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


REFUSED = Failed(
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
    "Connection refused"
)
PLAIN_TO_TLS = Failed(
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
)
NO_SUCH_NAME = Failed(
    "errors resolving nosuch.invalid:1: [field:hostname lookup error:address lookup failed "
    "for nosuch.invalid:1: Domain name not found]"
)
OLD_NO_SUCH_NAME = Failed("DNS resolution failed for nosuch.invalid:1: C-ares status")
WRONG_CA = Failed(
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Ssl handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
    "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED"
)
DROPPED = Failed("Socket closed")


@pytest.mark.parametrize(
    ("error", "detail", "mends"),
    [
        (REFUSED, "connection refused", True),  # still starting, perhaps
        (PLAIN_TO_TLS, CLOSED_WHILE_CONNECTING, False),
        (NO_SUCH_NAME, DOES_NOT_RESOLVE, False),
        (OLD_NO_SUCH_NAME, DOES_NOT_RESOLVE, False),
        (
            WRONG_CA,
            "TLS handshake failed: its certificate is not signed by the CA in --ca-cert",
            False,
        ),
        (DROPPED, "connection lost", True),
    ],
)
def test_what_each_failure_means(error: Failed, detail: str, mends: bool) -> None:
    assert transport_detail(error) == detail
    assert cannot_mend(detail) is not mends


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_agent_that_never_got_through_gives_up_on_a_tls_mismatch_after_its_window() -> None:
    clock = Clock()
    contact = FirstContact(["a:1"], 60.0, tls=False, clock=clock)
    line = contact.failed("a:1", PLAIN_TO_TLS)
    assert line == (
        "scheduler a:1: closed while connecting; a scheduler with TLS closes plain-text "
        "connections: pass --ca-cert"
    )
    clock.now += 59.9
    contact.failed("a:1", PLAIN_TO_TLS)  # within the window: it tries on
    clock.now += 0.1
    with pytest.raises(
        GaveUp, match=r"pass --ca-cert \(gave up after 60s; see --reconnect-timeout\)"
    ):
        contact.failed("a:1", PLAIN_TO_TLS)


def test_with_tls_the_hint_is_about_its_own_certificate() -> None:
    contact = FirstContact(["a:1"], 60.0, tls=True)
    assert contact.failed("a:1", PLAIN_TO_TLS).endswith(
        "a scheduler with mutual TLS closes connections without a certificate from its CA: "
        "check --tls-cert and --tls-key"
    )


def test_a_scheduler_that_is_not_up_yet_is_waited_for_as_long_as_it_takes() -> None:
    clock = Clock()
    contact = FirstContact(["a:1"], 1.0, tls=False, clock=clock)
    for _ in range(100):
        clock.now += 10
        assert contact.failed("a:1", REFUSED) == "scheduler a:1: connection refused"


def test_one_replica_that_may_come_up_keeps_the_agent_trying() -> None:
    clock = Clock()
    contact = FirstContact(["a:1", "b:2"], 1.0, tls=False, clock=clock)
    for _ in range(10):
        clock.now += 10
        contact.failed("a:1", PLAIN_TO_TLS)
        contact.failed("b:2", REFUSED)
    clock.now += 10
    contact.failed("a:1", NO_SUCH_NAME)  # b's last word still was "refused"
    contact.failed("b:2", NO_SUCH_NAME)  # now every address is hopeless: the window starts
    clock.now += 1
    with pytest.raises(GaveUp):
        contact.failed("a:1", NO_SUCH_NAME)


def test_an_agent_that_got_through_once_never_gives_up() -> None:
    clock = Clock()
    contact = FirstContact(["a:1"], 1.0, tls=False, clock=clock)
    contact.reached()
    for _ in range(10):
        clock.now += 10
        assert "pass --ca-cert" in contact.failed("a:1", PLAIN_TO_TLS)


def test_the_sdk_gives_each_hint_once() -> None:
    assert str(unreachable({"x:1": DOES_NOT_RESOLVE})) == (
        "scheduler x:1 unreachable: the name does not resolve; check the host name"
    )
    assert str(unreachable({"x:1": CLOSED_WHILE_CONNECTING}, tls=False)).endswith(
        "closes plain-text connections: pass --ca-cert"
    )
    assert str(unreachable({"x:1": CLOSED_WHILE_CONNECTING})) == (
        "scheduler x:1 unreachable: closed while connecting"  # reached before: no guess
    )
    # The scheduler's own message already says how to give a key: once is enough.
    told = Failed(
        "this scheduler needs an API key: pass --api-key or set SDMESH_API_KEY",
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert str(from_rpc_error(told, "x:1")).count("SDMESH_API_KEY") == 1
    bare = Failed("the API key is not valid", grpc.StatusCode.UNAUTHENTICATED)
    assert str(from_rpc_error(bare, "x:1")) == (
        "not authenticated: the API key is not valid; pass --api-key or set SDMESH_API_KEY"
    )


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("sched:50051", None),
        ("10.0.0.5:50051", None),
        ("[::1]:50051", None),
        ("unix:/run/sdmesh.sock", None),
        ("dns:///sched:50051", None),
        ("sched", "'sched' has no port; give HOST:PORT, e.g. sched:50051"),
        ("::1", "'::1' has no port; give HOST:PORT, e.g. [::1]:50051"),
        ("sched:", "'sched:' has no port; give HOST:PORT, e.g. sched:50051"),
        (
            "https://sched:443/",
            "'https://sched:443/' is a URL; give HOST:PORT without https://, e.g. sched:443",
        ),
        ("sched:0", "'sched:0': the port must be a number from 1 to 65535"),
        ("sched:65536", "'sched:65536': the port must be a number from 1 to 65535"),
    ],
)
def test_addresses(address: str, problem: str | None) -> None:
    if problem is None:
        assert check_address(address) == address
    else:
        with pytest.raises(ValueError, match="^" + re.escape(problem) + "$"):
            check_address(address)


@pytest.mark.parametrize(
    ("url", "read_as"),
    [
        ("postgres://u:pw@db/sdmesh", "postgresql+psycopg://u:pw@db/sdmesh"),
        ("postgresql://u@db:6432/sdmesh", "postgresql+psycopg://u@db:6432/sdmesh"),
        ("PostgreSQL+psycopg://u@db/x", "postgresql+psycopg://u@db/x"),
        ("sqlite:////var/lib/sdmesh/sdmesh.db", "sqlite:////var/lib/sdmesh/sdmesh.db"),
    ],
)
def test_database_urls_in_the_spellings_people_use(url: str, read_as: str) -> None:
    assert parse_database_url(url) == read_as


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("db-host/sdmesh", "expected a database URL like postgresql://USER@HOST/DATABASE"),
        ("mysql://u:secret@db/x", "mysql:// is not a database sdmesh supports"),
        ("postgresql+psycopg2://u:secret@db/x", "write postgresql://u:***@db/x"),
    ],
)
def test_database_urls_that_cannot_work_say_so_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as raised:
        parse_database_url(url)
    assert "secret" not in str(raised.value)


def test_a_second_server_cannot_share_a_port() -> None:
    """gRPC's default SO_REUSEPORT would let a second scheduler bind the
    first one's port and take half its connections."""

    async def scenario() -> None:
        first = aio.server(options=server_options())
        port = first.add_insecure_port("127.0.0.1:0")
        await first.start()
        try:
            assert port_taken("127.0.0.1", port)
            second = aio.server(options=server_options())
            with pytest.raises(RuntimeError, match="Failed to bind"):
                second.add_insecure_port(f"127.0.0.1:{port}")
        finally:
            await first.stop(None)
        assert not port_taken("127.0.0.1", port)  # free again once it stopped

    asyncio.run(scenario())
