"""The job store: jobs, their attempts, events and images.

The `scheduler.store` package is the only place that opens database
connections: this module (with `reads`) for jobs, `nodes` for remembered
nodes and models,
`estimates` for learned VRAM figures, `leader` for the lease and the fence,
`credentials` for keys, join tokens, node credentials and the audit trail,
`inputs` for uploaded input images, `lifecycle` for deleting jobs.

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
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from scheduler.domain import EventBody, Job, JobEvent, StateChange
from scheduler.states import ACTIVE, JobState, sources
from scheduler.store.credentials import CredentialRegistry
from scheduler.store.engine import create_engine, migrate
from scheduler.store.estimates import EstimateRegistry
from scheduler.store.inputs import InputRegistry
from scheduler.store.leader import Fence
from scheduler.store.lifecycle import JobRemoval
from scheduler.store.nodes import NodeRegistry
from scheduler.store.reads import JobReads
from scheduler.store.rows import event_row
from scheduler.store.schema import job_inputs
from scheduler.store.statements import (
    COUNTED_FAILURES,
    END_ATTEMPT,
    FIRST_START,
    INSERT_ATTEMPT,
    INSERT_EVENTS,
    INSERT_IMAGES,
    INSERT_JOBS,
    LAST_FAILURE,
    NEXT_ATTEMPT,
    NOT_LAST_FAILURE,
    ONE_MORE_FAILURE,
    UPDATE_ATTEMPT,
    transition,
)
from sdmesh.domain import AttemptOutcome, AttemptProfile, ImageInfo
from sdmesh.spec import JobSpec, MemoryMode

T = TypeVar("T")


@dataclass(frozen=True)
class Submission:
    job_id: str
    owner: str
    spec: JobSpec
    max_attempts: int


def _job_row(job: Job) -> dict[str, Any]:
    spec = job.spec
    return {
        "id": job.id,
        "owner": job.owner,
        "state": job.state.value,
        "priority": spec.priority,
        "model": spec.model,
        "spec": spec.to_dict(),
        "request_id": spec.request_id or None,
        "attempt": job.attempt,
        "failures": job.failures,
        "max_attempts": job.max_attempts,
        "memory_mode": spec.memory_mode.value,
        "reason": job.reason,
        "last_seq": 1,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


class Store(JobReads):
    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.clock = clock
        # Every write goes through the fence: see scheduler.store.leader.
        self.fence = Fence(self.engine)
        self.nodes = NodeRegistry(self.engine, self.fence, clock)
        self.estimates = EstimateRegistry(self.engine, self.fence, clock)
        self.credentials = CredentialRegistry(self.engine, clock)
        self.removal = JobRemoval(self.engine, self.fence)
        self.inputs = InputRegistry(self.engine, self.fence, clock)

    def write_many(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Runs several writes as one transaction: they commit together, or
        none does (see `scheduler.store.group`)."""
        with self.fence.together():
            return [call() for call in calls]

    def migrate(self) -> None:
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ---- writes ------------------------------------------------------

    def submit(self, job_id: str, owner: str, spec: JobSpec, max_attempts: int) -> tuple[Job, bool]:
        """Stores a new QUEUED job with its first event. With a request id
        already used by this owner, returns that job and False instead."""
        return self.submit_many([Submission(job_id, owner, spec, max_attempts)])[0]

    def submit_many(self, submissions: Sequence[Submission]) -> list[tuple[Job, bool]]:
        """Stores new QUEUED jobs with their first events, all in one
        transaction (group commit: concurrent submits share it). A request
        id this owner already used, in the store or earlier in the batch,
        gives back that job and False."""
        now = self.clock()
        results: list[tuple[Job, bool] | None] = [None] * len(submissions)
        existing = self._by_request_ids(
            {(s.owner, s.spec.request_id) for s in submissions if s.spec.request_id}
        )
        new_jobs: list[Job] = []
        for position, item in enumerate(submissions):
            key = (item.owner, item.spec.request_id)
            if item.spec.request_id and key in existing:
                results[position] = existing[key], False
                continue
            job = Job(
                id=item.job_id,
                owner=item.owner,
                spec=item.spec,
                state=JobState.QUEUED,
                attempt=0,
                failures=0,
                max_attempts=item.max_attempts,
                created_at=now,
                updated_at=now,
                memory_mode=item.spec.memory_mode,
            )
            if item.spec.request_id:
                existing[key] = job
            new_jobs.append(job)
            results[position] = job, True
        if new_jobs:
            try:
                with self.fence.begin() as conn:
                    conn.execute(INSERT_JOBS, [_job_row(job) for job in new_jobs])
                    conn.execute(
                        INSERT_EVENTS,
                        [
                            event_row(job.id, 1, 0, now, StateChange(JobState.QUEUED))
                            for job in new_jobs
                        ],
                    )
                    # Which inputs each job names, so that they stay while
                    # it does (scheduler.store.lifecycle).
                    named = [
                        {"job_id": job.id, "sha256": sha}
                        for job in new_jobs
                        for sha in job.spec.inputs
                    ]
                    if named:
                        conn.execute(sa.insert(job_inputs), named)
            except IntegrityError:
                if len(submissions) == 1:
                    # Two submits with one request id raced; the other committed.
                    item = submissions[0]
                    found = self._by_request_ids({(item.owner, item.spec.request_id)})
                    if not item.spec.request_id or not found:
                        raise
                    return [(next(iter(found.values())), False)]
                # Someone else used one of these request ids meanwhile: one by one.
                return [self.submit_many([item])[0] for item in submissions]
        return [result for result in results if result is not None]

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
        params: dict[str, Any] | None = None,
        reason: str = "",
        before: Sequence[EventBody] = (),
    ) -> list[JobEvent] | None:
        """The one conditional UPDATE every state change goes through. Writes
        the `before` events and then the state event, with consecutive seqs.
        Returns the events, or None when the job was not in a state (or at
        the attempt) that allows the move.

        `values` are plain values or expressions, and `where` conditions,
        from `scheduler.store.statements`: the statement is built once for
        each combination. `params` binds their parameters."""
        allowed = sources(target)
        if from_states is not None:
            allowed = allowed & frozenset(from_states)
        now = self.clock()
        bound: dict[str, Any] = {**(params or {}), "job_id": job_id, "now": now}
        bound.update(seq_step=len(before) + 1, reason=reason)
        if attempt is not None:
            bound["expected_attempt"] = attempt
        sets: list[tuple[str, sa.ColumnElement[Any] | None]] = []
        for name, value in (values or {}).items():
            if isinstance(value, sa.ColumnElement):
                sets.append((name, value))
            else:  # a plain value, bound under its column's name
                sets.append((name, None))
                bound[name] = value
        query = transition(target, allowed, attempt is not None, tuple(where), tuple(sorted(sets)))
        row = conn.execute(query, bound).first()
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
            INSERT_EVENTS,
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
            "attempt_job_id": job_id,
            "attempt_number": attempt,
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
        conn.execute(END_ATTEMPT, values)

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
                    "attempt": NEXT_ATTEMPT,
                    "node_id": node_id,
                    "node_name": node_name,
                    "gpu_index": gpu_index,
                    "memory_mode": memory_mode.value,
                },
            )
            if events is None:
                return None
            conn.execute(
                INSERT_ATTEMPT,
                {
                    "job_id": job_id,
                    "attempt": expected_attempt + 1,
                    "node_id": node_id,
                    "node_name": node_name,
                    "gpu_index": gpu_index,
                    "memory_mode": memory_mode.value,
                    "placement": placement,
                    "vram_estimate_bytes": vram_estimate_bytes or None,
                    # queued_seconds: now minus the time of the event before these
                    "now": now,
                    "event_job_id": job_id,
                    "assigned_seq": events[0].seq,
                    "reason": "",
                    "counted_failure": False,
                    "assigned_at": now,
                },
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
                values={"started_at": FIRST_START},
                params={"first_start": now},
            )
            if events is not None:
                conn.execute(
                    UPDATE_ATTEMPT,
                    {"attempt_job_id": job_id, "attempt_number": attempt, "started_at": now},
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
                INSERT_IMAGES,
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
                    where=[LAST_FAILURE],
                    values={"failures": ONE_MORE_FAILURE},
                    reason=history,
                )
            if events is None:
                events = self._transition(
                    conn,
                    job_id,
                    JobState.QUEUED,
                    attempt=attempt,
                    where=[NOT_LAST_FAILURE] if count_failure else [],
                    values={"failures": ONE_MORE_FAILURE} if count_failure else {},
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
        rows = conn.execute(COUNTED_FAILURES, {"job_id": job_id})
        earlier = [(row.attempt, row.reason) for row in rows]
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
