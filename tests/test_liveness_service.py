"""Liveness and failover over real gRPC, with scripted agents: a silent
agent loses its lease, a hung card misses its progress deadline and comes
back after a health probe, a drain from the API, and two replicas on one
database, where only the leader serves and a stale leader writes nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from client import AsyncClient
from harness.waiting import until_async
from protos import agent_pb2, agent_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.server import SchedulerServer
from sdmesh.wire import is_standby, leader_hint
from tests.scripted import ScriptedAgent, hello, running_scheduler

FAST = {"heartbeat_seconds": 0.2, "lease_seconds": 1.0, "progress_deadline_seconds": 1.0}


async def keep_heartbeating(agent: ScriptedAgent, stop: asyncio.Event) -> None:
    while not stop.is_set():
        agent.heartbeat()
        await asyncio.sleep(0.1)


async def next_of(agent: ScriptedAgent, kind: str) -> agent_pb2.SchedulerMessage:
    while True:
        message = await agent.receive()
        if message.WhichOneof("body") == kind:
            return message


def test_a_silent_agent_loses_its_lease_and_its_late_result_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            running_scheduler(tmp_path / "s", **FAST) as server,  # type: ignore[arg-type]
            AsyncClient(f"127.0.0.1:{server.port}", user="alice") as client,
        ):
            agent = ScriptedAgent(server.port, "n1")
            await agent.connect()
            handle = await client.submit("p", width=64, height=64)
            job = await agent.assignment()
            agent.started(job)
            agent.step(job, 1)
            # ...and then nothing: the process was paused.
            requeued = await until_async(
                handle.refresh, "re-queued", done=lambda j: j.state == "QUEUED"
            )
            assert (requeued.attempt, requeued.failures) == (1, 1)
            assert requeued.attempts[0].outcome == "lost"
            assert requeued.attempts[0].reason.startswith("node host-n1 lost: no heartbeat for")
            # Woken up, it dials again holding the old attempt, and is told to stop it.
            late = ScriptedAgent(server.port, "n1")
            await late.connect(hello("n1", held=((job.job_id, 1),)))
            stop = await next_of(late, "stop")
            assert (stop.stop.job_id, stop.stop.attempt) == (job.job_id, 1)
            late.succeed(job, [b"late"])
            retry = await late.assignment()
            assert retry.attempt == 2
            final = await handle.refresh()
            assert final.images == [] and final.attempt == 2
            await agent.close()
            await late.close()

    asyncio.run(main())


def test_a_hung_card_misses_its_deadline_and_recovers_after_a_health_probe(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with (
            running_scheduler(tmp_path / "s", **FAST) as server,  # type: ignore[arg-type]
            AsyncClient(f"127.0.0.1:{server.port}", user="alice") as client,
        ):
            agent = ScriptedAgent(server.port, "n1")
            await agent.connect()
            stop_beats = asyncio.Event()
            beats = asyncio.create_task(keep_heartbeating(agent, stop_beats))
            handle = await client.submit("p", width=64, height=64)
            job = await agent.assignment()
            agent.started(job)
            agent.step(job, 1)  # then the card stops; the agent keeps heartbeating
            stop = await next_of(agent, "stop")
            assert stop.stop.reason == "missed its progress deadline"
            requeued = await until_async(
                handle.refresh, "re-queued", done=lambda j: j.state == "QUEUED"
            )
            assert requeued.failures == 1
            assert "no progress for" in requeued.attempts[0].reason
            [node] = await client.list_nodes()
            assert not node.devices[0].healthy
            assert "the card may be hung" in node.devices[0].health_detail
            check = await next_of(agent, "check")
            assert check.check.gpu_index == 0
            agent.report_health(0, False, "still stuck")
            check = await next_of(agent, "check")  # it asks again
            agent.report_health(0, True, "256x256 matmul")
            retry = await agent.assignment()  # healthy again: the job comes back here
            assert retry.attempt == 2
            [node] = await client.list_nodes()
            assert node.devices[0].healthy
            stop_beats.set()
            await beats
            await agent.close()

    asyncio.run(main())


def test_drain_node_stops_new_work_until_undone(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            running_scheduler(tmp_path / "s", heartbeat_seconds=0.2) as server,
            AsyncClient(f"127.0.0.1:{server.port}", user="alice") as client,
        ):
            agent = ScriptedAgent(server.port, "n1")
            await agent.connect()
            stub = scheduler_pb2_grpc.SchedulerStub(grpc.aio.insecure_channel(server.address))
            node = await stub.DrainNode(
                scheduler_pb2.DrainNodeRequest(node="host-n1", timeout_seconds=45)
            )
            assert node.draining
            drain = await next_of(agent, "drain")
            assert drain.drain.timeout_seconds == 45
            handle = await client.submit("p", width=64, height=64)
            waiting = await until_async(
                handle.refresh, "a reason", done=lambda j: "draining" in j.reason
            )
            assert waiting.state == "QUEUED"
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.DrainNode(scheduler_pb2.DrainNodeRequest(node="nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            await stub.DrainNode(scheduler_pb2.DrainNodeRequest(node="n1", undo=True))
            await next_of(agent, "resume")
            assert (await agent.assignment()).job_id == handle.id
            await agent.close()

    asyncio.run(main())


def test_a_leaving_agent_gets_no_new_work_and_is_told_so_after_what_was_sent(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with (
            running_scheduler(tmp_path / "s", heartbeat_seconds=0.2) as server,
            AsyncClient(f"127.0.0.1:{server.port}", user="alice") as client,
        ):
            agent = ScriptedAgent(server.port, "n1")
            await agent.connect()
            first = await client.submit("p", width=64, height=64)
            assignment = await agent.assignment()
            assert assignment.job_id == first.id
            agent.leaving()  # SIGTERM on the agent
            await next_of(agent, "drain")  # the scheduler's answer: nothing more comes
            second = await client.submit("q", width=64, height=64)
            waiting = await until_async(
                second.refresh, "a reason", done=lambda j: "draining" in j.reason
            )
            assert waiting.state == "QUEUED"
            # What it held it hands back, which is no failure.
            agent.ended(assignment, agent_pb2.ATTEMPT_OUTCOME_RELEASED, "agent shutting down")
            back = await until_async(
                first.refresh, "the hand-back", done=lambda j: j.state == "QUEUED"
            )
            assert (back.attempt, back.failures) == (1, 0)
            await agent.close()

    asyncio.run(main())


def test_only_the_leader_serves_and_a_standby_takes_over(tmp_path: Path, db_url: str) -> None:
    async def main() -> None:
        url = db_url or f"sqlite:///{tmp_path / 'shared.db'}"
        async with (
            running_scheduler(tmp_path / "a", url, lease_seconds=1.0) as leader,
            running_scheduler(tmp_path / "b", url, lease_seconds=1.0) as standby,
        ):
            a = scheduler_pb2_grpc.SchedulerStub(grpc.aio.insecure_channel(leader.address))
            b = scheduler_pb2_grpc.SchedulerStub(grpc.aio.insecure_channel(standby.address))
            health_a = await a.GetHealth(scheduler_pb2.GetHealthRequest())
            health_b = await b.GetHealth(scheduler_pb2.GetHealthRequest())
            assert health_a.role == scheduler_pb2.ROLE_LEADER
            assert health_b.role == scheduler_pb2.ROLE_STANDBY
            assert health_b.leader_address == leader.address
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await b.ListJobs(scheduler_pb2.ListJobsRequest())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (refused.value.details() or "").startswith("standby replica")
            # Agents and clients read that from the trailing metadata, not the text.
            assert is_standby(refused.value)
            assert leader_hint(refused.value) == leader.address
            # A stream an agent opens is turned away the same way.
            stream = agent_pb2_grpc.AgentGatewayStub(
                grpc.aio.insecure_channel(standby.address)
            ).Connect(iter([hello("n1")]))
            with pytest.raises(grpc.aio.AioRpcError) as turned_away:
                await stream.read()
            assert is_standby(turned_away.value)
            async with AsyncClient(f"{standby.address},{leader.address}") as client:
                handle = await client.submit("p", width=64, height=64)
            await leader.stop(grace=0.5)  # hands the lease over
            for _ in range(100):
                health_b = await b.GetHealth(scheduler_pb2.GetHealthRequest())
                if health_b.role == scheduler_pb2.ROLE_LEADER:
                    break
                await asyncio.sleep(0.1)
            assert (health_b.role, health_b.epoch) == (scheduler_pb2.ROLE_LEADER, 2)
            job = await b.GetJob(scheduler_pb2.GetJobRequest(job_id=handle.id))
            assert job.id == handle.id

    asyncio.run(main())


def test_a_leader_whose_lease_was_taken_commits_nothing_and_steps_down(
    tmp_path: Path, db_url: str
) -> None:
    async def main() -> None:
        url = db_url or f"sqlite:///{tmp_path / 'shared.db'}"
        async with running_scheduler(tmp_path / "a", url, lease_seconds=30.0) as old:
            stub = scheduler_pb2_grpc.SchedulerStub(grpc.aio.insecure_channel(old.address))
            spec = common_pb2.JobSpec(prompt="before", width=64, height=64)
            await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=spec), timeout=10)
            # The leader was paused past its lease and a standby took over.
            await asyncio.to_thread(takeover, old, url)
            spec.prompt = "after"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=spec), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "lost the leader lease" in (refused.value.details() or "")
            for _ in range(100):
                if not old.replica.leading:
                    break
                await asyncio.sleep(0.05)
            assert not old.replica.leading
            prompts = jobs_in(url)
            assert prompts == ["before"]

    asyncio.run(main())


def takeover(server: SchedulerServer, url: str) -> None:
    from scheduler.store.leader import LeaderLease

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE leader SET expires_at = 0"))
    assert LeaderLease(engine, "standby", "b:1").acquire(30.0, None) == server.replica.epoch + 1
    engine.dispose()


def jobs_in(url: str) -> list[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        specs = conn.execute(sa.text("SELECT spec FROM jobs")).scalars().all()
    engine.dispose()
    return [(spec if isinstance(spec, dict) else json.loads(spec))["prompt"] for spec in specs]
