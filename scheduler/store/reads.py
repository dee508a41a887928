"""The job store's reads: jobs, pages of them, the queue, attempts, events
and images. Each read is one short connection; `Store` adds the writes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from scheduler.domain import AttemptRecord, Job, JobEvent
from scheduler.states import JobState
from scheduler.store.rows import attempt_from_row, event_from_row, image_from_row, job_from_row
from scheduler.store.schema import jobs
from scheduler.store.statements import (
    ACTIVE_ATTEMPTS,
    ACTIVE_JOBS,
    ATTEMPTS_OF_JOB,
    EVENTS_AFTER,
    IMAGE,
    IMAGES_OF_JOB,
    IMAGES_OF_JOBS,
    JOB,
    JOBS_BY_IDS,
    JOBS_BY_REQUEST_IDS,
    QUEUED_IDS,
)
from sdmesh.domain import ImageInfo


class JobReads:
    engine: sa.Engine

    def _jobs(self, conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[Job]:
        ids = [row.id for row in rows]
        by_job: dict[str, list[ImageInfo]] = {job_id: [] for job_id in ids}
        if not ids:
            return []
        if len(ids) == 1:  # get_job's: no IN list to render
            found = conn.execute(IMAGES_OF_JOB, {"job_id": ids[0]})
        else:
            found = conn.execute(IMAGES_OF_JOBS, {"job_ids": ids})
        for image in found:
            by_job[image.job_id].append(image_from_row(image))
        return [job_from_row(row, by_job[row.id]) for row in rows]

    def get_job(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            rows = conn.execute(JOB, {"job_id": job_id}).all()
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

    def queued_jobs(self, per_user: int | None = 200, limit: int | None = 5000) -> list[Job]:
        """The head of each user's queue (by priority, then age), so that one
        user's backlog never hides another user's jobs from the queue policy,
        which orders them; every queued job with no limits."""
        order = (jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
        queued = jobs.c.state == JobState.QUEUED.value
        if per_user is None:
            query = sa.select(jobs).where(queued).order_by(*order).limit(limit)
        else:
            rank = (
                sa.func.row_number()
                .over(partition_by=jobs.c.owner, order_by=order)
                .label("rank_in_user")
            )
            heads = sa.select(jobs, rank).where(queued).subquery()
            query = (
                sa.select(*(heads.c[column.name] for column in jobs.columns))
                .where(heads.c.rank_in_user <= per_user)
                .order_by(heads.c.priority.desc(), heads.c.created_at, heads.c.id)
                .limit(limit)
            )
        with self.engine.connect() as conn:
            return self._jobs(conn, conn.execute(query).all())

    def queued_ids(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(QUEUED_IDS).scalars())

    def jobs_by_ids(self, ids: Iterable[str]) -> list[Job]:
        wanted = list(ids)
        if not wanted:
            return []
        with self.engine.connect() as conn:
            return self._jobs(conn, conn.execute(JOBS_BY_IDS, {"job_ids": wanted}).all())

    def active_jobs(self) -> list[Job]:
        with self.engine.connect() as conn:
            return self._jobs(conn, conn.execute(ACTIVE_JOBS).all())

    def active_attempts(self) -> list[tuple[Job, AttemptRecord]]:
        """Assigned and running jobs, each with its current attempt."""
        with self.engine.connect() as conn:
            records = {row.job_id: attempt_from_row(row) for row in conn.execute(ACTIVE_ATTEMPTS)}
        return [(job, records[job.id]) for job in self.active_jobs() if job.id in records]

    def events_after(self, job_id: str, after_seq: int) -> list[JobEvent]:
        with self.engine.connect() as conn:
            rows = conn.execute(EVENTS_AFTER, {"job_id": job_id, "after": after_seq})
            return [event_from_row(row) for row in rows]

    def image(self, job_id: str, index: int) -> tuple[ImageInfo, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(IMAGE, {"job_id": job_id, "index": index}).first()
        return None if row is None else (image_from_row(row), row.path)

    def attempts(self, job_id: str) -> list[AttemptRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(ATTEMPTS_OF_JOB, {"job_id": job_id})
            return [attempt_from_row(row) for row in rows]

    def _by_request_ids(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Job]:
        if not keys:
            return {}
        by_owner: dict[str, list[str]] = {}
        for owner, request_id in sorted(keys):
            by_owner.setdefault(owner, []).append(request_id)
        with self.engine.connect() as conn:
            rows = [
                row
                for owner, request_ids in by_owner.items()
                for row in conn.execute(
                    JOBS_BY_REQUEST_IDS, {"owner": owner, "request_ids": request_ids}
                )
            ]
            found = self._jobs(conn, rows)
        return {(job.owner, job.spec.request_id): job for job in found}
