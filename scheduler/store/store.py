"""The job store: jobs, their attempts, events and images.

The `scheduler.store` package is the only place that opens database
connections: this module for jobs, `nodes` for remembered nodes and models,
`estimates` for learned VRAM figures, `leader` for the lease and the fence.

Every state change is one conditional UPDATE built from the state machine
(`... WHERE id = ? [AND attempt = ?] AND state IN (sources of the target)`),
committed in the same transaction as its durable event, whose per-job
sequence number comes from the same UPDATE. A write from a stale attempt
matches no row and changes nothing; the caller gets None back.

Methods are synchronous and each is one transaction. The async services run
them on a small thread pool (see `scheduler.store.Database`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from scheduler.domain import AttemptRecord, EventBody, Job, JobEvent, StateChange
from scheduler.states import ACTIVE, JobState, sources
from scheduler.store.engine import create_engine, migrate
from scheduler.store.estimates import EstimateRegistry
from scheduler.store.leader import Fence
from scheduler.store.nodes import NodeRegistry
from scheduler.store.rows import (
    attempt_from_row,
    event_from_row,
    event_row,
    image_from_row,
    job_from_row,
)
from scheduler.store.schema import attempts, images, job_events, jobs
from sdmesh.domain import AttemptOutcome, AttemptProfile, ImageInfo
from sdmesh.spec import JobSpec, MemoryMode


class Store:
    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.clock = clock
        # Every write goes through the fence: see scheduler.store.leader.
        self.fence = Fence(self.engine)
        self.nodes = NodeRegistry(self.engine, self.fence, clock)
        self.estimates = EstimateRegistry(self.engine, self.fence, clock)

    def migrate(self) -> None:
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ---- reads -------------------------------------------------------

    def _jobs(self, conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[Job]:
        ids = [row.id for row in rows]
        by_job: dict[str, list[ImageInfo]] = {job_id: [] for job_id in ids}
        if ids:
            for image in conn.execute(
                sa.select(images).where(images.c.job_id.in_(ids)).order_by(images.c.idx)
            ):
                by_job[image.job_id].append(image_from_row(image))
        return [job_from_row(row, by_job[row.id]) for row in rows]

    def get_job(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).all()
            found = self._jobs(conn, rows)
        return found[0] if found else None

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] = (),
        owner: str = "",
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[Job]:
        """Newest first. `before` is the (created_at, id) of the last job of the
        previous page."""
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        wanted = [state.value for state in states]
        if wanted:
            query = query.where(jobs.c.state.in_(wanted))
        if owner:
            query = query.where(jobs.c.owner == owner)
        if before is not None:
            created_at, job_id = before
            query = query.where(
                sa.or_(
                    jobs.c.created_at < created_at,
                    sa.and_(jobs.c.created_at == created_at, jobs.c.id < job_id),
                )
            )
        with self.engine.connect() as conn:
            return self._jobs(conn, conn.execute(query).all())

    def queued_jobs(self, per_user: int = 200, limit: int = 5000) -> list[Job]:
        """The head of each user's queue (by priority, then age), so that one
        user's backlog never hides another user's jobs from the queue policy,
        which orders them."""
        rank = (
            sa.func.row_number()
            .over(
                partition_by=jobs.c.owner,
                order_by=(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id),
            )
            .label("rank_in_user")
        )
        heads = sa.select(jobs, rank).where(jobs.c.state == JobState.QUEUED.value).subquery()
        query = (
            sa.select(*(heads.c[column.name] for column in jobs.columns))
            .where(heads.c.rank_in_user <= per_user)
            .order_by(heads.c.priority.desc(), heads.c.created_at, heads.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return self._jobs(conn, conn.execute(query).all())

    def active_jobs(self) -> list[Job]:
        query = sa.select(jobs).where(jobs.c.state.in_([state.value for state in ACTIVE]))
        with self.engine.connect() as conn:
            return self._jobs(conn, conn.execute(query).all())

    def active_attempts(self) -> list[tuple[Job, AttemptRecord]]:
        """Assigned and running jobs, each with its current attempt."""
        query = (
            sa.select(attempts)
            .join(
                jobs, sa.and_(jobs.c.id == attempts.c.job_id, jobs.c.attempt == attempts.c.attempt)
            )
            .where(jobs.c.state.in_([state.value for state in ACTIVE]))
        )
        with self.engine.connect() as conn:
            records = {row.job_id: attempt_from_row(row) for row in conn.execute(query)}
        return [(job, records[job.id]) for job in self.active_jobs() if job.id in records]

    def events_after(self, job_id: str, after_seq: int) -> list[JobEvent]:
        query = (
            sa.select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.seq > after_seq)
            .order_by(job_events.c.seq)
        )
        with self.engine.connect() as conn:
            return [event_from_row(row) for row in conn.execute(query)]

    def image(self, job_id: str, index: int) -> tuple[ImageInfo, str] | None:
        query = sa.select(images).where(images.c.job_id == job_id, images.c.idx == index)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else (image_from_row(row), row.path)

    def attempts(self, job_id: str) -> list[AttemptRecord]:
        query = sa.select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.attempt)
        with self.engine.connect() as conn:
            return [attempt_from_row(row) for row in conn.execute(query)]

    # ---- writes ------------------------------------------------------

    def submit(self, job_id: str, owner: str, spec: JobSpec, max_attempts: int) -> tuple[Job, bool]:
        """Stores a new QUEUED job with its first event. With a request id
        already used by this owner, returns that job and False instead."""
        if spec.request_id:
            existing = self._by_request_id(owner, spec.request_id)
            if existing is not None:
                return existing, False
        now = self.clock()
        try:
            with self.fence.begin() as conn:
                conn.execute(
                    sa.insert(jobs).values(
                        id=job_id,
                        owner=owner,
                        state=JobState.QUEUED.value,
                        priority=spec.priority,
                        model=spec.model,
                        spec=spec.to_dict(),
                        request_id=spec.request_id or None,
                        attempt=0,
                        failures=0,
                        max_attempts=max_attempts,
                        memory_mode=spec.memory_mode.value,
                        reason="",
                        last_seq=1,
                        created_at=now,
                        updated_at=now,
                    )
                )
                conn.execute(
                    sa.insert(job_events).values(
                        event_row(job_id, 1, 0, now, StateChange(JobState.QUEUED))
                    )
                )
        except IntegrityError:
            # Two submits with one request id raced; the other one committed.
            existing = self._by_request_id(owner, spec.request_id) if spec.request_id else None
            if existing is None:
                raise
            return existing, False
        job = self.get_job(job_id)
        assert job is not None
        return job, True

    def _by_request_id(self, owner: str, request_id: str) -> Job | None:
        query = sa.select(jobs).where(jobs.c.owner == owner, jobs.c.request_id == request_id)
        with self.engine.connect() as conn:
            found = self._jobs(conn, conn.execute(query).all())
        return found[0] if found else None

    def _transition(
        self,
        conn: sa.Connection,
        job_id: str,
        target: JobState,
        *,
        attempt: int | None,
        from_states: Iterable[JobState] | None = None,
        values: dict[str, Any] | None = None,
        where: Sequence[sa.ColumnElement[bool]] = (),
        reason: str = "",
        before: Sequence[EventBody] = (),
    ) -> list[JobEvent] | None:
        """The one conditional UPDATE every state change goes through. Writes
        the `before` events and then the state event, with consecutive seqs.
        Returns the events, or None when the job was not in a state (or at
        the attempt) that allows the move."""
        allowed = sources(target)
        if from_states is not None:
            allowed = allowed & frozenset(from_states)
        now = self.clock()
        query = (
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state.in_([state.value for state in allowed]))
            .where(*where)
            .values(
                state=target.value,
                reason=reason,
                updated_at=now,
                last_seq=jobs.c.last_seq + len(before) + 1,
                **(values or {}),
            )
            .returning(
                jobs.c.last_seq, jobs.c.attempt, jobs.c.node_id, jobs.c.node_name, jobs.c.gpu_index
            )
        )
        if attempt is not None:
            query = query.where(jobs.c.attempt == attempt)
        if target.terminal:
            query = query.values(finished_at=now)
        row = conn.execute(query).first()
        if row is None:
            return None
        first_seq = row.last_seq - len(before)
        state = StateChange(
            target,
            reason=reason,
            node_id=row.node_id or "",
            node_name=row.node_name or "",
            gpu_index=-1 if row.gpu_index is None else row.gpu_index,
        )
        events = [
            JobEvent(job_id, first_seq + offset, row.attempt, now, body)
            for offset, body in enumerate([*before, state])
        ]
        conn.execute(
            sa.insert(job_events),
            [event_row(e.job_id, e.seq, e.attempt, e.time, e.body) for e in events],
        )
        return events

    def _end_attempt(
        self,
        conn: sa.Connection,
        job_id: str,
        attempt: int,
        outcome: AttemptOutcome,
        reason: str,
        *,
        counted_failure: bool = False,
        profile: AttemptProfile | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "outcome": outcome.value,
            "reason": reason,
            "counted_failure": counted_failure,
            "ended_at": self.clock(),
        }
        if profile is not None:
            values.update(
                load_seconds=profile.load_seconds,
                mean_step_seconds=profile.mean_step_seconds,
                peak_vram_bytes=profile.peak_vram_bytes or None,
            )
        conn.execute(
            sa.update(attempts)
            .where(
                attempts.c.job_id == job_id,
                attempts.c.attempt == attempt,
                attempts.c.outcome.is_(None),
            )
            .values(**values)
        )

    def assign(
        self,
        job_id: str,
        *,
        expected_attempt: int,
        node_id: str,
        node_name: str,
        gpu_index: int,
        memory_mode: MemoryMode,
        placement: str = "",
        vram_estimate_bytes: int = 0,
    ) -> list[JobEvent] | None:
        """QUEUED -> ASSIGNED as attempt expected_attempt + 1, recording why
        it goes there. Fails (None) if the job moved or was assigned since
        it was read."""
        now = self.clock()
        with self.fence.begin() as conn:
            events = self._transition(
                conn,
                job_id,
                JobState.ASSIGNED,
                attempt=expected_attempt,
                values={
                    "attempt": jobs.c.attempt + 1,
                    "node_id": node_id,
                    "node_name": node_name,
                    "gpu_index": gpu_index,
                    "memory_mode": memory_mode.value,
                },
            )
            if events is None:
                return None
            queued_since = conn.execute(
                sa.select(job_events.c.created_at)
                .where(job_events.c.job_id == job_id, job_events.c.seq < events[0].seq)
                .order_by(job_events.c.seq.desc())
                .limit(1)
            ).scalar()
            conn.execute(
                sa.insert(attempts).values(
                    job_id=job_id,
                    attempt=expected_attempt + 1,
                    node_id=node_id,
                    node_name=node_name,
                    gpu_index=gpu_index,
                    memory_mode=memory_mode.value,
                    placement=placement,
                    vram_estimate_bytes=vram_estimate_bytes or None,
                    queued_seconds=None if queued_since is None else now - queued_since,
                    reason="",
                    counted_failure=False,
                    assigned_at=now,
                )
            )
        return events

    def start(self, job_id: str, attempt: int) -> list[JobEvent] | None:
        """ASSIGNED -> RUNNING: the agent's worker picked the attempt up."""
        now = self.clock()
        with self.fence.begin() as conn:
            events = self._transition(
                conn,
                job_id,
                JobState.RUNNING,
                attempt=attempt,
                values={"started_at": sa.func.coalesce(jobs.c.started_at, now)},
            )
            if events is not None:
                conn.execute(
                    sa.update(attempts)
                    .where(attempts.c.job_id == job_id, attempts.c.attempt == attempt)
                    .values(started_at=now)
                )
        return events

    def succeed(
        self,
        job_id: str,
        attempt: int,
        stored: Sequence[tuple[ImageInfo, str]],
        profile: AttemptProfile,
    ) -> list[JobEvent] | None:
        """-> SUCCEEDED with its images, their events and the attempt's
        profile, all in one transaction."""
        now = self.clock()
        with self.fence.begin() as conn:
            events = self._transition(
                conn,
                job_id,
                JobState.SUCCEEDED,
                attempt=attempt,
                before=[image for image, _ in stored],
            )
            if events is None:
                return None
            conn.execute(
                sa.insert(images),
                [
                    {
                        "job_id": job_id,
                        "idx": image.index,
                        "attempt": attempt,
                        "seed": image.seed,
                        "sha256": image.sha256,
                        "size_bytes": image.size_bytes,
                        "width": image.width,
                        "height": image.height,
                        "path": path,
                        "created_at": now,
                    }
                    for image, path in stored
                ],
            )
            self._end_attempt(conn, job_id, attempt, AttemptOutcome.SUCCEEDED, "", profile=profile)
        return events

    def requeue(
        self,
        job_id: str,
        attempt: int,
        outcome: AttemptOutcome,
        reason: str,
        *,
        count_failure: bool,
        profile: AttemptProfile | None = None,
    ) -> list[JobEvent] | None:
        """Ends an active attempt that did not succeed. The job goes back to
        QUEUED, or to FAILED when this failure reaches max_attempts; a
        release does not count as a failure."""
        with self.fence.begin() as conn:
            events: list[JobEvent] | None = None
            if count_failure:
                # Both moves are conditional on the failure count, so two
                # concurrent writers cannot both decide.
                history = self._failure_history(conn, job_id, attempt, reason)
                events = self._transition(
                    conn,
                    job_id,
                    JobState.FAILED,
                    attempt=attempt,
                    from_states=ACTIVE,
                    where=[jobs.c.failures + 1 >= jobs.c.max_attempts],
                    values={"failures": jobs.c.failures + 1},
                    reason=history,
                )
            if events is None:
                events = self._transition(
                    conn,
                    job_id,
                    JobState.QUEUED,
                    attempt=attempt,
                    where=[jobs.c.failures + 1 < jobs.c.max_attempts] if count_failure else [],
                    values={"failures": jobs.c.failures + int(count_failure)},
                    reason=reason,
                )
            if events is None:
                return None
            self._end_attempt(
                conn,
                job_id,
                attempt,
                outcome,
                reason,
                counted_failure=count_failure,
                profile=profile,
            )
        return events

    def _failure_history(self, conn: sa.Connection, job_id: str, attempt: int, reason: str) -> str:
        query = (
            sa.select(attempts.c.attempt, attempts.c.reason)
            .where(attempts.c.job_id == job_id, attempts.c.counted_failure.is_(True))
            .order_by(attempts.c.attempt)
        )
        earlier = [(row.attempt, row.reason) for row in conn.execute(query)]
        lines = [f"attempt {n}: {why}" for n, why in [*earlier, (attempt, reason)]]
        return f"failed {len(lines)} times; " + "; ".join(lines)

    def cancel(self, job_id: str, reason: str) -> tuple[Job, list[JobEvent] | None] | None:
        """-> CANCELLED from any live state. Returns the job as it was before
        and the events, or (job, None) when it had already ended; None when
        there is no such job."""
        for _ in range(10):  # the job can move between the read and the write
            job = self.get_job(job_id)
            if job is None:
                return None
            if job.state.terminal:
                return job, None
            with self.fence.begin() as conn:
                events = self._transition(
                    conn,
                    job_id,
                    JobState.CANCELLED,
                    attempt=job.attempt,
                    from_states=[job.state],
                    reason=reason,
                )
                if events is not None and job.state in ACTIVE:
                    self._end_attempt(conn, job_id, job.attempt, AttemptOutcome.STOPPED, reason)
            if events is not None:
                return job, events
        raise RuntimeError(f"job {job_id} kept changing while being cancelled")

    def fail(self, job_id: str, reason: str) -> list[JobEvent] | None:
        """QUEUED -> FAILED: the job can never run."""
        with self.fence.begin() as conn:
            return self._transition(
                conn,
                job_id,
                JobState.FAILED,
                attempt=None,
                from_states=[JobState.QUEUED],
                reason=reason,
            )
