"""The agent-facing service: one bidirectional stream per connected agent.

Up come hello, stats and job updates; down go assignments and stops. Every
job update is checked against the attempt this node holds: one from a stale
attempt changes nothing, and the agent is told to stop that attempt.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

from grpc import aio

from protos import agent_pb2, agent_pb2_grpc
from scheduler.cluster import ActiveAttempt, NodeSession, StopCommand
from scheduler.convert import (
    command_to_proto,
    device_stats_from_proto,
    hello_from_proto,
    profile_from_proto,
)
from scheduler.domain import (
    AttemptOutcome,
    AttemptProfile,
    ImageMeta,
    JobEvent,
    NodeInfo,
    Preview,
    Progress,
)
from scheduler.errors import AlreadyExists, InvalidArgument
from scheduler.estimator import format_bytes
from scheduler.liveness import Supervisor, requeue_lost
from scheduler.placement import shape_of
from scheduler.runtime import Runtime, UsesRuntime
from scheduler.spec import check_labels
from scheduler.store.leader import NotLeader
from scheduler.uploads import Chunk, UploadError

log = logging.getLogger(__name__)

HELLO_TIMEOUT_SECONDS = 30.0
NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_OUTCOMES = {
    agent_pb2.ATTEMPT_OUTCOME_SUCCEEDED: AttemptOutcome.SUCCEEDED,
    agent_pb2.ATTEMPT_OUTCOME_FAILED: AttemptOutcome.FAILED,
    agent_pb2.ATTEMPT_OUTCOME_STOPPED: AttemptOutcome.STOPPED,
    agent_pb2.ATTEMPT_OUTCOME_RELEASED: AttemptOutcome.RELEASED,
}


def check_hello(node: NodeInfo) -> None:
    if not NODE_ID.match(node.node_id):
        raise InvalidArgument("hello.node_id", "must be 1-64 letters, digits, '.', '_' or '-'")
    if not node.name or len(node.name) > 128:
        raise InvalidArgument("hello.name", "must be 1-128 characters")
    if not node.devices:
        raise InvalidArgument("hello.devices", "must list at least one device")
    if len({device.index for device in node.devices}) != len(node.devices):
        raise InvalidArgument("hello.devices", "device indexes must be unique")
    for model in node.models:
        if not model.name or len(model.name) > 128:
            raise InvalidArgument("hello.models", "model names must be 1-128 characters")
    check_labels(node.labels, "hello.labels")


class AgentGateway(UsesRuntime, agent_pb2_grpc.AgentGatewayServicer):
    def __init__(self, runtime: Runtime, supervisor: Supervisor) -> None:
        super().__init__(runtime)
        self.supervisor = supervisor
        self.liveness = supervisor.config
        self._background: set[asyncio.Task[None]] = set()
        # Set while this replica stops leading (it shuts down or lost the
        # lease): attempts stay as they are in the store, and the next
        # leader waits for their agents to re-attach them.
        self.closing = False

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.SchedulerMessage]:
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT_SECONDS)
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "hello":
            raise InvalidArgument("hello", "the first message on the stream must be a hello")
        info = hello_from_proto(first.hello)
        check_hello(info)
        self._replace_silent(info)
        session = self.cluster.connect(info, self.clock())
        session.draining = first.hello.draining
        reader: asyncio.Task[None] | None = None
        try:
            await self.db.run(self.db.store.nodes.upsert, info)
            await self._reattach(session, first.hello.held)
            log.info(
                "node %s (%s) connected from %s with %d device(s), models: %s",
                info.name,
                info.node_id,
                context.peer(),
                len(info.devices),
                ", ".join(model.name for model in info.models) or "none",
            )
            self.dispatcher.wake()
            yield agent_pb2.SchedulerMessage(
                welcome=agent_pb2.Welcome(
                    heartbeat_seconds=self.liveness.heartbeat_seconds,
                    lease_seconds=self.liveness.lease_seconds,
                )
            )
            reader = asyncio.create_task(self._read(session, request_iterator))
            while (command := await session.outbox.get()) is not None:
                yield command_to_proto(command)
        finally:
            if reader is not None:
                reader.cancel()
            # Runs on its own: this generator may be closed by a cancellation.
            self._spawn(self._disconnected(session))

    def _replace_silent(self, info: NodeInfo) -> None:
        """A node that dials again while its old stream still looks open (a
        partition healed, a dead connection not yet noticed) replaces it,
        once that stream has been silent for two heartbeats. A second agent
        with the same id, while the first still talks, is refused."""
        existing = self.cluster.sessions.get(info.node_id)
        if existing is None:
            return
        now = self.clock()
        if now - existing.last_heard <= 2 * self.liveness.heartbeat_seconds:
            raise AlreadyExists(
                f"node id {info.node_id} is already connected as {existing.info.name!r}; "
                "every agent needs its own --data-dir"
            )
        log.info("node %s dialled again; dropping its silent stream", info.name)
        self.cluster.disconnect(existing)
        self.cluster.orphan(
            existing, now + self.liveness.lease_seconds, f"node {info.name} reconnected"
        )

    async def _reattach(self, session: NodeSession, held: Iterable[agent_pb2.HeldAttempt]) -> None:
        """Takes back the attempts the agent still holds and the scheduler
        still expects of it; stops the others. Attempts the scheduler
        expected of it that it no longer holds (it restarted) are lost."""
        now, name = self.clock(), session.info.name
        for attempt in held:
            if self.cluster.adopt(session, attempt.job_id, attempt.attempt, now):
                log.info(
                    "node %s re-attached job %s attempt %d", name, attempt.job_id, attempt.attempt
                )
            else:
                self._stop_stale(session, attempt.job_id, attempt.attempt)
        for orphan in self.cluster.orphans_of(session.node_id):
            del self.cluster.orphans[orphan.active.job_id]
            await requeue_lost(
                self,
                orphan.active,
                f"node {name} came back without it (the agent restarted)",
                failure=orphan.active.started_at is not None,
            )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    async def drain_background(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _read(
        self, session: NodeSession, requests: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        try:
            async for message in requests:
                session.last_heard = self.clock()
                kind = message.WhichOneof("body")
                if kind == "stats":
                    stats = [device_stats_from_proto(d) for d in message.stats.devices]
                    self.cluster.report_stats(
                        session.node_id, stats, self.clock(), message.stats.host_free_bytes
                    )
                elif kind == "job":
                    try:
                        await self._job_update(session, message.job)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        # One update that cannot be handled (the database is
                        # down, say) must not cut the node off.
                        log.exception("node %s: handling a job update failed", session.info.name)
                elif kind == "health":
                    report = message.health
                    self.supervisor.health_reported(
                        session, report.gpu_index, report.healthy, report.detail
                    )
                else:
                    log.warning("node %s sent an unexpected %s", session.info.name, kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("stream from node %s ended: %s", session.info.name, exc)
        finally:
            session.close()

    def _stop_stale(self, session: NodeSession, job_id: str, attempt: int) -> None:
        if (job_id, attempt) in session.stale_stopped:
            return
        session.stale_stopped.add((job_id, attempt))
        log.info(
            "node %s reported stale attempt %s/%d; stopping it", session.info.name, job_id, attempt
        )
        session.send(StopCommand(job_id, attempt, "stale attempt: the job has moved on"))

    async def _job_update(self, session: NodeSession, update: agent_pb2.JobUpdate) -> None:
        job_id, attempt = update.job_id, update.attempt
        kind = update.WhichOneof("body")
        active = session.current(job_id, attempt)
        if kind == "ended":
            # Ending an attempt writes files and commits; a closing stream
            # must not cut that short. It runs as its own task, and the
            # disconnect handler waits for it.
            ending = asyncio.ensure_future(self._ended(session, job_id, attempt, update.ended))
            session.ending.add(ending)
            ending.add_done_callback(session.ending.discard)
            await asyncio.shield(ending)
            return
        if active is None:
            self._stop_stale(session, job_id, attempt)
            return
        now = self.clock()
        if kind == "progress":
            active.last_step_at = now
            if not active.stopping:
                body = Progress(update.progress.step, update.progress.total_steps)
                self.hub.publish([JobEvent(job_id, 0, attempt, now, body)])
        elif kind == "preview":
            if not active.stopping:
                p = update.preview
                preview = Preview(p.step, p.total_steps, p.width, p.height, p.png)
                self.hub.publish([JobEvent(job_id, 0, attempt, now, preview)])
        elif kind == "started":
            active.started_at = now
            events = await self.db.run(self.db.store.start, job_id, attempt)
            if events is not None:
                self.hub.publish(events)
        elif kind == "image":
            self._receive_chunk(session, active, update.image)

    def _receive_chunk(
        self, session: NodeSession, active: ActiveAttempt, chunk: agent_pb2.ImageUpload
    ) -> None:
        try:
            active.uploads.add(
                Chunk(
                    chunk.index,
                    chunk.offset,
                    chunk.data,
                    chunk.seed,
                    chunk.width,
                    chunk.height,
                    chunk.last,
                    chunk.sha256,
                    chunk.size_bytes,
                )
            )
        except UploadError as exc:
            # The buffer remembers the error; the attempt fails when it ends.
            log.warning("node %s: bad upload for %s: %s", session.info.name, active.job_id, exc)

    async def _ended(
        self, session: NodeSession, job_id: str, attempt: int, ended: agent_pb2.AttemptEnded
    ) -> None:
        active = session.current(job_id, attempt)
        if active is None:
            return  # stale, or already handled: its slot is free either way
        try:
            events = await self._close_attempt(session, active, ended)
            if events:
                self.hub.publish(events)
        finally:
            # The slot frees once the outcome is written (or could not be).
            if session.attempts.get(job_id) is active:
                del session.attempts[job_id]
            self.dispatcher.wake()

    async def _close_attempt(
        self, session: NodeSession, active: ActiveAttempt, ended: agent_pb2.AttemptEnded
    ) -> list[JobEvent] | None:
        outcome = _OUTCOMES.get(ended.outcome, AttemptOutcome.FAILED)
        profile = profile_from_proto(ended.profile)
        reason = ended.reason or outcome.value
        try:
            await self._learn(active, outcome, ended.error_kind, profile)
        except Exception:  # learning must never keep the outcome from being written
            log.exception("learning from %s attempt %d failed", active.job_id, active.attempt)
        if outcome is AttemptOutcome.SUCCEEDED:
            if active.stopping:
                return None  # cancelled before it finished: the result is not wanted
            return await self._store_result(session, active, profile)
        failed = outcome is AttemptOutcome.FAILED
        return await self.db.run(
            self.db.store.requeue,
            active.job_id,
            active.attempt,
            outcome if failed else AttemptOutcome.RELEASED,
            f"{session.info.name}: {reason}" if failed else reason,
            count_failure=failed,
            profile=profile,
        )

    async def _learn(
        self,
        active: ActiveAttempt,
        outcome: AttemptOutcome,
        error_kind: str,
        profile: AttemptProfile,
    ) -> None:
        """Folds the attempt's measured peak into the VRAM estimates. After
        an out-of-memory the figure rises above what the card had, so the
        retry needs a card with more room or a lower memory mode."""
        shape = shape_of(active.spec)
        out_of_memory = outcome is AttemptOutcome.FAILED and error_kind == "oom"
        if not out_of_memory and outcome is not AttemptOutcome.SUCCEEDED:
            return
        learned = self.estimates.learn(
            shape,
            active.memory_mode,
            out_of_memory=out_of_memory,
            peak_bytes=profile.peak_vram_bytes,
            estimate_bytes=active.vram_bytes,
        )
        if learned is not None:
            log.info(
                "learned %s needs %s (%s, %s)",
                shape,
                format_bytes(learned.peak_bytes),
                active.memory_mode.value,
                "out of memory" if out_of_memory else "measured peak",
            )
            await self.db.run(self.db.store.estimates.save, shape.key(active.memory_mode), learned)

    async def _store_result(
        self, session: NodeSession, active: ActiveAttempt, profile: AttemptProfile
    ) -> list[JobEvent] | None:
        job_id, attempt = active.job_id, active.attempt

        async def failed(reason: str) -> list[JobEvent] | None:
            return await self.db.run(
                self.db.store.requeue,
                job_id,
                attempt,
                AttemptOutcome.FAILED,
                reason,
                count_failure=True,
                profile=profile,
            )

        try:
            images = active.uploads.complete(active.expected_images)
        except UploadError as exc:
            return await failed(f"{session.info.name}: {exc}")
        loop = asyncio.get_running_loop()
        stored: list[tuple[ImageMeta, str]] = []
        try:
            for meta, data in images:
                path = await loop.run_in_executor(
                    None, self.images.write, job_id, attempt, meta.index, data
                )
                stored.append((meta, path))
            events = await self.db.run(self.db.store.succeed, job_id, attempt, stored, profile)
        except Exception as exc:  # a full disk, a lost database connection
            log.exception("storing the result of %s attempt %d failed", job_id, attempt)
            await loop.run_in_executor(None, self.images.remove, [path for _, path in stored])
            return await failed(
                f"the scheduler could not store the result: {type(exc).__name__}: {exc}"
            )
        if events is None:  # cancelled meanwhile: the first terminal state won
            await loop.run_in_executor(None, self.images.remove, [path for _, path in stored])
        return events

    async def _disconnected(self, session: NodeSession) -> None:
        self.cluster.disconnect(session)  # no new work goes to it from now on
        if session.ending:
            await asyncio.gather(*session.ending, return_exceptions=True)
        if self.closing:
            session.take_attempts()
            return
        name = session.info.name
        if session.lost:
            # Its lease ran out: what it held is lost now, not after a wait.
            held = session.take_attempts()
            log.info("node %s lost holding %d attempt(s)", name, len(held))
            for active in held:
                await requeue_lost(self, active, f"node {name} lost: {session.lost}", failure=True)
        else:
            # The stream dropped: the agent may still be running its work
            # and may come back for it within the lease.
            deadline = session.last_heard + self.liveness.lease_seconds
            orphans = self.cluster.orphan(session, deadline, f"node {name} disconnected")
            log.info("node %s disconnected holding %d attempt(s)", name, len(orphans))
        await self.db.run(self.db.store.nodes.touch, [session.node_id])
        self.dispatcher.wake()


def _log_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    if isinstance(error, NotLeader):  # expected after stepping down: the fence held
        log.info("dropped after stepping down: %s", error)
    else:
        log.error("background task failed", exc_info=error)
