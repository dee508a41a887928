"""The async core of the SDK. `Client` in `_sync` wraps this; there is no
second implementation."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, TypeVar, Unpack

import grpc
from grpc import aio

from client._config import USER_METADATA_KEY, resolve_address, resolve_user
from client._errors import InvalidArgumentError, JobFailedError, SdmeshError, from_rpc_error
from client._models import (
    Event,
    Image,
    ImageInfo,
    Job,
    Model,
    Node,
    StateEvent,
    event_from_proto,
)
from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc

MEMORY_MODES = {
    "auto": common_pb2.MEMORY_MODE_AUTO,
    "full": common_pb2.MEMORY_MODE_FULL,
    "model_offload": common_pb2.MEMORY_MODE_MODEL_OFFLOAD,
    "sequential_offload": common_pb2.MEMORY_MODE_SEQUENTIAL_OFFLOAD,
}
JOB_STATES = {
    common_pb2.JobState.Name(value).removeprefix("JOB_STATE_"): value
    for value in common_pb2.JobState.values()
    if value != common_pb2.JOB_STATE_UNSPECIFIED
}
T = TypeVar("T")


class SubmitOptions(TypedDict, total=False):
    """What a job can ask for besides its prompt; see JobSpec in
    protos/common.proto for defaults and limits."""

    negative_prompt: str
    model: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int  # -1: random, fixed by the scheduler
    sampler_name: str
    batch_size: int
    priority: int  # -100..100, higher first
    memory_mode: str  # auto, full, model_offload, sequential_offload
    labels: Mapping[str, str]
    selector: Mapping[str, str]  # only nodes with all these labels take the job
    request_id: str


# Left unset when not given, so that the scheduler applies its defaults.
OPTIONAL_SPEC_FIELDS = (
    "model",
    "width",
    "height",
    "steps",
    "cfg_scale",
    "seed",
    "sampler_name",
    "batch_size",
)
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class AsyncClient:
    """Talks to one scheduler. Use as `async with AsyncClient() as client:`.

    The address comes from `address`, else SDMESH_SCHEDULER, else
    localhost:50051; the user from `user`, else SDMESH_USER, else the OS login.
    """

    def __init__(
        self, address: str | None = None, *, user: str | None = None, timeout: float = 30.0
    ) -> None:
        self.address = resolve_address(address)
        self.user = resolve_user(user)
        self.timeout = timeout
        self._channel = aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._metadata = ((USER_METADATA_KEY, self.user),)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    def _error(self, error: grpc.RpcError) -> SdmeshError:
        return from_rpc_error(error, self.address)

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None

    async def submit(self, prompt: str, **options: Unpack[SubmitOptions]) -> AsyncJobHandle:
        """Queues a job; options left out take the A1111 defaults on the
        scheduler. A request id is made per call, so a retried call returns
        the same job."""
        memory_mode = options.get("memory_mode", "auto")
        if memory_mode not in MEMORY_MODES:
            raise InvalidArgumentError(
                f"memory_mode: must be one of {', '.join(MEMORY_MODES)}, got {memory_mode!r}"
            )
        spec = common_pb2.JobSpec(
            prompt=prompt,
            negative_prompt=options.get("negative_prompt") or "",
            priority=options.get("priority") or 0,
            memory_mode=MEMORY_MODES[memory_mode],
            request_id=options.get("request_id") or uuid.uuid4().hex,
            labels=dict(options.get("labels") or {}),
            selector=dict(options.get("selector") or {}),
        )
        for name in OPTIONAL_SPEC_FIELDS:
            value = options.get(name)
            if value is not None:
                setattr(spec, name, value)
        response = await self._call(self._stub.SubmitJob, scheduler_pb2.SubmitJobRequest(spec=spec))
        return AsyncJobHandle(self, Job.from_proto(response.job))

    async def get_job(self, job_id: str) -> Job:
        job = await self._call(self._stub.GetJob, scheduler_pb2.GetJobRequest(job_id=job_id))
        return Job.from_proto(job)

    def job(self, job_id: str) -> AsyncJobHandle:
        """A handle on an existing job, without a round trip."""
        return AsyncJobHandle(self, None, job_id=job_id)

    async def list_jobs(
        self, *, states: Iterable[str] = (), owner: str = "", limit: int = 50
    ) -> list[Job]:
        """Newest first, following pages up to `limit` jobs."""
        wanted = []
        for state in states:
            if state.upper() not in JOB_STATES:
                raise InvalidArgumentError(
                    f"state: must be one of {', '.join(JOB_STATES)}, got {state!r}"
                )
            wanted.append(JOB_STATES[state.upper()])
        jobs: list[Job] = []
        token = ""
        while len(jobs) < limit:
            request = scheduler_pb2.ListJobsRequest(
                states=wanted, owner=owner, limit=min(limit - len(jobs), 1000), page_token=token
            )
            response = await self._call(self._stub.ListJobs, request)
            jobs.extend(Job.from_proto(job) for job in response.jobs)
            token = response.next_page_token
            if not token:
                break
        return jobs

    async def cancel(self, job_id: str) -> Job:
        job = await self._call(self._stub.CancelJob, scheduler_pb2.CancelJobRequest(job_id=job_id))
        return Job.from_proto(job)

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[Event]:
        """Events of a job: the durable ones after `after_seq`, then live
        progress, previews and state changes, ending with its terminal state."""
        call = self._stub.WatchJob(
            scheduler_pb2.WatchJobRequest(job_id=job_id, after_seq=after_seq),
            metadata=self._metadata,
        )
        try:
            async for event in call:
                yield event_from_proto(event)
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()

    async def download_image(self, job_id: str, index: int) -> Image:
        """One stored PNG, checked against its sha256."""
        info: ImageInfo | None = None
        data = bytearray()
        try:
            async for chunk in self._stub.GetImage(
                scheduler_pb2.GetImageRequest(job_id=job_id, index=index),
                metadata=self._metadata,
                timeout=self.timeout * 10,
            ):
                if chunk.HasField("info"):
                    info = ImageInfo.from_proto(chunk.info)
                data += chunk.data
        except grpc.RpcError as error:
            raise self._error(error) from None
        if info is None or hashlib.sha256(data).hexdigest() != info.sha256:
            raise SdmeshError(f"image {index} of job {job_id} arrived damaged; try again")
        return Image(info, bytes(data))

    async def list_nodes(self) -> list[Node]:
        response = await self._call(self._stub.ListNodes, scheduler_pb2.ListNodesRequest())
        return [Node.from_proto(node) for node in response.nodes]

    async def list_models(self) -> list[Model]:
        response = await self._call(self._stub.ListModels, scheduler_pb2.ListModelsRequest())
        return [Model.from_proto(model) for model in response.models]


class AsyncJobHandle:
    """A handle on one job: its events, its end, its images."""

    def __init__(self, client: AsyncClient, job: Job | None, *, job_id: str = "") -> None:
        self._client = client
        self.id = job.id if job is not None else job_id
        self.last_known = job

    def __repr__(self) -> str:
        state = self.last_known.state if self.last_known else "?"
        return f"<AsyncJobHandle {self.id} {state}>"

    async def refresh(self) -> Job:
        self.last_known = await self._client.get_job(self.id)
        return self.last_known

    def events(self, after_seq: int = 0) -> AsyncIterator[Event]:
        return self._client.watch(self.id, after_seq)

    async def wait(self) -> Job:
        """Follows the job's events until it ends; returns the final job."""
        async for event in self.events():
            if isinstance(event, StateEvent) and event.terminal:
                break
        return await self.refresh()

    async def images(self) -> list[Image]:
        """Waits for the job and downloads its images; raises JobFailedError
        if it did not succeed."""
        job = await self.wait()
        if not job.succeeded:
            raise JobFailedError(job)
        return [await self._client.download_image(self.id, info.index) for info in job.images]

    async def save_images(self, directory: str | Path) -> list[Path]:
        """Saves the images as DIRECTORY/<job id>-<index>.png."""
        target = Path(directory)
        return [
            image.save(target / f"{self.id}-{image.info.index}.png")
            for image in await self.images()
        ]

    async def cancel(self) -> Job:
        self.last_known = await self._client.cancel(self.id)
        return self.last_known
