"""The async core of the SDK. `Client` in `_sync` wraps this; there is no
second implementation."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

import grpc
from grpc import aio

from client._config import (
    DEFAULT_RECONNECT_TIMEOUT,
    resolve_addresses,
    resolve_api_key,
    resolve_tls,
    resolve_user,
)
from client._errors import (
    EndedEarly,
    InvalidArgumentError,
    JobFailedError,
    SdmeshError,
    from_rpc_error,
    unreachable,
)
from client._inputs import ImageInput, Uploads, prepare, read_input, spec_request
from client._inputs import SubmitOptions as SubmitOptions  # its home for the SDK
from client._models import (
    Event,
    Health,
    Image,
    Job,
    Model,
    Node,
    StateEvent,
    event_from_proto,
)
from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from sdmesh.convert import from_message, input_info_from_proto, spec_request_to_proto
from sdmesh.dialing import is_tls_failure, nobody_there, transport_detail
from sdmesh.domain import ImageInfo
from sdmesh.kinds import InputInfo
from sdmesh.wire import (
    CLIENT_FIRST_BACKOFF_SECONDS,
    CLIENT_MAX_BACKOFF_SECONDS,
    USER_METADATA_KEY,
    Backoff,
    bearer,
    client_channel_options,
    leader_hint,
    open_channel,
)

if TYPE_CHECKING:
    from protos.scheduler_pb2_grpc import SchedulerAsyncStub

JOB_STATES = {
    common_pb2.JobState.Name(value).removeprefix("JOB_STATE_"): value
    for value in common_pb2.JobState.values()
    if value != common_pb2.JOB_STATE_UNSPECIFIED
}
T = TypeVar("T")
OnRetry = Callable[[str, SdmeshError], None]


class _Retries:
    """One operation's retries on UNAVAILABLE. Each failure moves the client
    to the next address; after a whole pass over the list it backs off. It
    gives up once `reconnect_timeout` has passed since the first failure,
    after one pass if this client has never reached a scheduler and nothing
    listens at any address (a wrong address should not hang for a minute),
    and as soon as every address has failed its TLS handshake (a wrong
    certificate does not mend itself)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._failures: dict[str, str] = {}
        self._since: float | None = None
        self._in_pass = 0
        self._anybody_there = False
        self._tls_failed: set[str] = set()
        self._backoff = Backoff(CLIENT_FIRST_BACKOFF_SECONDS, CLIENT_MAX_BACKOFF_SECONDS)

    def succeeded(self) -> None:
        if self._since is not None:
            self._failures.clear()
            self._since = None
            self._in_pass = 0
            self._backoff.reset()

    async def failed(self, address: str, error: grpc.RpcError) -> None:
        """Returns when the caller should try again, at `client.address`;
        raises UnavailableError when it should not."""
        client = self._client
        now = time.monotonic()
        if self._since is None:
            self._since = now
        self._failures[address] = transport_detail(error)
        self._anybody_there = self._anybody_there or not nobody_there(error)
        client._move_on(address, leader_hint(error))
        if is_tls_failure(error):
            self._tls_failed.add(address)
            if self._tls_failed.issuperset(client.addresses):
                raise from_rpc_error(error, address) from None
        else:
            self._tls_failed.discard(address)
        self._in_pass += 1
        pass_done = self._in_pass >= len(client.addresses)
        # The hint about TLS, only for a client that has never got through.
        tls = None if client._reached else client.tls.enabled
        if pass_done and not client._reached and not self._anybody_there:
            raise unreachable(self._failures, tls=tls) from None
        left = self._since + client.reconnect_timeout - now
        if left <= 0:
            raise unreachable(self._failures, now - self._since, tls=tls) from None
        if client.on_retry is not None:
            client.on_retry(address, from_rpc_error(error, address))
        if pass_done:
            self._in_pass = 0
            await asyncio.sleep(min(self._backoff.next(), left))


