"""Limits against a real scheduler process: a queue past its bound and a
submit rate past its limit answer RESOURCE_EXHAUSTED, which sdctl names
with its own exit code; an oversized message is refused by gRPC; and a
thousand watchers that never read leave the scheduler's memory bounded
while an agent streams large previews."""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path

import grpc
import pytest
from grpc import aio
from PIL import Image

from harness.processes import LocalCluster
from protos import agent_pb2, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.service import MAX_WATCHES
from scheduler.uploads import MAX_PREVIEW_BYTES
from tests.scripted import ScriptedAgent

pytestmark = pytest.mark.e2e

SLOW_AGENT = ("--simulate-gpus", "8GiB", "--simulate-step-delay", "2")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_queue_bound_and_rate_limit_answer_resource_exhausted(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    cluster.start_scheduler("--max-queued-per-user", "2", "--submit-rate", "1000")
    cluster.start_agent("slow", *SLOW_AGENT)
    try:
        cluster.wait_for_nodes(1)
        # Different steps, so that no two batch together. The card takes one
        # to run and one to prefetch; two more queue, and the next is refused.
        results = []
        for steps in range(40, 48):
            submit = ("submit", "--no-wait", "--steps", str(steps), "x")
            results.append(cluster.sdctl(*submit, "--width", "64", "--height", "64"))
            if results[-1].returncode != 0:
                break
        refused = results[-1]
        assert refused.returncode == 5, [(r.returncode, r.stderr) for r in results]
        assert "--max-queued-per-user" in refused.stderr
        assert "\n" not in refused.stderr.strip()  # one line
        with cluster.client() as client:
            assert len(client.list_jobs(states=["QUEUED"])) == 2
    finally:
        cluster.stop()

    limited = LocalCluster(tmp_path / "rate")
    limited.root.mkdir()
    limited.start_scheduler("--submit-rate", "0.5")  # a burst of 1, then one per 2 s
    limited.start_agent("slow", *SLOW_AGENT)
    try:
        limited.wait_for_nodes(1)
        first = limited.sdctl("submit", "--no-wait", "--steps", "4", "one")
        second = limited.sdctl("submit", "--no-wait", "--steps", "4", "two")
        assert first.returncode == 0, first.stderr
        assert second.returncode == 5, second.stderr
        assert "--submit-rate" in second.stderr and "retry in" in second.stderr
    finally:
        limited.stop()


def test_an_oversized_message_is_refused(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    cluster.start_scheduler()
    try:
        cluster.wait_for(lambda c: c.health().role == "leader", "the leader")

        async def send() -> grpc.StatusCode:
            options = [("grpc.max_send_message_length", 64 * 2**20)]
            async with aio.insecure_channel(cluster.address, options=options) as channel:
                request = scheduler_pb2.SubmitJobRequest()
                request.spec.prompt = "x" * (6 * 2**20)
                with pytest.raises(aio.AioRpcError) as raised:
                    await scheduler_pb2_grpc.SchedulerStub(channel).SubmitJob(request, timeout=30)
                return raised.value.code()

        assert asyncio.run(send()) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # It is still there for everyone else.
        with cluster.client() as client:
            assert client.health().role == "leader"
    finally:
        cluster.stop()


def noise_png(size: int) -> bytes:
    """A preview as large as a rogue could make one within the limits."""
    rng = random.Random(size)
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=0)
    return out.getvalue()


def test_a_thousand_watchers_that_never_read_leave_memory_bounded(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    scheduler = cluster.start_scheduler()
    preview = noise_png(200)  # about 120 KB: just under the cap
    watchers = 1000

    async def scenario() -> tuple[int, int, int]:
        agent = ScriptedAgent(cluster.port, "n1")
        await agent.connect()
        async with aio.insecure_channel(cluster.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            request = scheduler_pb2.SubmitJobRequest()
            request.spec.prompt, request.spec.steps = "watched", 150
            request.spec.width = request.spec.height = 64
            job_id = (await stub.SubmitJob(request)).job.id
            job = await agent.assignment()
            agent.started(job)
            before = rss_bytes(scheduler.popen.pid)
            watch = scheduler_pb2.WatchJobRequest(job_id=job_id)
            # Ten users with a hundred streams each: every stream the limits allow.
            calls = [
                stub.WatchJob(watch, metadata=(("x-sdmesh-user", f"user{i % 10}"),))
                for i in range(watchers)
            ]
            await asyncio.sleep(1.0)  # the scheduler has taken them all
            for who in ("user0", "user-eleven"):  # one per user more; one more in all
                extra = stub.WatchJob(watch, metadata=(("x-sdmesh-user", who),))
                with pytest.raises(aio.AioRpcError) as raised:
                    await extra.read()
                assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "watch limit" in (raised.value.details() or "")
            # Previews flow for a while; nobody reads.
            peak = before
            for step in range(1, 61):
                agent.send(
                    job.job_id,
                    job.attempt,
                    progress=common_pb2.Progress(step=step, total_steps=150),
                )
                agent.send(
                    job.job_id,
                    job.attempt,
                    preview=common_pb2.Preview(
                        step=step, total_steps=150, width=200, height=200, png=preview
                    ),
                )
                await asyncio.sleep(0.1)
                peak = max(peak, rss_bytes(scheduler.popen.pid))
            # It still answers, and the agent can finish the job.
            health = await stub.GetHealth(scheduler_pb2.GetHealthRequest(), timeout=10)
            assert health.role == scheduler_pb2.ROLE_LEADER
            agent.ended(job, agent_pb2.ATTEMPT_OUTCOME_RELEASED, "done")
            for call in calls:
                call.cancel()
            await agent.close()
            return before, peak, len(preview)

    try:
        cluster.wait_for(lambda c: c.health().role == "leader", "the leader")
        before, peak, size = asyncio.run(scenario())
    finally:
        cluster.stop()
    grown = peak - before
    # Without bounds the previews alone would be 60 x 1000 x 120 KB = 7.2 GB
    # queued. With them, each open stream holds its pending message and the
    # one gRPC is writing, a preview each at most: the bound is set by the
    # watch limits and the preview cap, with room for gRPC's own buffers.
    bound = MAX_WATCHES * 3 * MAX_PREVIEW_BYTES
    print(
        f"scheduler RSS {before / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB "
        f"with {watchers} idle watchers and {size / 1000:.0f} KB previews "
        f"(bound {bound / 2**20:.0f} MiB)"
    )
    assert grown < bound, f"grew by {grown / 2**20:.0f} MiB"
