"""Authentication and tenancy over real gRPC, against an in-process
scheduler with keys and enrollment on: API keys (none, wrong, revoked,
expired), one user's jobs hidden from another, admins, node enrollment,
a node speaking for another, a removed node, delete and retention, the
audit trail, and input images: uploaded with a key as its user's, fetched
only by the node running their job."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from PIL import Image

from harness.waiting import until_async
from protos import agent_pb2, agent_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler import auth
from scheduler.server import SchedulerServer
from scheduler.store.credentials import CredentialRegistry
from tests.scripted import ScriptedAgent, hello, running_scheduler

SUCCEEDED = agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED
Stub = scheduler_pb2_grpc.SchedulerStub


class Cluster:
    """A scheduler with auth on, its credentials, and a stub to call it."""

    def __init__(self, server: SchedulerServer, stub: Any) -> None:
        self.server = server
        self.stub = stub
        self.registry: CredentialRegistry = server.db.store.credentials
        self.keys: dict[str, str] = {}
        for user, admin in (("alice", False), ("bob", False), ("root", True)):
            self.keys[user] = self.registry.create_key(
                user, admin=admin, expires_at=None, actor="test"
            )[1].text

    def as_(self, user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[user]}"),)

    async def enrolled_agent(self, node_id: str) -> ScriptedAgent:
        token = self.registry.create_join_token(
            expires_at=self.server.clock() + 60, reusable=False, labels={"zone": "a"}, actor="t"
        )[1]
        async with aio.insecure_channel(f"127.0.0.1:{self.server.port}") as channel:
            answer = await agent_pb2_grpc.AgentGatewayStub(channel).Enroll(
                agent_pb2.EnrollRequest(join_token=token.text, node_id=node_id, name=node_id)
            )
        assert dict(answer.labels) == {"zone": "a"}
        agent = ScriptedAgent(self.server.port, node_id)
        agent.credential = answer.credential  # type: ignore[attr-defined]
        await agent.connect(metadata=node_metadata(node_id, answer.credential))
        return agent

    async def submit(self, user: str, prompt: str = "a lighthouse") -> str:
        spec = scheduler_pb2.SubmitJobRequest()
        spec.spec.prompt = prompt
        spec.spec.width = spec.spec.height = 64
        spec.spec.steps = 4
        answer = await self.stub.SubmitJob(spec, metadata=self.as_(user))
        return str(answer.job.id)


def png_of(width: int, height: int) -> bytes:
    image = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 20)).save(image, format="PNG")
    return image.getvalue()


async def refused(agent: ScriptedAgent, **connect: Any) -> grpc.StatusCode:
    """The status the scheduler ends a stream it refuses with."""
    with pytest.raises(aio.AioRpcError) as raised:
        await agent.connect(**connect)
    await agent.close()
    return raised.value.code()


def node_metadata(node_id: str, credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"), ("x-sdmesh-node", node_id))


def run(
    scenario: Callable[[Cluster], Coroutine[Any, Any, None]], tmp_path: Path, db_url: str
) -> None:
    async def main() -> None:
        async with (
            running_scheduler(
                tmp_path / "scheduler", db_url, heartbeat_seconds=0.5, no_auth=False
            ) as server,
            aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            await scenario(Cluster(server, Stub(channel)))

    asyncio.run(main())


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as raised:
        await call
    return raised.value.code()


def test_calls_without_a_valid_key_are_unauthenticated(tmp_path: Path, db_url: str) -> None:
    async def scenario(c: Cluster) -> None:
        listing = scheduler_pb2.ListJobsRequest()
        with pytest.raises(aio.AioRpcError) as raised:
            await c.stub.ListJobs(listing)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "--api-key" in (raised.value.details() or "")
        wrong = "sdk_0123456789ab_" + "A" * 43
        for bad in (wrong, "garbage", "x" * 4000, c.keys["alice"] + "x"):
            metadata = (("authorization", f"Bearer {bad}"),)
            assert await code_of(c.stub.ListJobs(listing, metadata=metadata)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        # Health stays open: clients find the leader before they authenticate.
        health = await c.stub.GetHealth(scheduler_pb2.GetHealthRequest())
        assert health.role == scheduler_pb2.ROLE_LEADER
        # The right key works, and x-sdmesh-user does not change who you are.
        as_root = (*c.as_("alice"), ("x-sdmesh-user", "root"))
        await c.stub.ListJobs(listing, metadata=as_root)

    run(scenario, tmp_path, "")


def test_revoked_and_expired_keys_are_refused(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "CACHE_SECONDS", 0.0)

    async def scenario(c: Cluster) -> None:
        listing = scheduler_pb2.ListJobsRequest()
        await c.stub.ListJobs(listing, metadata=c.as_("alice"))
        key_id = c.keys["alice"].split("_")[1]
        assert c.registry.revoke_key(key_id, actor="test")
        with pytest.raises(aio.AioRpcError) as raised:
            await c.stub.ListJobs(listing, metadata=c.as_("alice"))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (raised.value.details() or "")
        _, expired = c.registry.create_key(
            "carol", admin=False, expires_at=c.server.clock() - 1, actor="test"
        )
        with pytest.raises(aio.AioRpcError) as raised:
            await c.stub.ListJobs(listing, metadata=(("authorization", f"Bearer {expired.text}"),))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in (raised.value.details() or "")

    run(scenario, tmp_path, db_url)


def test_a_user_sees_and_acts_only_on_their_own_jobs(tmp_path: Path, db_url: str) -> None:
    async def scenario(c: Cluster) -> None:
        agent = await c.enrolled_agent("n1")
        job_id = await c.submit("alice")
        job = await agent.assignment()
        agent.succeed(job, [png_of(64, 64)])
        bob = c.as_("bob")
        stub = c.stub
        await until_async(
            lambda: _state(stub, job_id, c.as_("alice")), "the job to succeed", within=10
        )
        not_found = grpc.StatusCode.NOT_FOUND
        assert (
            await code_of(stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id), metadata=bob))
            == not_found
        )
        assert (
            await code_of(
                stub.CancelJob(scheduler_pb2.CancelJobRequest(job_id=job_id), metadata=bob)
            )
            == not_found
        )
        assert (
            await code_of(
                stub.DeleteJob(scheduler_pb2.DeleteJobRequest(job_id=job_id), metadata=bob)
            )
            == not_found
        )
        watch = stub.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job_id), metadata=bob)
        assert await code_of(_drain_stream(watch)) == not_found
        image = stub.GetImage(scheduler_pb2.GetImageRequest(job_id=job_id), metadata=bob)
        assert await code_of(_drain_stream(image)) == not_found
        # A job that does not exist answers the same.
        missing = await code_of(
            stub.GetJob(scheduler_pb2.GetJobRequest(job_id="0" * 16), metadata=bob)
        )
        assert missing == not_found
        # Listing: bob sees none of alice's, may not ask for hers; admin sees all.
        listed = await stub.ListJobs(scheduler_pb2.ListJobsRequest(), metadata=bob)
        assert [j.id for j in listed.jobs] == []
        other = scheduler_pb2.ListJobsRequest(owner="alice")
        assert (
            await code_of(stub.ListJobs(other, metadata=bob)) == grpc.StatusCode.PERMISSION_DENIED
        )
        listed = await stub.ListJobs(scheduler_pb2.ListJobsRequest(), metadata=c.as_("root"))
        assert [j.id for j in listed.jobs] == [job_id]
        # Bob's reuse of alice's request id makes his own job, not a view of hers.
        request = scheduler_pb2.SubmitJobRequest()
        request.spec.prompt, request.spec.request_id = "mine", "shared-id"
        mine = await stub.SubmitJob(request, metadata=c.as_("alice"))
        theirs = await stub.SubmitJob(request, metadata=bob)
        assert theirs.created and theirs.job.id != mine.job.id and theirs.job.owner == "bob"
        # The admin can act on it, and that is audited.
        await stub.DeleteJob(scheduler_pb2.DeleteJobRequest(job_id=job_id), metadata=c.as_("root"))
        gone = await code_of(
            stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id), metadata=c.as_("root"))
        )
        assert gone == not_found
        actions = [(e.actor.split()[0], e.action, e.target) for e in c.registry.audit_entries()]
        assert ("root", "delete-job", job_id) in actions
        await agent.close()

    run(scenario, tmp_path, db_url)


async def _state(stub: Any, job_id: str, metadata: Any) -> bool:
    job = await stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id), metadata=metadata)
    return bool(job.state == common_pb2.JOB_STATE_SUCCEEDED)


async def _drain_stream(call: Any) -> None:
    async for _ in call:
        pass


def test_draining_needs_an_admin_and_is_audited(tmp_path: Path, db_url: str) -> None:
    async def scenario(c: Cluster) -> None:
        agent = await c.enrolled_agent("n1")
        drain = scheduler_pb2.DrainNodeRequest(node="n1", timeout_seconds=5)
        denied = await code_of(c.stub.DrainNode(drain, metadata=c.as_("alice")))
        assert denied == grpc.StatusCode.PERMISSION_DENIED
        node = await c.stub.DrainNode(drain, metadata=c.as_("root"))
        assert node.draining
        entries = c.registry.audit_entries()
        assert [(e.action, e.target) for e in entries][-1] == ("drain-node", "n1")
        assert entries[-1].actor.startswith("root")
        await agent.close()

    run(scenario, tmp_path, db_url)


def test_an_agent_must_be_enrolled_and_speaks_only_for_its_own_node(
    tmp_path: Path, db_url: str
) -> None:
    async def scenario(c: Cluster) -> None:
        port = c.server.port
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        assert await refused(ScriptedAgent(port, "rogue")) == unauthenticated

        agent = await c.enrolled_agent("n1")
        # The join token fixed zone=a on it.
        nodes = await c.stub.ListNodes(scheduler_pb2.ListNodesRequest(), metadata=c.as_("alice"))
        assert [dict(n.labels) for n in nodes.nodes] == [{"zone": "a"}]
        # n1's credential cannot say hello as n2.
        credential = agent.credential  # type: ignore[attr-defined]
        impostor = ScriptedAgent(port, "n2")
        as_n1 = node_metadata("n1", credential)
        denied = await refused(impostor, metadata=as_n1, first=hello("n2"))
        assert denied == grpc.StatusCode.PERMISSION_DENIED
        # Nor can it be used under another node id.
        as_n2 = node_metadata("n2", credential)
        assert await refused(ScriptedAgent(port, "n2"), metadata=as_n2) == unauthenticated
        # A single-use token enrolls once; an enrolled id cannot be taken over.
        token = c.registry.create_join_token(
            expires_at=c.server.clock() + 60, reusable=False, labels={}, actor="t"
        )[1]
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            gateway = agent_pb2_grpc.AgentGatewayStub(channel)
            taken = agent_pb2.EnrollRequest(join_token=token.text, node_id="n1", name="n1")
            assert await code_of(gateway.Enroll(taken)) == grpc.StatusCode.ALREADY_EXISTS
            fresh = agent_pb2.EnrollRequest(join_token=token.text, node_id="n3", name="n3")
            await gateway.Enroll(fresh)
            again = agent_pb2.EnrollRequest(join_token=token.text, node_id="n4", name="n4")
            assert await code_of(gateway.Enroll(again)) == grpc.StatusCode.UNAUTHENTICATED
            bad = agent_pb2.EnrollRequest(join_token="sdj_nope", node_id="n5", name="n5")
            assert await code_of(gateway.Enroll(bad)) == grpc.StatusCode.UNAUTHENTICATED
        await agent.close()

    run(scenario, tmp_path, db_url)


async def upload_chunks_of(data: bytes) -> Any:
    for offset in range(0, len(data), 500):
        yield common_pb2.InputChunk(offset=offset, data=data[offset : offset + 500])


async def fetch(channel: Any, job: agent_pb2.AssignedJob, sha: str, metadata: Any) -> bytes:
    gateway = agent_pb2_grpc.AgentGatewayStub(channel)
    request = agent_pb2.FetchInputRequest(job_id=job.job_id, attempt=job.attempt, sha256=sha)
    return b"".join([chunk.data async for chunk in gateway.FetchInput(request, metadata=metadata)])


def test_an_input_is_its_uploader_s_and_only_the_node_running_its_job_fetches_it(
    tmp_path: Path, db_url: str
) -> None:
    async def scenario(c: Cluster) -> None:
        data = png_of(64, 64)
        no_key = c.stub.UploadInput(upload_chunks_of(data))
        assert await code_of(no_key) == grpc.StatusCode.UNAUTHENTICATED
        info = await c.stub.UploadInput(upload_chunks_of(data), metadata=c.as_("alice"))
        inputs = c.server.db.store.inputs
        assert list(inputs.sizes("alice", [info.sha256])) == [info.sha256]
        assert inputs.sizes("bob", [info.sha256]) == {}

        a = await c.enrolled_agent("node-a")
        request = scheduler_pb2.SubmitJobRequest()
        request.spec.prompt = "a lighthouse"
        request.spec.width = request.spec.height = 64
        request.spec.steps = 4
        request.spec.init_image = info.sha256
        # Bob cannot name alice's upload, though he knows its sha256.
        with pytest.raises(aio.AioRpcError) as raised:
            await c.stub.SubmitJob(request, metadata=c.as_("bob"))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (raised.value.details() or "").startswith("init_image"), raised.value.details()
        await c.stub.SubmitJob(request, metadata=c.as_("alice"))
        job = await a.assignment()
        b = await c.enrolled_agent("node-b")
        as_a = node_metadata("node-a", a.credential)  # type: ignore[attr-defined]
        as_b = node_metadata("node-b", b.credential)  # type: ignore[attr-defined]
        async with aio.insecure_channel(f"127.0.0.1:{c.server.port}") as channel:
            assert await fetch(channel, job, info.sha256, as_a) == data
            denied = fetch(channel, job, info.sha256, as_b)
            assert await code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
            with_a_key = fetch(channel, job, info.sha256, c.as_("alice"))
            assert await code_of(with_a_key) == grpc.StatusCode.UNAUTHENTICATED
        await a.close()
        await b.close()

    run(scenario, tmp_path, db_url)


def test_a_removed_node_loses_its_stream_and_its_job_is_requeued(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "CACHE_SECONDS", 0.0)

    async def scenario(c: Cluster) -> None:
        agent = await c.enrolled_agent("n1")
        job_id = await c.submit("alice")
        job = await agent.assignment()
        agent.started(job)
        assert c.registry.revoke_node("n1", actor="test")

        async def requeued() -> bool:
            found = await c.stub.GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), metadata=c.as_("alice")
            )
            return bool(found.state == common_pb2.JOB_STATE_QUEUED)

        await until_async(requeued, "the removed node's job back in the queue", within=15)
        nodes = await c.stub.ListNodes(scheduler_pb2.ListNodesRequest(), metadata=c.as_("alice"))
        assert not any(n.connected for n in nodes.nodes)
        metadata = node_metadata("n1", agent.credential)  # type: ignore[attr-defined]
        again = await refused(ScriptedAgent(c.server.port, "n1"), metadata=metadata)
        assert again == grpc.StatusCode.UNAUTHENTICATED
        await agent.close()

    run(scenario, tmp_path, db_url)


def test_retention_deletes_finished_jobs_with_their_images(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        agent = await c.enrolled_agent("n1")
        job_id = await c.submit("alice")
        job = await agent.assignment()
        agent.succeed(job, [png_of(64, 64)])
        await until_async(lambda: _state(c.stub, job_id, c.as_("alice")), "success", within=10)
        images = c.server.runtime.images.root
        assert list(images.rglob("*.png"))
        queued = await c.submit("alice", "still queued")  # never finished: kept
        c.server.retention.retain_seconds = 0.001
        await asyncio.sleep(0.01)
        assert await c.server.retention.sweep() == 1
        assert not list(images.rglob("*.png"))
        gone = await code_of(
            c.stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id), metadata=c.as_("alice"))
        )
        assert gone == grpc.StatusCode.NOT_FOUND
        await c.stub.GetJob(scheduler_pb2.GetJobRequest(job_id=queued), metadata=c.as_("alice"))
        await agent.close()

    run(scenario, tmp_path, "")


def test_a_user_deletes_their_own_job_even_while_it_runs(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        agent = await c.enrolled_agent("n1")
        job_id = await c.submit("alice")
        job = await agent.assignment()
        agent.started(job)
        request = scheduler_pb2.DeleteJobRequest(job_id=job_id)
        answer = await c.stub.DeleteJob(request, metadata=c.as_("alice"))
        assert answer.images_deleted == 0
        stop = await agent.receive()  # the running attempt was stopped first
        assert stop.WhichOneof("body") == "stop"
        gone = c.stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id), metadata=c.as_("alice"))
        assert await code_of(gone) == grpc.StatusCode.NOT_FOUND
        # Deleting it again: it is not there.
        assert await code_of(c.stub.DeleteJob(request, metadata=c.as_("alice"))) == (
            grpc.StatusCode.NOT_FOUND
        )
        # Nobody else's cancels are in the audit trail: it was her own job.
        assert "delete-job" not in [e.action for e in c.registry.audit_entries()]
        await agent.close()

    run(scenario, tmp_path, "")
