"""The client's side of authentication and limits, against scripted
scheduler replicas (tests/test_client_retry.py): the API key goes with every
call, flags and SDMESH_* variables say what to send and how to dial, the
scheduler's refusals become their own errors and exit codes, and
`sdctl delete` deletes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from client import (
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SdmeshError,
)
from client.cli.main import build_parser, run
from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from sdmesh.tls import TlsFiles, make_cluster_certs, server_credentials
from sdmesh.wire import (
    MAX_SERVER_RECEIVE_BYTES,
    bearer,
    client_channel_options,
    parse_bearer,
    retry_after,
    server_options,
)
from tests.test_cli_drain_health import replicas
from tests.test_client_retry import Context, FakeScheduler, nowhere, serving

ENV = ("SDMESH_API_KEY", "SDMESH_CA_CERT", "SDMESH_CLIENT_CERT", "SDMESH_CLIENT_KEY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ENV:
        monkeypatch.delenv(variable, raising=False)


class Recording(FakeScheduler):
    """Keeps each call's metadata; deletes as the real scheduler answers:
    the images deleted, or NOT_FOUND for a job it does not have."""

    def __init__(self, name: str = "leader") -> None:
        super().__init__(name)
        self.metadata: list[dict[str, str]] = []

    async def _enter(self, method: str, request: Any, context: Context) -> None:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        await super()._enter(method, request, context)

    async def DeleteJob(
        self, request: scheduler_pb2.DeleteJobRequest, context: Context
    ) -> scheduler_pb2.DeleteJobResponse:
        await self._enter("DeleteJob", request, context)
        if request.job_id == "gone":
            await context.abort(grpc.StatusCode.NOT_FOUND, "job gone not found")
        if request.job_id == "alices":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "job alices belongs to alice")
        return scheduler_pb2.DeleteJobResponse(images_deleted=len(request.job_id) - 1)


class Refuses(FakeScheduler):
    """Refuses every call with one status, message and trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__()
        self.refusal = (code, details, trailing)

    async def _enter(self, method: str, request: Any, context: Context) -> None:
        await super()._enter(method, request, context)
        code, details, trailing = self.refusal
        await context.abort(code, details, trailing_metadata=trailing)


def run_async(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 30))


# ---- the key and the TLS files ---------------------------------------------------


def test_the_key_goes_with_every_call_beside_the_user() -> None:
    async def scenario() -> None:
        servicer = Recording()
        async with (
            serving(servicer) as address,
            AsyncClient(address, api_key="sdk_abc123", user="bob") as client,
        ):
            await client.get_job("j")
            await client.list_jobs()
            assert await client.delete("job-1") == 4
            with pytest.raises(SdmeshError):  # the fake does not script a watch
                await anext(aiter(client.watch("j")))
        assert len(servicer.metadata) == 4
        for metadata in servicer.metadata:
            assert metadata["authorization"] == "Bearer sdk_abc123"
            assert metadata["x-sdmesh-user"] == "bob"

    run_async(scenario())


def test_without_a_key_none_is_sent() -> None:
    async def scenario() -> None:
        servicer = Recording()
        async with serving(servicer) as address, AsyncClient(address, user="bob") as client:
            await client.get_job("j")
        [metadata] = servicer.metadata
        assert "authorization" not in metadata
        assert metadata["x-sdmesh-user"] == "bob"

    run_async(scenario())


def test_the_environment_gives_the_key_and_the_tls_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    certs = make_cluster_certs(tmp_path, ["localhost"], clients=("bob",))
    monkeypatch.setenv("SDMESH_API_KEY", "from-env")
    monkeypatch.setenv("SDMESH_CA_CERT", str(certs["ca"]))
    monkeypatch.setenv("SDMESH_CLIENT_CERT", str(certs["bob"]))
    monkeypatch.setenv("SDMESH_CLIENT_KEY", str(certs["bob-key"]))

    async def scenario() -> None:
        servicer = Recording()
        server = aio.server(options=server_options())
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
        credentials = server_credentials(certs["scheduler"], certs["scheduler-key"], certs["ca"])
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        try:
            async with AsyncClient(f"localhost:{port}") as client:
                assert client.tls == TlsFiles(certs["ca"], certs["bob"], certs["bob-key"])
                await client.get_job("j")  # over mutual TLS
            # A flag wins over its variable.
            async with AsyncClient(f"localhost:{port}", api_key="from-flag") as client:
                await client.get_job("j")
        finally:
            await server.stop(None)
        assert [m["authorization"] for m in servicer.metadata] == [
            "Bearer from-env", "Bearer from-flag",
        ]  # fmt: skip

    run_async(scenario())