class AsyncClient:
    """Talks to the scheduler. Use as `async with AsyncClient() as client:`.

    `address` is one HOST:PORT, several separated by commas, or a list: the
    replicas of one scheduler. Left out, it comes from SDMESH_SCHEDULER, else
    localhost:50051.

    Who is asking: `api_key`, else SDMESH_API_KEY, sent with every call as
    `authorization: Bearer <key>`. `user` (else SDMESH_USER, else the OS
    login) counts only on a scheduler that runs with --no-auth.

    With `ca_cert` (else SDMESH_CA_CERT) calls go over TLS, the scheduler's
    certificate checked against that CA; `client_cert` and `client_key`
    (else SDMESH_CLIENT_CERT, SDMESH_CLIENT_KEY) are this client's for
    mutual TLS. A file that cannot be used raises InvalidArgumentError here.

    Calls go to one address at a time. When it is unavailable (refused, a
    standby, a dropped connection) the client moves to the next, backing off
    up to 2 s between passes, for up to `reconnect_timeout` seconds, and
    calls `on_retry(address, error)` before each retry. `timeout` bounds each
    unary call.
    """

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        user: str | None = None,
        timeout: float = 30.0,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        on_retry: OnRetry | None = None,
        api_key: str | None = None,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ) -> None:
        self.addresses = resolve_addresses(address)
        self.user = resolve_user(user)
        self.tls = resolve_tls(ca_cert, client_cert, client_key)
        if self.tls.enabled:
            self._check_tls()  # a wrong file is one line now, not a failed handshake later
        key = resolve_api_key(api_key)
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        self.on_retry = on_retry
        self._current = 0
        self._reached = False  # some scheduler has answered this client
        self._channels: dict[str, tuple[aio.Channel, SchedulerAsyncStub]] = {}
        self._metadata = ((USER_METADATA_KEY, self.user),) + ((bearer(key),) if key else ())
        self._uploads = Uploads(self._send_input)

    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._current]

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
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close(grace=None)

    def _check_tls(self) -> None:
        try:
            self.tls.credentials()
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None

    def _stub(self, address: str) -> SchedulerAsyncStub:
        """The stub for one address; its channel is made on first use."""
        if address not in self._channels:
            try:
                channel = open_channel(address, client_channel_options(), self.tls)
            except ValueError as exc:  # a TLS file changed since the check
                raise InvalidArgumentError(str(exc)) from None
            self._channels[address] = (channel, scheduler_pb2_grpc.SchedulerStub(channel))
        return self._channels[address][1]

    def _move_on(self, address: str, leader: str = "") -> None:
        """The address a standby named as the leader's, if it is one of
        ours; else the next. Unless another call has moved on already."""
        if self.address != address:
            return
        if leader in self.addresses:
            self._current = self.addresses.index(leader)
        else:
            self._current = (self._current + 1) % len(self.addresses)

    async def _retry_or_raise(
        self, retries: _Retries, address: str, error: grpc.RpcError, *, lost_reply: bool = False
    ) -> None:
        """Waits to retry UNAVAILABLE (and DEADLINE_EXCEEDED where `lost_reply`:
        the call took effect but its reply may be lost); raises the rest."""
        code = error.code()
        if code is grpc.StatusCode.UNAVAILABLE or (
            lost_reply and code is grpc.StatusCode.DEADLINE_EXCEEDED
        ):
            await retries.failed(address, error)
            return
        if code is not grpc.StatusCode.DEADLINE_EXCEEDED:
            self._reached = True
        raise from_rpc_error(error, address) from None

    async def _call(
        self,
        pick: Callable[[SchedulerAsyncStub], Callable[..., Awaitable[T]]],
        request: Any,
        *,
        lost_reply: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (the call's own, for gRPC)
    ) -> tuple[str, T]:
        """A unary call with retries; returns the address that answered and
        the answer. Every call is safe to repeat: submit by its request id,
        an upload by its bytes. `request` may be a list of messages for a
        client stream (a list, so that a retry sends them again)."""
        retries = _Retries(self)
        while True:
            address = self.address
            try:
                response = await pick(self._stub(address))(
                    request, metadata=self._metadata, timeout=timeout or self.timeout
                )
            except grpc.RpcError as error:
                await self._retry_or_raise(retries, address, error, lost_reply=lost_reply)
                continue
            self._reached = True
            return address, response

    async def submit(self, prompt: str, **options: Unpack[SubmitOptions]) -> AsyncJobHandle:
        """Queues a job; options left out take the A1111 defaults on the
        scheduler. Its request id is made once here and sent on every retry,
        so a retry whose first reply was lost returns the same job.

        Input images are read and checked first, then each one this client
        has not uploaded yet goes up once; the job names them by sha256."""
        prepared = prepare(options)
        spec = spec_request(prompt, prepared.options)  # its checks before any upload
        reused = await self._uploads.upload_all(prepared)
        request = scheduler_pb2.SubmitJobRequest(spec=spec_request_to_proto(spec))
        try:
            _, response = await self._call(lambda s: s.SubmitJob, request, lost_reply=True)
        except InvalidArgumentError as exc:
            if not await self._uploads.again(prepared, reused, exc):
                raise
            _, response = await self._call(lambda s: s.SubmitJob, request, lost_reply=True)
        return AsyncJobHandle(self, Job.from_proto(response.job))

    async def upload(self, image: ImageInput, *, field: str = "image") -> InputInfo:
        """Uploads an input image (a path, bytes or a PIL image), checked
        here first, once per process for the same bytes; its InputInfo can
        stand for the image in `submit`."""
        if isinstance(image, InputInfo):
            return image
        return await self._uploads.upload(field, read_input(field, image))

    async def _send_input(self, chunks: list[common_pb2.InputChunk]) -> InputInfo:
        _, answer = await self._call(
            lambda s: s.UploadInput, chunks, lost_reply=True, timeout=self.timeout * 10
        )
        return input_info_from_proto(answer)

    async def get_job(self, job_id: str) -> Job:
        request = scheduler_pb2.GetJobRequest(job_id=job_id)
        _, job = await self._call(lambda s: s.GetJob, request)
        return Job.from_proto(job)

    def job(self, job_id: str) -> AsyncJobHandle:
        """A handle on an existing job, without a round trip."""
        return AsyncJobHandle(self, None, job_id=job_id)

    async def list_jobs(
        self, *, states: Iterable[str] = (), owner: str = "", limit: int = 50
    ) -> list[Job]:
        """Newest first, following pages up to `limit` jobs."""
        if limit < 1:
            raise InvalidArgumentError(f"limit: must be at least 1, got {limit}")
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
            _, response = await self._call(lambda s: s.ListJobs, request)
            jobs.extend(Job.from_proto(job) for job in response.jobs)
            token = response.next_page_token
            if not token:
                break
        return jobs

    async def cancel(self, job_id: str) -> Job:
        request = scheduler_pb2.CancelJobRequest(job_id=job_id)
        _, job = await self._call(lambda s: s.CancelJob, request)
        return Job.from_proto(job)

    async def delete(self, job_id: str) -> int:
        """Removes a job with its events and images, cancelling it first if
        it is still queued or running; returns how many images went."""
        request = scheduler_pb2.DeleteJobRequest(job_id=job_id)
        _, response = await self._call(lambda s: s.DeleteJob, request)
        return response.images_deleted

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[Event]:
        """Events of a job: the durable ones after `after_seq`, then live
        progress, previews and state changes, ending with its terminal state.

        A broken stream is opened again after the last durable event seen, on
        the next address if need be, so that every durable event (seq > 0)
        comes exactly once and in order; progress and previews (seq 0) are
        live only and may be missed while it reconnects."""
        last = after_seq
        retries = _Retries(self)
        while True:
            address = self.address
            request = scheduler_pb2.WatchJobRequest(job_id=job_id, after_seq=last)
            call = self._stub(address).WatchJob(request, metadata=self._metadata)
            try:
                async for message in call:
                    self._reached = True
                    retries.succeeded()
                    event = event_from_proto(message)
                    if event.seq > 0:
                        if event.seq <= last:
                            continue  # seen before the stream broke
                        last = event.seq
                    yield event
                    if isinstance(event, StateEvent) and event.terminal:
                        return
            except grpc.RpcError as error:
                await self._retry_or_raise(retries, address, error)
                continue
            finally:
                call.cancel()
            # The stream ended without a terminal state: either the job had
            # ended at or before `after_seq`, or the stream was cut short.
            if (await self.get_job(job_id)).done:
                return
            await retries.failed(address, EndedEarly(f"the stream of job {job_id} ended early"))

    async def download_image(self, job_id: str, index: int) -> Image:
        """One stored PNG, checked against its sha256; a broken download
        starts over, on the next address if need be."""
        retries = _Retries(self)
        while True:
            address = self.address
            info: ImageInfo | None = None
            data = bytearray()
            call = self._stub(address).GetImage(
                scheduler_pb2.GetImageRequest(job_id=job_id, index=index),
                metadata=self._metadata,
                timeout=self.timeout * 10,
            )
            try:
                async for chunk in call:
                    if chunk.HasField("info"):
                        info = from_message(ImageInfo, chunk.info)
                    data += chunk.data
            except grpc.RpcError as error:
                await self._retry_or_raise(retries, address, error)
                continue
            finally:
                call.cancel()
            self._reached = True
            break
        if info is None or hashlib.sha256(data).hexdigest() != info.sha256:
            raise SdmeshError(f"image {index} of job {job_id} arrived damaged; try again")
        return Image(info, bytes(data))

    async def list_nodes(self) -> list[Node]:
        _, response = await self._call(lambda s: s.ListNodes, scheduler_pb2.ListNodesRequest())
        return [Node.from_proto(node) for node in response.nodes]

    async def list_models(self) -> list[Model]:
        _, response = await self._call(lambda s: s.ListModels, scheduler_pb2.ListModelsRequest())
        return [Model.from_proto(model) for model in response.models]

    async def drain_node(
        self,
        node: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the drain's, sent to the scheduler)
        undo: bool = False,
    ) -> Node:
        """Stops new work on a node (by id or name). What runs there finishes
        within `timeout` seconds (None: the agent's own shutdown timeout) or is
        handed back to the queue without counting as a failure. `undo=True`
        lets the node take work again."""
        if timeout is not None and timeout <= 0:
            raise InvalidArgumentError(f"timeout: must be positive, got {timeout:g}")
        request = scheduler_pb2.DrainNodeRequest(
            node=node, timeout_seconds=timeout or 0.0, undo=undo
        )
        _, answer = await self._call(lambda s: s.DrainNode, request)
        return Node.from_proto(answer)

    async def health(self, address: str | None = None) -> Health:
        """One replica's role and lease epoch. With `address`, that replica
        alone, once; without, whichever address answers first (a standby
        answers too)."""
        request = scheduler_pb2.GetHealthRequest()
        if address is None:
            answered, health = await self._call(lambda s: s.GetHealth, request)
            return Health.from_proto(health, answered)
        try:
            health = await self._stub(address).GetHealth(
                request, metadata=self._metadata, timeout=self.timeout
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, address) from None
        return Health.from_proto(health, address)


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

    async def delete(self) -> int:
        """Removes the job with its images; returns how many images went."""
        return await self._client.delete(self.id)
