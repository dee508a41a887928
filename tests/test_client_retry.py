"""The client's side of failover, at the gRPC boundary: scripted Scheduler
servicers on real in-process gRPC servers refuse, answer as a standby, drop
replies and break streams, and the SDK must move between addresses, resend a
submit with the same request id, resume a watch without duplicates or gaps,
and give up in time, naming what it tried."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc import aio

from client import (
    AsyncClient,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ProgressEvent,
    RejectedError,
    SdmeshError,
    StateEvent,
    UnavailableError,
)
from harness.processes import free_port
from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from sdmesh.convert import spec_request_from_proto, spec_to_proto
from sdmesh.spec import resolve
from sdmesh.wire import standby_metadata

Context = aio.ServicerContext[Any, Any]
STANDBY = "standby replica r2 (127.0.0.1:2): no replica holds the leader lease yet"


def job(
    job_id: str,
    state: common_pb2.JobState.ValueType = common_pb2.JOB_STATE_UNSPECIFIED,
    spec: common_pb2.JobSpec | None = None,
) -> scheduler_pb2.Job:
    """A job as a scheduler sends it: its spec resolved, every field set."""
    resolved = resolve(
        spec_request_from_proto(spec or common_pb2.JobSpec(prompt="p")),
        known_models=(),
        random_seed=lambda: 7,
    )
    return scheduler_pb2.Job(id=job_id, state=state, spec=spec_to_proto(resolved))  # fmt: skip


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """A scheduler replica reduced to what the client's retries can see.
    Records every request by method; a standby answers only GetHealth."""

    def __init__(self, name: str = "leader", *, standby: bool = False, leader: str = "") -> None:
        self.name = name
        self.standby = standby
        self.leader = leader  # the address a standby names as the leader's
        self.requests: dict[str, list[Any]] = {}
        self.jobs: dict[str, scheduler_pb2.Job] = {}  # by request id
        self.inputs: dict[str, bytes] = {}  # uploaded input images, by sha256

    async def _enter(self, method: str, request: Any, context: Context) -> None:
        self.requests.setdefault(method, []).append(request)
        if self.standby:
            trailing = standby_metadata(self.leader) if self.leader else ()
            await context.abort(grpc.StatusCode.UNAVAILABLE, STANDBY, trailing_metadata=trailing)

    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: Context
    ) -> scheduler_pb2.SubmitJobResponse:
        await self._enter("SubmitJob", request, context)
        return self.commit(request)

    def commit(self, request: scheduler_pb2.SubmitJobRequest) -> scheduler_pb2.SubmitJobResponse:
        """Deduplicates by request id, as the real scheduler does per owner."""
        key = request.spec.request_id
        created = key not in self.jobs
        if created:
            self.jobs[key] = job(
                f"job-{len(self.jobs) + 1}", common_pb2.JOB_STATE_QUEUED, request.spec
            )
        return scheduler_pb2.SubmitJobResponse(job=self.jobs[key], created=created)

    async def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: Context
    ) -> scheduler_pb2.Job:
        await self._enter("GetJob", request, context)
        return job(request.job_id, common_pb2.JOB_STATE_RUNNING)

    async def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: Context
    ) -> scheduler_pb2.ListJobsResponse:
        await self._enter("ListJobs", request, context)
        return scheduler_pb2.ListJobsResponse(jobs=[job(f"from-{self.name}")])

    async def DrainNode(
        self, request: scheduler_pb2.DrainNodeRequest, context: Context
    ) -> scheduler_pb2.Node:
        await self._enter("DrainNode", request, context)
        return scheduler_pb2.Node(
            id="n1", name=request.node, connected=True, draining=not request.undo
        )

    async def WatchJob(
        self, request: scheduler_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[common_pb2.JobEvent]:
        await self._enter("WatchJob", request, context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        yield common_pb2.JobEvent()  # never reached; makes this a stream

    async def GetImage(
        self, request: scheduler_pb2.GetImageRequest, context: Context
    ) -> AsyncIterator[scheduler_pb2.ImageChunk]:
        await self._enter("GetImage", request, context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        yield scheduler_pb2.ImageChunk()

    async def CancelJob(
        self, request: scheduler_pb2.CancelJobRequest, context: Context
    ) -> scheduler_pb2.Job:
        await self._enter("CancelJob", request, context)
        return job(request.job_id, common_pb2.JOB_STATE_CANCELLED)

    async def DeleteJob(
        self, request: scheduler_pb2.DeleteJobRequest, context: Context
    ) -> scheduler_pb2.DeleteJobResponse:
        await self._enter("DeleteJob", request, context)
        return scheduler_pb2.DeleteJobResponse(images_deleted=2)

    async def ListNodes(
        self, request: scheduler_pb2.ListNodesRequest, context: Context
    ) -> scheduler_pb2.ListNodesResponse:
        await self._enter("ListNodes", request, context)
        return scheduler_pb2.ListNodesResponse()

    async def ListModels(
        self, request: scheduler_pb2.ListModelsRequest, context: Context
    ) -> scheduler_pb2.ListModelsResponse:
        await self._enter("ListModels", request, context)
        return scheduler_pb2.ListModelsResponse()

    async def UploadInput(
        self, chunks: AsyncIterator[common_pb2.InputChunk], context: Context
    ) -> common_pb2.InputInfo:
        """Keeps the bytes by sha256, as the real scheduler does; records
        the chunks of each upload as one request."""
        received = [chunk async for chunk in chunks]
        await self._enter("UploadInput", received, context)
        data = b"".join(chunk.data for chunk in received)
        sha = hashlib.sha256(data).hexdigest()
        self.inputs[sha] = data
        return common_pb2.InputInfo(sha256=sha, size_bytes=len(data), format="PNG")

    async def GetHealth(
        self, request: scheduler_pb2.GetHealthRequest, context: Context
    ) -> scheduler_pb2.Health:
        self.requests.setdefault("GetHealth", []).append(request)
        role = scheduler_pb2.ROLE_STANDBY if self.standby else scheduler_pb2.ROLE_LEADER
        return scheduler_pb2.Health(role=role, epoch=7, replica_id=self.name, version="0.1.0")


@asynccontextmanager
async def serving(servicer: FakeScheduler, port: int = 0) -> AsyncIterator[str]:
    server = aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 30))


def nowhere() -> str:
    """An address where nothing listens: connections are refused."""
    return f"127.0.0.1:{free_port()}"


def state(seq: int, value: common_pb2.JobState.ValueType, attempt: int = 1) -> common_pb2.JobEvent:
    return common_pb2.JobEvent(
        job_id="j", seq=seq, attempt=attempt, state=common_pb2.StateChange(state=value)
    )


def progress(step: int) -> common_pb2.JobEvent:
    return common_pb2.JobEvent(
        job_id="j", attempt=1, progress=common_pb2.Progress(step=step, total_steps=4)
    )


def image(seq: int) -> common_pb2.JobEvent:
    return common_pb2.JobEvent(job_id="j", seq=seq, attempt=1, image=common_pb2.ImageInfo(index=0))


Retries = list[tuple[str, SdmeshError]]


def recorder() -> tuple[Retries, Callable[[str, SdmeshError], None]]:
    seen: Retries = []
    return seen, lambda address, error: seen.append((address, error))


def test_a_refused_address_is_skipped_for_the_next() -> None:
    async def scenario() -> None:
        leader = FakeScheduler()
        dead = nowhere()
        async with serving(leader) as live:
            retries, hook = recorder()
            async with AsyncClient([dead, live], on_retry=hook) as client:
                assert [job.id for job in await client.list_jobs()] == ["from-leader"]
                assert client.address == live
                await client.get_job("j")  # goes straight to the one that answered
            [(address, error)] = retries
            assert address == dead
            assert str(error) == f"scheduler {dead} unreachable: connection refused"
            assert len(leader.requests["ListJobs"]) == 1

    run(scenario())


def test_a_standby_that_names_the_leader_sends_the_client_straight_there() -> None:
    async def scenario() -> None:
        leader, other = FakeScheduler(), FakeScheduler("other", standby=True)
        async with serving(leader) as leading, serving(other) as second:
            standby = FakeScheduler("standby", standby=True, leader=leading)
            async with serving(standby) as first, AsyncClient([first, second, leading]) as client:
                assert (await client.get_job("j")).state == "RUNNING"
                assert client.address == leading
            # The replica between the two was never asked.
            assert other.requests == {}
            assert len(standby.requests["GetJob"]) == 1

    run(scenario())


def test_a_standby_sends_the_client_on_to_the_leader() -> None:
    async def scenario() -> None:
        standby, leader = FakeScheduler("standby", standby=True), FakeScheduler()
        async with serving(standby) as first, serving(leader) as second:
            retries, hook = recorder()
            async with AsyncClient(f"{first},{second}", on_retry=hook) as client:
                job = await client.get_job("j")
                assert job.state == "RUNNING"
                assert client.address == second
                health = await client.health(first)  # a standby still answers this
                assert (health.role, health.leader, health.address) == ("standby", False, first)
            assert [address for address, _ in retries] == [first]
            assert str(retries[0][1]) == f"scheduler {first} unreachable: {STANDBY}"
            assert len(standby.requests["GetJob"]) == len(leader.requests["GetJob"]) == 1

    run(scenario())


def test_a_submit_whose_reply_was_lost_returns_the_same_job() -> None:
    class LosesFirstReply(FakeScheduler):
        async def SubmitJob(
            self, request: scheduler_pb2.SubmitJobRequest, context: Context
        ) -> scheduler_pb2.SubmitJobResponse:
            await self._enter("SubmitJob", request, context)
            response = self.commit(request)  # committed, then the connection drops
            if len(self.requests["SubmitJob"]) == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            return response

    async def scenario() -> None:
        servicer = LosesFirstReply()
        async with serving(servicer) as address, AsyncClient(address) as client:
            handle = await client.submit("a lighthouse")
        first, second = servicer.requests["SubmitJob"]
        assert first.spec.request_id == second.spec.request_id != ""
        [job] = servicer.jobs.values()
        assert handle.id == job.id

    run(scenario())


def test_a_submit_that_timed_out_is_sent_again_with_the_same_request_id() -> None:
    class SlowFirstReply(FakeScheduler):
        async def SubmitJob(
            self, request: scheduler_pb2.SubmitJobRequest, context: Context
        ) -> scheduler_pb2.SubmitJobResponse:
            await self._enter("SubmitJob", request, context)
            response = self.commit(request)
            if len(self.requests["SubmitJob"]) == 1:
                await asyncio.sleep(2)  # past the client's deadline
            return response

        async def GetJob(
            self, request: scheduler_pb2.GetJobRequest, context: Context
        ) -> scheduler_pb2.Job:
            await self._enter("GetJob", request, context)
            await asyncio.sleep(2)
            return job(request.job_id)

    async def scenario() -> None:
        servicer = SlowFirstReply()
        async with serving(servicer) as address, AsyncClient(address, timeout=0.3) as client:
            handle = await client.submit("a lighthouse", request_id="mine")
            with pytest.raises(UnavailableError, match="did not answer in time"):
                await client.get_job("j")  # a read is not sent again after a deadline
        assert len(servicer.requests["GetJob"]) == 1
        assert [r.spec.request_id for r in servicer.requests["SubmitJob"]] == ["mine", "mine"]
        assert handle.id == servicer.jobs["mine"].id

    run(scenario())


def test_a_watch_resumes_after_the_last_durable_event() -> None:
    running, succeeded = common_pb2.JOB_STATE_RUNNING, common_pb2.JOB_STATE_SUCCEEDED
    streams = [
        # Breaks mid-way, as a killed scheduler's stream does.
        [state(1, common_pb2.JOB_STATE_QUEUED), state(2, common_pb2.JOB_STATE_ASSIGNED),
         progress(1), state(3, running), progress(2), "break"],
        # Replays one event too many, then ends without the terminal state.
        [state(3, running), progress(3), image(4), "end"],
        [progress(4), state(5, succeeded), "end"],
    ]  # fmt: skip

    class Breaks(FakeScheduler):
        async def WatchJob(
            self, request: scheduler_pb2.WatchJobRequest, context: Context
        ) -> AsyncIterator[common_pb2.JobEvent]:
            await self._enter("WatchJob", request, context)
            for item in streams[len(self.requests["WatchJob"]) - 1]:
                if item == "break":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
                elif item == "end":
                    return
                else:
                    assert isinstance(item, common_pb2.JobEvent)
                    yield item

    async def scenario() -> None:
        servicer = Breaks()
        retries, hook = recorder()
        async with serving(servicer) as address, AsyncClient(address, on_retry=hook) as client:
            events = [event async for event in client.watch("j")]
        assert [r.after_seq for r in servicer.requests["WatchJob"]] == [0, 3, 4]
        assert [e.seq for e in events if e.seq] == [1, 2, 3, 4, 5]
        assert [e.step for e in events if isinstance(e, ProgressEvent)] == [1, 2, 3, 4]
        assert [e.state for e in events if isinstance(e, StateEvent) and e.terminal] == [
            "SUCCEEDED"
        ]
        assert events[-1].seq == 5
        assert len(servicer.requests["GetJob"]) == 1  # asked whether the job had ended
        assert [str(error).split(": ", 1)[1] for _, error in retries] == [
            "connection lost",
            "the stream of job j ended early",
        ]

    run(scenario())


def test_a_watch_past_the_end_ends_without_reconnecting() -> None:
    class Ended(FakeScheduler):
        async def WatchJob(
            self, request: scheduler_pb2.WatchJobRequest, context: Context
        ) -> AsyncIterator[common_pb2.JobEvent]:
            await self._enter("WatchJob", request, context)
            for _ in ():
                yield state(0, common_pb2.JOB_STATE_UNSPECIFIED)

        async def GetJob(
            self, request: scheduler_pb2.GetJobRequest, context: Context
        ) -> scheduler_pb2.Job:
            await self._enter("GetJob", request, context)
            return job(request.job_id, common_pb2.JOB_STATE_SUCCEEDED)

    async def scenario() -> None:
        servicer = Ended()
        async with serving(servicer) as address, AsyncClient(address) as client:
            assert [event async for event in client.watch("j", after_seq=50)] == []
        assert len(servicer.requests["WatchJob"]) == 1

    run(scenario())


def test_a_broken_image_download_starts_over() -> None:
    png = b"\x89PNG" + bytes(range(256)) * 8

    class BreaksOnce(FakeScheduler):
        async def GetImage(
            self, request: scheduler_pb2.GetImageRequest, context: Context
        ) -> AsyncIterator[scheduler_pb2.ImageChunk]:
            await self._enter("GetImage", request, context)
            info = common_pb2.ImageInfo(index=0, sha256=hashlib.sha256(png).hexdigest())
            yield scheduler_pb2.ImageChunk(info=info, data=png[:100])
            if len(self.requests["GetImage"]) == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            yield scheduler_pb2.ImageChunk(offset=100, data=png[100:])

    async def scenario() -> None:
        servicer = BreaksOnce()
        async with serving(servicer) as address, AsyncClient(address) as client:
            assert (await client.download_image("j", 0)).data == png
        assert len(servicer.requests["GetImage"]) == 2

    run(scenario())


def test_a_restarted_scheduler_is_waited_for_on_the_same_address() -> None:
    async def scenario() -> None:
        port = free_port()
        retrying = asyncio.Event()
        async with AsyncClient(f"127.0.0.1:{port}", on_retry=lambda *_: retrying.set()) as client:
            async with serving(FakeScheduler("first"), port):
                assert [job.id for job in await client.list_jobs()] == ["from-first"]
            listing = asyncio.create_task(client.list_jobs())
            await retrying.wait()  # the scheduler is down, and the client keeps trying
            async with serving(FakeScheduler("second"), port):
                assert [job.id for job in await listing] == ["from-second"]

    run(scenario())


def test_it_gives_up_after_the_reconnect_timeout_naming_every_address() -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            standbys = [FakeScheduler(f"s{i}", standby=True) for i in range(2)]
            addresses = [await stack.enter_async_context(serving(s)) for s in standbys]
            client = await stack.enter_async_context(AsyncClient(addresses, reconnect_timeout=0.8))
            started = time.monotonic()
            with pytest.raises(UnavailableError) as failed:
                await client.list_jobs()
            waited = time.monotonic() - started
        assert 0.8 <= waited < 4, waited
        message = str(failed.value)
        assert message.startswith(f"schedulers {addresses[0]}, {addresses[1]} unreachable: ")
        assert f"{addresses[0]}: {STANDBY}; {addresses[1]}: {STANDBY}" in message
        assert re.search(r" \(retried for [\d.]+s\)$", message), message
        assert all(len(s.requests["ListJobs"]) >= 2 for s in standbys)

    run(scenario())


def test_a_client_that_never_reached_a_scheduler_fails_after_one_pass() -> None:
    async def scenario() -> None:
        first, second = nowhere(), nowhere()
        async with AsyncClient(f"{first}, {second}", reconnect_timeout=60) as client:
            assert client.addresses == [first, second]
            started = time.monotonic()
            with pytest.raises(UnavailableError) as failed:
                await client.get_job("j")
            assert time.monotonic() - started < 2
        assert str(failed.value) == (
            f"schedulers {first}, {second} unreachable: "
            f"{first}: connection refused; {second}: connection refused"
        )

    run(scenario())


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, RejectedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.INTERNAL, SdmeshError),
    ],
)
def test_answers_other_than_unavailable_are_not_retried(
    code: grpc.StatusCode, raised: type[SdmeshError]
) -> None:
    class Refuses(FakeScheduler):
        async def _enter(self, method: str, request: Any, context: Context) -> None:
            self.requests.setdefault("refused", []).append(request)
            await context.abort(code, f"{method}: no")

    async def scenario() -> None:
        servicer, retries, hook = Refuses(), *recorder()
        async with serving(servicer) as address, AsyncClient(address, on_retry=hook) as client:
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: client.submit("p"),
                lambda: client.get_job("j"),
                lambda: client.drain_node("n"),
                lambda: client.delete("j"),
                lambda: anext(aiter(client.watch("j"))),
            ]
            for call in calls:
                with pytest.raises(raised) as failed:
                    await call()
                assert type(failed.value) is raised
                assert str(failed.value).endswith(": no")
        assert len(servicer.requests["refused"]) == len(calls)
        assert retries == []

    run(scenario())


def test_drain_and_health_speak_the_protocol() -> None:
    async def scenario() -> None:
        dead = nowhere()
        leader = FakeScheduler("replica-a")
        async with serving(leader) as live, AsyncClient([dead, live]) as client:
            node = await client.drain_node("gpu-1", timeout=90)
            assert (node.name, node.draining) == ("gpu-1", True)
            undone = await client.drain_node("gpu-1", undo=True)
            assert not undone.draining
            health = await client.health()  # the first address that answers
            assert (health.address, health.role, health.epoch) == (live, "leader", 7)
            assert (health.replica_id, health.version, health.leader) == (
                "replica-a",
                "0.1.0",
                True,
            )
            with pytest.raises(UnavailableError, match=f"scheduler {dead} unreachable"):
                await client.health(dead)  # one address, asked once
            with pytest.raises(InvalidArgumentError, match="timeout: must be positive"):
                await client.drain_node("gpu-1", timeout=0)
        drained, undrained = leader.requests["DrainNode"]
        assert (drained.node, drained.timeout_seconds, drained.undo) == ("gpu-1", 90.0, False)
        assert (undrained.timeout_seconds, undrained.undo) == (0.0, True)

    run(scenario())