@pytest.mark.parametrize("key", ["two words", "tab\there", "é"])
def test_a_key_that_cannot_travel_as_metadata_is_refused(key: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^--api-key: must be printable ASCII"):
        Client("127.0.0.1:1", api_key=key)


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer sdk_abc", "sdk_abc"),
        ("bearer sdk_abc", "sdk_abc"),  # the scheme in any case
        ("  Bearer   sdk_abc  ", "sdk_abc"),
        (b"Bearer sdk_abc", "sdk_abc"),
        ("Basic dXNlcjpwdw==", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_bearer(value: str | bytes | None, token: str | None) -> None:
    assert parse_bearer(value) == token


def test_bearer_is_what_parse_bearer_reads() -> None:
    assert bearer("sdk_abc") == ("authorization", "Bearer sdk_abc")
    assert parse_bearer(bearer("sdk_abc")[1]) == "sdk_abc"


# ---- refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "details", "trailing", "raised", "exit_code", "message", "wait"),
    [
        (
            grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked API key", (),
            AuthenticationError, 4,
            "not authenticated: unknown or revoked API key; pass --api-key or set SDMESH_API_KEY",
            None,
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED, "job j belongs to alice", (),
            PermissionDeniedError, 4, "not allowed: job j belongs to alice", None,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "submit rate: 50 per second for key k1",
            (("retry-after", "0.25"),), ResourceExhaustedError, 5,
            "limit reached: submit rate: 50 per second for key k1; retry in 0.25s", 0.25,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full: 20000 jobs queued", (),
            ResourceExhaustedError, 5, "limit reached: queue full: 20000 jobs queued; retry later",
            None,
        ),
    ],
)  # fmt: skip
def test_refusals_are_their_own_errors_and_are_not_retried(
    code: grpc.StatusCode,
    details: str,
    trailing: tuple[tuple[str, str], ...],
    raised: type[SdmeshError],
    exit_code: int,
    message: str,
    wait: float | None,
) -> None:
    retried: list[str] = []

    async def scenario() -> None:
        servicer = Refuses(code, details, trailing)
        async with (
            serving(servicer) as address,
            AsyncClient(address, on_retry=lambda address, error: retried.append(address)) as client,
        ):
            with pytest.raises(raised) as failed:
                await client.submit("p")
        assert (str(failed.value), failed.value.exit_code) == (message, exit_code)
        if isinstance(failed.value, ResourceExhaustedError):
            assert failed.value.retry_after == wait
        assert len(servicer.requests["SubmitJob"]) == 1
        assert retried == []

    run_async(scenario())


class _Trailing(grpc.RpcError):
    def __init__(self, *trailing: tuple[str, str]) -> None:
        self._trailing = trailing

    def trailing_metadata(self) -> Any:
        return self._trailing


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2.5", 2.5), ("0", 0.0), ("30", 30.0), ("soon", None), ("-1", None), ("nan", None),
     ("inf", None)],
)  # fmt: skip
def test_retry_after_is_a_number_of_seconds_or_nothing(value: str, seconds: float | None) -> None:
    assert retry_after(_Trailing(("retry-after", value))) == seconds
    assert retry_after(_Trailing(("other", "1"))) is None


def test_a_message_over_the_size_limit_fails_at_once() -> None:
    """The client refuses to send what the scheduler would refuse to take,
    and the scheduler refuses it too; neither is retried."""
    big = "x" * (MAX_SERVER_RECEIVE_BYTES + 1)

    async def scenario() -> None:
        servicer = FakeScheduler()
        server = aio.server(options=server_options())
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            async with AsyncClient(address) as client:
                with pytest.raises(SdmeshError, match=r"^message too large: .*Sent message larger"):
                    await client.submit(big)
            # A caller without our limits meets the scheduler's.
            options = [o for o in client_channel_options() if "send_message" not in o[0]]
            async with aio.insecure_channel(address, options=options) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    await scheduler_pb2_grpc.SchedulerStub(channel).SubmitJob(
                        scheduler_pb2.SubmitJobRequest(spec=common_pb2.JobSpec(prompt=big))
                    )
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "SubmitJob" not in servicer.requests
        finally:
            await server.stop(None)

    run_async(scenario())


