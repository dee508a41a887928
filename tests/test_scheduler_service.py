"""The scheduler over real gRPC, driven by the SDK on one side and a scripted
agent on the other: assignment, uploads, fencing of stale attempts, cancel,
retries, watch replay, identity and input checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from client import (
    AsyncClient,
    Event,
    ImageEvent,
    InvalidArgumentError,
    Job,
    NotFoundError,
    PreviewEvent,
    RejectedError,
    StateEvent,
)
from harness.waiting import until_async
from protos import agent_pb2, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.factories import make_png
from tests.scripted import ScriptedAgent, hello, running_scheduler

SUCCEEDED = agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED
FAILED = agent_pb2.ATTEMPT_OUTCOME_FAILED
PNG, OTHER_PNG = make_png(64, 64, shade=1), make_png(64, 64, shade=2)


def run(
    scenario: Callable[[int, AsyncClient], Coroutine[Any, Any, None]],
    tmp_path: Path,
    db_url: str = "",
) -> None:
    async def main() -> None:
        async with (
            running_scheduler(tmp_path / "scheduler", db_url, heartbeat_seconds=0.5) as server,
            AsyncClient(f"127.0.0.1:{server.port}", user="alice", timeout=5) as client,
        ):
            await scenario(server.port, client)

    asyncio.run(main())


async def events_of(client: AsyncClient, job_id: str, after_seq: int = 0) -> list[Event]:
    return [event async for event in client.watch(job_id, after_seq)]


def test_a_job_goes_through_an_agent_and_its_image_comes_back(tmp_path: Path, db_url: str) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        agent = ScriptedAgent(port, "n1")
        welcome = await agent.connect()
        assert welcome.welcome.heartbeat_seconds == 0.5
        handle = await client.submit("a lighthouse", width=64, height=64, steps=4, batch_size=2)
        watching = asyncio.create_task(events_of(client, handle.id))
        job = await agent.assignment()
        assert handle.last_known is not None
        assert (job.job_id, job.attempt, job.spec.seed) == (
            handle.id,
            1,
            handle.last_known.spec.seed,
        )
        agent.succeed(job, [PNG, OTHER_PNG])
        events = await asyncio.wait_for(watching, 10)
        final = await handle.refresh()
        assert final.state == "SUCCEEDED"
        assert final.owner == "alice"
        assert [e.state for e in events if isinstance(e, StateEvent)] == [
            "QUEUED",
            "ASSIGNED",
            "RUNNING",
            "SUCCEEDED",
        ]
        assert [e.image.index for e in events if isinstance(e, ImageEvent)] == [0, 1]
        assert [e.step for e in events if isinstance(e, PreviewEvent)] == [1]
        first, second = await handle.images()
        assert (first.data, second.data) == (PNG, OTHER_PNG)
        assert second.info.seed == final.spec.seed + 1
        await agent.close()

    run(scenario, tmp_path, db_url)


def test_watch_resumes_after_a_sequence_number_and_late_watchers_get_no_preview(
    tmp_path: Path,
) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        agent = ScriptedAgent(port, "n1")
        await agent.connect()
        handle = await client.submit("p", width=64, height=64, steps=4)
        agent.succeed(await agent.assignment(), [PNG])
        await until_async(handle.refresh, "the job to end", done=lambda j: j.done)
        everything = await events_of(client, handle.id)
        # A finished job's preview is gone: a late watcher gets its history.
        assert not any(isinstance(e, PreviewEvent) for e in everything)
        assert [e.seq for e in everything if e.seq] == [1, 2, 3, 4, 5]
        resumed = await events_of(client, handle.id, after_seq=3)
        assert [e.seq for e in resumed if e.seq] == [4, 5]
        assert isinstance(resumed[-1], StateEvent)
        assert resumed[-1].state == "SUCCEEDED"
        assert await events_of(client, handle.id, after_seq=5) == []
        await agent.close()

    run(scenario, tmp_path)


def test_a_stale_attempt_is_stopped_and_changes_nothing(tmp_path: Path, db_url: str) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        first = ScriptedAgent(port, "n1")
        await first.connect()
        handle = await client.submit("p", width=64, height=64, steps=4)
        old = await first.assignment()
        first.started(old)
        await until_async(handle.refresh, "RUNNING", done=lambda j: j.state == "RUNNING")
        await first.close()  # the node is lost: the job goes back with a failure
        requeued = await until_async(handle.refresh, "re-queue", done=lambda j: j.state == "QUEUED")
        assert (requeued.failures, requeued.attempt) == (1, 1)
        assert "disconnected" in requeued.reason

        second = ScriptedAgent(port, "n2")
        await second.connect()
        new = await second.assignment()
        assert new.attempt == 2

        # The first agent comes back and reports on its old attempt.
        returning = ScriptedAgent(port, "n1")
        await returning.connect()
        returning.step(old, 2)
        stop = await returning.receive()
        assert (stop.stop.job_id, stop.stop.attempt) == (old.job_id, 1)
        assert "stale" in stop.stop.reason
        returning.upload(old, 0, b"stale image")
        returning.ended(old, SUCCEEDED)

        second.succeed(new, [PNG])
        final = await until_async(handle.refresh, "the end", done=lambda j: j.done)
        assert (final.state, final.attempt, final.node_id) == ("SUCCEEDED", 2, "n2")
        [image] = await handle.images()
        assert image.data == PNG
        terminal = [
            e
            for e in await events_of(client, handle.id)
            if isinstance(e, StateEvent) and e.terminal
        ]
        assert len(terminal) == 1
        for agent in (second, returning):
            await agent.close()

    run(scenario, tmp_path, db_url)


def test_cancel_stops_the_agent_and_a_late_result_is_dropped(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        agent = ScriptedAgent(port, "n1")
        await agent.connect()
        handle = await client.submit("p", width=64, height=64, steps=4)
        job = await agent.assignment()
        agent.started(job)
        agent.step(job, 1)
        await until_async(handle.refresh, "RUNNING", done=lambda j: j.state == "RUNNING")
        cancelled = await handle.cancel()
        assert cancelled.state == "CANCELLED"
        assert cancelled.reason == "cancelled by alice"
        stop = await agent.receive()
        assert (stop.stop.job_id, stop.stop.attempt, stop.stop.reason) == (
            job.job_id,
            1,
            "cancelled by alice",
        )
        agent.upload(job, 0, PNG)  # it finished just before the stop arrived
        agent.ended(job, SUCCEEDED)
        # The slot frees when the agent reports the end: the next job is sent.
        nxt = await client.submit("next", width=64, height=64, steps=4)
        assert (await agent.assignment()).job_id == nxt.id
        final = await handle.refresh()
        assert (final.state, final.images) == ("CANCELLED", [])
        with pytest.raises(NotFoundError):
            await client.download_image(handle.id, 0)
        assert not list((tmp_path / "scheduler" / "images").rglob("*.png"))
        again = await client.cancel(handle.id)  # cancelling an ended job changes nothing
        assert again.state == "CANCELLED"
        await agent.close()

    run(scenario, tmp_path)


def test_failures_retry_and_then_fail_the_job_with_each_reason(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        agent = ScriptedAgent(port, "n1")
        await agent.connect()
        handle = await client.submit("p", width=64, height=64, steps=4)
        job = await agent.assignment()
        agent.upload(job, 0, PNG, sha256="0" * 64)  # a damaged upload
        agent.ended(job, SUCCEEDED)
        job = await agent.assignment()
        assert job.attempt == 2
        agent.ended(job, FAILED, "CUDA out of memory", "oom")
        job = await agent.assignment()
        agent.ended(job, FAILED, "RuntimeError: boom", "error")
        final = await until_async(handle.refresh, "the end", done=lambda j: j.done)
        assert (final.state, final.failures, final.attempt) == ("FAILED", 3, 3)
        assert final.reason.startswith("failed 3 times; attempt 1: host-n1: image 0: sha256")
        assert (
            "attempt 2: host-n1: CUDA out of memory; attempt 3: host-n1: RuntimeError: boom"
            in final.reason
        )
        await agent.close()

    run(scenario, tmp_path)


def test_agents_are_checked_at_hello(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        first = ScriptedAgent(port, "n1")
        await first.connect()
        duplicate = ScriptedAgent(port, "n1")
        with pytest.raises(aio.AioRpcError) as refused:
            await duplicate.connect()
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "node id n1 is already connected" in (refused.value.details() or "")
        no_hello = ScriptedAgent(port, "n2")
        with pytest.raises(aio.AioRpcError) as refused:
            await no_hello.connect(agent_pb2.AgentMessage(stats=agent_pb2.Stats()))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad_id = ScriptedAgent(port, "n3")
        with pytest.raises(aio.AioRpcError) as refused:
            await bad_id.connect(hello("bad id!"))
        assert (refused.value.details() or "").startswith("hello.node_id:")
        [node] = await client.list_nodes()
        assert (node.id, node.connected, node.models) == ("n1", True, ["tiny"])
        for agent in (first, duplicate, no_hello, bad_id):
            await agent.close()

    run(scenario, tmp_path)


def test_models_are_known_from_nodes_and_remembered(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        with pytest.raises(InvalidArgumentError, match="unknown model 'sdxl'"):
            await client.submit("p", model="sdxl")
        agent = ScriptedAgent(port, "n1", models=("tiny", "sdxl"))
        await agent.connect()
        await client.submit("p", model="sdxl")
        await agent.close()
        for _ in range(200):
            if not any(node.connected for node in await client.list_nodes()):
                break
            await asyncio.sleep(0.05)
        # Gone, but seen within the memory window: still a known model.
        await client.submit("p", model="sdxl")
        models = {m.name: m for m in await client.list_models()}
        assert models["sdxl"].node_ids == []  # no connected node holds it now
        assert models["sdxl"].weight_bytes == 2**30

    run(scenario, tmp_path)


def test_who_is_asking_comes_from_metadata(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            request = scheduler_pb2.SubmitJobRequest(spec={"prompt": "p"})  # type: ignore[arg-type]
            with pytest.raises(aio.AioRpcError) as refused:
                await stub.SubmitJob(request, metadata=(("x-sdmesh-user", "no spaces allowed"),))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (refused.value.details() or "").startswith("x-sdmesh-user:")
            anonymous = await stub.SubmitJob(request)
            assert anonymous.job.owner == "anonymous"
        bob = AsyncClient(f"127.0.0.1:{port}", user="bob")
        job = await bob.submit("p", request_id="retry-1")
        again = await bob.submit("p", request_id="retry-1")
        assert again.id == job.id
        assert (await client.submit("p", request_id="retry-1")).id != job.id  # alice's own
        assert [j.owner for j in await client.list_jobs(owner="bob")] == ["bob"]
        await bob.close()

    run(scenario, tmp_path)


def test_a_waiting_job_says_why_and_listing_pages(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        handles = [await client.submit(f"p{i}", width=64, height=64) for i in range(5)]
        waiting = await until_async(handles[0].refresh, "a reason", done=lambda j: j.reason != "")
        assert waiting.reason == "waiting: no GPUs connected"
        listed = await client.list_jobs(limit=3)
        assert [j.id for j in listed] == [h.id for h in reversed(handles)][:3]
        everything = await client.list_jobs(limit=1000)
        assert len(everything) == 5
        with pytest.raises(InvalidArgumentError, match="state: must be one of"):
            await client.list_jobs(states=["DONE"])
        with pytest.raises(NotFoundError, match="job nope not found"):
            await client.get_job("nope")

    run(scenario, tmp_path)


def _run_in_first_life(tmp_path: Path) -> str:
    """A job that is RUNNING on agent n1 when its scheduler stops."""

    async def first_life() -> str:
        async with running_scheduler(tmp_path / "scheduler") as server:
            agent = ScriptedAgent(server.port, "n1")
            await agent.connect()
            async with AsyncClient(f"127.0.0.1:{server.port}") as client:
                handle = await client.submit("p", width=64, height=64)
                agent.started(await agent.assignment())
                await until_async(handle.refresh, "RUNNING", done=lambda j: j.state == "RUNNING")
        await agent.close()  # the scheduler stopped first, with the job running
        return handle.id

    return asyncio.run(first_life())


def test_after_a_restart_the_agent_reattaches_its_job_and_delivers_the_result(
    tmp_path: Path,
) -> None:
    job_id = _run_in_first_life(tmp_path)

    async def second_life(port: int, client: AsyncClient) -> None:
        job = await client.get_job(job_id)
        assert (job.state, job.attempt, job.failures) == ("RUNNING", 1, 0)
        agent = ScriptedAgent(port, "n1")
        await agent.connect(hello("n1", held=((job_id, 1),)))
        agent.succeed(held_attempt(job), [PNG])
        final = await until_async(lambda: client.get_job(job_id), "the end", done=lambda j: j.done)
        assert (final.state, final.attempt, final.failures) == ("SUCCEEDED", 1, 0)
        await agent.close()

    run(second_life, tmp_path)


def test_after_a_restart_an_agent_back_without_its_job_has_it_requeued(tmp_path: Path) -> None:
    job_id = _run_in_first_life(tmp_path)

    async def second_life(port: int, client: AsyncClient) -> None:
        agent = ScriptedAgent(port, "n1")
        await agent.connect()  # it holds nothing: it restarted too
        assigned = await agent.assignment()
        assert (assigned.job_id, assigned.attempt) == (job_id, 2)
        job = await client.get_job(job_id)
        assert job.failures == 1
        assert job.attempts[0].reason == "node host-n1 came back without it (the agent restarted)"
        agent.succeed(assigned, [PNG])
        final = await until_async(lambda: client.get_job(job_id), "the end", done=lambda j: j.done)
        assert final.state == "SUCCEEDED"
        await agent.close()

    run(second_life, tmp_path)


def held_attempt(job: Job) -> agent_pb2.AssignedJob:
    """The attempt a reconnecting agent holds, as its assignment said."""
    spec = common_pb2.JobSpec(seed=job.spec.seed, width=job.spec.width, height=job.spec.height)
    return agent_pb2.AssignedJob(job_id=job.id, attempt=job.attempt, spec=spec)


def test_watching_past_the_end_still_ends(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        agent = ScriptedAgent(port, "n1")
        await agent.connect()
        handle = await client.submit("p", width=64, height=64, steps=4)
        job = await agent.assignment()
        agent.started(job)
        await until_async(handle.refresh, "RUNNING", done=lambda j: j.state == "RUNNING")
        watching = asyncio.create_task(events_of(client, handle.id, after_seq=50))
        agent.succeed(job, [PNG])
        assert [e for e in await asyncio.wait_for(watching, 10) if e.seq] == []
        await agent.close()

    run(scenario, tmp_path)


def test_a_result_that_cannot_be_stored_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_scheduler(tmp_path / "scheduler") as server:
            written: list[str] = []
            real_write = server.gateway.images.write

            def full_disk(job_id: str, attempt: int, index: int, data: bytes) -> str:
                if attempt == 1 and index == 1:  # the disk fills up after the first image
                    raise OSError(28, "No space left on device")
                written.append(real_write(job_id, attempt, index, data))
                return written[-1]

            server.gateway.images.write = full_disk  # type: ignore[method-assign]
            agent = ScriptedAgent(server.port, "n1")
            await agent.connect()
            async with AsyncClient(f"127.0.0.1:{server.port}") as client:
                handle = await client.submit("p", width=64, height=64, batch_size=2)
                agent.succeed(await agent.assignment(), [PNG, PNG])
                retry = await agent.assignment()  # the node is still served
                assert retry.attempt == 2
                assert (await handle.refresh()).failures == 1
                [ended] = [a for a in server.db.store.attempts(handle.id) if a.outcome]
                assert (ended.attempt, ended.outcome) == (1, "failed")
                assert "could not store the result: OSError: [Errno 28]" in ended.reason
                assert not (server.gateway.images.root / written[0]).exists()
                agent.succeed(retry, [PNG, PNG])
                assert (await handle.wait()).succeeded
            await agent.close()

    asyncio.run(main())


def test_a_selector_sends_a_job_to_the_nodes_labelled_for_it(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        plain = ScriptedAgent(port, "plain")
        pooled = ScriptedAgent(port, "pooled", labels={"pool": "sdxl"})
        await plain.connect()
        await pooled.connect()
        handle = await client.submit("p", width=64, height=64, selector={"pool": "sdxl"})
        job = await pooled.assignment()
        assert job.job_id == handle.id
        assert dict(job.spec.selector) == {"pool": "sdxl"}
        # Nobody has the "flux" pool: the job waits, and says why.
        waiting = await client.submit("q", width=64, height=64, selector={"pool": "flux"})
        job_waiting = await until_async(waiting.refresh, "a reason", done=lambda j: j.reason != "")
        assert job_waiting.reason == "waiting: 0/2 GPUs: 2 selector mismatch (pool=flux)"
        with pytest.raises(InvalidArgumentError, match=r"selector\[pool\]: value 'a b'"):
            await client.submit("p", selector={"pool": "a b"})
        for agent in (plain, pooled):
            await agent.close()

    run(scenario, tmp_path)


def test_a_job_that_can_no_longer_fit_any_gpu_fails_instead_of_waiting(tmp_path: Path) -> None:
    async def scenario(port: int, client: AsyncClient) -> None:
        agent = ScriptedAgent(port, "n1")  # one 24 GiB card
        await agent.connect()
        handle = await client.submit("p", width=1024, height=1024, memory_mode="full")
        job = await agent.assignment()
        # It ran out of memory with 20 GiB: the estimate rises to 25 GiB, more
        # than the card can ever give, so the job fails rather than wait.
        agent.send(
            job.job_id,
            job.attempt,
            ended=agent_pb2.AttemptEnded(
                outcome=FAILED,
                reason="CUDA out of memory",
                error_kind="oom",
                profile=agent_pb2.AttemptProfile(peak_vram_bytes=20 * 2**30),
            ),
        )
        final = await until_async(handle.refresh, "the end", done=lambda j: j.done)
        assert final.state == "FAILED"
        assert final.reason.startswith("fits no GPU seen recently: needs at least 26.2 GiB")
        assert final.reason.endswith("the biggest GPU is host-n1 gpu 0 with 24.0 GiB")
        # A job that needs the whole card is refused at submit: none can have it all.
        with pytest.raises(RejectedError, match="fits no GPU seen recently"):
            await client.submit("p", width=2048, height=2048, batch_size=3, memory_mode="full")
        await agent.close()

    run(scenario, tmp_path)
