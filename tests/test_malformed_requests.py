"""The malformed requests that once reached INTERNAL, each now refused as
INVALID_ARGUMENT naming its field, with only a short prefix of the input
quoted back; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from protos import agent_pb2, agent_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.scripted import running_scheduler

Stub = scheduler_pb2_grpc.SchedulerStub


def token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def deep(levels: int) -> str:
    return base64.urlsafe_b64encode(b"[" * levels + b"]" * levels).decode()


async def drain(call: Any) -> None:
    async for _ in call:
        pass


async def chunks(*items: tuple[int, bytes]) -> Any:
    for offset, data in items:
        yield common_pb2.InputChunk(offset=offset, data=data)


CASES: list[tuple[str, Callable[[Any], Awaitable[Any]], str]] = [
    (
        "a page token whose time overflows a float",
        lambda s: s.ListJobs(
            scheduler_pb2.ListJobsRequest(page_token=token(["1" + "0" * 400, "a"]))
        ),
        "page_token",
    ),
    (
        "a page token with a huge integer",
        lambda s: s.ListJobs(scheduler_pb2.ListJobsRequest(page_token=token([10**400, "a"]))),
        "page_token",
    ),
    (
        "a page token nested deeper than the parser recurses",
        lambda s: s.ListJobs(scheduler_pb2.ListJobsRequest(page_token=deep(100))),
        "page_token",
    ),
    (
        "a page token that is not base64",
        lambda s: s.ListJobs(scheduler_pb2.ListJobsRequest(page_token="%%%")),
        "page_token",
    ),
    (
        "a NUL in a job id",
        lambda s: s.GetJob(scheduler_pb2.GetJobRequest(job_id="ab\x00cd")),
        "job_id",
    ),
    (
        "a NUL in an owner",
        lambda s: s.ListJobs(scheduler_pb2.ListJobsRequest(owner="al\x00ice")),
        "owner",
    ),
    (
        "after_seq past the 32-bit column",
        lambda s: drain(
            s.WatchJob(scheduler_pb2.WatchJobRequest(job_id="0" * 16, after_seq=2**31))
        ),
        "after_seq",
    ),
    (
        "a NaN drain timeout",
        lambda s: s.DrainNode(
            scheduler_pb2.DrainNodeRequest(node="n1", timeout_seconds=float("nan"))
        ),
        "timeout_seconds",
    ),
    (
        "a negative image index",
        lambda s: drain(s.GetImage(scheduler_pb2.GetImageRequest(job_id="0" * 16, index=-1))),
        "index",
    ),
    (
        "an upload chunk at a negative offset",
        lambda s: s.UploadInput(chunks((-1, b"\x89PNG"))),
        "image",
    ),
    (
        "an upload whose second chunk starts past the first",
        lambda s: s.UploadInput(chunks((0, b"\x89PNG\r\n\x1a\n" + b"\x00" * 8), (2**62, b"x"))),
        "image",
    ),
    (
        "an upload of a megabyte of NULs",
        lambda s: s.UploadInput(chunks((0, bytes(2**20)))),
        "image",
    ),
    (
        "a megabyte job id",
        lambda s: s.CancelJob(scheduler_pb2.CancelJobRequest(job_id="x" * 2**20)),
        "job_id",
    ),
]


@pytest.mark.parametrize(("what", "call", "field"), CASES, ids=[case[0] for case in CASES])
def test_a_malformed_request_is_invalid_argument(
    tmp_path: Path, db_url: str, what: str, call: Callable[[Any], Awaitable[Any]], field: str
) -> None:
    async def scenario() -> aio.AioRpcError:
        async with (
            running_scheduler(tmp_path / "scheduler", db_url) as server,
            aio.insecure_channel(
                f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 2**24)]
            ) as channel,
        ):
            with pytest.raises(aio.AioRpcError) as raised:
                await call(Stub(channel))
            return raised.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, error.details())
    details = error.details() or ""
    assert details.startswith(field), details
    assert len(details) < 300, details  # a short prefix of the input, never all of it


@pytest.mark.parametrize(
    ("sha256", "what"),
    [
        ("", "empty"),
        ("../../etc/passwd", "a path"),
        ("A" * 64, "upper case"),
        ("a\x00" * 32, "NUL"),
    ],
)
def test_a_fetch_naming_no_sha256_is_invalid_argument(
    tmp_path: Path, db_url: str, sha256: str, what: str
) -> None:
    async def scenario() -> aio.AioRpcError:
        async with (
            running_scheduler(tmp_path / "scheduler", db_url) as server,
            aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            request = agent_pb2.FetchInputRequest(job_id="j", attempt=1, sha256=sha256)
            with pytest.raises(aio.AioRpcError) as raised:
                await drain(agent_pb2_grpc.AgentGatewayStub(channel).FetchInput(request))
            return raised.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, error.details())
    assert (error.details() or "").startswith("sha256"), error.details()
