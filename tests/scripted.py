"""An in-process scheduler and a scripted agent that speaks the agent
protocol message by message, for testing the scheduler's side of it:
fencing, uploads, disconnects. (Real agents are tested in e2e/.)"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from grpc import aio

from protos import agent_pb2, agent_pb2_grpc, common_pb2
from scheduler.server import SchedulerConfig, SchedulerServer
from tests.factories import make_png

GIB = 2**30


@asynccontextmanager
async def running_scheduler(
    data_dir: Path, db_url: str = "", **options: object
) -> AsyncIterator[SchedulerServer]:
    options.setdefault("no_auth", True)  # tests of auth pass no_auth=False
    config = SchedulerConfig(data_dir=data_dir, port=0, db_url=db_url, **options)  # type: ignore[arg-type]
    server = SchedulerServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


def hello(
    node_id: str,
    models: tuple[str, ...] = ("tiny",),
    labels: dict[str, str] | None = None,
    held: tuple[tuple[str, int], ...] = (),
) -> agent_pb2.AgentMessage:
    message = agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(
            node_id=node_id,
            name=f"host-{node_id}",
            hostname="host",
            agent_version="test",
            devices=[
                common_pb2.DeviceInfo(
                    index=0, name="GPU", uuid="GPU-0", kind="cuda", total_bytes=24 * GIB
                )
            ],
            models=[
                common_pb2.ModelInfo(name=m, weight_bytes=GIB, dtype="float16") for m in models
            ],
            labels=labels or {},
        )
    )
    for job_id, attempt in held:
        message.hello.held.add(job_id=job_id, attempt=attempt, gpu_index=0)
    return message


def upload_chunks(
    job: agent_pb2.AssignedJob,
    index: int,
    data: bytes,
    *,
    chunk: int,
    sha256: str | None = None,
) -> list[agent_pb2.ImageUpload]:
    """Image `index` of the job as an agent uploads it: pieces of `chunk`
    bytes, the last with the whole image's sha256 (or the one given) and
    size."""
    pieces: list[agent_pb2.ImageUpload] = []
    for offset in range(0, len(data), chunk):
        last = offset + chunk >= len(data)
        image = agent_pb2.ImageUpload(
            index=index,
            seed=job.spec.seed + index,
            width=job.spec.width,
            height=job.spec.height,
            offset=offset,
            data=data[offset : offset + chunk],
            last=last,
        )
        if last:
            image.sha256 = sha256 or hashlib.sha256(data).hexdigest()
            image.size_bytes = len(data)
        pieces.append(image)
    return pieces


class ScriptedAgent:
    def __init__(
        self,
        port: int,
        node_id: str,
        models: tuple[str, ...] = ("tiny",),
        labels: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.node_id = node_id
        self.models = models
        self.labels = labels
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self._channel: aio.Channel | None = None
        self.call: (
            aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.SchedulerMessage] | None
        ) = None

    async def _requests(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        while (message := await self._outbox.get()) is not None:
            yield message

    async def connect(
        self,
        first: agent_pb2.AgentMessage | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> agent_pb2.SchedulerMessage:
        """Opens the stream (with a node credential's `metadata` when the
        scheduler requires enrollment) and returns the welcome."""
        self._channel = aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.call = agent_pb2_grpc.AgentGatewayStub(self._channel).Connect(
            self._requests(), metadata=metadata
        )
        self._outbox.put_nowait(first or hello(self.node_id, self.models, self.labels))
        return await self.receive()

    async def receive(self, within: float = 10.0) -> agent_pb2.SchedulerMessage:
        """The next message that is not a ping."""
        assert self.call is not None
        while True:
            message = await asyncio.wait_for(self.call.read(), within)
            assert message is not aio.EOF, "the scheduler closed the stream"  # type: ignore[attr-defined]
            if message.WhichOneof("body") != "ping":  # type: ignore[attr-defined]
                return message  # type: ignore[return-value]

    def heartbeat(self) -> None:
        self._outbox.put_nowait(agent_pb2.AgentMessage(stats=agent_pb2.Stats()))

    def leaving(self) -> None:
        self._outbox.put_nowait(agent_pb2.AgentMessage(leaving=agent_pb2.Leaving()))

    def report_health(self, gpu_index: int, healthy: bool, detail: str = "") -> None:
        report = agent_pb2.HealthReport(gpu_index=gpu_index, healthy=healthy, detail=detail)
        self._outbox.put_nowait(agent_pb2.AgentMessage(health=report))

    async def assignment(self) -> agent_pb2.AssignedJob:
        message = await self.receive()
        assert message.WhichOneof("body") == "assign", message
        [job] = message.assign.jobs
        return job

    def send(self, job_id: str, attempt: int, **body: object) -> None:
        update = agent_pb2.JobUpdate(job_id=job_id, attempt=attempt, **body)  # type: ignore[arg-type]
        self._outbox.put_nowait(agent_pb2.AgentMessage(job=update))

    def started(self, job: agent_pb2.AssignedJob) -> None:
        self.send(job.job_id, job.attempt, started=agent_pb2.AttemptStarted())

    def step(
        self, job: agent_pb2.AssignedJob, step: int, total: int = 4, preview: bool = True
    ) -> None:
        self.send(
            job.job_id, job.attempt, progress=common_pb2.Progress(step=step, total_steps=total)
        )
        if preview:
            self.send(
                job.job_id,
                job.attempt,
                preview=common_pb2.Preview(
                    step=step, total_steps=total, width=8, height=8, png=make_png(8, 8, shade=step)
                ),
            )

    def upload(
        self,
        job: agent_pb2.AssignedJob,
        index: int,
        data: bytes,
        *,
        chunk: int = 7,
        sha256: str | None = None,
    ) -> None:
        for image in upload_chunks(job, index, data, chunk=chunk, sha256=sha256):
            self.send(job.job_id, job.attempt, image=image)

    def ended(
        self,
        job: agent_pb2.AssignedJob | tuple[str, int],
        outcome: agent_pb2.AttemptOutcome.ValueType,
        reason: str = "",
        error_kind: str = "",
    ) -> None:
        job_id, attempt = (
            (job.job_id, job.attempt) if isinstance(job, agent_pb2.AssignedJob) else job
        )
        self.send(
            job_id,
            attempt,
            ended=agent_pb2.AttemptEnded(outcome=outcome, reason=reason, error_kind=error_kind),
        )

    def succeed(self, job: agent_pb2.AssignedJob, images: list[bytes]) -> None:
        self.started(job)
        self.step(job, 1)
        for index, data in enumerate(images):
            self.upload(job, index, data)
        self.ended(job, agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED)

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._channel is not None:
            await self._channel.close(grace=None)
