"""The client-facing Scheduler service: submit, inspect, cancel and watch
jobs, download their images, and list nodes and models.

This module and `convert` are where protobuf meets the domain; everything
below works on dataclasses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.cluster import DrainCommand, NodeSession, ResumeCommand, StopCommand
from scheduler.convert import (
    attempt_to_proto,
    event_to_proto,
    image_to_proto,
    job_state_from_proto,
    job_to_proto,
    model_to_listing,
    node_to_proto,
    spec_request_from_proto,
)
from scheduler.dispatcher import seen_gpus
from scheduler.domain import Job, Progress
from scheduler.errors import FailedPrecondition, InvalidArgument, NotFound
from scheduler.placement import demand_for, unresolvable
from scheduler.principal import current_principal
from scheduler.replica import ReplicaState, package_version
from scheduler.runtime import Runtime, UsesRuntime
from scheduler.spec import MAX_SEED, JobSpec, resolve
from scheduler.states import JobState

log = logging.getLogger(__name__)

DEFAULT_PAGE = 50
MAX_PAGE = 1000
Context = aio.ServicerContext[Any, Any]


def new_job_id() -> str:
    return secrets.token_hex(8)


def _job_id(value: str, field: str = "job_id") -> str:
    if not value or len(value) > 32:
        raise InvalidArgument(field, "must be a job id (1-32 characters)")
    return value


def _encode_page_token(job: Job) -> str:
    raw = json.dumps([job.created_at, job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_page_token(token: str) -> tuple[float, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created_at), str(job_id)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument("page_token", "is not a token from an earlier ListJobs") from exc


class SchedulerService(UsesRuntime, scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        runtime: Runtime,
        replica: ReplicaState,
        *,
        node_window_seconds: float,
        max_attempts: int,
    ) -> None:
        super().__init__(runtime)
        self.replica = replica
        self.node_window_seconds = node_window_seconds
        self.max_attempts = max_attempts

    async def _known_models(self) -> dict[str, int]:
        """Models seen within the node memory window, with their weight size."""
        since = self.clock() - self.node_window_seconds
        remembered = await self.db.run(self.db.store.nodes.models_seen_since, since)
        known = {model.name: model.weight_bytes for model in remembered}
        for name, weight_bytes in self.cluster.models().items():
            known[name] = max(weight_bytes, known.get(name, 0))
        return known

    async def _check_resolvable(self, spec: JobSpec, weight_bytes: int) -> None:
        """Rejects a job that no GPU seen within the window could ever take."""
        since = self.clock() - self.node_window_seconds
        seen = seen_gpus(await self.db.run(self.db.store.nodes.seen_since, since))
        problem = unresolvable(demand_for("", spec, weight_bytes, self.estimates), seen)
        if problem is not None:
            raise FailedPrecondition(problem)

    async def _get_job(self, job_id: str) -> Job:
        job = await self.db.run(self.db.store.get_job, _job_id(job_id))
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def _job_message(self, job: Job) -> scheduler_pb2.Job:
        progress: Progress | None = None
        if job.state is JobState.RUNNING:
            latest = self.hub.latest_progress(job.id)
            if latest is not None and latest.attempt == job.attempt:
                assert isinstance(latest.body, Progress)
                progress = latest.body
        message = job_to_proto(job, progress)
        if job.state is JobState.QUEUED and job.id in self.dispatcher.waiting:
            # Keep why it came back to the queue, if it did, and say why it waits.
            waiting = f"waiting: {self.dispatcher.waiting[job.id]}"
            message.reason = f"{job.reason}; {waiting}" if job.reason else waiting
        return message

    async def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: Context
    ) -> scheduler_pb2.SubmitJobResponse:
        user = current_principal().user
        known = await self._known_models()
        spec = resolve(
            spec_request_from_proto(request.spec),
            known_models=known,
            random_seed=lambda: secrets.randbelow(MAX_SEED + 1),
        )
        await self._check_resolvable(spec, known.get(spec.model, 0))
        job, created = await self.db.run(
            self.db.store.submit, new_job_id(), user, spec, self.max_attempts
        )
        if created:
            log.info(
                "job %s submitted by %s: %s %dx%d, %d steps",
                job.id,
                user,
                spec.model,
                spec.width,
                spec.height,
                spec.steps,
            )
            self.dispatcher.wake()
        return scheduler_pb2.SubmitJobResponse(job=self._job_message(job), created=created)

    async def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: Context
    ) -> scheduler_pb2.Job:
        job = await self._get_job(request.job_id)
        message = self._job_message(job)
        for attempt in await self.db.run(self.db.store.attempts, job.id):
            message.attempts.append(attempt_to_proto(attempt))
        return message

    async def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: Context
    ) -> scheduler_pb2.ListJobsResponse:
        limit = request.limit or DEFAULT_PAGE
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument("limit", f"must be between 1 and {MAX_PAGE}, got {limit}")
        states = [job_state_from_proto(value, "states") for value in request.states]
        before = _decode_page_token(request.page_token) if request.page_token else None
        jobs = await self.db.run(
            self.db.store.list_jobs,
            states=states,
            owner=request.owner,
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
        job_id = _job_id(request.job_id)
        reason = f"cancelled by {current_principal().user}"
        result = await self.db.run(self.db.store.cancel, job_id, reason)
        if result is None:
            raise NotFound(f"job {job_id} not found")
        before, events = result
        if events is not None:
            log.info("job %s %s", job_id, reason)
            self.hub.publish(events)
            self.cluster.orphans.pop(job_id, None)  # its agent is told if it comes back
            holder = self.cluster.holder(job_id, before.attempt)
            if holder is not None:
                holder.attempts[job_id].stopping = True
                holder.send(StopCommand(job_id, before.attempt, reason))
        return self._job_message(await self._get_job(job_id))

    async def WatchJob(
        self, request: scheduler_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[common_pb2.JobEvent]:
        job = await self._get_job(request.job_id)
        if request.after_seq < 0:
            raise InvalidArgument("after_seq", "must not be negative")
        with self.hub.subscribe(job.id) as subscription:
            last = request.after_seq
            for event in await self.db.run(self.db.store.events_after, job.id, last):
                if event.terminal:
                    # A late watcher still gets the last picture first.
                    preview = self.hub.latest_preview(job.id)
                    if preview is not None:
                        yield event_to_proto(preview)
                last = event.seq
                yield event_to_proto(event)
                if event.terminal:
                    return
            if (await self._get_job(job.id)).state.terminal:
                # It ended after the read above, or the caller has seen the end.
                for event in await self.db.run(self.db.store.events_after, job.id, last):
                    yield event_to_proto(event)
                return
            sent_live = [
                live
                for live in (self.hub.latest_progress(job.id), self.hub.latest_preview(job.id))
                if live is not None
            ]
            for live in sent_live:
                yield event_to_proto(live)
            while True:
                event = await subscription.get()
                if any(event is sent for sent in sent_live):
                    continue  # already sent as the latest one
                if event.durable:
                    if event.seq <= last:
                        if event.terminal:
                            return  # the caller asked to resume past the end
                        continue  # already replayed from the store
                    if event.seq > last + 1:
                        # Commits can be published out of order; fill the gap.
                        for missing in await self.db.run(self.db.store.events_after, job.id, last):
                            if missing.seq >= event.seq:
                                break
                            yield event_to_proto(missing)
                    last = event.seq
                yield event_to_proto(event)
                if event.terminal:
                    return

    async def GetImage(
        self, request: scheduler_pb2.GetImageRequest, context: Context
    ) -> AsyncIterator[scheduler_pb2.ImageChunk]:
        job = await self._get_job(request.job_id)
        found = await self.db.run(self.db.store.image, job.id, request.index)
        if found is None:
            raise NotFound(
                f"job {job.id} has no image {request.index} "
                f"({len(job.images)} stored, state {job.state.value})"
            )
        meta, path = found
        chunks = await asyncio.get_running_loop().run_in_executor(None, self.images.chunks, path)
        offset = 0
        for number, data in enumerate(chunks):
            chunk = scheduler_pb2.ImageChunk(offset=offset, data=data)
            if number == 0:
                chunk.info.CopyFrom(image_to_proto(meta))
            offset += len(data)
            yield chunk

    async def ListNodes(
        self, request: scheduler_pb2.ListNodesRequest, context: Context
    ) -> scheduler_pb2.ListNodesResponse:
        """Connected nodes with their live stats, then the ones seen within
        the memory window that are gone."""
        since = self.clock() - self.node_window_seconds
        records = await self.db.run(self.db.store.nodes.seen_since, since)
        response = scheduler_pb2.ListNodesResponse()
        for session in sorted(self.cluster.sessions.values(), key=lambda s: s.info.name):
            response.nodes.append(self._session_node(session))
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
        active: dict[int, int] = {}
        for attempt in session.attempts.values():
            active[attempt.gpu_index] = active.get(attempt.gpu_index, 0) + 1
        return node_to_proto(
            session.info,
            connected=True,
            last_seen=session.last_heard,
            stats=session.stats,
            active_jobs=active,
            draining=session.draining,
            unhealthy=session.unhealthy,
        )

    async def DrainNode(
        self, request: scheduler_pb2.DrainNodeRequest, context: Context
    ) -> scheduler_pb2.Node:
        if not request.node:
            raise InvalidArgument("node", "must be a node id or name")
        if request.timeout_seconds < 0:
            raise InvalidArgument("timeout_seconds", "must not be negative (0: the agent's own)")
        matches = [
            session
            for session in self.cluster.sessions.values()
            if request.node in (session.node_id, session.info.name)
        ]
        if not matches:
            raise NotFound(f"node {request.node} is not connected")
        if len(matches) > 1:
            ids = ", ".join(sorted(session.node_id for session in matches))
            raise FailedPrecondition(f"{request.node} names several nodes ({ids}); use an id")
        session = matches[0]
        who = current_principal().user
        if request.undo:
            session.draining = False
            session.send(ResumeCommand())
            log.info("node %s: drain undone by %s", session.info.name, who)
            self.dispatcher.wake()
        else:
            session.draining = True
            session.send(DrainCommand(request.timeout_seconds))
            log.info("node %s drained by %s", session.info.name, who)
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
        holders: dict[str, list[str]] = {}
        for session in self.cluster.sessions.values():
            for model in session.info.models:
                holders.setdefault(model.name, []).append(session.node_id)
        return scheduler_pb2.ListModelsResponse(
            models=[model_to_listing(m, sorted(holders.get(m.name, []))) for m in known]
        )
