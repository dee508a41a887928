"""In-flight attempts: every attempt that is out on an agent, or waiting for
its agent to come back. `Attempts` is the one writer of their state, as
vLLM's scheduler is of its requests: the dispatcher binds through it, the
agent stream hands it what agents say, liveness hands it its verdicts, a
cancel and a change of leader go through it. Nothing else edits an attempt,
sends a stop or re-queues a job.

Every state change it makes is a store transition (committed with its
event, fenced by the attempt number and the leader epoch), then the events
are published and the dispatcher is woken.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace

from scheduler.attempt_state import ActiveAttempt, Orphan, Told, bound, count_by_owner, holder
from scheduler.cluster import NodeSession
from scheduler.commands import AssignCommand, BatchPartner, StopCommand
from scheduler.domain import Job, JobEvent
from scheduler.estimator import format_bytes
from scheduler.placement import Placed, shape_of
from scheduler.runtime import Runtime, UsesRuntime
from scheduler.uploads import UploadBuffer, UploadError, report_problem
from sdmesh.convert import unsound_numbers
from sdmesh.domain import (
    AttemptOutcome,
    AttemptProfile,
    AttemptUpdate,
    Ended,
    ImageChunk,
    ImageInfo,
    Preview,
    Progress,
    Started,
)

log = logging.getLogger(__name__)


class Attempts(UsesRuntime):
    def __init__(self, runtime: Runtime, *, lease_seconds: float) -> None:
        super().__init__(runtime)
        self.lease_seconds = lease_seconds
        # By stream (a node that dials again gets a new session, while the
        # old one may still be settling): session -> job id -> attempt.
        self._held: dict[NodeSession, dict[str, ActiveAttempt]] = {}
        self._orphans: dict[str, Orphan] = {}  # job id -> attempt waiting for its agent
        self._told: dict[NodeSession, Told] = {}  # attempts each node was told are over
        self._ending: dict[NodeSession, set[asyncio.Task[None]]] = {}  # being closed
        # Set while this replica stops leading (it shuts down or lost the
        # lease): attempts stay as they are in the store, and the next
        # leader waits for their agents to re-attach them.
        self.closing = False

    # ---- reads ---------------------------------------------------------------

    def held(self, session: NodeSession) -> list[ActiveAttempt]:
        return list(self._held.get(session, {}).values())

    def held_by_node(self) -> dict[str, list[ActiveAttempt]]:
        """What each connected node holds, by node id."""
        return {s.node_id: self.held(s) for s in self.cluster.sessions.values()}

    def orphans(self) -> list[Orphan]:
        return list(self._orphans.values())

    def current(self, session: NodeSession, job_id: str, attempt: int) -> ActiveAttempt | None:
        active = self._held.get(session, {}).get(job_id)
        return active if active is not None and active.attempt == attempt else None

    def by_owner(self) -> dict[str, int]:
        """Assigned and running jobs per user, for fair share."""
        held = [a for attempts in self._held.values() for a in attempts.values()]
        return count_by_owner([*held, *(orphan.active for orphan in self._orphans.values())])

    def active_jobs(self, session: NodeSession) -> dict[int, int]:
        """GPU index -> how many attempts are bound to it."""
        return dict(Counter(active.gpu_index for active in self.held(session)))

    # ---- binding -------------------------------------------------------------

    async def assign(self, job: Job, placed: Placed, partners: Sequence[Job] = ()) -> set[str]:
        """Commits the next attempt of the job (and of the partners it runs
        with as one batch) on the GPU placement chose, and sends them to
        that GPU's agent in one assignment. Returns the ids of the jobs
        bound: not those that moved meanwhile (cancelled, taken), none when
        the agent left."""
        gpu, need = placed.gpu, placed.need
        session = self.cluster.sessions.get(gpu.node_id)
        if session is None:  # it left while the dispatcher was planning
            return set()
        members = [job, *partners]
        written = await asyncio.gather(
            *(
                self.db.write(
                    self.db.store.assign,
                    member.id,
                    expected_attempt=member.attempt,
                    node_id=gpu.node_id,
                    node_name=gpu.node_name,
                    gpu_index=gpu.index,
                    memory_mode=need.mode,
                    placement=placed.explanation,
                    vram_estimate_bytes=need.vram_bytes // len(members),
                )
                for member in members
            )
        )
        batch = [member for member, events in zip(members, written, strict=True) if events]
        for events in written:
            if events:
                self.hub.publish(events)
        if not batch:
            return set()
        gone = self.cluster.sessions.get(gpu.node_id) is not session
        if gone or session.draining:
            # The agent left during the write (its disconnect did not see
            # this attempt), or began draining or leaving (its Drain went
            # out before this assignment could): hand it back here.
            what = "disconnected" if gone else "began draining"
            reason = f"node {gpu.node_name} {what} before the assignment was sent"
            for member in batch:
                await self._requeue(
                    member.id, member.attempt + 1, AttemptOutcome.LOST, reason, failure=False
                )
            return set()
        now, held = self.clock(), self._held.setdefault(session, {})
        for member in batch:
            held[member.id] = bound(member, member.attempt + 1, placed, now, batch)
        lead, *rest = batch
        session.send(
            AssignCommand(
                lead.id,
                lead.attempt + 1,
                lead.spec,
                gpu.index,
                need.mode,
                partners=tuple(BatchPartner(m.id, m.attempt + 1, m.spec) for m in rest),
            )
        )
        for member in batch:
            log.info("job %s attempt %d -> %s", member.id, member.attempt + 1, placed.explanation)
        return {member.id for member in batch}

    async def reattach(self, session: NodeSession, held: Iterable[tuple[str, int]]) -> None:
        """Takes back the attempts a (re)connecting agent still holds and the
        scheduler still expects of it; stops the others. Attempts the
        scheduler expected of it that it no longer holds (it restarted) are
        lost."""
        now, name = self.clock(), session.name
        for job_id, attempt in held:
            orphan = self._orphans.get(job_id)
            if (
                orphan is None
                or orphan.node_id != session.node_id
                or orphan.active.attempt != attempt
            ):
                self._stop_stale(session, job_id, attempt)
            else:
                del self._orphans[job_id]
                active = orphan.active
                active.uploads = UploadBuffer(active.spec)  # the agent replays every image
                active.last_step_at = now  # its progress clock starts again
                self._held.setdefault(session, {})[job_id] = active
                log.info("node %s re-attached job %s attempt %d", name, job_id, attempt)
        for orphan in [o for o in self._orphans.values() if o.node_id == session.node_id]:
            if self._orphans.get(orphan.active.job_id) is not orphan:
                continue  # cancelled or settled during an earlier write
            del self._orphans[orphan.active.job_id]
            active = orphan.active
            await self._requeue(
                active.job_id,
                active.attempt,
                AttemptOutcome.LOST,
                f"node {name} came back without it (the agent restarted)",
                failure=active.started_at is not None,
            )

    # ---- what agents say -----------------------------------------------------

    async def update(self, session: NodeSession, update: AttemptUpdate) -> None:
        """One update from an agent, about an attempt bound to its node. A
        report on any other attempt (a stale one of its own, another node's,
        one that never was) changes nothing: it is refused, logged, and the
        node is told to stop that attempt."""
        job_id, attempt, body = update.job_id, update.attempt, update.body
        active = self.current(session, job_id, attempt)
        if active is None:
            self._refuse(session, job_id, attempt, stop=not isinstance(body, Ended))
            return
        if isinstance(body, Ended):
            # Ending an attempt writes files and commits; a closing stream
            # must not cut that short. It runs as its own task, and the
            # node's disconnect waits for it.
            ending = asyncio.ensure_future(self._ended(session, job_id, attempt, body))
            tasks = self._ending.setdefault(session, set())
            tasks.add(ending)
            ending.add_done_callback(tasks.discard)
            await asyncio.shield(ending)
            return
        now = self.clock()
        if isinstance(body, Progress | Preview):
            problem = report_problem(body)
            if problem:
                active.refused_reports += 1
                if active.refused_reports == 1:  # once an attempt: a rogue sends many
                    log.warning("node %s: %s of %s attempt %d refused: %s", session.name,
                                type(body).__name__, job_id, attempt, problem)  # fmt: skip
                return
            if isinstance(body, Progress):
                active.last_step_at = now
            if not active.stopping:
                self.hub.publish([JobEvent(job_id, 0, attempt, now, body)])
        elif isinstance(body, Started):
            active.started_at = now
            events = await self.db.write(self.db.store.start, job_id, attempt)
            if events is not None:
                self.hub.publish(events)
        elif isinstance(body, ImageChunk):
            try:
                active.uploads.add(body)
            except UploadError as exc:
                # Not the images the job asked for: the attempt fails at once,
                # a failure counted against max_attempts as a crash is. None
                # of it is kept, and what the agent still says of it is dropped.
                log.warning("node %s: upload of %s attempt %d refused: %s", session.name, job_id,
                            attempt, exc)  # fmt: skip
                del self._held[session][job_id]
                self._told.setdefault(session, Told()).add(job_id, attempt)
                reason = f"{session.name}: {exc}"
                await self._requeue(job_id, attempt, AttemptOutcome.FAILED, reason, failure=True)

    async def _ended(self, session: NodeSession, job_id: str, attempt: int, ended: Ended) -> None:
        active = self.current(session, job_id, attempt)
        if active is None:
            return  # stale, or already handled: its slot is free either way
        unsound = unsound_numbers(ended.profile)
        if unsound:
            log.warning("node %s: profile of %s attempt %d dropped: %s", session.name, job_id,
                        attempt, ", ".join(unsound))  # fmt: skip
            ended = replace(ended, profile=AttemptProfile())
        try:
            await self._learn(active, ended)
            reason = ended.reason or ended.outcome.value
            if ended.outcome is AttemptOutcome.SUCCEEDED:
                if not active.stopping:  # else cancelled before it finished: not wanted
                    await self._store_result(session, active, ended.profile)
            else:  # a failure counts; a hand-back or a stop does not
                failed = ended.outcome is AttemptOutcome.FAILED
                await self._requeue(
                    job_id,
                    attempt,
                    AttemptOutcome.FAILED if failed else AttemptOutcome.RELEASED,
                    f"{session.name}: {reason}" if failed else reason,
                    failure=failed,
                    profile=ended.profile,
                )
        finally:
            # The slot frees once the outcome is written (or could not be).
            held = self._held.get(session, {})
            if held.get(job_id) is active:
                del held[job_id]
            self.wake()

    async def _learn(self, active: ActiveAttempt, ended: Ended) -> None:
        """Folds the attempt's measured peak into the VRAM estimates. After
        an out-of-memory the figure rises above what the card had, so the
        retry needs a card with more room or a lower memory mode. Learning
        never keeps the outcome from being written."""
        out_of_memory = ended.outcome is AttemptOutcome.FAILED and ended.error_kind == "oom"
        if not out_of_memory and ended.outcome is not AttemptOutcome.SUCCEEDED:
            return
        try:
            shape = shape_of(active.spec)
            learned = self.estimates.learn(
                shape,
                active.memory_mode,
                out_of_memory=out_of_memory,
                peak_bytes=ended.profile.peak_vram_bytes,
                estimate_bytes=active.vram_bytes,
            )
            if learned is None:
                return
            log.info(
                "learned %s needs %s (%s, %s)",
                shape,
                format_bytes(learned.peak_bytes),
                active.memory_mode.value,
                "out of memory" if out_of_memory else "measured peak",
            )
            await self.db.run(self.db.store.estimates.save, shape.key(active.memory_mode), learned)
        except Exception:
            log.exception("learning from %s attempt %d failed", active.job_id, active.attempt)

    async def _store_result(
        self, session: NodeSession, active: ActiveAttempt, profile: AttemptProfile
    ) -> None:
        job_id, attempt = active.job_id, active.attempt

        async def failed(reason: str) -> None:
            await self._requeue(
                job_id, attempt, AttemptOutcome.FAILED, reason, failure=True, profile=profile
            )

        try:
            images = active.uploads.complete()
        except UploadError as exc:
            await failed(f"{session.name}: {exc}")
            return
        loop = asyncio.get_running_loop()
        stored: list[tuple[ImageInfo, str]] = []
        try:
            for meta, data in images:
                path = await loop.run_in_executor(
                    None, self.images.write, job_id, attempt, meta.index, data
                )
                stored.append((meta, path))
            events = await self.db.write(self.db.store.succeed, job_id, attempt, stored, profile)
        except Exception as exc:  # a full disk, a lost database connection
            log.exception("storing the result of %s attempt %d failed", job_id, attempt)
            await loop.run_in_executor(None, self.images.remove, [path for _, path in stored])
            await failed(f"the scheduler could not store the result: {type(exc).__name__}: {exc}")
            return
        if events is None:  # cancelled meanwhile: the first terminal state won
            await loop.run_in_executor(None, self.images.remove, [path for _, path in stored])
            return
        self.hub.publish(events)

    # ---- stops and verdicts --------------------------------------------------

    async def cancel(self, job_id: str, reason: str) -> bool:
        """Cancels a job in any live state and stops its attempt, wherever it
        is. False when there is no such job; a job that had already ended
        is left as it was."""
        result = await self.db.run(self.db.store.cancel, job_id, reason)
        if result is None:
            return False
        before, events = result
        if events is None:
            return True
        log.info("job %s %s", job_id, reason)
        self.hub.publish(events)
        self._orphans.pop(job_id, None)  # its agent is told if it comes back
        for session, held in self._held.items():
            active = held.get(job_id)
            if active is not None and active.attempt == before.attempt:
                active.stopping = True
                self._stop(session, job_id, active.attempt, reason)
        return True

    async def fence_hung(self, session: NodeSession, active: ActiveAttempt, reason: str) -> None:
        """An attempt that missed its progress deadline: fenced (its agent is
        told to stop it), and its job re-queued as a failure."""
        log.warning("job %s attempt %d fenced: %s", active.job_id, active.attempt, reason)
        self._held.get(session, {}).pop(active.job_id, None)
        self._told.setdefault(session, Told()).add(active.job_id, active.attempt)
        self._stop(session, active.job_id, active.attempt, "missed its progress deadline")
        await self._requeue(
            active.job_id, active.attempt, AttemptOutcome.FAILED, reason, failure=True
        )

    def orphan(self, session: NodeSession, deadline: float, why: str) -> int:
        """Moves what a node holds to the orphans, to wait for its agent to
        come back until `deadline`. Returns how many."""
        held = self._held.pop(session, {})
        for active in held.values():
            self._orphans[active.job_id] = Orphan(
                active, session.node_id, session.name, deadline, why
            )
        return len(held)

    async def node_gone(self, session: NodeSession) -> None:
        """A node's stream ended. A lost node's attempts are lost now; an
        agent whose stream merely dropped may come back for them within its
        lease."""
        ending = self._ending.pop(session, set())
        if ending:
            await asyncio.gather(*ending, return_exceptions=True)
        self._told.pop(session, None)
        if self.closing:
            self._held.pop(session, None)
            return
        if session.lost:
            held = list(self._held.pop(session, {}).values())
            log.info("node %s lost holding %d attempt(s)", session.name, len(held))
            for active in held:
                reason = f"node {session.name} lost: {session.lost}"
                await self._requeue(
                    active.job_id, active.attempt, AttemptOutcome.LOST, reason, failure=True
                )
        else:
            deadline = session.last_heard + self.lease_seconds
            count = self.orphan(session, deadline, f"node {session.name} disconnected")
            log.info("node %s disconnected holding %d attempt(s)", session.name, count)

    async def expire(self, orphan: Orphan) -> None:
        """An orphan whose agent did not come back in time: lost."""
        if self._orphans.get(orphan.active.job_id) is not orphan:
            return  # re-attached or settled meanwhile
        del self._orphans[orphan.active.job_id]
        active = orphan.active
        reason = f"{orphan.why}; not back within the lease"
        await self._requeue(
            active.job_id, active.attempt, AttemptOutcome.LOST, reason, failure=True
        )

    async def recover(self, deadline: float) -> None:
        """After a restart or a change of leader: the jobs that were out on
        agents wait for those agents to reconnect and re-attach them, until
        `deadline`; then they are re-queued as lost."""
        loop = asyncio.get_running_loop()
        for job, record in await self.db.run(self.db.store.active_attempts):
            # An active job has no committed images; files here are from a
            # leader that died between writing a result and committing it.
            await loop.run_in_executor(None, self.images.remove_job, job.id)
            active = ActiveAttempt(
                job_id=job.id,
                attempt=job.attempt,
                gpu_index=job.gpu_index,
                owner=job.owner,
                spec=job.spec,
                memory_mode=record.memory_mode,
                vram_bytes=record.vram_estimate_bytes,
                expected_seconds=0.0,
                assigned_at=record.assigned_at,
                started_at=record.started_at,
            )
            self._orphans[job.id] = Orphan(
                active, job.node_id, job.node_name, deadline, "the scheduler changed leader"
            )
        if self._orphans:
            log.info("waiting for agents to re-attach %d job(s)", len(self._orphans))

    def release_all(self) -> None:
        """This replica stopped leading: it forgets every attempt, which the
        store keeps for the next leader."""
        self._held.clear()
        self._orphans.clear()
        self._told.clear()

    # ---- the few places that write -------------------------------------------

    def _stop(self, session: NodeSession, job_id: str, attempt: int, reason: str) -> None:
        """The one place a stop is sent."""
        session.send(StopCommand(job_id, attempt, reason))

    def _stop_stale(self, session: NodeSession, job_id: str, attempt: int) -> None:
        if self._told.setdefault(session, Told()).add(job_id, attempt):
            log.info("node %s holds stale attempt %s/%d; stopping it", session.name, job_id,
                     attempt)  # fmt: skip
            self._stop(session, job_id, attempt, "stale attempt: the job has moved on")

    def _refuse(self, session: NodeSession, job_id: str, attempt: int, *, stop: bool) -> None:
        """A report on an attempt not bound to this node: one warning, and a
        stop, for each such attempt; nothing else. What a node says after
        it was told an attempt is over is dropped quietly."""
        if not self._told.setdefault(session, Told()).add(job_id, attempt):
            return
        other = holder(self._held, self._orphans, session.node_id, job_id, attempt)
        whose = f"it is bound to node {other}" if other else "it holds no such attempt"
        log.warning("node %s reported on job %s attempt %d, refused: %s", session.name, job_id,
                    attempt, whose)  # fmt: skip
        if stop:
            self._stop(session, job_id, attempt, "stale attempt: not one this node holds")

    async def _requeue(
        self,
        job_id: str,
        attempt: int,
        outcome: AttemptOutcome,
        reason: str,
        *,
        failure: bool,
        profile: AttemptProfile | None = None,
    ) -> None:
        """Ends an attempt that did not succeed and puts its job back in the
        queue, or fails it after max_attempts failures."""
        events = await self.db.write(
            self.db.store.requeue,
            job_id,
            attempt,
            outcome,
            reason,
            count_failure=failure,
            profile=profile,
        )
        if events:
            what = "failed" if events[-1].terminal else "re-queued"
            log.info("job %s attempt %d %s: %s", job_id, attempt, what, reason)
            self.hub.publish(events)
        self.wake()
