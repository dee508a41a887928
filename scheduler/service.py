"""The client-facing Scheduler service: upload input images, submit,
inspect, cancel and watch jobs, download their images, and list and drain
nodes.

A thin layer: each method converts the request, calls the domain
(admission, the attempts' owner, the event log, the cluster) and converts
the answer back. Errors raised on purpose become their status in the error
interceptor.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from grpc import aio

from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.admission import Admission
from scheduler.attempts import Attempts
from scheduler.cluster import NodeSession
from scheduler.convert import (
    event_to_proto,
    job_state_from_proto,
    job_to_proto,
    model_to_listing,
    node_to_proto,
)
from scheduler.dispatcher import Dispatcher
from scheduler.domain import Job, JobEvent
from scheduler.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted
from scheduler.events import watch
from scheduler.leadership import ReplicaState
from scheduler.principal import Principal, check_user_name, current_principal
from scheduler.runtime import Runtime, UsesRuntime
from sdmesh.convert import input_info_to_proto, spec_request_from_proto, to_message
from sdmesh.errors import InvalidArgument, quote
from sdmesh.wire import package_version

log = logging.getLogger(__name__)

DEFAULT_PAGE = 50
MAX_PAGE = 1000
Context = aio.ServicerContext[Any, Any]


JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_SEQ = 2**31 - 1  # the event table's sequence column is 32-bit
MAX_DRAIN_SECONDS = 7 * 86400.0
MAX_PAGE_TOKEN_CHARS = 256
# Open WatchJob streams. Each one that does not read holds its pending
# message and the one gRPC is writing (a preview is at most 128 KiB,
# scheduler/uploads.py), so these bound what watchers can make the
# scheduler keep: under 400 MB at the total (tests/e2e/test_limits.py).
MAX_WATCHES_PER_USER = 100
MAX_WATCHES = 1000
WATCH_RETRY_SECONDS = 5.0
# Uploads in progress. Uploads have their own bound rather than counting
# against the submit rate (one img2img job is an upload and a submit, a
# ControlNet job up to six calls): each open one holds a partial file of
# up to 32 MiB and a thread while it is written, so a user may have a few
# at once and the scheduler a few dozen.
MAX_UPLOADS_PER_USER = 4
MAX_UPLOADS = 32
UPLOAD_RETRY_SECONDS = 1.0
# An upload holds one of those slots: it must keep sending (a chunk at least
# every UPLOAD_IDLE_SECONDS) and end within UPLOAD_SECONDS, time for 32 MiB
# at half a megabit a second, or a slow sender would hold a slot for good.
UPLOAD_IDLE_SECONDS = 30.0
UPLOAD_SECONDS = 600.0


def _job_id(value: str, field: str = "job_id") -> str:
    if not JOB_ID.fullmatch(value):
        raise InvalidArgument(
            field, f"must be a job id (1-32 letters, digits, '_' or '-'), got {quote(value)}"
        )
    return value


def _encode_page_token(job: Job) -> str:
    raw = json.dumps([job.created_at, job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_page_token(token: str) -> tuple[float, str]:
    """Where the previous page ended. Anything but a token this service
    made is refused, whatever it decodes to."""
    problem = InvalidArgument("page_token", "is not a token from an earlier ListJobs")
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise problem
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, TypeError, binascii.Error, RecursionError, UnicodeError):
        raise problem from None
    if not (isinstance(value, list) and len(value) == 2):
        raise problem
    created_at, job_id = value
    if (
        not isinstance(created_at, (int, float))
        or isinstance(created_at, bool)
        or not math.isfinite(created_at)
        or not isinstance(job_id, str)
        or not JOB_ID.fullmatch(job_id)
    ):
        raise problem
    return float(created_at), job_id


class SchedulerService(UsesRuntime, scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        runtime: Runtime,
        *,
        admission: Admission,
        attempts: Attempts,
        dispatcher: Dispatcher,
        replica: ReplicaState,
        node_window_seconds: float,
    ) -> None:
        super().__init__(runtime)
        self.admission = admission
        self.attempts = attempts
        self.dispatcher = dispatcher
        self.replica = replica
        self.node_window_seconds = node_window_seconds
        self._watches = _Slots("watch", MAX_WATCHES_PER_USER, MAX_WATCHES, WATCH_RETRY_SECONDS)
        self._uploads = _Slots("upload", MAX_UPLOADS_PER_USER, MAX_UPLOADS, UPLOAD_RETRY_SECONDS)
        self._live_protos = _SharedProtos()

    async def _get_job(self, job_id: str) -> Job:
        """The job, if the caller may see it. Another user's job is not
        found, exactly as a job that does not exist: its existence must
        not leak."""
        job = await self.db.run(self.db.store.get_job, _job_id(job_id))
        if job is None or not current_principal().may_act_on(job.owner):
            raise NotFound(f"job {job_id} not found")
        return job

    async def _on_behalf(self, who: Principal, action: str, job: Job, detail: str = "") -> None:
        """Records an admin acting on another user's job."""
        if job.owner != who.user:
            await self.db.run(
                self.db.store.credentials.record,
                _actor(who),
                action,
                job.id,
                f"owner {job.owner}" + (f"; {detail}" if detail else ""),
            )

    def _job_message(self, job: Job, **extra: Any) -> scheduler_pb2.Job:
        """The job with what only this replica knows: its latest step and
        why it waits."""
        return job_to_proto(
            job, progress=self.hub.progress_of(job), reason=self.dispatcher.reason_for(job), **extra
        )

    async def UploadInput(
        self, request_iterator: AsyncIterator[common_pb2.InputChunk], context: Context
    ) -> common_pb2.InputInfo:
        """Stores an input image for the caller, who alone may name it in
        a job (`scheduler.inputs` checks and stores it)."""
        who = current_principal()
        with self._uploads.slot(who.user):
            try:
                async with asyncio.timeout(UPLOAD_SECONDS):
                    info = await self.inputs.upload(self.db, who.user, _timely(request_iterator))
            except TimeoutError:
                raise InvalidArgument(
                    "image", f"an upload must end within {UPLOAD_SECONDS:g}s"
                ) from None
        log.debug(
            "input %s (%s, %d bytes) uploaded by %s",
            info.sha256,
            info.format,
            info.size_bytes,
            who.user,
        )
        return input_info_to_proto(info)

    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: Context
    ) -> scheduler_pb2.SubmitJobResponse:
        spec = spec_request_from_proto(request.spec)
        who = current_principal()
        job, created = await self.admission.submit(spec, who.user, limit_key=who.limit_key)
        # A job just queued has not met a dispatch pass yet: no why to tell.
        message = job_to_proto(job, progress=self.hub.progress_of(job), reason=job.reason)
        return scheduler_pb2.SubmitJobResponse(job=message, created=created)

    async def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: Context
    ) -> scheduler_pb2.Job:
        job = await self._get_job(request.job_id)
        attempts = await self.db.run(self.db.store.attempts, job.id)
        return self._job_message(job, attempts=attempts)

    async def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: Context
    ) -> scheduler_pb2.ListJobsResponse:
        limit = request.limit or DEFAULT_PAGE
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument("limit", f"must be between 1 and {MAX_PAGE}, got {limit}")
        states = [job_state_from_proto(value, "states") for value in request.states]
        before = _decode_page_token(request.page_token) if request.page_token else None
        owner = check_user_name(request.owner, "owner") if request.owner else ""
        who = current_principal()
        if not who.admin:
            if owner and owner != who.user:
                raise PermissionDenied(
                    f"only an admin may list another user's jobs; you are {who.user}"
                )
            owner = who.user
        jobs = await self.db.run(
            self.db.store.list_jobs,
            states=states,
            owner=owner,
            limit=limit + 1,
            before=before,
        )
        response = scheduler_pb2.ListJobsResponse(
            jobs=[self._job_message(job) for job in jobs[:limit]]
        )
        if len(jobs) > limit:
            response.next_page_token = _encode_page_token(jobs[limit - 1])
        return response

    async def CancelJob(
        self, request: scheduler_pb2.CancelJobRequest, context: Context
    ) -> scheduler_pb2.Job:
        job = await self._get_job(request.job_id)
        who = current_principal()
        if not await self.attempts.cancel(job.id, f"cancelled by {who.user}"):
            raise NotFound(f"job {job.id} not found")
        await self._on_behalf(who, "cancel-job", job)
        return self._job_message(await self._get_job(job.id))

    async def DeleteJob(
        self, request: scheduler_pb2.DeleteJobRequest, context: Context
    ) -> scheduler_pb2.DeleteJobResponse:
        """Cancels the job if it has not ended, then removes it with its
        events and images."""
        job = await self._get_job(request.job_id)
        who = current_principal()
        if not job.state.terminal:
            await self.attempts.cancel(job.id, f"deleted by {who.user}")
        deleted = await self.db.run(self.db.store.removal.delete_finished, [job.id])
        if not deleted.job_ids:  # it had not ended yet after all: a cancel racing a start
            raise FailedPrecondition(f"job {job.id} is still ending; try again in a moment")
        removed = await asyncio.get_running_loop().run_in_executor(
            None, self.images.remove_job, job.id
        )
        await self.inputs.forget(self.db, deleted.inputs)
        await self._on_behalf(who, "delete-job", job)
        log.info("job %s deleted by %s (%d image files)", job.id, who.user, removed)
        return scheduler_pb2.DeleteJobResponse(images_deleted=removed)

    async def WatchJob(
        self, request: scheduler_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[common_pb2.JobEvent]:
        if not 0 <= request.after_seq <= MAX_SEQ:
            raise InvalidArgument("after_seq", f"must be between 0 and {MAX_SEQ}")
        job = await self._get_job(request.job_id)
        with self._watches.slot(current_principal().user):
            async for event in watch(self.hub, self.db, job.id, request.after_seq):
                yield self._live_protos.get(event) if not event.durable else event_to_proto(event)

    async def GetImage(
        self, request: scheduler_pb2.GetImageRequest, context: Context
    ) -> AsyncIterator[scheduler_pb2.ImageChunk]:
        if request.index < 0:
            raise InvalidArgument("index", "must not be negative")
        job = await self._get_job(request.job_id)
        found = await self.db.run(self.db.store.image, job.id, request.index)
        if found is None:
            raise NotFound(
                f"job {job.id} has no image {request.index} "
                f"({len(job.images)} stored, state {job.state.value})"
            )
        meta, path = found
        # Read from disk one chunk at a time: a watcher that never reads
        # holds one chunk, not the whole image.
        offset = 0
        async for data in self.images.stream(path):
            chunk = scheduler_pb2.ImageChunk(offset=offset, data=data)
            if offset == 0:
                chunk.info.CopyFrom(to_message(meta, common_pb2.ImageInfo))
            offset += len(data)
            yield chunk

    async def ListNodes(
        self, request: scheduler_pb2.ListNodesRequest, context: Context
    ) -> scheduler_pb2.ListNodesResponse:
        """Connected nodes with their live stats, then the ones seen within
        the memory window that are gone."""
        since = self.clock() - self.node_window_seconds
        records = await self.db.run(self.db.store.nodes.seen_since, since)
        connected = sorted(self.cluster.sessions.values(), key=lambda s: s.name)
        response = scheduler_pb2.ListNodesResponse(
            nodes=[self._session_node(session) for session in connected]
        )
        for record in records:
            if record.info.node_id not in self.cluster.sessions:
                response.nodes.append(
                    node_to_proto(
                        record.info,
                        connected=False,
                        last_seen=record.last_seen,
                        stats={},
                        active_jobs={},
                    )
                )
        return response

    def _session_node(self, session: NodeSession) -> scheduler_pb2.Node:
        return node_to_proto(
            session.info,
            connected=True,
            last_seen=session.last_heard,
            stats=session.stats,
            active_jobs=self.attempts.active_jobs(session),
            draining=session.draining,
            unhealthy=session.unhealthy,
        )

    async def DrainNode(
        self, request: scheduler_pb2.DrainNodeRequest, context: Context
    ) -> scheduler_pb2.Node:
        if not request.node or len(request.node) > 128:
            raise InvalidArgument("node", "must be a node id or name (1-128 characters)")
        timeout = request.timeout_seconds
        if not (math.isfinite(timeout) and 0 <= timeout <= MAX_DRAIN_SECONDS):
            raise InvalidArgument(
                "timeout_seconds",
                f"must be between 0 and {MAX_DRAIN_SECONDS:.0f} seconds (0: the agent's own)",
            )
        who = current_principal()
        if not who.admin:
            raise PermissionDenied(f"draining a node needs an admin's API key; you are {who.user}")
        session = self.cluster.find(request.node)
        action = "undrain-node" if request.undo else "drain-node"
        if request.undo:
            self.cluster.resume(session)
            log.info("node %s: drain undone by %s", session.name, who.user)
            self.wake()
        else:
            self.cluster.drain(session, timeout)
            log.info("node %s drained by %s", session.name, who.user)
        await self.db.run(
            self.db.store.credentials.record,
            _actor(who),
            action,
            session.node_id,
            "" if request.undo else f"timeout {timeout:g}s",
        )
        return self._session_node(session)

    async def GetHealth(
        self, request: scheduler_pb2.GetHealthRequest, context: Context
    ) -> scheduler_pb2.Health:
        replica = self.replica
        return scheduler_pb2.Health(
            role=scheduler_pb2.ROLE_LEADER if replica.leading else scheduler_pb2.ROLE_STANDBY,
            epoch=replica.epoch,
            replica_id=replica.replica_id,
            leader_address=replica.address if replica.leading else replica.leader_address,
            version=package_version(),
        )

    async def ListModels(
        self, request: scheduler_pb2.ListModelsRequest, context: Context
    ) -> scheduler_pb2.ListModelsResponse:
        since = self.clock() - self.node_window_seconds
        known = await self.db.run(self.db.store.nodes.models_seen_since, since)
        holders = self.cluster.holders()
        return scheduler_pb2.ListModelsResponse(
            models=[model_to_listing(m, sorted(holders.get((m.kind, m.name), []))) for m in known]
        )


async def _timely(
    chunks: AsyncIterator[common_pb2.InputChunk],
) -> AsyncIterator[tuple[int, bytes]]:
    """An upload's (offset, data), each within UPLOAD_IDLE_SECONDS of the last."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(iterator), UPLOAD_IDLE_SECONDS)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise InvalidArgument(
                "image", f"no chunk came for {UPLOAD_IDLE_SECONDS:g}s; an upload must keep sending"
            ) from None
        yield chunk.offset, chunk.data


class _Slots:
    """Long calls of one kind open at once, per user and in all: past
    either bound a call is refused as RESOURCE_EXHAUSTED."""

    def __init__(self, what: str, per_user: int, total: int, retry_seconds: float) -> None:
        self.what = what
        self.per_user = per_user
        self.total = total
        self.retry_seconds = retry_seconds
        self.open: dict[str, int] = {}

    @contextmanager
    def slot(self, user: str) -> Iterator[None]:
        mine = self.open.get(user, 0)
        if mine >= self.per_user:
            raise ResourceExhausted(
                f"{self.what} limit: {user} already has {mine} {self.what} streams open "
                f"(at most {self.per_user} per user)",
                self.retry_seconds,
            )
        if sum(self.open.values()) >= self.total:
            raise ResourceExhausted(
                f"{self.what} limit: {self.total} {self.what} streams are open on this scheduler",
                self.retry_seconds,
            )
        self.open[user] = mine + 1
        try:
            yield
        finally:
            self.open[user] -= 1
            if not self.open[user]:
                del self.open[user]


class _SharedProtos:
    """The hub hands one live event (a preview, a step) to every watcher of
    its job: it is converted once, and every stream sends that message,
    instead of each holding its own copy of the preview."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[int, tuple[JobEvent, common_pb2.JobEvent]] = OrderedDict()

    def get(self, event: JobEvent) -> common_pb2.JobEvent:
        hit = self._items.get(id(event))
        if hit is not None and hit[0] is event:
            return hit[1]
        message = event_to_proto(event)
        self._items[id(event)] = (event, message)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return message


def _actor(who: Principal) -> str:
    return f"{who.user} (key {who.key_id})" if who.key_id else who.user