# ---- delete ---------------------------------------------------------------------


def test_delete_rides_out_a_refused_address_as_every_call_does() -> None:
    async def scenario() -> None:
        servicer = Recording()
        async with serving(servicer) as address, AsyncClient([nowhere(), address]) as client:
            handle = client.job("job-12")
            assert await handle.delete() == 5
        assert [r.job_id for r in servicer.requests["DeleteJob"]] == ["job-12"]

    run_async(scenario())


def test_sdctl_delete_deletes_each_job_and_names_the_ones_it_cannot(
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer = Recording()
    with replicas(servicer) as [address]:
        code = run(
            ["--scheduler", address, "--api-key", "k1", "delete", "j", "job-1", "gone", "alices",
             "job-22", "job-1"]
        )  # fmt: skip
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "job j deleted with no images",
        "job job-1 deleted with 4 images",
        "job job-22 deleted with 5 images",
    ]
    assert err.splitlines() == [
        "error: job gone: job gone not found",
        "error: job alices: not allowed: job alices belongs to alice",
    ]
    assert code == 4  # the worst of NOT_FOUND (1) and PERMISSION_DENIED (4)
    assert [r.job_id for r in servicer.requests["DeleteJob"]] == [
        "j",
        "job-1",
        "gone",
        "alices",
        "job-22",
    ]  # fmt: skip
    assert {m["authorization"] for m in servicer.metadata} == {"Bearer k1"}


def test_sdctl_delete_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    with replicas(Recording()) as [address]:
        code = run(["--scheduler", address, "delete", "job-1", "jb", "-o", "json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [
        {"job_id": "job-1", "images_deleted": 4},
        {"job_id": "jb", "images_deleted": 1},
    ]


@pytest.mark.parametrize(
    ("code", "details", "trailing", "exit_code", "line"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, "no API key", (), 4,
         "error: not authenticated: no API key; pass --api-key or set SDMESH_API_KEY"),
        (grpc.StatusCode.PERMISSION_DENIED, "only an admin may drain a node", (), 4,
         "error: not allowed: only an admin may drain a node"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "bob has 1000 jobs queued (at most 1000)",
         (("retry-after", "2"),), 5,
         "error: limit reached: bob has 1000 jobs queued (at most 1000); retry in 2s"),
    ],
)  # fmt: skip
def test_sdctl_exits_4_or_5_with_one_line(
    capsys: pytest.CaptureFixture[str],
    code: grpc.StatusCode,
    details: str,
    trailing: tuple[tuple[str, str], ...],
    exit_code: int,
    line: str,
) -> None:
    with replicas(Refuses(code, details, trailing)) as [address]:
        assert run(["--scheduler", address, "jobs"]) == exit_code
    assert capsys.readouterr().err.splitlines() == [line]


# ---- flags -----------------------------------------------------------------------


CLIENT = ["--api-key", "k1", "--ca-cert", "ca.pem", "--client-cert", "me.pem",
          "--client-key", "me-key.pem"]  # fmt: skip


@pytest.mark.parametrize("command", [["jobs"], ["delete", "a", "b"], ["submit", "p"]])
def test_the_client_flags_go_before_or_after_the_command(command: list[str]) -> None:
    parser = build_parser()
    before = parser.parse_args([*CLIENT, *command])
    after = parser.parse_args([*command, *CLIENT])
    assert vars(before) == vars(after)
    assert (after.api_key, after.ca_cert, after.client_cert, after.client_key) == (
        "k1", Path("ca.pem"), Path("me.pem"), Path("me-key.pem"),
    )  # fmt: skip
    # Left out, they are not there at all: the client reads the environment.
    bare = vars(parser.parse_args(command))
    assert not {"api_key", "ca_cert", "client_cert", "client_key"} & set(bare)


def test_a_server_command_keeps_its_own_tls_flags() -> None:
    parser = build_parser()
    node = parser.parse_args(["node", "--ca-cert", "ca.pem", "--tls-cert", "n.pem"])
    assert (node.ca_cert, node.tls_cert) == (Path("ca.pem"), Path("n.pem"))
    assert not hasattr(parser.parse_args(["node"]), "ca_cert")
    with pytest.raises(SystemExit):
        parser.parse_args(["scheduler", "--api-key", "k1"])  # a client's flag
